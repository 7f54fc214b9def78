"""DenseNet121 with a CBAM after each of its four dense blocks (seed 001), and plain DenseNet121.

The backbone is torchvision's DenseNet121 with its module names unchanged, so torchvision and timm
DenseNet121 state dicts load into it key for key; the attention modules are the only extra keys.
``attention="none"`` gives plain DenseNet121 through the same code path (the seed's ablation).
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

#: Dense blocks of DenseNet121 and their output channels (growth 32, layers 6/12/24/16).
DENSE_BLOCKS = {"denseblock1": 256, "denseblock2": 512, "denseblock3": 1024, "denseblock4": 1024}
ATTENTION_PREFIX = "cbam"
# torchvision's old checkpoints name BN/conv inside dense layers "norm.1" instead of "norm1".
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class DenseNetCBAM(nn.Module):
    """DenseNet121 whose ``features`` has ``cbam1..cbam4`` after ``denseblock1..4``.

    Forward: features (ending in ``norm5``), ReLU, global average pooling, linear classifier, as
    in torchvision.  ``attention`` is "cbam", "channel", "spatial" or "none".
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


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


def _build(num_classes: int, in_chans: int, pretrained: bool, attention: str, reduction: int, name: str) -> nn.Module:
    model = DenseNetCBAM(num_classes, in_chans, attention, reduction)
    if pretrained:
        weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
        load_backbone(model, torchvision_state_dict(weights, name))
    return set_cam_layers(model, ["features.norm5"])


@register_model(
    "densenet121_cbam", options={"attention": "cbam", "reduction": CBAM_REDUCTION}, source="seed 001",
    description="DenseNet121 + CBAM (channel then spatial attention) after each dense block",
)
def densenet121_cbam(num_classes: int, in_chans: int, pretrained: bool, attention: str = "cbam",
                     reduction: int = CBAM_REDUCTION) -> nn.Module:
    """Seed 001's DenseNet121-CBAM; ``attention`` in "cbam" | "channel" | "spatial" | "none"."""
    return _build(num_classes, in_chans, pretrained, attention, reduction, "densenet121_cbam")


@register_model("densenet121", source="torchvision (seed 000/001 baseline)",
                description="plain DenseNet121 (the densenet121_cbam code path without attention)")
def densenet121(num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    """Plain DenseNet121: :class:`DenseNetCBAM` with ``attention="none"``."""
    return _build(num_classes, in_chans, pretrained, "none", CBAM_REDUCTION, "densenet121")
