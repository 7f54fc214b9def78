"""HiFuse-Tiny: hierarchical fusion of a convolutional and a Swin branch (seed 004, Huo et al. 2022).

Three branches run side by side over four stages (1/4 ... 1/32 of the input):

* local: ConvNeXt-style blocks (3x3 depthwise conv, LayerNorm, point-wise linear, GELU, residual);
* global: Swin Transformer blocks (window 7, shifted every second block) with patch merging;
* fusion: per stage an HFF block fuses the stage's local and global features with the previous
  HFF output -- spatial attention on the local path, channel attention on the global path,
  point-wise projections of the three inputs, an inverted-residual MLP and a shortcut.

Classification pools the last HFF output.  The Swin blocks here pad their input to whole
windows and shrink the window when a feature map is smaller than it, and both branches pad odd
feature maps before downsampling, so the model runs at any input size from 4 px (a test runs
32-250 px, odd sizes too); at 224 px they behave as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ChannelAttention, SpatialAttention
from .registry import register_model, set_cam_layers

TINY_DIMS = (96, 192, 384, 768)
TINY_DEPTHS = (2, 2, 2, 2)
TINY_HEADS = (3, 6, 12, 24)
WINDOW = 7
PATCH = 4  # both branches start with a 4x4, stride-4 patch embedding
MLP_RATIO = 4  # Swin MLP and HFF inverted-residual MLP width
INPUT_SIZE = 224


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LocalBlock(nn.Module):
    """ConvNeXt-style local block on (B, C, H, W): x + GELU(Linear(LN(DWConv3x3(x))))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + self.act(self.pwconv(y)).permute(0, 3, 1, 2)


def _relative_index(window: int, table_window: int) -> torch.Tensor:
    """Index into a (2*table_window-1)^2 bias table for every pair of positions in a ``window`` square."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (table_window - 1)  # (2, N, N), non-negative
    return rel[0] * (2 * table_window - 1) + rel[1]


def _shift_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Attention mask (windows, N, N) that stops tokens rolled in from the opposite edge mixing."""
    region = torch.zeros(height, width, device=device)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[hs, ws] = label
            label += 1
    r = _windows(region[None, :, :, None], window).squeeze(-1)  # (windows, N)
    return (r[:, :, None] != r[:, None, :]).float() * -100.0


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window*window, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unwindow(x: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`."""
    x = x.reshape(b, h // window, w // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int = WINDOW) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)

    def forward(self, x: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, d = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[_relative_index(window, self.window).to(x.device)].permute(2, 0, 1)  # (h, N, N)
        bias = bias.unsqueeze(0)  # (1, heads, N, N), the same for every window
        if mask is not None:  # (windows, N, N); x holds the windows of each image in turn
            windows = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask[None, :, None]).expand(bw // windows, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.heads, n, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(y.transpose(1, 2).reshape(bw, n, d))


class SwinBlock(nn.Module):
    """Swin Transformer block on (B, H, W, C): (shifted) window attention and an MLP, pre-norm, residual."""

    def __init__(self, dim: int, heads: int, shift: bool, window: int = WINDOW) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * MLP_RATIO), nn.GELU(), nn.Linear(dim * MLP_RATIO, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        window = min(self.window, h, w)
        shift = window // 2 if self.shift and min(h, w) > self.window else 0
        y = self.norm1(x)
        ph, pw = (-h) % window, (-w) % window
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        mask = None
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
            mask = _shift_mask(hp, wp, window, shift, x.device)
        y = _unwindow(self.attn(_windows(y, window), window, mask), window, b, hp, wp)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Swin downsampling on (B, H, W, C): concatenate 2x2 neighbours, LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class IRMLP(nn.Module):
    """Inverted-residual MLP: residual 3x3 depthwise conv, then 1x1 expand (x4) and 1x1 project, with BN."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = dim * MLP_RATIO
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.bn1 = nn.BatchNorm2d(dim)
        self.expand = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.BatchNorm2d(hidden))
        self.project = nn.Sequential(nn.Conv2d(hidden, out_dim, 1), nn.BatchNorm2d(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.act(x + self.dwconv(x)))
        return self.project(self.expand(x))


class HFF(nn.Module):
    """Hierarchical feature fusion of one stage: local L, global G and the previous HFF output F.

    L is re-weighted by spatial attention, G by channel attention; 1x1 projections of L, G and
    (the pooled, widened) F are concatenated, normalised and mixed into X.  Then [L', G', X]
    goes through LayerNorm and the IRMLP, and F is added as the shortcut.  Output: (B, dim, H, W).
    """

    def __init__(self, dim: int, prev_dim: int | None) -> None:
        super().__init__()
        self.spatial = SpatialAttention()
        self.channel = ChannelAttention(dim)
        self.w_local = nn.Conv2d(dim, dim, 1)
        self.w_global = nn.Conv2d(dim, dim, 1)
        self.w_prev = nn.Sequential(nn.Conv2d(prev_dim, dim, 1), nn.AvgPool2d(2, ceil_mode=True)) if prev_dim else None
        parts = 3 if prev_dim else 2
        self.mix = nn.Sequential(LayerNorm2d(parts * dim), nn.Conv2d(parts * dim, dim, 1), nn.GELU())
        self.norm = LayerNorm2d(3 * dim)
        self.irmlp = IRMLP(3 * dim, dim)

    def forward(self, local: torch.Tensor, global_: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        parts = [self.w_local(local), self.w_global(global_)]
        shortcut: torch.Tensor | float = 0.0
        if self.w_prev is not None and prev is not None:
            shortcut = self.w_prev(prev)[..., : local.shape[2], : local.shape[3]]
            parts.insert(0, shortcut)
        mixed = self.mix(torch.cat(parts, dim=1))
        fused = torch.cat([self.spatial(local), self.channel(global_), mixed], dim=1)
        return shortcut + self.irmlp(self.norm(fused))


class HiFuse(nn.Module):
    """HiFuse with the given stage widths, depths and heads (Tiny by default)."""

    def __init__(self, num_classes: int = 3, in_chans: int = 3, dims: tuple[int, ...] = TINY_DIMS,
                 depths: tuple[int, ...] = TINY_DEPTHS, heads: tuple[int, ...] = TINY_HEADS) -> None:
        super().__init__()
        self.local_stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], PATCH, PATCH), LayerNorm2d(dims[0]))
        self.local_down = nn.ModuleList(
            nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, 2)) for i in range(1, len(dims))
        )
        self.local_stages = nn.ModuleList(nn.Sequential(*[LocalBlock(d) for _ in range(n)]) for d, n in zip(dims, depths))
        self.global_stem = nn.Conv2d(in_chans, dims[0], PATCH, PATCH)
        self.global_norm = nn.LayerNorm(dims[0])
        self.global_down = nn.ModuleList(PatchMerging(dims[i - 1], dims[i]) for i in range(1, len(dims)))
        self.global_stages = nn.ModuleList(
            nn.Sequential(*[SwinBlock(d, h, shift=bool(j % 2)) for j in range(n)])
            for d, n, h in zip(dims, depths, heads)
        )
        self.fusion = nn.ModuleList(HFF(d, dims[i - 1] if i else None) for i, d in enumerate(dims))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < PATCH:
            raise ValueError(f"HiFuse needs images of at least {PATCH}x{PATCH} px, got {tuple(x.shape[-2:])}")
        local = self.local_stem(x)
        glob = self.global_norm(self.global_stem(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        fused = None
        for i, hff in enumerate(self.fusion):
            if i:
                # Odd maps are padded to even on both branches (patch merging pads too), so the
                # two stay the same size at any input size, not only at multiples of 32.
                local = F.pad(local, (0, local.shape[3] % 2, 0, local.shape[2] % 2))
                local, glob = self.local_down[i - 1](local), self.global_down[i - 1](glob)
            local = self.local_stages[i](local)
            glob = self.global_stages[i](glob)
            fused = hff(local, glob.permute(0, 3, 1, 2), fused)
        return self.head(self.norm(fused.mean(dim=(2, 3))))


@register_model("hifuse_tiny", source="seed 004", image_size=INPUT_SIZE,
                description="HiFuse-T: ConvNeXt-style local + Swin global branches fused by HFF blocks")
def hifuse_tiny(num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    """Seed 004's HiFuse-Tiny.  Raises ValueError for ``pretrained=True``: no ImageNet weights exist for it."""
    if pretrained:
        raise ValueError("hifuse_tiny has no ImageNet weights in timm or torchvision; use pretrained=False")
    model = HiFuse(num_classes, in_chans)
    return set_cam_layers(model, [f"fusion.{len(model.fusion) - 1}"])
