"""Measure where trained models look: lung energy and the weight-randomisation check, per model.

:func:`lung_energy_report` explains the held-out (validation and test) images that have ieee8023
lung masks or boxes with every given model and summarises the share of CAM energy inside the
lungs against the uniform-map baseline; :func:`randomisation_report` runs the Adebayo et al.
sanity check per model.  Notebook 07 and the command line below share them:

``python -m nbhelpers.explain --ablation-root results/runs/ablation-cpu64 --manifest M --seed 0 --out results/tables``
explains the ablation rows' runs of one seed and writes ``cam_lung_energy.{csv,md}`` and
``cam_randomisation.{csv,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from data_prep.atomic import write_text, write_with
from nbhelpers import lungs
from data_prep.schema import CLASSES
from nbhelpers.cam import cams_for_images, examples_per_class, randomisation_check
from nbhelpers.data import to_model_input
from nbhelpers.preprocess import ImageCache, PreprocessConfig

HELD_OUT = ("val", "test")


def run_cache(run, manifest: pd.DataFrame, data_dir: Path, cache_root: Path) -> ImageCache:
    """The image cache with the preprocessing that the finished run ``run`` (a
    :class:`nbhelpers.train.RunResult`) was trained on: a model is explained on the images it saw."""
    from nbhelpers.preprocess import build_cache

    cfg = PreprocessConfig(**run.metrics["data"]["preprocess"])
    return build_cache(manifest, data_dir, cache_root, cfg, progress=False)


def held_out_images(cache: ImageCache, splits: Sequence[str] = HELD_OUT) -> dict[str, np.ndarray]:
    """Cached uint8 images of ``splits`` by image id (never the training images)."""
    return {i: img for name in splits for i, img in zip(cache.split(name).image_ids, cache.split(name).images)}


def lung_energy_report(models: Mapping[str, nn.Module], cache: ImageCache, manifest: pd.DataFrame,
                       data_dir: Path, cfg: PreprocessConfig, device: torch.device | str = "cpu",
                       method: str = "gradcam") -> tuple[pd.DataFrame, pd.DataFrame, lungs.LungMasks]:
    """Lung energy of every model on the held-out images that have lung masks (or boxes).

    Returns ``(per_image, summary, masks)``: :func:`nbhelpers.lungs.lung_energy_table` and
    :func:`nbhelpers.lungs.summarise_lung_energy` (both empty when no held-out image has a mask).
    """
    images = held_out_images(cache)
    masks = lungs.lung_masks(manifest, data_dir, cfg, image_ids=list(images), progress=False, boxes=True)
    if not masks.image_ids:
        empty = lungs.lung_energy_table({}, masks)
        return empty, lungs.summarise_lung_energy(empty), masks
    stack = np.stack([images[i] for i in masks.image_ids])
    cams = {label: cams_for_images(net, stack, method=method, device=device, progress=False)[0]
            for label, net in models.items()}
    per_image = lungs.lung_energy_table(cams, masks)
    return per_image, lungs.summarise_lung_energy(per_image), masks


def randomisation_report(models: Mapping[str, nn.Module], images: np.ndarray,
                         device: torch.device | str = "cpu") -> pd.DataFrame:
    """Per model: mean and std over ``images`` (uint8 (N, H, W)) of the Spearman correlation and
    SSIM between its CAMs and those of its re-initialised copy (low = the maps depend on training)."""
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device), None, in_chans=3, train=False)
    checks = pd.concat([randomisation_check(net, x).assign(model=label) for label, net in models.items()])
    table = checks.groupby("model", sort=False)[["spearman", "ssim"]].agg(["mean", "std"])
    table.columns = ["_".join(c) for c in table.columns]
    return table.reset_index()


def main(argv: Sequence[str] | None = None) -> int:
    from nbhelpers import ablation
    from nbhelpers.complexity import markdown_table
    from nbhelpers.config import data_dir as resolve_data_dir
    from nbhelpers.train import load_trained

    parser = argparse.ArgumentParser(prog="python -m nbhelpers.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--ablation-root", type=Path, required=True, help="the --out folder of nbhelpers.ablation")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--data-dir", help="folder of the upstream sources (default: $CXR_DATA_DIR)")
    parser.add_argument("--groups", nargs="+", help="only these ablation groups")
    parser.add_argument("--seed", type=int, default=0, help="which seed's runs to explain")
    parser.add_argument("--randomisation-images", type=int, default=24, help="held-out images for the sanity check")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--figures", type=Path, help="also draw each group's CAMs on the same test images here")
    parser.add_argument("--figure-images", type=int, default=6, help="test images per figure")
    parser.add_argument("--prefix", default="cam", help="file names: PREFIX_lung_energy, PREFIX_randomisation, PREFIX_<group>.png")
    args = parser.parse_args(argv)
    data, manifest = resolve_data_dir(args.data_dir), pd.read_csv(args.manifest)
    energy, randomised, masks, n_sample = [], [], None, 0
    figure_cams: dict[str, dict[str, np.ndarray]] = {}  # group -> row name -> CAMs
    figure_images: dict[str, dict[str, np.ndarray]] = {}  # group -> row name -> images (rows may crop differently)
    figure_titles: dict[str, list[str]] = {}
    for row in ablation.load_grid(groups=args.groups):
        net, run = load_trained(ablation.run_dir(args.ablation_root, row, args.seed))
        cache = run_cache(run, manifest, data, args.ablation_root / "cache")
        cfg = cache.cfg
        label = f"{row.group}/{row.name}"
        per_image, _, masks = lung_energy_report({label: net}, cache, manifest, data, cfg)
        energy.append(per_image)
        sample = np.stack(list(held_out_images(cache).values())[: args.randomisation_images])
        randomised.append(randomisation_report({label: net}, sample))
        n_sample = len(sample)
        if args.figures:
            test = cache.split("test")
            picked = examples_per_class(test.labels, args.figure_images)
            shown = np.asarray(test.images[picked])
            figure_cams.setdefault(row.group, {})[row.name] = cams_for_images(net, shown, progress=False)[0]
            figure_images.setdefault(row.group, {})[row.name] = shown
            figure_titles[row.group] = [f"true {CLASSES[t]}" for t in test.labels[picked]]
    summary, randomised = lungs.summarise_lung_energy(pd.concat(energy)).reset_index(), pd.concat(randomised)
    header = (f"Made by `python -m nbhelpers.explain {shlex.join(argv if argv is not None else sys.argv[1:])}` on "
              f"{datetime.now(timezone.utc):%Y-%m-%d}, CPU; Grad-CAM of each row's seed-{args.seed} run; lung energy on "
              f"{len(masks.image_ids)} held-out ieee8023 COVID-19 images with lung masks ({masks.kinds.count('boxes')} "
              f"with lung boxes only); randomisation check on {n_sample} held-out images.")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in ((f"{args.prefix}_lung_energy", summary), (f"{args.prefix}_randomisation", randomised)):
        write_with(args.out / f"{name}.csv", lambda p, t=table: t.to_csv(p, index=False))
        write_text(args.out / f"{name}.md", f"{header}\n\n{markdown_table(table, digits=3)}\n")
        print(table.round(3).to_string(index=False))
    for group, cams in figure_cams.items():
        from nbhelpers.plots import cam_comparison

        images, titles = figure_images[group], figure_titles[group]
        args.figures.mkdir(parents=True, exist_ok=True)
        figure = args.figures / f"{args.prefix}_{group}.png"
        fig = cam_comparison(images, cams, titles)
        write_with(figure, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
        print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
