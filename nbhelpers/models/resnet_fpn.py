"""ResNet50 with a feature pyramid and self-attention in its last residual blocks (seed 003, Chen et al. 2022).

The stage outputs conv2_3, conv3_4, conv4_6 and conv5_3 (torchvision's ``layer1..layer4``) feed
an FPN (1x1 laterals, top-down upsampling and addition, 3x3 smoothing).  A non-local
self-attention module sits in the last residual block of conv3, conv4 and conv5, on the residual
branch just before the addition, so each block keeps its input and output sizes.  The classifier
pools every pyramid level and concatenates them.  Switches: ``fpn`` (off: classify from the
pooled conv5 output) and ``attention`` (off: plain bottlenecks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from .attention import AttentionGate
from .pretrained import PretrainedWeightsError, replace_input_conv, torchvision_state_dict
from .registry import register_model, set_cam_layers

STAGE_CHANNELS = (256, 512, 1024, 2048)  # outputs of conv2_x .. conv5_x
ATTENTION_STAGES = ("layer2", "layer3", "layer4")  # conv3, conv4, conv5
FPN_CHANNELS = 256
NONLOCAL_REDUCTION = 2  # the embedding width of theta/phi/g is C / 2, as in Wang et al. 2018


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block: y = x + W(softmax(theta(x)^T phi(x)) g(x)).

    Every position attends to every other.  The output BatchNorm starts at zero, so a new block is
    the identity and pretrained ResNet weights keep their behaviour at the start of training.
    The (B, HW, HW) attention matrix passes through an :class:`AttentionGate`.
    """

    def __init__(self, channels: int, reduction: int = NONLOCAL_REDUCTION) -> None:
        super().__init__()
        inner = channels // reduction
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        self.gate = AttentionGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        k = self.phi(x).flatten(2)  # (B, C', HW)
        v = self.g(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        attn = self.gate(torch.softmax(q @ k, dim=-1))
        y = (attn @ v).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out(y)


class AttentionBottleneck(nn.Module):
    """A torchvision Bottleneck with a :class:`NonLocal` on its residual branch before the addition."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.block = block
        self.attention = NonLocal(block.bn3.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        identity = x if b.downsample is None else b.downsample(x)
        y = b.relu(b.bn1(b.conv1(x)))
        y = b.relu(b.bn2(b.conv2(y)))
        y = self.attention(b.bn3(b.conv3(y)))
        return b.relu(y + identity)


class FPN(nn.Module):
    """Feature pyramid: laterals to ``channels``, top-down nearest upsampling and sum, 3x3 smoothing."""

    def __init__(self, in_channels: tuple[int, ...] = STAGE_CHANNELS, channels: int = FPN_CHANNELS) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 2, -1, -1):  # coarse to fine
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        return [conv(p) for conv, p in zip(self.smooth, laterals)]


class ResNetFPNAttention(nn.Module):
    """torchvision ResNet50 backbone (``self.backbone``), optional FPN and non-local blocks, linear head."""

    def __init__(self, num_classes: int = 3, in_chans: int = 3, fpn: bool = True, attention: bool = True) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet50(weights=None)
        self.backbone.fc = nn.Identity()
        self.use_attention = attention
        if attention:
            for stage in ATTENTION_STAGES:
                layer = getattr(self.backbone, stage)
                layer[-1] = AttentionBottleneck(layer[-1])
        self.fpn = FPN() if fpn else None
        features = FPN_CHANNELS * len(STAGE_CHANNELS) if fpn else STAGE_CHANNELS[-1]
        self.classifier = nn.Linear(features, num_classes)
        self.set_in_chans(in_chans)

    def set_in_chans(self, in_chans: int) -> None:
        """Replace the stem conv so it takes ``in_chans`` channels (adapting its current weights)."""
        self.backbone.conv1 = replace_input_conv(self.backbone.conv1, in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.backbone
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        c2 = r.layer1(x)
        c3 = r.layer2(c2)
        c4 = r.layer3(c3)
        c5 = r.layer4(c4)
        levels = self.fpn([c2, c3, c4, c5]) if self.fpn is not None else [c5]
        pooled = torch.cat([F.adaptive_avg_pool2d(p, 1).flatten(1) for p in levels], dim=1)
        return self.classifier(pooled)


def load_resnet_backbone(model: ResNetFPNAttention, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a torchvision ResNet50 ``state_dict`` (3-channel stem) into ``model.backbone``.

    Blocks wrapped with attention hold the original block as ``.block``, so their keys are renamed.
    Raises :class:`PretrainedWeightsError` when backbone keys do not fit.
    """
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        stage, _, rest = key.partition(".")
        if model.use_attention and stage in ATTENTION_STAGES:
            index, _, tail = rest.partition(".")
            if int(index) == len(getattr(model.backbone, stage)) - 1:
                key = f"{stage}.{index}.block.{tail}"
        renamed[key] = value
    in_chans = model.backbone.conv1.in_channels
    model.set_in_chans(3)
    result = model.backbone.load_state_dict(renamed, strict=False)
    model.set_in_chans(in_chans)
    missing = [k for k in result.missing_keys if ".attention." not in k]
    if missing or result.unexpected_keys:
        raise PretrainedWeightsError(
            f"ResNet50 weights do not fit the resnet50_fpn_attn backbone: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


@register_model("resnet50_fpn_attn", options={"fpn": True, "attention": True}, source="seed 003",
                description="ResNet50 + FPN over conv2-5 + non-local attention in the last block of conv3-5")
def resnet50_fpn_attn(num_classes: int, in_chans: int, pretrained: bool, fpn: bool = True,
                      attention: bool = True) -> nn.Module:
    """Seed 003's improved ResNet50; ``fpn`` and ``attention`` switch its two additions."""
    model = ResNetFPNAttention(num_classes, 3 if pretrained else in_chans, fpn, attention)
    if pretrained:
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        load_resnet_backbone(model, torchvision_state_dict(weights, "resnet50_fpn_attn"))
        model.set_in_chans(in_chans)
    # Every pyramid level feeds the classifier, so Grad-CAM averages the maps of all four.
    cam = [f"fpn.smooth.{i}" for i in range(len(STAGE_CHANNELS))] if fpn else ["backbone.layer4"]
    return set_cam_layers(model, cam)
