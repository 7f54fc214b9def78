"""Small pictures of the preprocessing choices, for notebook 02 and for anyone tuning them.

Each ``*_variants`` / ``augment_examples`` function returns plain uint8 arrays (easy to test and
to save); each ``plot_*`` function draws them and returns the matplotlib Figure, so a notebook
cell is one line and ``fig.savefig(...)`` writes the figure to ``results/``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from nbhelpers.pipeline.data import AugmentPolicy, from_model_input, to_model_input
from nbhelpers.pipeline.preprocess import DEFAULT_TILE_GRID, RESIZE_MODES, PreprocessConfig, clahe, enhance, resize

#: Clip limits shown side by side by default (1 = mild, 2 = the profiles' default, 4 = strong).
DEFAULT_CLIP_LIMITS = (1.0, 2.0, 4.0)
#: Inches per image panel in the figures.
PANEL_INCHES = 2.6
HIST_BINS = 64
_U8_LEVELS = 256


def clahe_variants(
    img: np.ndarray, clip_limits: Sequence[float] = DEFAULT_CLIP_LIMITS, tile_grid: int = DEFAULT_TILE_GRID
) -> dict[str, np.ndarray]:
    """``{"original": img, "clip 1.0": ..., ...}``: ``img`` enhanced at each clip limit."""
    out = {"original": img}
    out.update({f"clip {c:g}": clahe(img, c, tile_grid) for c in clip_limits})
    return out


def resize_variants(img: np.ndarray, size: int, modes: Sequence[str] = RESIZE_MODES) -> dict[str, np.ndarray]:
    """``{mode: (size, size) uint8}`` for each resize mode (letterbox, stretch, crop)."""
    return {mode: resize(img, size, mode) for mode in modes}


def augment_examples(img: np.ndarray, policy: AugmentPolicy, n: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` augmented copies of one prepared uint8 image (H, W), returned as uint8 (n, H, W).

    Goes through :func:`nbhelpers.pipeline.data.to_model_input` exactly as training does, then undoes
    the normalisation, so the pictures show what the model is fed.
    """
    batch = torch.from_numpy(np.array(img, copy=True)).expand(n, 1, -1, -1)  # a writable copy
    gen = torch.Generator().manual_seed(seed)
    shown = from_model_input(to_model_input(batch, policy, in_chans=3, train=True, generator=gen))
    return (shown.numpy() * (_U8_LEVELS - 1)).round().astype(np.uint8)


def _grid(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def plot_images(images: Mapping[str, np.ndarray], ncols: int = 4, title: str | None = None) -> Figure:
    """Draw grey uint8 images in a grid, each titled by its key (:func:`nbhelpers.evaluation.plots.image_grid`)."""
    from nbhelpers.evaluation.plots import image_grid

    ncols = max(1, min(ncols, len(images)))
    return image_grid(list(images.values()), list(images), ncols=ncols, size=PANEL_INCHES, title=title)


def plot_clahe_grid(
    images: Mapping[str, np.ndarray],
    clip_limits: Sequence[float] = DEFAULT_CLIP_LIMITS,
    tile_grid: int = DEFAULT_TILE_GRID,
) -> Figure:
    """One row per named image (e.g. one per class): the original, then CLAHE at each clip limit."""
    fig, axes = _grid(len(images), 1 + len(clip_limits))
    for row, (name, img) in enumerate(images.items()):
        for col, (label, im) in enumerate(clahe_variants(img, clip_limits, tile_grid).items()):
            ax = axes[row, col]
            ax.imshow(im, cmap="gray", vmin=0, vmax=_U8_LEVELS - 1)
            ax.set_title(f"{name}: {label}" if col == 0 else label, fontsize=9)
    fig.suptitle(f"CLAHE, {tile_grid}x{tile_grid} tiles")
    fig.tight_layout()
    return fig


def local_contrast(img: np.ndarray, window: int = 15) -> float:
    """Mean standard deviation of grey levels in ``window``-pixel neighbourhoods: what CLAHE
    raises even where the global histogram hardly widens."""
    import cv2

    x = img.astype(np.float32)
    mean = cv2.blur(x, (window, window))
    var = np.maximum(cv2.blur(x * x, (window, window)) - mean * mean, 0)
    return float(np.sqrt(var).mean())


def plot_histograms(img: np.ndarray, cfg: PreprocessConfig | None = None) -> Figure:
    """The image and its grey-level histogram before and after :func:`enhance` with ``cfg``."""
    cfg = cfg or PreprocessConfig()
    after = enhance(img, replace(cfg, clahe=True))
    fig, axes = plt.subplots(2, 2, figsize=(2 * PANEL_INCHES * 1.3, 2 * PANEL_INCHES))
    for col, (name, im) in enumerate((("original", img), (f"CLAHE clip {cfg.clip_limit:g}", after))):
        low, high = np.percentile(im, (5, 95))
        axes[0, col].imshow(im, cmap="gray", vmin=0, vmax=_U8_LEVELS - 1)
        axes[0, col].set_title(f"{name}\n5-95 % of pixels in {low:.0f}-{high:.0f}, local contrast {local_contrast(im):.1f}",
                               fontsize=8)
        axes[0, col].axis("off")
        axes[1, col].hist(im.ravel(), bins=HIST_BINS, range=(0, _U8_LEVELS), color="0.3")
        axes[1, col].set_xlabel("grey level (0 black, 255 white)")
        axes[1, col].set_ylabel("pixels")
    fig.tight_layout()
    return fig


def plot_resize_variants(img: np.ndarray, size: int) -> Figure:
    """The source image beside its letterbox, stretch and crop resizes to ``size``."""
    panels = {f"source {img.shape[1]}x{img.shape[0]}": img}
    panels.update({f"{mode} {size}px": im for mode, im in resize_variants(img, size).items()})
    return plot_images(panels, ncols=len(panels))


def plot_augment_examples(img: np.ndarray, policy: AugmentPolicy, n: int = 8, seed: int = 0) -> Figure:
    """``n`` augmented copies of ``img`` under ``policy`` (see :func:`augment_examples`)."""
    examples = augment_examples(img, policy, n, seed)
    return plot_images({f"{policy.name} #{i}": im for i, im in enumerate(examples)},
                       title=f"augmentation policy '{policy.name}'")
