"""Attention blocks shared by the seed models: CBAM's channel and spatial attention, ECA and MSCAM.

Every block multiplies its input by a map squashed into (0, 1).  That map passes through an
:class:`AttentionGate` (an identity module), so :func:`nbhelpers.models.attention_maps` can collect
the maps of any model with forward hooks, without the blocks keeping state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: CBAM's reduction ratio r of the shared channel MLP (Woo et al. 2018; seed 001 uses 16).
CBAM_REDUCTION = 16
#: CBAM's spatial-attention kernel: a 7x7 conv over the channel-average and channel-max maps.
SPATIAL_KERNEL = 7
#: ECA picks its 1-D kernel size from the channel count C as |log2(C)/gamma + b/gamma|, made odd.
ECA_GAMMA, ECA_B = 2, 1
#: MSCAM's bottleneck ratio r of its point-wise convs (Dai et al. 2021 use 4).
MSCAM_REDUCTION = 4
#: Bottlenecks never shrink below this many channels, so tiny test widths still work.
MIN_HIDDEN = 8


class AttentionGate(nn.Identity):
    """Marks an attention map (values in (0, 1)) so forward hooks can find it; computes nothing."""


def _hidden(channels: int, reduction: int) -> int:
    return max(channels // reduction, MIN_HIDDEN)


class ChannelAttention(nn.Module):
    """CBAM channel attention: sigma(MLP(avgpool F) + MLP(maxpool F)) re-weights each channel.

    The MLP is shared by both descriptors (two 1x1 convs, C -> C/r -> C).  Input and output are
    (B, C, H, W); the map is (B, C, 1, 1).
    """

    def __init__(self, channels: int, reduction: int = CBAM_REDUCTION) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"CBAM reduction must be >= 1, got {reduction}")
        hidden = _hidden(channels, reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.gate = AttentionGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * self.gate(torch.sigmoid(avg + mx))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: sigma(conv7x7([mean_c F; max_c F])) re-weights each position.

    Input and output are (B, C, H, W); the map is (B, 1, H, W).
    """

    def __init__(self, kernel_size: int = SPATIAL_KERNEL) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.gate = AttentionGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(torch.sigmoid(self.conv(pooled)))


CBAM_MODES = ("cbam", "channel", "spatial", "none")


class CBAM(nn.Module):
    """Convolutional block attention module: channel attention, then spatial attention.

    ``mode`` switches the seed-001 ablations: "cbam" (both), "channel", "spatial" or "none"
    (identity, no parameters).  Raises ValueError for any other mode.
    """

    def __init__(self, channels: int, mode: str = "cbam", reduction: int = CBAM_REDUCTION) -> None:
        super().__init__()
        if mode not in CBAM_MODES:
            raise ValueError(f"attention={mode!r} is not a CBAM mode; choose one of {CBAM_MODES}")
        self.channel = ChannelAttention(channels, reduction) if mode in ("cbam", "channel") else nn.Identity()
        self.spatial = SpatialAttention() if mode in ("cbam", "spatial") else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


def eca_kernel_size(channels: int, gamma: int = ECA_GAMMA, b: int = ECA_B) -> int:
    """Return ECA's adaptive 1-D kernel size for ``channels`` (odd, at least 3)."""
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return max(k if k % 2 else k + 1, 3)


class ECA(nn.Module):
    """Efficient channel attention: GAP, a 1-D conv across neighbouring channels, sigmoid.

    No dimensionality reduction (unlike SE/CBAM), so it adds only k parameters.  Input and output
    are (B, C, H, W); the map is (B, C, 1, 1).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.gate = AttentionGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))  # (B, C)
        y = self.conv(y.unsqueeze(1)).squeeze(1)  # neighbouring channels interact
        return x * self.gate(torch.sigmoid(y)[:, :, None, None])


def _pw_bottleneck(channels: int, hidden: int) -> nn.Sequential:
    """PWConv-BN-ReLU-PWConv-BN, the body of both MSCAM branches."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
    )


class MSCAM(nn.Module):
    """Multi-scale channel attention: X' = X * sigma(L(X) + g(X)) (seed 000, eqs. 6-8).

    g is the global branch (GAP, then the point-wise bottleneck; map (B, C, 1, 1)), L the local
    branch (the same bottleneck at every position; map (B, C, H, W)).  The sum broadcasts, so the
    gate is (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = MSCAM_REDUCTION) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.global_branch = nn.Sequential(nn.AdaptiveAvgPool2d(1), _pw_bottleneck(channels, hidden))
        self.local_branch = _pw_bottleneck(channels, hidden)
        self.gate = AttentionGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(torch.sigmoid(self.local_branch(x) + self.global_branch(x)))
