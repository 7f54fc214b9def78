"""CLAHE, resizing to the training size, and the shortcut mitigations: one source image to one training image.

**CLAHE before resizing.**  :func:`prepare` enhances the grey image at its source resolution,
then resizes it, and only then pads a letterbox.  Measured on 100 real mirror images (about
500 px; ``workbook bench clahe-order``, ``results/benchmarks/clahe_order.txt``):

* the two orders differ visibly — by 9.4 grey levels on average at 64 px (36% of pixels by more
  than 10 levels) and 5.1 at 224 px (12%);
* enhancing first does not depend on the training size: the 64 px image and the 224 px image
  shrunk to 64 px differ by 0.4 levels, against 8.4 when enhancing after resizing.  With the
  tile grid fixed, a 64 px image leaves 8x8-pixel tiles whose 64-pixel histograms are too
  small to equalise sensibly, so the smoke profile would train on a different enhancement
  than the full one;
* it matches seed paper 000, which enhances the original data;
* it is slower (about 600 against 1,300 decoded images/s at 224 px here; more on full-size
  upstream files), but that cost is paid once, when the cache is built.

``clahe_stage="after_resize"`` remains for the comparison.

**Shortcut mitigations** (off by default; :mod:`nbhelpers.pipeline.mitigate`): ``mask_markers`` fills
burnt-in text and arrows, ``lung_crop`` cuts the image to a box around the lungs, and
``hist_match`` maps grey levels onto the source-balanced mean histogram of the training split.
A lung crop is stretched to fill the square: black letterbox bars would tell its shape.
They run at source resolution, in that order, before CLAHE.

Every :class:`PreprocessConfig` field enters :meth:`PreprocessConfig.key`, which names the
on-disk cache of preprocessed images (:mod:`nbhelpers.pipeline.cache`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import cv2
import numpy as np
import pandas as pd
from data_prep.progress import tqdm

from data_prep.errors import WorkbookError
from data_prep.images import load_gray
from nbhelpers.pipeline.mitigate import (
    BLACKOUTS,
    Box,
    LUNG_BOX,
    blackout,
    crop,
    histogram,
    lung_box,
    mask_markers,
    match_histogram,
    reference_histogram,
)

#: Bump when the pixels produced for the same parameters change, so old caches are not reused.
PIPELINE_VERSION = 1
#: CLAHE defaults: OpenCV's tile grid of 8x8 and clip limit 2.0, the common choice for CXR.
DEFAULT_CLIP_LIMIT = 2.0
DEFAULT_TILE_GRID = 8
DEFAULT_SIZE = 224
RESIZE_MODES = ("letterbox", "stretch", "crop")
CLAHE_STAGES = ("before_resize", "after_resize")
#: Grey level of letterbox padding (black, like the air around the body).
PAD_VALUE = 0
#: Length of the hex keys used as cache folder names.
KEY_LENGTH = 16

#: The shortcut-mitigation switches of PreprocessConfig, in the order they are applied.
MITIGATIONS = ("mask_markers", "lung_crop", "hist_match")

ResizeMode = Literal["letterbox", "stretch", "crop"]
ClaheStage = Literal["before_resize", "after_resize"]


class PreprocessError(WorkbookError, ValueError):
    """A preprocessing setting out of range (size, clip limit, tile grid, an unknown mode)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Every parameter that changes the preprocessed pixels (and so the cache key).

    ``size``: side of the square training image.  ``clahe``: the on/off switch (the ablation
    toggles only this).  ``clip_limit`` / ``tile_grid``: OpenCV CLAHE contrast limit and tiles
    per side.  ``resize``: ``letterbox`` (keep aspect, pad black), ``stretch`` (squash to a
    square) or ``crop`` (fill the square, cut the long side centrally).  ``clahe_stage``:
    enhance at source resolution (``before_resize``, the default; see the module docstring)
    or after resizing.  ``mask_markers`` / ``lung_crop`` / ``hist_match``: the shortcut
    mitigations of :mod:`nbhelpers.pipeline.mitigate` (see the module docstring); ``blackout``
    (``none``, ``center``, ``lungs``, ``lungs_only``): the shortcut *test* of Maguolo & Nanni,
    black over the central box, the lung box, or all but the lung box; with ``lung_crop`` the
    crop is stretched to the square whatever ``resize`` says (:attr:`fit`).  Raises ValueError
    naming the field on an invalid value.
    """

    size: int = DEFAULT_SIZE
    clahe: bool = True
    clip_limit: float = DEFAULT_CLIP_LIMIT
    tile_grid: int = DEFAULT_TILE_GRID
    resize: ResizeMode = "letterbox"
    clahe_stage: ClaheStage = "before_resize"
    mask_markers: bool = False
    lung_crop: bool = False
    hist_match: bool = False
    blackout: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 8:
            raise PreprocessError(f"PreprocessConfig.size must be an integer >= 8, got {self.size!r}")
        if self.clip_limit <= 0:
            raise PreprocessError(f"PreprocessConfig.clip_limit must be > 0, got {self.clip_limit!r}")
        if not isinstance(self.tile_grid, int) or self.tile_grid < 1:
            raise PreprocessError(f"PreprocessConfig.tile_grid must be an integer >= 1, got {self.tile_grid!r}")
        if self.resize not in RESIZE_MODES:
            raise PreprocessError(f"PreprocessConfig.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.clahe_stage not in CLAHE_STAGES:
            raise PreprocessError(f"PreprocessConfig.clahe_stage must be one of {CLAHE_STAGES}, got {self.clahe_stage!r}")
        for name in MITIGATIONS:
            if not isinstance(getattr(self, name), bool):
                raise PreprocessError(f"PreprocessConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.blackout not in BLACKOUTS:
            raise PreprocessError(f"PreprocessConfig.blackout must be one of {BLACKOUTS}, got {self.blackout!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | Any, **overrides: Any) -> "PreprocessConfig":
        """Build a config from profile settings (a dict or :class:`nbhelpers.settings.config.Settings`).

        Reads ``image_size``, ``clahe``, ``clip_limit``, ``tile_grid`` and, when present,
        ``resize``, ``clahe_stage`` and the mitigation switches; ``overrides`` (config field names) win.
        """
        values = settings.as_dict() if hasattr(settings, "as_dict") else dict(settings)
        names = {"image_size": "size", "clahe": "clahe", "clip_limit": "clip_limit", "tile_grid": "tile_grid",
                 "resize": "resize", "clahe_stage": "clahe_stage", **{m: m for m in MITIGATIONS}}
        kwargs = {field: values[key] for key, field in names.items() if values.get(key) is not None}
        kwargs.update(overrides)
        if "clip_limit" in kwargs:
            kwargs["clip_limit"] = float(kwargs["clip_limit"])
        return cls(**kwargs)

    @property
    def fit(self) -> ResizeMode:
        """How the content fills the square: ``resize``, except that a lung crop is stretched to
        fill it, since letterbox bars would carry the crop box's shape (the archive's framing)."""
        return "stretch" if self.lung_crop else self.resize

    def key(self) -> str:
        """A stable hex hash of every field (and :data:`PIPELINE_VERSION`), independent of field order."""
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in MITIGATIONS:  # added later: left out while off, so earlier caches keep their keys
            if not payload[name]:
                del payload[name]
        if payload["blackout"] == "none":
            del payload["blackout"]
        elif payload["blackout"] != "center":  # the lung blackouts moved to one fixed box for every film
            payload["blackout_box"] = list(LUNG_BOX)
        payload["clip_limit"] = float(self.clip_limit)  # 2 and 2.0 are the same setting
        payload["pipeline_version"] = PIPELINE_VERSION
        return _hash_text(json.dumps(payload, sort_keys=True))


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def check_gray(img: np.ndarray, what: str) -> None:
    """Raise ValueError, naming the caller ``what``, unless ``img`` is a uint8 grey image (H, W)."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 2:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ValueError(f"{what} expects a uint8 grey image of shape (H, W), got {dtype} {shape}; use load_gray()")


def clahe(img: np.ndarray, clip_limit: float = DEFAULT_CLIP_LIMIT, tile_grid: int = DEFAULT_TILE_GRID) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 grey image (OpenCV).

    ``clip_limit`` caps each tile's histogram at that multiple of the uniform bin height
    (higher = more contrast and noise); ``tile_grid`` is the number of tiles per side.  Returns
    a new uint8 array of the same shape; raises ValueError for anything but uint8 (H, W).
    """
    check_gray(img, "clahe()")
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid))).apply(img)


def enhance(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Apply CLAHE with ``cfg``'s parameters, or return ``img`` unchanged when ``cfg.clahe`` is off."""
    check_gray(img, "enhance()")
    return clahe(img, cfg.clip_limit, cfg.tile_grid) if cfg.clahe else img


def _interpolation(src_shape: tuple[int, int], dst_shape: tuple[int, int]) -> int:
    # Area averaging when shrinking (no aliasing); bilinear when enlarging small figures.
    shrinking = dst_shape[0] <= src_shape[0] and dst_shape[1] <= src_shape[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def _resize_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(img, (width, height), interpolation=_interpolation(img.shape, (height, width)))


def fit_content(img: np.ndarray, size: int, mode: ResizeMode) -> np.ndarray:
    """Resize ``img`` to what ends up inside the ``size`` square, before any letterbox padding.

    ``letterbox``: long side to ``size``, aspect kept (the result may be narrower than ``size``);
    ``stretch``: exactly (size, size); ``crop``: short side to ``size``, long side cut centrally.
    """
    h, w = img.shape
    if mode == "stretch":
        return _resize_to(img, size, size)
    if mode == "letterbox":
        scale = size / max(h, w)
        return _resize_to(img, max(1, round(h * scale)), max(1, round(w * scale)))
    if mode == "crop":
        scale = size / min(h, w)
        big = _resize_to(img, max(size, round(h * scale)), max(size, round(w * scale)))
        top, left = (big.shape[0] - size) // 2, (big.shape[1] - size) // 2
        return big[top : top + size, left : left + size]
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def pad_square(img: np.ndarray, size: int, value: int = PAD_VALUE) -> np.ndarray:
    """Centre ``img`` (at most ``size`` per side) on a ``size`` x ``size`` canvas filled with ``value``."""
    h, w = img.shape
    if h > size or w > size:
        raise ValueError(f"pad_square(): image {h}x{w} is larger than the {size} px square")
    top, left = (size - h) // 2, (size - w) // 2
    return cv2.copyMakeBorder(img, top, size - h - top, left, size - w - left, cv2.BORDER_CONSTANT, value=value)


def resize(img: np.ndarray, size: int, mode: ResizeMode = "letterbox") -> np.ndarray:
    """Resize a uint8 grey image to (size, size) with ``mode`` (see :func:`fit_content`)."""
    check_gray(img, "resize()")
    return pad_square(fit_content(img, size, mode), size)


def source_content(img: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, Box | None]:
    """The part of a loaded grey image that ``cfg`` keeps, at source resolution: markers filled
    (``mask_markers``) and cut to the lung box (``lung_crop``).  Returns it with the box (None
    when ``lung_crop`` is off or no box was found), so masks can be cut the same way.  With
    ``blackout`` part of the film is set to black first (:func:`nbhelpers.pipeline.mitigate.blackout`)."""
    if cfg.mask_markers:
        img = mask_markers(img)
    if cfg.blackout != "none":
        img = blackout(img, cfg.blackout)
    box = lung_box(img) if cfg.lung_crop else None
    return crop(img, box), box


def prepare(img: np.ndarray, cfg: PreprocessConfig, reference: np.ndarray | None = None) -> np.ndarray:
    """Turn a loaded grey image into the uint8 (size, size) training image described by ``cfg``.

    Order: the mitigations that are on (:func:`source_content`, then histogram matching to
    ``reference``), CLAHE (if on, at source resolution unless ``cfg.clahe_stage ==
    "after_resize"``), resize, and letterbox padding — so padding never enters a CLAHE
    histogram.  Raises ValueError when ``cfg.hist_match`` is on and no ``reference`` is given.
    """
    check_gray(img, "prepare()")
    return finish(source_content(img, cfg)[0], cfg, reference)


def finish(img: np.ndarray, cfg: PreprocessConfig, reference: np.ndarray | None = None) -> np.ndarray:
    """The steps of :func:`prepare` after :func:`source_content`: histogram matching, CLAHE,
    resize and padding."""
    if cfg.hist_match:
        if reference is None:
            raise ValueError("PreprocessConfig.hist_match needs the reference histogram: build_cache() computes it "
                             "from the training split (or pass reference=training_reference(...))")
        img = match_histogram(img, reference)
    if cfg.clahe_stage == "before_resize":
        img = enhance(img, cfg)
    content = fit_content(img, cfg.size, cfg.fit)
    if cfg.clahe_stage == "after_resize":
        content = enhance(np.ascontiguousarray(content), cfg)
    return pad_square(content, cfg.size)


def load_prepared(path: Path | str, cfg: PreprocessConfig, reference: np.ndarray | None = None) -> np.ndarray:
    """:func:`load_gray` then :func:`prepare`: one source file to one training image."""
    return prepare(load_gray(path), cfg, reference)


def training_reference(manifest: pd.DataFrame, data_dir: Path | str, cfg: PreprocessConfig,
                       progress: bool = True) -> np.ndarray:
    """The histogram-matching reference: the mean grey-level histogram of the training split's
    images (after ``cfg``'s marker filling and lung crop), each source weighted equally (all rows
    alike when the manifest has no ``source`` column).  Raises ValueError when the manifest
    has no training rows."""
    rows = manifest[manifest["split"] == "train"]
    if rows.empty:
        raise ValueError("histogram matching needs training images to build its reference; the manifest has none")
    hists = [histogram(source_content(load_gray(Path(data_dir) / rel), cfg)[0])
             for rel in tqdm(rows["path"], desc="reference histogram", unit="img", disable=not progress)]
    return reference_histogram(hists, rows["source"].tolist() if "source" in rows.columns else None)


def clahe_order_difference(img: np.ndarray, cfg: PreprocessConfig) -> dict[str, float]:
    """Compare CLAHE before vs after resizing on one image (both with ``cfg``'s other settings).

    Returns the mean absolute grey-level difference (``mean_abs``) and the share of pixels
    differing by more than 10 levels (``frac_gt10``), measured on the image content only.
    """
    before = fit_content(clahe(img, cfg.clip_limit, cfg.tile_grid), cfg.size, cfg.resize)
    small = np.ascontiguousarray(fit_content(img, cfg.size, cfg.resize))
    after = clahe(small, cfg.clip_limit, cfg.tile_grid)
    diff = np.abs(before.astype(np.int16) - after.astype(np.int16))
    return {"mean_abs": float(diff.mean()), "frac_gt10": float((diff > 10).mean())}
