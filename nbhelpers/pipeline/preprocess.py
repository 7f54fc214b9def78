"""CLAHE, resizing to the training size, and the on-disk cache of preprocessed images.

**CLAHE before resizing.**  :func:`prepare` enhances the grey image at its source resolution,
then resizes it, and only then pads a letterbox.  Measured on 100 real mirror images (about
500 px; ``python -m nbhelpers.tools.bench clahe-order``, ``results/benchmarks/clahe_order.txt``):

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
They run at source resolution, in that order, before CLAHE.  The cache records the images for
which no lung box was found (kept uncropped) and the reference histogram in ``meta.json``.

The cache (:func:`build_cache`) stores each split as one uint8 ``.npy`` array (N, size, size),
memory-mapped on reading, in a folder named by :func:`cache_key` — a hash of the manifest rows
and of every :class:`PreprocessConfig` field — so a changed parameter or manifest builds a new
cache and an unchanged one is reused.  Superseded cache folders are left in place (switching a
parameter back reuses them); delete the cache root to reclaim the space.

A cache is trusted only after a check: ``meta.json`` records, per split, the shape, dtype and
SHA-256 of each array file and the SHA-256 of the id list, and opening a cache compares every
file against it (once per process while the files keep their size and modification time, so
training does not re-hash on every open).  :func:`build_cache` rebuilds a broken or incomplete
folder (saying why, in one line); :meth:`ImageCache.open` raises :class:`CacheError` naming the
folder and how to delete it.  A cache is built under a temporary name, ``meta.json`` last, and
renamed when complete, so an interrupted build is never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data_prep.atomic import write_text
from data_prep.schema import CLASSES, SPLITS, label_index
from data_prep.sources import sha256_file
from data_prep.images import ImageReadError, load_gray
from nbhelpers.pipeline.mitigate import (
    BLACKOUTS,
    Box,
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
#: Manifest columns that decide the cache contents; ``sha256`` joins them when present.
MANIFEST_KEY_COLUMNS = ("image_id", "path", "label", "split")
#: Length of the hex keys used as cache folder names.
KEY_LENGTH = 16
META_FILE = "meta.json"

#: The shortcut-mitigation switches of PreprocessConfig, in the order they are applied.
MITIGATIONS = ("mask_markers", "lung_crop", "hist_match")

ResizeMode = Literal["letterbox", "stretch", "crop"]
ClaheStage = Literal["before_resize", "after_resize"]


# Cache folders verified in this process: resolved path -> (name, size, mtime, inode) of its files
# at that moment.  A file rewritten since then has another signature and is checked again.
_VERIFIED: dict[str, tuple[tuple[str, int, int, int], ...]] = {}


class CacheError(RuntimeError):
    """A preprocessing cache is missing, incomplete, broken, or was asked for a split it does not hold."""


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
            raise ValueError(f"PreprocessConfig.size must be an integer >= 8, got {self.size!r}")
        if self.clip_limit <= 0:
            raise ValueError(f"PreprocessConfig.clip_limit must be > 0, got {self.clip_limit!r}")
        if not isinstance(self.tile_grid, int) or self.tile_grid < 1:
            raise ValueError(f"PreprocessConfig.tile_grid must be an integer >= 1, got {self.tile_grid!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"PreprocessConfig.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.clahe_stage not in CLAHE_STAGES:
            raise ValueError(f"PreprocessConfig.clahe_stage must be one of {CLAHE_STAGES}, got {self.clahe_stage!r}")
        for name in MITIGATIONS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PreprocessConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.blackout not in BLACKOUTS:
            raise ValueError(f"PreprocessConfig.blackout must be one of {BLACKOUTS}, got {self.blackout!r}")

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
        payload["clip_limit"] = float(self.clip_limit)  # 2 and 2.0 are the same setting
        payload["pipeline_version"] = PIPELINE_VERSION
        return _hash_text(json.dumps(payload, sort_keys=True))


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def _check_gray(img: np.ndarray, what: str) -> None:
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
    _check_gray(img, "clahe()")
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid))).apply(img)


def enhance(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Apply CLAHE with ``cfg``'s parameters, or return ``img`` unchanged when ``cfg.clahe`` is off."""
    _check_gray(img, "enhance()")
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
    _check_gray(img, "resize()")
    return pad_square(fit_content(img, size, mode), size)


def source_content(img: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, Box | None]:
    """The part of a loaded grey image that ``cfg`` keeps, at source resolution: markers filled
    (``mask_markers``) and cut to the lung box (``lung_crop``).  Returns it with the box (None
    when ``lung_crop`` is off or no box was found), so masks can be cut the same way.  With
    ``blackout`` part of the film is set to black first (:func:`nbhelpers.pipeline.mitigate.blackout`)."""
    if cfg.mask_markers:
        img = mask_markers(img)
    if cfg.blackout != "none":
        img = blackout(img, cfg.blackout)[0]
    box = lung_box(img) if cfg.lung_crop else None
    return crop(img, box), box


def prepare(img: np.ndarray, cfg: PreprocessConfig, reference: np.ndarray | None = None) -> np.ndarray:
    """Turn a loaded grey image into the uint8 (size, size) training image described by ``cfg``.

    Order: the mitigations that are on (:func:`source_content`, then histogram matching to
    ``reference``), CLAHE (if on, at source resolution unless ``cfg.clahe_stage ==
    "after_resize"``), resize, and letterbox padding — so padding never enters a CLAHE
    histogram.  Raises ValueError when ``cfg.hist_match`` is on and no ``reference`` is given.
    """
    _check_gray(img, "prepare()")
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


# --------------------------------------------------------------------------- the cache


def manifest_hash(manifest: pd.DataFrame) -> str:
    """Hash the manifest rows that decide the cache contents, in their order.

    Uses :data:`MANIFEST_KEY_COLUMNS` plus ``sha256`` when the column exists, so a re-downloaded
    file with new bytes (and a new recorded hash) also invalidates the cache.  Raises KeyError
    naming missing columns.
    """
    missing = [c for c in MANIFEST_KEY_COLUMNS if c not in manifest.columns]
    if missing:
        raise KeyError(f"manifest lacks column(s) {missing}; it needs {list(MANIFEST_KEY_COLUMNS)}")
    columns = list(MANIFEST_KEY_COLUMNS) + (["sha256"] if "sha256" in manifest.columns else [])
    rows = manifest[columns].astype(str).to_numpy().tolist()
    return _hash_text(json.dumps([columns, rows]))


def cache_key(manifest: pd.DataFrame, cfg: PreprocessConfig) -> str:
    """The cache folder name for ``manifest`` preprocessed with ``cfg``."""
    return _hash_text(f"{manifest_hash(manifest)}:{cfg.key()}")


def _split_files(split: str) -> dict[str, str]:
    """The file names of one split in a cache folder, by part."""
    return {"images": f"{split}_images.npy", "labels": f"{split}_labels.npy", "ids": f"{split}_ids.json"}


def _npy_layout(path: Path) -> tuple[list[int], str, int]:
    """Shape, dtype and expected file size from a .npy header; ValueError when it is not one."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f".npy format version {version} is not one this cache writes")
        shape, _, dtype = readers[version](f)
        offset = f.tell()
    return list(shape), dtype.str, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _describe_files(folder: Path, splits: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """What ``meta.json`` records to check a cache by: per split and file, shape, dtype and SHA-256."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in splits:
        files = _split_files(split)
        entry: dict[str, dict[str, Any]] = {}
        for part in ("images", "labels"):
            shape, dtype, _ = _npy_layout(folder / files[part])
            entry[part] = {"file": files[part], "shape": shape, "dtype": dtype, "sha256": sha256_file(folder / files[part])}
        ids = json.loads((folder / files["ids"]).read_text(encoding="utf-8"))
        entry["ids"] = {"file": files["ids"], "count": len(ids), "sha256": sha256_file(folder / files["ids"])}
        out[split] = entry
    return out


def _signature(folder: Path, meta: dict[str, Any]) -> tuple[tuple[str, int, int, int], ...]:
    """Size, modification time and inode of meta.json and every file it lists (FileNotFoundError if one is gone)."""
    names = [META_FILE] + [f["file"] for split in meta.get("files", {}).values() for f in split.values()]
    out = []
    for name in names:
        st = (folder / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _problem(folder: Path, meta: dict[str, Any]) -> str:
    """Why the files of cache ``folder`` do not match ``meta`` (shapes, dtypes, sizes, SHA-256), or ""."""
    recorded = meta.get("files")
    if not isinstance(recorded, dict) or set(recorded) != set(meta.get("splits", [])):
        return f"{META_FILE} records no file checksums (built by an older version)"
    size = meta.get("config", {}).get("size")
    for split, entry in recorded.items():
        n = meta.get("counts", {}).get(split)
        expected = {"images": [n, size, size], "labels": [n]}
        for part in ("images", "labels", "ids"):
            info = entry.get(part, {})
            path = folder / str(info.get("file", _split_files(split)[part]))
            if not path.is_file():
                return f"{path.name} is missing"
            if part != "ids":
                try:
                    shape, dtype, length = _npy_layout(path)
                except (ValueError, OSError, EOFError) as err:
                    return f"{path.name} is not a readable .npy array ({err})"
                if shape != info.get("shape") or dtype != info.get("dtype"):
                    return (f"{path.name} holds {dtype} {shape}, {META_FILE} says "
                            f"{info.get('dtype')} {info.get('shape')}")
                if shape != expected[part]:
                    return f"{path.name} holds shape {shape}, but {n} images of {size} px make {expected[part]}"
                if path.stat().st_size != length:
                    return f"{path.name} is truncated or padded ({path.stat().st_size} bytes, its header needs {length})"
            if sha256_file(path) != info.get("sha256"):
                return f"{path.name} does not match its SHA-256 in {META_FILE} (its bytes changed)"
        if entry["ids"].get("count") != n:
            return f"{_split_files(split)['ids']} lists {entry['ids'].get('count')} ids, counts say {n}"
    return ""


def _read_meta(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """``meta.json`` of cache ``folder`` once its files are verified, with "" ; or None and why not."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return None, f"no {META_FILE} (an interrupted or foreign folder)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        PreprocessConfig(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{META_FILE} is unreadable ({type(err).__name__}: {err})"
    key = str(folder.resolve())
    try:
        signature = _signature(folder, meta)
    except (FileNotFoundError, TypeError, AttributeError):
        signature = None
    if signature is not None and _VERIFIED.get(key) == signature:
        return meta, ""  # checked earlier in this process and not touched since
    problem = _problem(folder, meta)
    if problem:
        _VERIFIED.pop(key, None)
        return None, problem
    _VERIFIED[key] = _signature(folder, meta)
    return meta, ""


def _discard(folder: Path) -> None:
    """Move a broken cache folder aside (one rename, so no reader sees it half-deleted), then delete it."""
    aside = folder.with_name(f".{folder.name}.broken-{os.getpid()}-{time.time_ns()}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return  # another process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


@dataclass
class CachedSplit:
    """One split of a cache: ``images`` uint8 (N, H, W) memory-mapped, ``labels`` int64 (N,), ``image_ids``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    path: Path

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name, in :data:`CLASSES` order."""
        counts = np.bincount(self.labels, minlength=len(CLASSES))
        return {name: int(n) for name, n in zip(CLASSES, counts)}


@dataclass
class ImageCache:
    """A built cache folder: its ``path``, ``key``, ``cfg``, and the splits it holds."""

    path: Path
    key: str
    cfg: PreprocessConfig
    meta: dict[str, Any]
    reused: bool = False

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.meta["splits"])

    def split(self, name: str) -> CachedSplit:
        """Open split ``name`` (images memory-mapped); raise :class:`CacheError` listing the splits held."""
        if name not in self.meta["splits"]:
            raise CacheError(f"cache {self.path} holds splits {list(self.splits)}, not {name!r}")
        images = np.load(self.path / f"{name}_images.npy", mmap_mode="r")
        labels = np.load(self.path / f"{name}_labels.npy")
        ids = json.loads((self.path / f"{name}_ids.json").read_text(encoding="utf-8"))
        return CachedSplit(name=name, images=images, labels=labels, image_ids=ids, path=self.path)

    @classmethod
    def open(cls, path: Path | str) -> "ImageCache":
        """Open a complete cache folder after checking every file against ``meta.json``.

        Checks shapes, dtypes, sizes and SHA-256 of the arrays and id lists (hashing once per
        process while the files are unchanged).  Raises :class:`CacheError` naming the folder,
        what is wrong and the command that deletes it when it is incomplete or broken.
        """
        path = Path(path)
        meta, problem = _read_meta(path)
        if meta is None:
            raise CacheError(
                f"{path} is not a complete preprocessing cache: {problem}; delete it with "
                f"`rm -rf {shlex.quote(str(path))}` and build_cache() builds it again"
            )
        return cls(path=path, key=path.name, cfg=PreprocessConfig(**meta["config"]), meta=meta)


def build_cache(
    manifest: pd.DataFrame,
    data_dir: Path | str,
    cache_root: Path | str,
    cfg: PreprocessConfig,
    *,
    workers: int = 1,
    progress: bool = True,
) -> ImageCache:
    """Preprocess every manifest image once into ``cache_root/<cache_key>/``, or reuse it.

    For each split present in ``manifest`` (in :data:`SPLITS` order) writes
    ``<split>_images.npy`` uint8 (N, size, size), ``<split>_labels.npy`` int64 (class indices of
    :data:`CLASSES`) and ``<split>_ids.json``, then ``meta.json`` (config, manifest hash, counts,
    date, and each file's shape, dtype and SHA-256 under ``files``).  Rows keep manifest order
    within a split.  The folder is built under a temporary name and renamed when complete, so an
    interrupted build is never reused; an existing folder is reused only when its files match
    ``meta.json``, else it is moved aside and rebuilt (one printed line says why).  Returns the
    :class:`ImageCache` (``reused`` says which happened).  ``workers`` > 1 decodes in that many
    threads (OpenCV and Pillow release the GIL); the result does not depend on it.  Raises :class:`ImageReadError` naming
    the file and its ``image_id`` for an unreadable image, ValueError for unknown labels/splits.
    """
    data_dir, cache_root = Path(data_dir), Path(cache_root)
    key = cache_key(manifest, cfg)
    final = cache_root / key
    if final.exists():
        meta, problem = _read_meta(final)
        if meta is not None:
            return ImageCache(path=final, key=key, cfg=PreprocessConfig(**meta["config"]), meta=meta, reused=True)
        print(f"rebuilding preprocessing cache {final}: {problem}")
        _discard(final)
    unknown = sorted(set(manifest["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"manifest has unknown split(s) {unknown}; expected {SPLITS}")
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    splits = [s for s in SPLITS if (manifest["split"] == s).any()]
    reference = training_reference(manifest, data_dir, cfg, progress) if cfg.hist_match else None
    bar = tqdm(total=len(manifest), desc=f"preprocessing {cfg.size}px", unit="img", disable=not progress)
    no_box: list[str] = []
    try:
        for split in splits:
            rows = manifest[manifest["split"] == split]
            no_box += _write_split(rows, split, data_dir, tmp, cfg, bar, workers, reference)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an incomplete cache must not be left to be mistaken
        raise
    finally:
        bar.close()
    meta = {
        "config": asdict(cfg),
        "config_key": cfg.key(),
        "manifest_hash": manifest_hash(manifest),
        "pipeline_version": PIPELINE_VERSION,
        "splits": splits,
        "counts": {s: int((manifest["split"] == s).sum()) for s in splits},
        "data_dir": str(data_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg.lung_crop:
        meta["lung_box_missing"] = no_box
        print(f"lung crop: no lung box found for {len(no_box)} of {len(manifest)} images; they are kept uncropped "
              f"(listed under lung_box_missing in {final / META_FILE})")
    if reference is not None:
        meta["reference_histogram"] = [round(float(v), 8) for v in reference]
    try:
        meta["files"] = _describe_files(tmp, splits)
        write_text(tmp / META_FILE, json.dumps(meta, indent=2))  # last: its presence marks a finished build
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for attempt in range(2):
        try:
            tmp.rename(final)
            break
        except OSError:
            # Another process finished the same cache first: keep theirs (identical by construction)
            # when it checks out; a broken folder in the way is moved aside and the rename retried.
            if _read_meta(final)[0] is not None or attempt:
                shutil.rmtree(tmp, ignore_errors=True)
                break
            _discard(final)
    return ImageCache.open(final)


def _write_split(
    rows: pd.DataFrame, split: str, data_dir: Path, out: Path, cfg: PreprocessConfig, bar: tqdm, workers: int,
    reference: np.ndarray | None = None,
) -> list[str]:
    """Write one split's arrays; return the ids of images for which ``lung_crop`` found no box."""
    labels = np.array([label_index(label) for label in rows["label"]], dtype=np.int64)
    images = np.lib.format.open_memmap(out / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(rows), cfg.size, cfg.size))

    no_box: list[str] = []

    def one(job: tuple[str, str]) -> np.ndarray:
        image_id, rel = job
        try:
            img = load_gray(data_dir / rel)
        except ImageReadError as err:
            raise ImageReadError(f"{err} (manifest image_id {image_id!r}, split {split!r})") from err
        _check_gray(img, "build_cache()")
        content, box = source_content(img, cfg)
        if cfg.lung_crop and box is None:
            no_box.append(str(image_id))
        return finish(content, cfg, reference)

    jobs = list(zip(rows["image_id"], rows["path"]))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # map() yields in manifest order, so row i of the array is row i of the split.
        for i, img in enumerate(pool.map(one, jobs) if workers > 1 else map(one, jobs)):
            images[i] = img
            bar.update(1)
    images.flush()
    del images
    np.save(out / f"{split}_labels.npy", labels)
    (out / f"{split}_ids.json").write_text(json.dumps([str(i) for i in rows["image_id"]]), encoding="utf-8")
    order = {str(i): k for k, i in enumerate(rows["image_id"])}
    return sorted(no_box, key=order.get)
