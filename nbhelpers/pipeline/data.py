"""Batches from the preprocessing cache, the augmentation policy, and the one path to model input.

Training, evaluation and Grad-CAM all turn cached uint8 images into model input through
:func:`to_model_input`: scale to [0, 1], augment (training only, with an :class:`AugmentPolicy`),
normalise, and repeat the grey channel to ``in_chans``.  Augmentation runs as batched tensor ops
on whatever device the batch is on, so on a GPU the CPU only copies uint8 bytes.

Normalisation: ImageNet statistics, so pretrained weights see inputs on the scale they were
trained on — mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) for 3 channels (the grey
image repeated in each), and their averages 0.449 / 0.226 for a 1-channel model.

The policies follow seed paper 003 (flips, random rotation, colour and affine jitter).  The
paper gives no ranges, so the numbers in :data:`POLICIES` are ours; saturation and hue jitter
are left out because they do nothing to a grey image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from nbhelpers.pipeline.cache import CachedSplit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: For 1-channel models: the channel averages (timm sums RGB stem weights when in_chans=1).
GRAY_MEAN = sum(IMAGENET_MEAN) / 3
GRAY_STD = sum(IMAGENET_STD) / 3
_U8_MAX = 255.0


@dataclass(frozen=True)
class AugmentPolicy:
    """Random image changes for training, each drawn independently per image in a batch.

    ``hflip`` / ``vflip``: probability of a horizontal / vertical flip.  ``rotate``: maximum
    rotation in degrees (uniform in ±rotate).  ``translate``: maximum shift as a fraction of the
    side.  ``scale``: maximum zoom change (factor uniform in 1±scale).  ``shear``: maximum shear
    in degrees.  ``brightness`` / ``contrast``: maximum relative change (factor uniform in 1±x).
    All geometric changes are combined into one affine warp (one interpolation); the area
    uncovered by the warp is filled black.  A policy with all zeros changes nothing.
    """

    name: str = "off"
    hflip: float = 0.0
    vflip: float = 0.0
    rotate: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    @classmethod
    def from_name(cls, name: str) -> "AugmentPolicy":
        """Return the named policy (``off``, ``light`` or ``paper``); ValueError lists the names."""
        if name not in POLICIES:
            raise ValueError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICIES)}")
        return POLICIES[name]

    @property
    def active(self) -> bool:
        """Whether this policy changes images at all."""
        return any(getattr(self, f.name) for f in fields(self) if f.name != "name")

    @property
    def geometric(self) -> bool:
        return any((self.hflip, self.vflip, self.rotate, self.translate, self.scale, self.shear))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float batch ``x`` (B, C, H, W) in [0, 1]; returns a new batch on the same device.

        Random parameters are drawn on the CPU from ``generator`` (or torch's global RNG), so
        the same seed gives the same augmentation on any device.
        """
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"AugmentPolicy expects a float batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if not self.active:
            return x
        batch = x.shape[0]
        draws = torch.rand(batch, 9, generator=generator).to(x.device)
        if self.geometric:
            theta = self._affine(draws[:, :7], x.dtype)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.brightness or self.contrast:
            bright = 1 + self.brightness * (2 * draws[:, 7] - 1)
            contrast = 1 + self.contrast * (2 * draws[:, 8] - 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast.view(-1, 1, 1, 1) + mean
            x = x * bright.view(-1, 1, 1, 1)
            x = x.clamp(0.0, 1.0)
        return x

    def _affine(self, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-image 2x3 matrices mapping output to input coordinates (affine_grid convention)."""
        sym = 2 * u - 1  # uniform in [-1, 1]
        angle = torch.deg2rad(self.rotate * sym[:, 0])
        shear = torch.deg2rad(self.shear * sym[:, 1])
        zoom = 1 + self.scale * sym[:, 2]
        tx, ty = 2 * self.translate * sym[:, 3], 2 * self.translate * sym[:, 4]  # grid spans [-1, 1]
        flip_x = torch.where(u[:, 5] < self.hflip, -1.0, 1.0)
        flip_y = torch.where(u[:, 6] < self.vflip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # rotation @ shear (x-shear), divided by zoom because the grid maps output -> input.
        a = cos / zoom
        b = (cos * torch.tan(shear) - sin) / zoom
        c = sin / zoom
        d = (sin * torch.tan(shear) + cos) / zoom
        theta = torch.stack(
            [torch.stack([a * flip_x, b * flip_y, tx], dim=1), torch.stack([c * flip_x, d * flip_y, ty], dim=1)], dim=1
        )
        return theta.to(dtype)


#: The named policies.  ``light``: small pose and exposure changes that keep anatomy plausible
#: (no flips: the heart stays on the left).  ``paper``: seed 003's list — horizontal and vertical
#: flips, random rotation, brightness/contrast and affine (shift, zoom, shear) jitter.
POLICIES: dict[str, AugmentPolicy] = {
    "off": AugmentPolicy(name="off"),
    "light": AugmentPolicy(name="light", rotate=5.0, translate=0.05, scale=0.05, brightness=0.1, contrast=0.1),
    "paper": AugmentPolicy(
        name="paper", hflip=0.5, vflip=0.5, rotate=15.0, translate=0.1, scale=0.1, shear=10.0,
        brightness=0.2, contrast=0.2,
    ),
}


def _norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_chans == 1:
        return (GRAY_MEAN,), (GRAY_STD,)
    # Any other channel count: the grey statistics repeated (no pretrained convention exists).
    return (GRAY_MEAN,) * in_chans, (GRAY_STD,) * in_chans


def to_model_input(
    x: torch.Tensor,
    policy: AugmentPolicy | None = None,
    in_chans: int = 3,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn cached uint8 images (B, 1, H, W) — or (B, H, W) — into normalised float model input.

    Scales to [0, 1], applies ``policy`` only when ``train`` is true, normalises with the
    ImageNet statistics (module docstring) and repeats the grey channel to ``in_chans``.
    Returns float32 (B, in_chans, H, W) on ``x``'s device.  ``generator`` seeds the
    augmentation.  Raises ValueError for a non-uint8 or wrongly shaped batch.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"to_model_input expects uint8 images from the cache, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"to_model_input expects (B, 1, H, W) or (B, H, W) grey images, got {tuple(x.shape)}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    mean, std = _norm_stats(in_chans)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    out = x.float()
    if train and policy is not None and policy.active:
        out = policy(out.div_(_U8_MAX), generator)
        scale = 1.0 / std_t
    else:
        scale = 1.0 / (_U8_MAX * std_t)  # fold the [0, 1] scaling into the normalisation
    # One fused multiply-add that also broadcasts the grey channel to in_chans (measured 3x
    # faster on the CPU than expand + subtract + divide).
    return torch.addcmul(-mean_t / std_t, out, scale)


def from_model_input(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of :func:`to_model_input`: float (B, C, H, W) -> grey (B, H, W) in [0, 1].

    For display, e.g. ``pytorch_grad_cam.utils.image.show_cam_on_image``, which wants [0, 1].
    """
    mean, std = _norm_stats(x.shape[1])
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * std_t + mean_t).mean(dim=1).clamp(0.0, 1.0)


def batches(
    split: CachedSplit,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    epoch: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images uint8 (B, 1, H, W), labels int64 (B,))`` from a cached split.

    With ``shuffle`` the order is a permutation drawn from ``(seed, epoch)``, so every epoch
    differs and every run with the same seed repeats.  Rows are read from the memory map in
    sorted order within a batch (the batch keeps its shuffled order), which keeps reads cheap.
    ``device`` moves each batch there (non-blocking from pinned memory on CUDA).
    Raises ValueError for a non-positive ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(split)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    cuda = device is not None and torch.device(device).type == "cuda"
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        sort = np.argsort(idx, kind="stable")
        rows = np.empty((len(idx),) + split.images.shape[1:], dtype=np.uint8)
        rows[sort] = split.images[idx[sort]]
        images = torch.from_numpy(rows).unsqueeze(1)
        labels = torch.from_numpy(split.labels[idx].astype(np.int64, copy=False))
        if device is not None:
            if cuda:
                images, labels = images.pin_memory(), labels.pin_memory()
            images, labels = images.to(device, non_blocking=cuda), labels.to(device, non_blocking=cuda)
        yield images, labels


def num_batches(split: CachedSplit, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields for ``split`` (for progress bars and schedulers)."""
    n = len(split)
    return n // batch_size if drop_last else math.ceil(n / batch_size)


class CachedDataset(torch.utils.data.Dataset):
    """A torch Dataset over one cached split, for code that wants a DataLoader.

    Items are ``(uint8 tensor (1, H, W), int label)``.  It keeps only the file path and opens the
    memory map lazily in each worker process, so DataLoader workers never copy the array.
    """

    def __init__(self, split: CachedSplit) -> None:
        self.images_path = Path(split.path) / f"{split.name}_images.npy"
        self.labels = np.asarray(split.labels, dtype=np.int64)
        self.image_ids = list(split.image_ids)
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return torch.from_numpy(np.array(self._images[index])).unsqueeze(0), int(self.labels[index])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None  # never pickle the mapped array into worker processes
        return state
