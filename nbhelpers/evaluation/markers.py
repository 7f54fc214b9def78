"""Notebook 08's pictures of the shortcut: what each mitigation does to one film per source, and
how much of a model's Grad-CAM falls on burnt-in markers and letterbox padding.

:data:`VARIANTS` names the mitigation sets that notebook 08 shows and probes again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd


#: The preprocessing variants compared in pictures and probes: each mitigation alone, then all.
VARIANTS: dict[str, dict[str, bool]] = {
    "none": {}, "mask_markers": {"mask_markers": True}, "lung_crop": {"lung_crop": True},
    "hist_match": {"hist_match": True}, "all": {"mask_markers": True, "lung_crop": True, "hist_match": True},
}


def mitigation_preview(manifest: pd.DataFrame, data_dir: Path | str, cfg, split: str = "test", seed: int = 0,
                       progress: bool = True) -> tuple[list[np.ndarray], list[str]]:
    """One image of ``split`` per source, prepared with every :data:`VARIANTS` entry on top of
    ``cfg``: a list of images (row by row: source, then variant) and their titles, for
    :func:`nbhelpers.evaluation.plots.image_grid` with ``ncols=len(VARIANTS)``.  Histogram matching uses
    the reference of the manifest's training split (prepared like the variant)."""
    from dataclasses import replace

    from data_prep.images import load_gray
    from nbhelpers.pipeline.preprocess import prepare, training_reference

    rows = manifest[manifest["split"] == split]
    picked = rows.groupby("source", sort=True).sample(1, random_state=seed)
    references = {name: training_reference(manifest, data_dir, replace(cfg, **switches), progress=progress)
                  for name, switches in VARIANTS.items() if switches.get("hist_match")}
    images, titles = [], []
    for source, rel in zip(picked["source"], picked["path"]):
        img = load_gray(Path(data_dir) / rel)
        for name, switches in VARIANTS.items():
            images.append(prepare(img, replace(cfg, **switches), references.get(name)))
            titles.append(f"{source}: {name}")
    return images, titles


def marker_masks(manifest: pd.DataFrame, data_dir: Path | str, cfg,
                 image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Where :func:`nbhelpers.pipeline.mitigate.marker_mask` finds burnt-in markers on each image, and
    where the letterbox padding lies, both in ``cfg``'s training geometry (lung crop included),
    as two bool (N, size, size) stacks.  The marker masks say where markers *were* also when
    ``cfg.mask_markers`` filled them."""
    from data_prep.images import load_gray
    from nbhelpers.pipeline.lungmasks import prepare_mask
    from nbhelpers.pipeline.mitigate import marker_mask
    from nbhelpers.pipeline.preprocess import source_content

    paths = manifest.set_index(manifest["image_id"].astype(str))["path"]
    markers, padding = [], []
    for image_id in image_ids:
        img = load_gray(Path(data_dir) / paths[str(image_id)])
        box = source_content(img, cfg)[1]
        markers.append(prepare_mask(marker_mask(img), cfg, box))
        padding.append(~prepare_mask(np.ones(img.shape, bool), cfg, box))
    if not markers:
        return np.zeros((0, cfg.size, cfg.size), bool), np.zeros((0, cfg.size, cfg.size), bool)
    return np.stack(markers), np.stack(padding)


def marker_attention(net, cache, manifest: pd.DataFrame, data_dir: Path | str, n: int = 6, split: str = "test",
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Grad-CAM on the ``n`` images of ``split`` with the most marker area, and the share of
    each CAM that falls on the markers.

    Returns (images uint8 (n, H, W), CAMs (n, H, W), table) where the table has one row per
    image: image_id, source, label, predicted, marker_area (share of the square) and
    marker_energy (share of the CAM on marker pixels), and the same for the black letterbox
    padding (padding_area, padding_energy).  Energy well above area means the model looks at
    the letters and arrows, or at the image's format.  Images without any marker are not chosen.
    """
    from data_prep.schema import CLASSES
    from nbhelpers.evaluation.cam import cams_for_images
    from nbhelpers.evaluation.lungs import lung_energy

    part = cache.split(split)
    masks, padding = marker_masks(manifest, data_dir, cache.cfg, part.image_ids)
    area = masks.reshape(len(masks), -1).mean(axis=1)
    chosen = [int(i) for i in np.argsort(-area, kind="stable")[:n] if area[i] > 0]
    images = np.asarray(part.images[chosen])
    cams, predicted = cams_for_images(net, images, progress=progress)
    info = manifest.set_index(manifest["image_id"].astype(str))
    ids = [part.image_ids[i] for i in chosen]
    table = pd.DataFrame({
        "image_id": ids, "source": info.loc[ids, "source"].to_numpy(), "label": info.loc[ids, "label"].to_numpy(),
        "predicted": [CLASSES[p] for p in predicted], "marker_area": area[chosen],
        "marker_energy": [lung_energy(c, m) for c, m in zip(cams, masks[chosen])],
        "padding_area": padding[chosen].reshape(len(chosen), -1).mean(axis=1) if chosen else [],
        "padding_energy": [lung_energy(c, m) for c, m in zip(cams, padding[chosen])],
    })
    return images, cams, table
