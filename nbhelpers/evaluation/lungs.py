"""The share of CAM energy inside the lungs, and the pointing game.

The ieee8023 collection ships lung masks made by lungVAE (Selvan et al. 2020) as
``annotations/lungVAE-masks/<image stem>_mask.png`` — a few are named ``<stem>_mask.png.png`` —
each the size of its image, grey 0..255 with soft edges from resizing.  :func:`lung_masks` finds
the mask of each manifest row by the image's file name, thresholds it at half scale
(:data:`MASK_THRESHOLD`) and brings it into the geometry of the cached training image with the
very resize and padding functions of :mod:`nbhelpers.pipeline.preprocess`, so mask pixel (i, j) lies over
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

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from nbhelpers.pipeline.lungmasks import LungMasks

#: A CAM is flagged as looking outside the lungs when its lung energy share exceeds the lung
#: area share (the share of a uniform map) by no more than this.
OUTSIDE_MARGIN = 0.0
#: Two-sided confidence level of the per-model intervals.
CONFIDENCE = 0.95


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


#: The three readings of a lung-energy excess interval.
FAVOURS_LUNGS, AVOIDS_LUNGS, UNDETERMINED = "favours the lungs", "favours the lungs less than a uniform map", "undetermined"


def lung_verdict(low: float, high: float) -> str:
    """What an interval of the lung-energy excess says: :data:`FAVOURS_LUNGS` when it lies above
    zero, :data:`AVOIDS_LUNGS` below :data:`OUTSIDE_MARGIN`, else :data:`UNDETERMINED` (also for
    a missing interval)."""
    if np.isfinite(low) and low > 0:
        return FAVOURS_LUNGS
    if np.isfinite(high) and high < OUTSIDE_MARGIN:
        return AVOIDS_LUNGS
    return UNDETERMINED


def summarise_lung_energy(per_image: pd.DataFrame) -> pd.DataFrame:
    """Lung energy per model beside the uniform baseline, from :func:`lung_energy_table`.

    The statistical unit is the distinct image, and intervals resample patients: with a ``seed``
    column (several seeds' runs of one model) each image's values are first averaged over the
    seeds, so no image counts twice; with a ``patient_id`` column the bootstrap draws patients
    with all their images (:func:`nbhelpers.evaluation.stats.mean_ci`), otherwise images.

    Columns: ``images`` (distinct, with a map), ``patients``, ``seeds``, ``energy_mean``,
    ``energy_std`` (over the images), ``area_mean`` (uniform-map share), ``excess_mean`` with its
    :data:`CONFIDENCE` interval ``excess_ci_low``/``excess_ci_high``, ``outside_share`` (share of
    images flagged), ``looks_outside`` (the whole interval of the excess below
    :data:`OUTSIDE_MARGIN`: measurably less on the lungs than a uniform map), ``lung_verdict``
    (:func:`lung_verdict`), the pointing game's hits (seed-averaged) and rate with the
    wider of the patient bootstrap and the Wilson interval (``pointing_chance``: the rate of a
    random point on the film, the mean lung area share), ``blank_maps`` (maps that were all zero,
    counted over images and seeds and left out of the means), and ``grid`` / ``target`` when the
    per-image table has them.  One row per model, in first-seen order.
    """
    from nbhelpers.evaluation.stats import mean_ci, proportion_ci

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
            "outside_share": images["outside"].mean(), "looks_outside": bool(high < OUTSIDE_MARGIN),
            "lung_verdict": lung_verdict(low, high),
            "pointing_hits": float(pointing["correct"]), "pointing_rate": pointing["accuracy"],
            "pointing_low": pointing["low"], "pointing_high": pointing["high"],
            "pointing_chance": images["lung_area"].mean(),
        })
    return pd.DataFrame(out).set_index("model") if out else pd.DataFrame()
