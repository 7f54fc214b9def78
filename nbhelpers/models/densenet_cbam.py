"""DenseNet121 with a CBAM after each of its four dense blocks (seed 001), and plain DenseNet121.

The backbone is torchvision's DenseNet121 with its module names unchanged, so torchvision and timm
DenseNet121 state dicts load into it key for key; the attention modules are the only extra keys.
``attention="none"`` gives plain DenseNet121 through the same code path (the seed's ablation).
``pretrained`` is True (ImageNet, torchvision's weights) or ``"xrv:NAME"`` (torchxrayvision's
chest X-ray weights, :mod:`.xrv`, with :class:`.xrv.XrvInput` rescaling the input).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .attention import CBAM, CBAM_REDUCTION
from .pretrained import PretrainedWeightsError, adapt_input_weight, replace_input_conv, torchvision_state_dict
from .registry import register_model, set_cam_layers
from .xrv import XrvInput, spread_first_conv, xrv_backbone_state_dict, xrv_weights_name

#: Dense blocks of DenseNet121 and their output channels (growth 32, layers 6/12/24/16).
DENSE_BLOCKS = {"denseblock1": 256, "denseblock2": 512, "denseblock3": 1024, "denseblock4": 1024}
ATTENTION_PREFIX = "cbam"
# torchvision's old checkpoints name BN/conv inside dense layers "norm.1" instead of "norm1".
#: The weights these models start from besides none: ImageNet (pretrained=True) and torchxrayvision's.
WEIGHT_SOURCES = ("imagenet", "xrv")
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class DenseNetCBAM(nn.Module):
    """DenseNet121 whose ``features`` has ``cbam1..cbam4`` after ``denseblock1..4``.

    Forward: ``input_map`` (None, or :class:`.xrv.XrvInput` for torchxrayvision weights),
    features (ending in ``norm5``), ReLU, global average pooling, linear classifier, as in
    torchvision.  ``attention`` is "cbam", "channel", "spatial" or "none".  Loading a state dict
    that holds ``input_map`` buffers installs the input map, and one without them removes it, so
    a checkpoint rebuilds the model it was saved from.
    """

    def __init__(self, num_classes: int = 3, in_chans: int = 3, attention: str = "cbam",
                 reduction: int = CBAM_REDUCTION) -> None:
        super().__init__()
        base = torchvision.models.densenet121(weights=None)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in base.features.named_children():
            layers[name] = replace_input_conv(module, in_chans) if name == "conv0" else module
            if name in DENSE_BLOCKS:
                index = name.removeprefix("denseblock")
                layers[f"{ATTENTION_PREFIX}{index}"] = CBAM(DENSE_BLOCKS[name], attention, reduction)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(base.classifier.in_features, num_classes)
        self.attention = attention
        self.input_map: XrvInput | None = None  # no module at all unless xrv weights need it
        self.register_load_state_dict_pre_hook(_match_input_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_map is not None:
            x = self.input_map(x)
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _match_input_map(model: DenseNetCBAM, state_dict: dict[str, torch.Tensor], prefix: str, *args) -> None:
    """Install or remove ``model.input_map`` as ``state_dict`` holds its buffers or not (a load
    hook: it runs before the children load, so the buffers find their module)."""
    scale = state_dict.get(f"{prefix}input_map.scale")
    if scale is not None and not isinstance(model.input_map, XrvInput):
        weight = model.features.conv0.weight
        model.input_map = XrvInput(scale.shape[1]).to(device=weight.device, dtype=weight.dtype)
    elif scale is None and isinstance(model.input_map, XrvInput):
        model.input_map = None


def backbone_state_dict(state_dict: dict[str, torch.Tensor], in_chans: int = 3) -> dict[str, torch.Tensor]:
    """Map a torchvision or timm DenseNet121 ``state_dict`` onto the backbone of :class:`DenseNetCBAM`.

    Renames torchvision's legacy dense-layer keys, drops the ImageNet classifier and adapts the
    first conv to ``in_chans``.  Returns a new dict; the input is not changed.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            continue
        match = _LEGACY_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    if "features.conv0.weight" in out:
        out["features.conv0.weight"] = adapt_input_weight(out["features.conv0.weight"], in_chans)
    return out


def load_backbone(model: DenseNetCBAM, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a DenseNet121 ``state_dict`` into ``model``'s backbone; only attention and classifier stay new.

    Raises :class:`PretrainedWeightsError` listing the keys that did not fit.
    """
    in_chans = model.features.conv0.in_channels
    result = model.load_state_dict(backbone_state_dict(state_dict, in_chans), strict=False)
    missing = [k for k in result.missing_keys
               if not k.startswith("classifier.") and f".{ATTENTION_PREFIX}" not in f".{k}"]
    if missing or result.unexpected_keys:
        raise PretrainedWeightsError(
            "DenseNet121 weights do not fit the densenet121_cbam backbone: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def load_xrv_backbone(model: DenseNetCBAM, weights: str, name: str) -> DenseNetCBAM:
    """Start ``model``'s backbone from torchxrayvision weights ``weights`` (their 1-channel first
    conv spread over ``in_chans`` as ``w / in_chans``) and put :class:`.xrv.XrvInput` in front, so
    the features see torchxrayvision's pixel scale.  Returns ``model``; raises
    :class:`PretrainedWeightsError` when the file cannot be had or does not fit."""
    state_dict = xrv_backbone_state_dict(weights, name)
    in_chans = model.features.conv0.in_channels
    state_dict["features.conv0.weight"] = spread_first_conv(state_dict["features.conv0.weight"], in_chans)
    load_backbone(model, state_dict)
    model.input_map = XrvInput(in_chans)
    return model


def _build(num_classes: int, in_chans: int, pretrained: bool | str, attention: str, reduction: int,
           name: str) -> nn.Module:
    model = DenseNetCBAM(num_classes, in_chans, attention, reduction)
    xrv_weights = xrv_weights_name(pretrained)
    if xrv_weights is not None:
        load_xrv_backbone(model, xrv_weights, name)
    elif pretrained:
        weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
        load_backbone(model, torchvision_state_dict(weights, name))
    return set_cam_layers(model, ["features.norm5"])


@register_model(
    "densenet121_cbam", options={"attention": "cbam", "reduction": CBAM_REDUCTION}, source="seed 001",
    description="DenseNet121 + CBAM (channel then spatial attention) after each dense block", weights=WEIGHT_SOURCES,
)
def densenet121_cbam(num_classes: int, in_chans: int, pretrained: bool | str, attention: str = "cbam",
                     reduction: int = CBAM_REDUCTION) -> nn.Module:
    """Seed 001's DenseNet121-CBAM; ``attention`` in "cbam" | "channel" | "spatial" | "none"."""
    return _build(num_classes, in_chans, pretrained, attention, reduction, "densenet121_cbam")


@register_model("densenet121", source="torchvision (seed 000/001 baseline)",
                description="plain DenseNet121 (the densenet121_cbam code path without attention)", weights=WEIGHT_SOURCES)
def densenet121(num_classes: int, in_chans: int, pretrained: bool | str) -> nn.Module:
    """Plain DenseNet121: :class:`DenseNetCBAM` with ``attention="none"``."""
    return _build(num_classes, in_chans, pretrained, "none", CBAM_REDUCTION, "densenet121")
