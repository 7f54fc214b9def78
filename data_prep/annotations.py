"""The annotations upstream ships with a source: ieee8023's lung masks and lung boxes.

The ieee8023 collection ships lung masks made by lungVAE (Selvan et al. 2020) as
``annotations/lungVAE-masks/<image stem>_mask.png`` (a few are named ``<stem>_mask.png.png``),
each the size of its image, grey 0..255 with soft edges from resizing, and the two lung
bounding boxes per image of ``annotations/imageannotation_ai_lung_bounding_boxes.json``.
This module finds and reads them at source resolution; :mod:`nbhelpers.pipeline.lungmasks`
brings them into training geometry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from data_prep.sources import SOURCES
from data_prep.errors import WorkbookError

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


class LungMaskError(WorkbookError, FileNotFoundError):
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
            "upstream annotations/ folder; fetch it with `workbook download`"
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
