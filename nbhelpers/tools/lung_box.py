"""``workbook lung-box``: how well the lung-crop rule (:func:`nbhelpers.pipeline.mitigate.lung_box`)
finds the lungs, against the ieee8023 lungVAE masks, and how often it finds a box per source
(``results/benchmarks/lung_box.txt``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from data_prep.atomic import write_text
from data_prep.options import add_data_dir, add_out
from nbhelpers.pipeline.mitigate import Box, lung_box


def lung_box_check(data_dir: Path | str, progress: bool = True) -> pd.DataFrame:
    """Compare :func:`lung_box` with the box of every ieee8023 lungVAE mask whose image is present.

    One row per image: ``found``, ``iou`` (box vs mask box), ``lung_covered`` (share of mask
    pixels inside the box), ``box_share`` / ``mask_box_share`` (areas as shares of the image).
    Raises :class:`data_prep.annotations.LungMaskError` when the masks are missing.
    """
    from data_prep.progress import tqdm

    from data_prep.images import load_gray
    from data_prep.annotations import load_mask, mask_folder, mask_index

    masks = mask_index(data_dir)
    images = {p.stem: p for p in (mask_folder(data_dir).parent.parent / "images").iterdir()}
    rows = []
    for stem, mask_path in tqdm(sorted(masks.items()), desc="lung boxes", unit="img", disable=not progress):
        if stem not in images:
            continue
        img = load_gray(images[stem])
        mask = load_mask(mask_path, img.shape)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        truth = Box(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        box = lung_box(img)
        row = {"image": stem, "found": box is not None, "iou": np.nan, "lung_covered": np.nan, "box_share": np.nan,
               "mask_box_share": truth.area() / img.size}
        if box is not None:
            inter = Box(max(box.top, truth.top), min(box.bottom, truth.bottom),
                        max(box.left, truth.left), min(box.right, truth.right))
            overlap = inter.area() if inter.bottom > inter.top and inter.right > inter.left else 0
            row.update(iou=overlap / (box.area() + truth.area() - overlap),
                       lung_covered=mask[box.top : box.bottom, box.left : box.right].sum() / mask.sum(),
                       box_share=box.area() / img.size)
        rows.append(row)
    return pd.DataFrame(rows)


def found_rates(paths_by_source: Mapping[str, Iterable[Path]]) -> pd.DataFrame:
    """Share of images per source for which :func:`lung_box` finds a box, and the median box share."""
    from data_prep.images import load_gray

    rows = []
    for source, paths in paths_by_source.items():
        boxes = [(lung_box(img), img.size) for img in (load_gray(p) for p in paths)]
        found = [b.area() / size for b, size in boxes if b is not None]
        rows.append({"source": source, "images": len(boxes), "found": len(found) / max(1, len(boxes)),
                     "box_share_median": float(np.median(found)) if found else np.nan})
    return pd.DataFrame(rows)


def summarise_check(table: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of :func:`lung_box_check`: found share, and over found boxes the median
    IoU, share with IoU > 0.5, median lung coverage and share covering >= 90 % of the lung."""
    hit = table[table["found"]]
    return {"images": len(table), "found": float(table["found"].mean()), "iou_median": float(hit["iou"].median()),
            "iou_gt_0.5": float((hit["iou"] > 0.5).mean()), "covered_median": float(hit["lung_covered"].median()),
            "covered_ge_0.9": float((hit["lung_covered"] >= 0.9).mean()),
            "box_share_median": float(hit["box_share"].median()),
            "mask_box_share_median": float(table["mask_box_share"].median())}


#: The file ``workbook lung-box --out FOLDER`` writes its report to.
REPORT_NAME = "lung_box.txt"


def add_lung_box_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook lung-box``."""
    add_data_dir(parser)
    parser.add_argument("--per-source", type=int, default=200, help="images per source for the found-rate table")
    add_out(parser, f"the report, {REPORT_NAME}")


def run_lung_box_command(args: argparse.Namespace) -> int:
    """``workbook lung-box``: measure :func:`lung_box` against the ieee8023 lung masks and its
    found rate per source, print the report (and write it to ``--out``); returns 0."""
    from datetime import datetime, timezone

    from data_prep.datadir import data_dir as resolve_data_dir
    from data_prep.recipe import FRONTAL_VIEWS
    from data_prep.table import load_table

    root = resolve_data_dir(args.data_dir)
    table = lung_box_check(root)
    sources, _ = load_table(root, hash_images=False)
    frontal = sources[(sources["modality"] == "X-ray") & (sources["view"].isin(FRONTAL_VIEWS) | (sources["view"] == "")) & (sources["label"] != "")]
    paths = {name: [root / rel for rel in part["path"].head(args.per_source)]
             for name, part in frontal.groupby("source", sort=True)}
    lines = [f"$ {args.command_line}",
             f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             "data: the sources folder's ieee8023 lungVAE masks; lung-box rule of nbhelpers.pipeline.mitigate",
             "", "against the masks (IoU, coverage and box share over images where a box was found):"]
    lines += [f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in summarise_check(table).items()]
    lines += ["", f"found per source (first {args.per_source} frontal X-rays with a class label of each):",
              found_rates(paths).to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        write_text(args.out / REPORT_NAME, report)
    return 0
