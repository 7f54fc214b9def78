"""Shortcut mitigations applied to the grey image before CLAHE and resizing.

Three options of :class:`nbhelpers.pipeline.preprocess.PreprocessConfig` call these functions; each is
meant to remove a cue that tells the archive apart rather than the disease (see
:mod:`nbhelpers.experiments.audit`):

* ``lung_crop`` — :func:`lung_box` finds a box around both lung fields by a fixed rule that
  treats every source alike, and the image is cut to it: borders, arms, neck, abdomen and most
  corner labels go.  The rule works on a 256 px copy: threshold at Otsu's level of the central
  60 % of the image, remove the dark outside air (anything below 0.6 of that level that touches
  the edge, grown by 3 px), open the remaining dark pixels to cut thin links, keep the largest
  dark region on each side of the midline that lies mostly away from the edge, and take their
  joint box (mirrored across the midline when only one side was found) plus a 4 % margin.  If no
  region qualifies the rule retries with larger openings; if it still fails, or the box is
  implausibly small, it returns None and the image stays uncropped — the cache counts and lists
  those images.  Measured against the ieee8023 lungVAE masks by
  ``workbook lung-box`` (:mod:`nbhelpers.tools.lung_box`, ``results/benchmarks/lung_box.txt``).  The ieee8023
  masks themselves are not used for cropping: they exist for one source only, and cropping one
  source by masks and the others by a rule would be a new source cue.
* ``mask_markers`` — :func:`marker_mask` finds burnt-in text, side letters, arrows and similar
  overlays as small, very bright, sharp-edged blobs (white top-hat), and :func:`mask_markers`
  fills them from their surroundings (OpenCV's Telea inpainting).  Dark text on a light label
  and markers inside a large white box are not found.
* ``hist_match`` — :func:`match_histogram` maps each image's grey levels so that its histogram
  follows a reference: :func:`reference_histogram`, the mean histogram of the training images
  with every source weighted equally, so no archive's exposure and contrast dominate.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import cv2
import numpy as np

#: Long side (px) of the copy on which the lung box and the markers are searched.
WORK_SIZE = 256
#: Share of the image (per side, centred) whose Otsu level separates lung from body.
CENTRAL_SHARE = 0.6
#: Grey level (as a share of that Otsu level) below which edge-connected pixels are outside air.
AIR_SHARE = 0.6
#: Diameters (px at WORK_SIZE) of the openings tried in turn to separate the lungs from other dark areas.
OPENINGS = (5, 11, 17, 25)
#: A lung region may have at most this share of its pixels in the 3 % band along the edge.
EDGE_SHARE = 0.2
#: Smallest lung region, as a share of the image.
MIN_REGION = 0.01
#: Smallest plausible box, as shares of the image width and height.
MIN_BOX = (0.35, 0.3)
#: Margin added around the box on every side, as a share of the image side.
MARGIN = 0.04
#: Markers: top-hat window (share of the long side), least top-hat height and brightness (grey
#: levels), largest blob (share of the image) and how far the filled area is grown (px at WORK_SIZE).
MARKER_WINDOW = 0.06
MARKER_TOPHAT = 60
MARKER_BRIGHT = 200
MARKER_MAX_BLOB = 0.01
MARKER_GROW = 2
#: Telea inpainting radius (px at source resolution).
INPAINT_RADIUS = 3
LEVELS = 256


class Box(NamedTuple):
    """A crop box in source pixels: rows ``top:bottom``, columns ``left:right``."""

    top: int
    bottom: int
    left: int
    right: int

    def area(self) -> int:
        return max(0, self.bottom - self.top) * max(0, self.right - self.left)


def _work_copy(img: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = img.shape
    scale = WORK_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=interpolation), scale


def _disk(diameter: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))


def _lung_regions(small: np.ndarray, opening: int) -> tuple[np.ndarray, list[int]]:
    """Label image and the ids of the largest qualifying dark region on each side of the midline."""
    h, w = small.shape
    c0, c1 = int(h * (1 - CENTRAL_SHARE) / 2), int(h * (1 + CENTRAL_SHARE) / 2)
    r0, r1 = int(w * (1 - CENTRAL_SHARE) / 2), int(w * (1 + CENTRAL_SHARE) / 2)
    level, _ = cv2.threshold(np.ascontiguousarray(small[c0:c1, r0:r1]), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = (small < level).astype(np.uint8)
    _, air = cv2.connectedComponents((small < AIR_SHARE * level).astype(np.uint8), connectivity=8)
    edge_ids = np.setdiff1d(np.unique(np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]])), [0])
    outside = cv2.dilate(np.isin(air, edge_ids).astype(np.uint8), _disk(7))
    dark[outside > 0] = 0
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, _disk(opening))
    n, labels, stats, centres = cv2.connectedComponentsWithStats(dark, connectivity=4)
    band = max(2, int(0.03 * max(h, w)))
    inner = np.bincount(labels[band : h - band, band : w - band].ravel(), minlength=n)
    best: dict[int, tuple[int, int]] = {}
    for i in range(1, n):
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < MIN_REGION * h * w or stats[i, cv2.CC_STAT_WIDTH] > 0.9 * w:
            continue
        if 1 - inner[i] / area > EDGE_SHARE:
            continue
        cx, cy = centres[i]
        if not (0.1 * w < cx < 0.9 * w and 0.1 * h < cy < 0.9 * h):
            continue
        side = int(cx >= w / 2)
        if area > best.get(side, (0, 0))[0]:
            best[side] = (area, i)
    return labels, [i for _, i in best.values()]


def lung_box(img: np.ndarray) -> Box | None:
    """A box around both lung fields of a uint8 grey chest film, or None when none is found.

    The rule is in the module docstring.  Returns a :class:`Box` in ``img``'s pixels.
    """
    small, scale = _work_copy(img)
    h, w = small.shape
    for opening in OPENINGS:
        labels, keep = _lung_regions(cv2.GaussianBlur(small, (5, 5), 0), opening)
        if keep:
            break
    else:
        return None
    ys, xs = np.nonzero(np.isin(labels, keep))
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if len(keep) == 1:  # one lung found: the other is its mirror image across the midline
        left, right = min(left, w - right), max(right, w - left)
    if right - left < MIN_BOX[0] * w or bottom - top < MIN_BOX[1] * h:
        return None
    top, bottom = max(0.0, top - MARGIN * h), min(h, bottom + MARGIN * h)
    left, right = max(0.0, left - MARGIN * w), min(w, right + MARGIN * w)
    H, W = img.shape
    return Box(max(0, round(top / scale)), min(H, round(bottom / scale)),
               max(0, round(left / scale)), min(W, round(right / scale)))


def crop(img: np.ndarray, box: Box | None) -> np.ndarray:
    """``img`` cut to ``box`` (unchanged for None), as a contiguous array."""
    if box is None:
        return img
    return np.ascontiguousarray(img[box.top : box.bottom, box.left : box.right])


def marker_mask(img: np.ndarray) -> np.ndarray:
    """Bool mask (``img``'s shape) of burnt-in markers: small, very bright, sharp-edged blobs.

    A pixel is a candidate when the white top-hat (the image minus its opening by a disk of
    :data:`MARKER_WINDOW` of the long side) exceeds :data:`MARKER_TOPHAT` and its grey level is
    at least :data:`MARKER_BRIGHT`; candidate blobs larger than :data:`MARKER_MAX_BLOB` of the
    image (bone, devices, a bright body) are dropped; the rest are grown by :data:`MARKER_GROW` px.
    """
    small, _ = _work_copy(img)
    h, w = small.shape
    window = max(3, int(round(MARKER_WINDOW * max(h, w))) | 1)
    tophat = cv2.morphologyEx(small, cv2.MORPH_TOPHAT, _disk(window))
    candidates = ((tophat > MARKER_TOPHAT) & (small >= MARKER_BRIGHT)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(candidates, connectivity=8)
    small_blob = stats[:, cv2.CC_STAT_AREA] <= MARKER_MAX_BLOB * h * w
    small_blob[0] = False
    found = small_blob[labels].astype(np.uint8)
    if MARKER_GROW:
        found = cv2.dilate(found, _disk(2 * MARKER_GROW + 1))
    full = cv2.resize(found, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    return full.astype(bool)


def mask_markers(img: np.ndarray) -> np.ndarray:
    """``img`` with the :func:`marker_mask` blobs filled from their surroundings (Telea inpainting)."""
    mask = marker_mask(img)
    if not mask.any():
        return img
    return cv2.inpaint(img, mask.astype(np.uint8), INPAINT_RADIUS, cv2.INPAINT_TELEA)


#: The blackout variants of Maguolo & Nanni (2021): ``center`` blacks out a fixed central box
#: (:data:`CENTER_BOX`), ``lungs`` the fixed lung box (:data:`LUNG_BOX`), ``lungs_only`` everything
#: but it.  Both boxes are the same shares of every film: a box found per film covers 62 % of an NIH
#: film but 70-73 % of the other archives' (``results/benchmarks/lung_box.txt``), so its size alone
#: would tell the archives apart.
BLACKOUTS = ("none", "center", "lungs", "lungs_only")
#: (top, bottom, left, right) of the fixed central box as shares of the image's height and width.
CENTER_BOX = (0.15, 0.85, 0.15, 0.85)
#: (top, bottom, left, right) of the fixed lung box: the median edges of the boxes around the 198
#: ieee8023 lungVAE lung masks of the mirror, as shares of height and width (``workbook lung-box``
#: prints them; a test checks this constant against the masks).
LUNG_BOX = (0.07, 0.89, 0.07, 0.92)


def share_box(shape: tuple[int, int], shares: tuple[float, float, float, float]) -> Box:
    """The box of ``shares`` (top, bottom, left, right, as shares of height and width) of an image of ``shape``."""
    h, w = shape
    top, bottom, left, right = shares
    return Box(round(top * h), round(bottom * h), round(left * w), round(right * w))


def center_box(shape: tuple[int, int]) -> Box:
    """The fixed central box (:data:`CENTER_BOX`) of an image of ``shape``."""
    return share_box(shape, CENTER_BOX)


def blackout(img: np.ndarray, mode: str) -> np.ndarray:
    """``img`` with part of it set to black: the central box, the lung box, or all but the lung
    box (``mode`` one of :data:`BLACKOUTS`), each at the same place on every film.  A model trained
    on such films that stays accurate shows that the data allow an answer without that part:
    what a model trained on whole films uses is another question (its CAMs, notebook 07)."""
    if mode not in BLACKOUTS:
        raise ValueError(f"blackout must be one of {BLACKOUTS}, got {mode!r}")
    if mode == "none":
        return img
    box = center_box(img.shape) if mode == "center" else share_box(img.shape, LUNG_BOX)
    out = img.copy()
    if mode == "lungs_only":
        keep = out[box.top:box.bottom, box.left:box.right].copy()
        out[:] = 0
        out[box.top:box.bottom, box.left:box.right] = keep
    else:
        out[box.top:box.bottom, box.left:box.right] = 0
    return out


def histogram(img: np.ndarray) -> np.ndarray:
    """Normalised grey-level histogram (256 floats summing to 1) of a uint8 image."""
    counts = np.bincount(img.ravel(), minlength=LEVELS).astype(np.float64)
    return counts / counts.sum()


def reference_histogram(histograms: Sequence[np.ndarray], groups: Sequence[str] | None = None) -> np.ndarray:
    """Mean of ``histograms``, each group (source) weighted equally when ``groups`` is given.

    Raises ValueError for no histograms or a length mismatch.
    """
    if not len(histograms):
        raise ValueError("reference_histogram() needs at least one image histogram (is the training split empty?)")
    stack = np.asarray(histograms, dtype=np.float64)
    if groups is None:
        return stack.mean(axis=0)
    groups = np.asarray([str(g) for g in groups])
    if len(groups) != len(stack):
        raise ValueError(f"{len(stack)} histograms but {len(groups)} group labels")
    means = [stack[groups == g].mean(axis=0) for g in dict.fromkeys(groups)]
    return np.mean(means, axis=0)


def match_histogram(img: np.ndarray, reference: Sequence[float] | np.ndarray) -> np.ndarray:
    """Map ``img``'s grey levels so that its histogram follows ``reference`` (256 weights).

    Each level goes to the reference level whose cumulative share first reaches the image's
    cumulative share at that level (the classic monotone CDF mapping).  Raises ValueError for a
    reference that is not 256 non-negative weights with a positive sum.
    """
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (LEVELS,) or (ref < 0).any() or ref.sum() <= 0:
        raise ValueError(f"match_histogram() needs a reference of {LEVELS} non-negative weights, got shape {ref.shape}")
    src_cdf = np.cumsum(histogram(img))
    ref_cdf = np.cumsum(ref / ref.sum())
    lut = np.searchsorted(ref_cdf, np.minimum(src_cdf, ref_cdf[-1]) - 1e-12).clip(0, LEVELS - 1).astype(np.uint8)
    return cv2.LUT(img, lut)
