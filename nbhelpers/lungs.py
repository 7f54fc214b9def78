"""Lung fields for the ieee8023 images, in training geometry, and the share of CAM energy inside them.

The ieee8023 collection ships lung masks made by lungVAE (Selvan et al. 2020) as
``annotations/lungVAE-masks/<image stem>_mask.png`` — a few are named ``<stem>_mask.png.png`` —
each the size of its image, grey 0..255 with soft edges from resizing.  :func:`lung_masks` finds
the mask of each manifest row by the image's file name, thresholds it at half scale
(:data:`MASK_THRESHOLD`) and brings it into the geometry of the cached training image with the
very resize and padding functions of :mod:`nbhelpers.preprocess`, so mask pixel (i, j) lies over
cache pixel (i, j).  Rows of other sources, and ieee8023 images without a mask, are reported
as missing rather than guessed.  With ``boxes=True`` an image without a mask falls back to the
two lung bounding boxes of ``annotations/imageannotation_ai_lung_bounding_boxes.json`` (scaled
from the size they were drawn on to the image's; skipped when the aspect ratio disagrees, i.e.
the image changed upstream since).  Boxes also cover some mediastinum and diaphragm, so their
area share is larger and a CAM scores higher against them than against a mask.

Upstream annotated COVID-19 images only: lung energy measures how models look at the COVID
class, not at pneumonia or normal films.

:func:`lung_energy` is the share of a CAM's total value that falls on lung pixels.  A CAM spread
evenly over the film would score the lungs' share of the film area (letterbox padding and blank
borders excluded: a map on them is not "elsewhere on the chest"), so every number is reported
beside that uniform baseline and its excess over it; the pointing game (:func:`pointing_hit`)
asks whether the map's maximum lies in the lungs; a map whose share is not above the area share
(:data:`OUTSIDE_MARGIN`) looks no more at the lungs than a uniform map does, and is flagged as looking outside them (text markers,
devices, borders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import json

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from data_prep.sources import SOURCES
from nbhelpers.images import load_gray
from nbhelpers.mitigate import Box, crop
from nbhelpers.preprocess import PreprocessConfig, fit_content, pad_square, source_content

#: The source whose annotations hold the masks, and where they lie inside its folder.
MASK_SOURCE = "ieee8023"
MASK_FOLDER = Path("annotations") / "lungVAE-masks"
#: File name endings of the masks (the second is an upstream naming slip kept as it is).
MASK_SUFFIXES = ("_mask.png", "_mask.png.png")
BOX_FILE = Path("annotations") / "imageannotation_ai_lung_bounding_boxes.json"
#: Largest relative difference between the aspect ratio the boxes were drawn on and the image's
#: own before the boxes are taken to belong to another version of the image.
BOX_ASPECT_TOLERANCE = 0.02
#: Grey level (of 0..255) at or above which a mask pixel is lung: half scale, so the soft edges
#: that resizing left split evenly.
MASK_THRESHOLD = 128
#: A CAM is flagged as looking outside the lungs when its lung energy share exceeds the lung
#: area share (the share of a uniform map) by no more than this.
OUTSIDE_MARGIN = 0.0
#: Two-sided confidence level of the per-model intervals.
CONFIDENCE = 0.95


class LungMaskError(FileNotFoundError):
    """The lung-mask folder is missing, or a mask cannot be read or does not fit its image."""


def mask_folder(data_dir: Path | str) -> Path:
    """Return the lungVAE mask folder under ``data_dir`` (the ieee8023 source folder's annotations).

    Raises :class:`LungMaskError` naming the expected place when the source or the folder is absent.
    """
    data_dir = Path(data_dir)
    source = SOURCES[MASK_SOURCE].find(data_dir)
    if source is None or not (source / MASK_FOLDER).is_dir():
        expected = data_dir / SOURCES[MASK_SOURCE].folders[0] / MASK_FOLDER
        raise LungMaskError(
            f"no lung masks at {expected}: the ieee8023 source (covid-chestxray-dataset) must keep its "
            "upstream annotations/ folder; fetch it with `python -m data_prep.download`"
        )
    return source / MASK_FOLDER


def mask_index(data_dir: Path | str) -> dict[str, Path]:
    """Map each image file stem that has a lungVAE mask to that mask's path (see :func:`mask_folder`)."""
    index: dict[str, Path] = {}
    for path in sorted(mask_folder(data_dir).iterdir()):
        for suffix in MASK_SUFFIXES:
            if path.name.endswith(suffix):
                index[path.name[: -len(suffix)]] = path
                break
    return index


def box_index(data_dir: Path | str) -> dict[str, tuple[tuple[int, int], list[list[float]]]]:
    """Map each image file stem with lung boxes to ((height, width) they were drawn on, [[x, y, w, h], ...]).

    Images whose boxes upstream left empty (null) are left out.
    Raises :class:`LungMaskError` naming the file when the box annotations are missing or malformed.
    """
    path = mask_folder(data_dir).parent.parent / BOX_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {im["id"]: im for im in data["images"]}
        index: dict[str, tuple[tuple[int, int], list[list[float]]]] = {}
        for im in images.values():
            index[Path(im["file_name"]).stem] = ((int(im["height"]), int(im["width"])), [])
        for ann in data["annotations"]:
            if any(v is None for v in ann["bbox"]):  # upstream has an image whose boxes are all null
                continue
            index[Path(images[ann["image_id"]]["file_name"]).stem][1].append([float(v) for v in ann["bbox"]])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LungMaskError(f"lung boxes {path} cannot be read ({err!r}); re-fetch the ieee8023 annotations") from err
    return {stem: entry for stem, entry in index.items() if entry[1]}


def box_mask(boxes: Sequence[Sequence[float]], drawn_on: tuple[int, int], shape: tuple[int, int]) -> np.ndarray | None:
    """Fill ``boxes`` ([x, y, w, h] on an image of size ``drawn_on``) into a bool mask of ``shape``.

    Returns None when the two aspect ratios differ by more than :data:`BOX_ASPECT_TOLERANCE`.
    """
    (h0, w0), (h, w) = drawn_on, shape
    if abs((w / h) / (w0 / h0) - 1) > BOX_ASPECT_TOLERANCE:
        return None
    sy, sx = h / h0, w / w0
    mask = np.zeros(shape, dtype=bool)
    for x, y, bw, bh in boxes:
        top, left = max(0, round(y * sy)), max(0, round(x * sx))
        mask[top : round((y + bh) * sy), left : round((x + bw) * sx)] = True
    return mask


def find_masks(manifest: pd.DataFrame, data_dir: Path | str) -> pd.Series:
    """Return the mask path of every manifest row (index ``image_id``), or None where it has none.

    A row matches when it comes from the ieee8023 source (``source`` column, or a path inside its
    folder) and a mask is named after its image file's stem.  Raises KeyError when the manifest
    lacks ``image_id`` or ``path``, :class:`LungMaskError` when the mask folder is missing.
    """
    missing = [c for c in ("image_id", "path") if c not in manifest.columns]
    if missing:
        raise KeyError(f"manifest lacks column(s) {missing}; lung masks are matched by image_id and path")
    index = mask_index(data_dir)
    found = [index.get(Path(rel).stem) if own else None
             for rel, own in zip(manifest["path"].astype(str), _from_mask_source(manifest))]
    return pd.Series(found, index=manifest["image_id"].astype(str).to_numpy(), name="mask_path", dtype=object)


def _from_mask_source(manifest: pd.DataFrame) -> np.ndarray:
    """Which rows come from the ieee8023 source: its ``source`` value, or a path inside its folder."""
    if "source" in manifest.columns:
        return (manifest["source"] == MASK_SOURCE).to_numpy()
    folders = SOURCES[MASK_SOURCE].folders
    return np.array([Path(str(p)).parts[0] in folders for p in manifest["path"]], dtype=bool)


def rows_without_mask(manifest: pd.DataFrame, data_dir: Path | str) -> pd.DataFrame:
    """The manifest rows that have no lung mask (other sources, or ieee8023 images upstream left out)."""
    masks = find_masks(manifest, data_dir)
    return manifest[masks.isna().to_numpy()]


def load_mask(path: Path | str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask file as a bool (H, W) lung map (grey >= :data:`MASK_THRESHOLD`).

    With ``shape`` (the source image's (H, W)) a mask of another size is first resized to it, as
    upstream resized the masks to their images.  Raises :class:`LungMaskError` naming the file when
    it cannot be read.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except (OSError, ValueError) as err:
        raise LungMaskError(f"lung mask {path} cannot be read ({err}); re-fetch the ieee8023 annotations") from err
    if shape is not None and grey.shape != tuple(shape):
        grey = np.asarray(Image.fromarray(grey).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    return grey >= MASK_THRESHOLD


def prepare_mask(mask: np.ndarray, cfg: PreprocessConfig, box: Box | None = None) -> np.ndarray:
    """Bring a source-resolution bool mask into ``cfg``'s training geometry, as a bool (size, size) array.

    ``box`` is the lung crop the image got (:func:`nbhelpers.preprocess.source_content`), cut
    from the mask first.  Uses :func:`nbhelpers.preprocess.fit_content` and :func:`~nbhelpers.preprocess.pad_square`
    (the functions :func:`~nbhelpers.preprocess.prepare` applies to the image) on the 0/255 mask,
    then thresholds again; letterbox padding is never lung.  Raises ValueError for a non-2-D mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"prepare_mask() expects a 2-D mask, got shape {mask.shape}")
    grey = crop(np.where(mask, 255, 0).astype(np.uint8), box)
    content = np.ascontiguousarray(fit_content(grey, cfg.size, cfg.fit))
    return pad_square(content, cfg.size, value=0) >= MASK_THRESHOLD


#: A source image's border row or column is blank (not film) when its grey levels vary by less than this.
BLANK_BORDER_STD = 2.0


def film_mask(img: np.ndarray) -> np.ndarray:
    """Where the film is in a source grey image: everything but the blank rows and columns at its
    edges (scanner frames, a uniform background around a figure), as a bool (H, W) map."""
    img = np.asarray(img, dtype=np.float32)
    rows, cols = img.std(axis=1) >= BLANK_BORDER_STD, img.std(axis=0) >= BLANK_BORDER_STD
    out = np.zeros(img.shape, dtype=bool)
    if rows.any() and cols.any():
        r, c = np.flatnonzero(rows), np.flatnonzero(cols)
        out[r[0]:r[-1] + 1, c[0]:c[-1] + 1] = True
    return out


@dataclass
class LungMasks:
    """Lung masks in training geometry: ``masks`` bool (N, size, size) for ``image_ids`` (in the
    order asked for), ``kinds`` ("mask" or "boxes") per image, and ``missing``, the asked-for ids
    without either."""

    image_ids: list[str]
    masks: np.ndarray
    missing: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    #: Where the film is, per image (bool (N, size, size)): not letterbox padding, not a blank
    #: border of the source image.  The uniform-map baseline is the lung share of this area.
    films: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def positions_in(self, image_ids: Sequence[str]) -> list[int]:
        """Positions in ``image_ids`` (e.g. a cached split's) of this object's images, in its order.

        Raises KeyError naming an image that ``image_ids`` does not hold.
        """
        where = {str(i): k for k, i in enumerate(image_ids)}
        absent = [i for i in self.image_ids if i not in where]
        if absent:
            raise KeyError(f"{len(absent)} masked image(s) are not among the given ids, e.g. {absent[0]!r}")
        return [where[i] for i in self.image_ids]


def lung_masks(
    manifest: pd.DataFrame,
    data_dir: Path | str,
    cfg: PreprocessConfig,
    image_ids: Sequence[str] | None = None,
    progress: bool = True,
    boxes: bool = False,
) -> LungMasks:
    """Load the lung mask of each asked-for image in ``cfg``'s training geometry.

    ``image_ids`` (default: every manifest row) are looked up in ``manifest``; each mask is read
    at the size of its source image (decoded with :func:`~nbhelpers.images.load_gray` to learn it,
    and to find the lung crop when ``cfg.lung_crop`` is on) and passed through :func:`prepare_mask`,
    as is its film area (:func:`film_mask`).  With ``boxes`` an ieee8023 image without a mask uses
    its lung bounding boxes (:func:`box_mask`).  Returns :class:`LungMasks`; ids with neither are
    listed in ``missing``.  Raises KeyError for an id not in the manifest and
    :class:`LungMaskError` for a missing mask folder or unreadable mask.
    """
    data_dir = Path(data_dir)
    paths = find_masks(manifest, data_dir)
    box_by_stem = box_index(data_dir) if boxes else {}
    rel = dict(zip(manifest["image_id"].astype(str), manifest["path"].astype(str)))
    own = dict(zip(manifest["image_id"].astype(str), _from_mask_source(manifest)))
    wanted = [str(i) for i in (manifest["image_id"] if image_ids is None else image_ids)]
    unknown = [i for i in wanted if i not in rel]
    if unknown:
        raise KeyError(f"{len(unknown)} image id(s) are not in the manifest, e.g. {unknown[0]!r}")
    out = LungMasks(image_ids=[], masks=np.zeros(0), missing=[], kinds=[])
    masks, films = [], []
    for image_id in tqdm(wanted, desc="lung masks", unit="img", disable=not progress):
        path, stem = paths[image_id], Path(rel[image_id]).stem
        drawn = box_by_stem.get(stem) if path is None and own[image_id] else None
        if path is None and drawn is None:
            out.missing.append(image_id)
            continue
        img = load_gray(data_dir / rel[image_id])
        mask = load_mask(path, img.shape) if path is not None else box_mask(drawn[1], drawn[0], img.shape)
        if mask is None:  # boxes drawn on another version of the image
            out.missing.append(image_id)
            continue
        crop_box = source_content(img, cfg)[1] if cfg.lung_crop else None
        masks.append(prepare_mask(mask, cfg, crop_box))
        films.append(prepare_mask(film_mask(img), cfg, crop_box))
        out.image_ids.append(image_id)
        out.kinds.append("mask" if path is not None else "boxes")
    out.masks = np.stack(masks) if masks else np.zeros((0, cfg.size, cfg.size), dtype=bool)
    out.films = np.stack(films) if films else np.zeros((0, cfg.size, cfg.size), dtype=bool)
    return out


# --------------------------------------------------------------------------- CAM energy


def lung_energy(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the CAM's total (non-negative) value on lung pixels: sum(cam * mask) / sum(cam).

    ``cam`` (H, W) non-negative, ``mask`` bool (H, W) of the same shape.  Returns a float in
    [0, 1], or NaN for an all-zero CAM (it points nowhere).  Raises ValueError for mismatched
    shapes or negative CAM values.
    """
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if cam.shape != mask.shape:
        raise ValueError(f"CAM shape {cam.shape} differs from mask shape {mask.shape}; "
                         "compute CAMs at the cache image size and prepare masks with the same config")
    if (cam < 0).any():
        raise ValueError("lung_energy() needs a non-negative CAM (grad-cam returns maps in [0, 1])")
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else float("nan")


def pointing_hit(cam: np.ndarray, mask: np.ndarray) -> bool | None:
    """The pointing game: does the CAM's maximum fall inside the lungs?  None for a blank map."""
    cam = np.asarray(cam, dtype=np.float64)
    if not np.isfinite(cam).all() or np.ptp(cam) <= 0:
        return None
    return bool(np.asarray(mask, dtype=bool).ravel()[int(np.argmax(cam))])


def lung_energy_table(cams: Mapping[str, np.ndarray], masks: LungMasks | np.ndarray,
                      image_ids: Sequence[str] | None = None, films: np.ndarray | None = None) -> pd.DataFrame:
    """Per-image lung energy and pointing game for several models (or ablation rows) on the same images.

    ``cams`` maps a label (model name or ablation row) to CAMs (N, H, W) aligned with ``masks``
    (a :class:`LungMasks`, or a bool (N, H, W) array with ``image_ids`` and optionally
    ``films``).  Returns one row per label and image: ``model``, ``image_id``, ``lung_energy``,
    ``lung_area`` (the uniform-map baseline: the lungs' share of the film area, letterbox padding
    and blank borders excluded; of the whole square when no film areas are known), ``excess``
    (energy - area), ``outside`` (excess <= :data:`OUTSIDE_MARGIN`), ``pointing_hit`` (the map's
    maximum lies in the lungs; empty for a blank map) and ``blank``.  Raises ValueError when a
    CAM stack does not match the masks in number or size.
    """
    if isinstance(masks, LungMasks):
        image_ids, films, masks = masks.image_ids, masks.films, masks.masks
    ids = list(image_ids) if image_ids is not None else [str(i) for i in range(len(masks))]
    if len(ids) != len(masks):
        raise ValueError(f"{len(ids)} image ids for {len(masks)} masks")
    if films is None or len(films) != len(masks):
        films = np.ones_like(masks, dtype=bool)
    film_px = films.reshape(len(masks), -1).sum(axis=1)
    areas = (masks & films).reshape(len(masks), -1).sum(axis=1) / np.maximum(film_px, 1)
    rows = []
    for label, stack in cams.items():
        stack = np.asarray(stack)
        if stack.shape != masks.shape:
            raise ValueError(f"CAMs of {label!r} have shape {stack.shape}, the masks {masks.shape}; "
                             "give one CAM per masked image at the mask size")
        for image_id, cam, mask, area in zip(ids, stack, masks, areas):
            energy = lung_energy(cam, mask)
            hit = pointing_hit(cam, mask)
            rows.append({"model": label, "image_id": image_id, "lung_energy": energy, "lung_area": float(area),
                         "excess": energy - area, "outside": bool(energy - area <= OUTSIDE_MARGIN),
                         "pointing_hit": hit, "blank": hit is None})
    return pd.DataFrame(rows, columns=["model", "image_id", "lung_energy", "lung_area", "excess", "outside",
                                       "pointing_hit", "blank"])


def summarise_lung_energy(per_image: pd.DataFrame) -> pd.DataFrame:
    """Lung energy per model beside the uniform baseline, from :func:`lung_energy_table`.

    The statistical unit is the distinct image, and intervals resample patients: with a ``seed``
    column (several seeds' runs of one model) each image's values are first averaged over the
    seeds, so no image counts twice; with a ``patient_id`` column the bootstrap draws patients
    with all their images (:func:`nbhelpers.stats.mean_ci`), otherwise images.

    Columns: ``images`` (distinct, with a map), ``patients``, ``seeds``, ``energy_mean``,
    ``energy_std`` (over the images), ``area_mean`` (uniform-map share), ``excess_mean`` with its
    :data:`CONFIDENCE` interval ``excess_ci_low``/``excess_ci_high``, ``outside_share`` (share of
    images flagged), ``looks_outside`` (mean excess <= :data:`OUTSIDE_MARGIN`: on average no more
    on the lungs than a uniform map), the pointing game's hits (seed-averaged) and rate with the
    wider of the patient bootstrap and the Wilson interval (``pointing_chance``: the rate of a
    random point on the film, the mean lung area share), ``blank_maps`` (maps that were all zero,
    counted over images and seeds and left out of the means), and ``grid`` / ``target`` when the
    per-image table has them.  One row per model, in first-seen order.
    """
    from nbhelpers.stats import mean_ci, proportion_ci

    out = []
    blanks = per_image.groupby("model", sort=False)["lung_energy"].apply(lambda v: int(v.isna().sum())) \
        if len(per_image) else pd.Series(dtype=int)
    extra = [c for c in ("grid", "target") if c in per_image.columns]
    for label, group in per_image.dropna(subset=["lung_energy"]).groupby("model", sort=False):
        seeds = group["seed"].nunique() if "seed" in group else 1
        keys = ["image_id"] + (["patient_id"] if "patient_id" in group else [])
        group = group.assign(pointing_hit=group["pointing_hit"].astype(float), outside=group["outside"].astype(float))
        images = group.groupby(keys, sort=False)[["lung_energy", "lung_area", "excess", "outside",
                                                  "pointing_hit"]].mean().reset_index()
        patients = images["patient_id"].to_numpy() if "patient_id" in images else None
        excess = images["excess"].to_numpy()
        mean, low, high = mean_ci(excess, patients, level=CONFIDENCE)
        hits = images.dropna(subset=["pointing_hit"])
        pointing = proportion_ci(hits["pointing_hit"].to_numpy(),
                                 hits["patient_id"].to_numpy() if patients is not None else None, level=CONFIDENCE)
        out.append({
            "model": label, **{c: group[c].iloc[0] for c in extra}, "images": len(images),
            "patients": int(len(set(map(str, patients)))) if patients is not None else len(images), "seeds": seeds,
            "blank_maps": int(blanks.get(label, 0)),
            "energy_mean": images["lung_energy"].mean(), "energy_std": images["lung_energy"].std(ddof=1),
            "area_mean": images["lung_area"].mean(),
            "excess_mean": mean, "excess_ci_low": low, "excess_ci_high": high,
            "outside_share": images["outside"].mean(), "looks_outside": bool(mean <= OUTSIDE_MARGIN),
            "pointing_hits": float(pointing["correct"]), "pointing_rate": pointing["accuracy"],
            "pointing_low": pointing["low"], "pointing_high": pointing["high"],
            "pointing_chance": images["lung_area"].mean(),
        })
    return pd.DataFrame(out).set_index("model") if out else pd.DataFrame()
