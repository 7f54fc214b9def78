"""Lung fields for the ieee8023 images in training geometry.

:func:`lung_masks` finds the mask of each manifest row (:mod:`data_prep.annotations`), thresholds it
at half scale (:data:`~data_prep.annotations.MASK_THRESHOLD`) and brings it into the geometry of the
cached training image with the very resize and padding functions of :mod:`nbhelpers.pipeline.preprocess`,
so mask pixel (i, j) lies over cache pixel (i, j).  Rows of other sources, and ieee8023 images
without a mask, are reported as missing rather than guessed.  With ``boxes=True`` an image without
a mask falls back to its two lung bounding boxes (scaled from the size they were drawn on to the
image's; skipped when the aspect ratio disagrees, i.e. the image changed upstream since).  Boxes
also cover some mediastinum and diaphragm, so their area share is larger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from data_prep.progress import tqdm

from data_prep.annotations import MASK_THRESHOLD, _from_mask_source, box_index, box_mask, find_masks, load_mask
from data_prep.images import load_gray
from nbhelpers.pipeline.mitigate import Box, crop
from nbhelpers.pipeline.preprocess import PreprocessConfig, fit_content, pad_square, source_content


def prepare_mask(mask: np.ndarray, cfg: PreprocessConfig, box: Box | None = None) -> np.ndarray:
    """Bring a source-resolution bool mask into ``cfg``'s training geometry, as a bool (size, size) array.

    ``box`` is the lung crop the image got (:func:`nbhelpers.pipeline.preprocess.source_content`), cut
    from the mask first.  Uses :func:`nbhelpers.pipeline.preprocess.fit_content` and :func:`~nbhelpers.pipeline.preprocess.pad_square`
    (the functions :func:`~nbhelpers.pipeline.preprocess.prepare` applies to the image) on the 0/255 mask,
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
    at the size of its source image (decoded with :func:`~data_prep.images.load_gray` to learn it,
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
