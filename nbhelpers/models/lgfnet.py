"""LGFNet: seed 000's lightweight dual-branch net fusing local and global features (Song et al. 2023).

Each of four stages (seed 000, Table 1) downsamples, then runs two branches in parallel on the
same features: a local branch of conv blocks (inverted residual, 5x5 depthwise conv, ECA) and a
global block in the style of MobileViT (local conv, unfold into patches, multi-head
self-attention, fold).  A fusion block adds the two and re-weights the sum with MSCAM.  Global
average pooling and a linear layer classify.  The paper trains at 448x448.

The paper's ablation rows (2)-(5) of Table 5 are the ``variant`` option; its row (1) is the real
MobileNetV2 (the ``mobilenetv2`` model), which the ``local_only`` variant is not: it keeps this
net's stage widths and depths and drops the global branch.

========== ============================================================ ====================
variant    what it builds                                               Table 5 row
========== ============================================================ ====================
local_only  local branch only, plain MobileNetV2-style blocks (3x3,     (none: the paper's
            no ECA), on this net's stage widths                          (1) is MobileNetV2)
dual        both branches, global block without MSA, fusion = sum       (2) basic network
dual_mscam  ``dual`` with MSCAM in the fusion block                     (3) + MSCAM
dual_msa    ``dual`` with MSA in the global block                       (4) + MSA
full        MSCAM and MSA (the proposed model)                          (5) + MSCAM + MSA
========== ============================================================ ====================

Without MSA the global block keeps its convs, unfold/fold and the transformer's feed-forward
layers, so the ``msa`` switch isolates exactly the self-attention.  Widths and depths are not all
legible in the paper's Table 1; the values below keep its stage resolutions and first two widths
(112x112x48, 56x56x96) and are chosen so the full model lands near its 3.6 M params / 3.7 GMACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ECA, MSCAM
from .registry import register_model, set_cam_layers


@dataclass(frozen=True)
class Stage:
    """One row of Table 1: output channels, conv blocks, transformer width and depth."""

    channels: int
    conv_blocks: int
    dim: int
    depth: int


#: Four stages at 1/4, 1/8, 1/16 and 1/32 of the input (112, 56, 28, 14 px at 448).
STAGES: tuple[Stage, ...] = (
    Stage(48, 2, 48, 1),
    Stage(96, 2, 96, 1),
    Stage(160, 3, 128, 2),
    Stage(224, 2, 192, 2),
)
STEM_CHANNELS = 16
EXPANSION = 3  # inverted-residual width multiplier (3 rather than MobileViT's 4 keeps the paper's budget)
LOCAL_KERNEL = 5  # the paper enlarges MobileNetV2's 3x3 depthwise kernel to 5x5
MOBILENETV2_KERNEL = 3
PATCH = 2  # unfold patch size (pixels per side), as in MobileViT
HEADS = 4
MLP_RATIO = 2
INPUT_SIZE = 448

VARIANTS: dict[str, dict[str, bool]] = {
    "local_only": {"dual": False, "mscam": False, "msa": False},
    "dual": {"dual": True, "mscam": False, "msa": False},
    "dual_mscam": {"dual": True, "mscam": True, "msa": False},
    "dual_msa": {"dual": True, "mscam": False, "msa": True},
    "full": {"dual": True, "mscam": True, "msa": True},
}


def conv_bn_act(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ SiLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand, kxk depthwise (optionally ECA), 1x1 project; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = LOCAL_KERNEL, eca: bool = True,
                 expansion: int | None = None) -> None:
        super().__init__()
        hidden = cin * (expansion or EXPANSION)
        self.expand = conv_bn_act(cin, hidden)
        self.depthwise = conv_bn_act(hidden, hidden, kernel, stride, groups=hidden)
        self.eca = ECA(hidden) if eca else nn.Identity()
        self.project = conv_bn_act(hidden, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.eca(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MSA(nn.Module):
    """Multi-head self-attention over tokens (B, N, d): softmax(QK^T / sqrt(d_h)) V, then a projection."""

    def __init__(self, dim: int, heads: int = HEADS) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer; ``msa=False`` keeps only the feed-forward half (the ablation)."""

    def __init__(self, dim: int, msa: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if msa else nn.Identity()
        self.attn = MSA(dim) if msa else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * MLP_RATIO), nn.SiLU(), nn.Linear(dim * MLP_RATIO, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def unfold(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, d, H, W) -> (B * patch^2, H*W / patch^2, d): one token sequence per pixel position in a patch.

    Attention then runs among the patches for each of the patch^2 positions, as in MobileViT.
    """
    b, d, h, w = x.shape
    x = x.reshape(b, d, h // patch, patch, w // patch, patch)
    return x.permute(0, 3, 5, 2, 4, 1).reshape(b * patch * patch, (h // patch) * (w // patch), d)


def fold(tokens: torch.Tensor, batch: int, height: int, width: int, patch: int = PATCH) -> torch.Tensor:
    """Inverse of :func:`unfold`: tokens back to a (B, d, H, W) feature map."""
    d = tokens.shape[-1]
    x = tokens.reshape(batch, patch, patch, height // patch, width // patch, d)
    return x.permute(0, 5, 3, 1, 4, 2).reshape(batch, d, height, width)


class GlobalBlock(nn.Module):
    """MobileViT-style block: 3x3 conv, 1x1 to width d, unfold, transformer layers, fold, 1x1 back to C."""

    def __init__(self, channels: int, dim: int, depth: int, msa: bool = True) -> None:
        super().__init__()
        self.local = nn.Sequential(conv_bn_act(channels, channels, 3), nn.Conv2d(channels, dim, 1, bias=False))
        self.transformer = nn.Sequential(*[TransformerLayer(dim, msa) for _ in range(depth)], nn.LayerNorm(dim))
        self.proj = conv_bn_act(dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        b, _, h, w = y.shape
        # Sizes not divisible by the patch are resized up and back, as MobileViT does.
        ph, pw = -(-h // PATCH) * PATCH, -(-w // PATCH) * PATCH
        if (ph, pw) != (h, w):
            y = F.interpolate(y, size=(ph, pw), mode="bilinear", align_corners=False)
        y = fold(self.transformer(unfold(y)), b, ph, pw)
        if (ph, pw) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return self.proj(y)


class FusionBlock(nn.Module):
    """Sum of the local and global branches, re-weighted by MSCAM when ``mscam`` is on."""

    def __init__(self, channels: int, mscam: bool = True) -> None:
        super().__init__()
        self.mscam = MSCAM(channels) if mscam else nn.Identity()

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        return self.mscam(local + global_)


class LGFStage(nn.Module):
    """Downsample, then the local branch and (if ``dual``) the global branch, then the fusion block."""

    def __init__(self, cin: int, stage: Stage, dual: bool, mscam: bool, msa: bool) -> None:
        super().__init__()
        kernel, eca = (LOCAL_KERNEL, True) if dual else (MOBILENETV2_KERNEL, False)
        self.downsample = InvertedResidual(cin, stage.channels, stride=2, kernel=MOBILENETV2_KERNEL, eca=False)
        self.local = nn.Sequential(*[InvertedResidual(stage.channels, stage.channels, 1, kernel, eca)
                                     for _ in range(stage.conv_blocks)])
        self.global_ = GlobalBlock(stage.channels, stage.dim, stage.depth, msa) if dual else None
        self.fusion = FusionBlock(stage.channels, mscam) if dual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.global_ is None:
            return self.local(x)
        return self.fusion(self.local(x), self.global_(x))


class LGFNet(nn.Module):
    """Seed 000's network: stem, four :class:`LGFStage`, global average pooling, linear classifier."""

    def __init__(self, num_classes: int = 3, in_chans: int = 3, variant: str = "full",
                 stages: tuple[Stage, ...] = STAGES) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"lgfnet variant={variant!r} is unknown; choose one of {tuple(VARIANTS)}")
        switches = VARIANTS[variant]
        self.variant = variant
        self.stem = conv_bn_act(in_chans, STEM_CHANNELS, 3, stride=2)
        blocks, cin = [], STEM_CHANNELS
        for stage in stages:
            blocks.append(LGFStage(cin, stage, **switches))
            cin = stage.channels
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("lgfnet", options={"variant": "full"}, source="seed 000", image_size=INPUT_SIZE,
                description="dual-branch local (IR 5x5 + ECA) / global (MobileViT MSA) net fused by MSCAM")
def lgfnet(num_classes: int, in_chans: int, pretrained: bool, variant: str = "full") -> nn.Module:
    """Seed 000's LGFNet; ``variant`` picks an ablation row (see the module docstring).

    Raises ValueError for ``pretrained=True``: the paper trains it from scratch and publishes no weights.
    """
    if pretrained:
        raise ValueError("lgfnet has no pretrained weights (seed 000 trains it from scratch); use pretrained=False")
    model = LGFNet(num_classes, in_chans, variant)
    last = len(model.stages) - 1
    layer = f"stages.{last}.fusion" if model.stages[last].fusion is not None else f"stages.{last}.local"
    return set_cam_layers(model, [layer])
