"""Measure where trained models look: lung energy and the weight-randomisation check, per model.

:func:`lung_energy_report` explains the held-out (validation and test) images that have ieee8023
lung masks or boxes with every given model, each for its true class, and summarises the share
of CAM energy inside the lungs against the uniform-map baseline over the film, and the pointing
game; :func:`randomisation_report` runs the Adebayo et al. sanity check (cascading and
independent) per model; :func:`verdict_sentences` says in words what passed and failed.  The
command explains every ablation row at one common CAM grid of at least 7x7 cells
(:func:`nbhelpers.evaluation.cam.layers_for_grid`), since a 2x2 map (DenseNet at 64 px) cannot localise.  Notebook 07 and the command line below share them:

``python -m nbhelpers.experiments.explain --ablation-root results/runs/ablation-cpu64 --manifest M --seeds 0 1 2 --out results/tables``
explains the ablation rows' runs of those seeds and writes ``cam_lung_energy.{csv,md}`` and
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
from tqdm.auto import tqdm

from data_prep.atomic import write_text, write_with
from nbhelpers.evaluation import lungs
from nbhelpers.pipeline import lungmasks
from data_prep.schema import CLASSES
from nbhelpers.evaluation.cam import (
    cam_grid,
    cams_for_images,
    examples_per_class,
    layers_for_grid,
    randomisation_check,
    randomisation_verdict,
)
from nbhelpers.evaluation.cam import MIN_GRID, PASS_SPEARMAN
from nbhelpers.pipeline.data import to_model_input
from nbhelpers.pipeline.preprocess import ImageCache, PreprocessConfig

HELD_OUT = ("val", "test")


def run_cache(run, manifest: pd.DataFrame, data_dir: Path, cache_root: Path) -> ImageCache:
    """The image cache with the preprocessing that the finished run ``run`` (a
    :class:`nbhelpers.training.train.RunResult`) was trained on: a model is explained on the images it saw."""
    from nbhelpers.pipeline.preprocess import build_cache

    cfg = PreprocessConfig(**run.metrics["data"]["preprocess"])
    return build_cache(manifest, data_dir, cache_root, cfg, progress=False)


def held_out_images(cache: ImageCache, splits: Sequence[str] = HELD_OUT) -> dict[str, np.ndarray]:
    """Cached uint8 images of ``splits`` by image id (never the training images)."""
    return {i: img for name in splits for i, img in zip(cache.split(name).image_ids, cache.split(name).images)}


def held_out_labels(cache: ImageCache, splits: Sequence[str] = HELD_OUT) -> dict[str, int]:
    """True class index of every image of ``splits`` by image id."""
    return {i: int(y) for name in splits for i, y in zip(cache.split(name).image_ids, cache.split(name).labels)}


def lung_energy_report(models: Mapping[str, nn.Module], cache: ImageCache, manifest: pd.DataFrame,
                       data_dir: Path, cfg: PreprocessConfig, device: torch.device | str = "cpu",
                       method: str = "gradcam", target_layers: Mapping[str, Sequence[nn.Module] | None] | None = None,
                       ) -> tuple[pd.DataFrame, pd.DataFrame, lungmasks.LungMasks]:
    """Lung energy and pointing game of every model on the held-out images that have lung masks
    (or boxes), each image explained for its **true** class (the COVID-19 films upstream drew
    masks for), not for whatever the model predicted.

    ``target_layers`` (per model label, e.g. from :func:`nbhelpers.evaluation.cam.layers_for_grid`) choose
    the CAM layer; each row records its CAM ``grid``.  Returns ``(per_image, summary, masks)``:
    :func:`nbhelpers.evaluation.lungs.lung_energy_table` and :func:`nbhelpers.evaluation.lungs.summarise_lung_energy`
    (both empty when no held-out image has a mask).
    """
    images, labels = held_out_images(cache), held_out_labels(cache)
    masks = lungmasks.lung_masks(manifest, data_dir, cfg, image_ids=list(images), progress=False, boxes=True)
    if not masks.image_ids:
        empty = lungs.lung_energy_table({}, masks)
        return empty, lungs.summarise_lung_energy(empty), masks
    stack = np.stack([images[i] for i in masks.image_ids])
    truth = [labels[i] for i in masks.image_ids]
    layers = dict(target_layers or {})
    cams, grids = {}, {}
    for label, net in models.items():
        chosen = layers.get(label)
        cams[label] = cams_for_images(net, stack, targets=truth, method=method, device=device, progress=False,
                                      target_layers=chosen)[0]
        grids[label] = "x".join(map(str, cam_grid(net, cfg.size, chosen)))
    per_image = lungs.lung_energy_table(cams, masks)
    patients = manifest.drop_duplicates("image_id").set_index("image_id")["patient_id"] \
        if {"image_id", "patient_id"} <= set(manifest.columns) else None
    if patients is not None:
        per_image.insert(2, "patient_id", per_image["image_id"].map(patients))
    per_image.insert(1, "grid", per_image["model"].map(grids))
    per_image.insert(2, "target", "true class")
    return per_image, lungs.summarise_lung_energy(per_image), masks


def randomisation_report(models: Mapping[str, nn.Module], images: np.ndarray, device: torch.device | str = "cpu",
                         target_layers: Mapping[str, Sequence[nn.Module] | None] | None = None,
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cascading and independent randomisation check (:func:`nbhelpers.evaluation.cam.randomisation_check`)
    of every model on ``images`` (uint8 (N, H, W)).

    Returns ``(verdicts, stages)``: one row per model with :func:`nbhelpers.evaluation.cam.randomisation_verdict`
    (the fully randomised model's mean Spearman / SSIM / HOG, blank maps, passed, reason), and
    one row per model, mode and stage with the mean similarities (the cascade's curve).
    """
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device), None, in_chans=3, train=False)
    layers = dict(target_layers or {})
    verdicts, curves = [], []
    for label, net in models.items():
        check = randomisation_check(net, x, target_layers=layers.get(label))
        verdicts.append({"model": label, **randomisation_verdict(check)})
        curve = check.groupby(["mode", "step", "stage"], sort=False)[["spearman", "ssim", "hog"]].mean().reset_index()
        blank = check.groupby(["mode", "step"], sort=False)["blank_random"].sum().to_numpy()
        curves.append(curve.assign(model=label, blank_random=blank))
    return pd.DataFrame(verdicts), pd.concat(curves, ignore_index=True)


def verdict_sentences(energy: pd.DataFrame, randomisation: pd.DataFrame) -> list[str]:
    """One sentence per model and diagnostic saying whether it passed and what that means, from
    :func:`nbhelpers.evaluation.lungs.summarise_lung_energy` (indexed by model or with a model column) and the
    verdicts of :func:`randomisation_report`."""
    lines = []
    table = energy.reset_index() if "model" not in energy.columns else energy
    for row in table.itertuples(index=False):
        above = row.excess_ci_low > 0 if np.isfinite(row.excess_ci_low) else row.excess_mean > 0
        seeds = getattr(row, "seeds", 1)
        lines.append(
            f"{row.model}: lung energy {row.energy_mean:.2f} against {row.area_mean:.2f} for a uniform map on the film "
            f"({'passed: its maps favour the lungs' if above else 'failed: its maps favour the lungs no more than a uniform map would'}); "
            f"pointing game {row.pointing_rate:.2f} [{row.pointing_low:.2f}, {row.pointing_high:.2f}] "
            f"(chance {row.pointing_chance:.2f}) over {row.images} images"
            + (f" of {row.patients} patients" if hasattr(row, "patients") else "")
            + (f", each averaged over {seeds} seeds" if seeds > 1 else "")
            + (f"; {row.blank_maps} blank map(s)" if row.blank_maps else "") + ".")
    if "seed" in randomisation.columns:
        for model, runs in randomisation.groupby("model", sort=False):
            passed = int(runs["passed"].sum())
            failed = runs.loc[~runs["passed"].astype(bool), "reason"]
            lines.append(f"{model}: randomisation check passed in {passed} of {len(runs)} seeds' runs"
                         + (f"; failed: {failed.iloc[0]}" if len(failed) else f" (mean Spearman "
                            f"{runs['spearman_full'].mean():.2f} after full randomisation)") + ".")
        return lines
    for row in randomisation.itertuples(index=False):
        lines.append(f"{row.model}: randomisation check {'passed' if row.passed else 'failed'}: {row.reason}.")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from nbhelpers.experiments import ablation
    from nbhelpers.models.complexity import markdown_table
    from data_prep.datadir import data_dir as resolve_data_dir
    from nbhelpers.training.train import load_trained

    parser = argparse.ArgumentParser(prog="python -m nbhelpers.experiments.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--ablation-root", type=Path, required=True, help="the --out folder of nbhelpers.experiments.ablation")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--data-dir", help="folder of the upstream sources (default: $CXR_DATA_DIR)")
    parser.add_argument("--groups", nargs="+", help="only these ablation groups")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="which seeds' runs to explain (each image's values are averaged over them)")
    parser.add_argument("--randomisation-images", type=int, default=24, help="held-out images for the sanity check")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--figures", type=Path, help="also draw each group's CAMs on the same test images here")
    parser.add_argument("--figure-images", type=int, default=6, help="test images per figure")
    parser.add_argument("--prefix", default="cam", help="file names: PREFIX_lung_energy, PREFIX_randomisation, PREFIX_<group>.png")
    args = parser.parse_args(argv)
    data, manifest = resolve_data_dir(args.data_dir), pd.read_csv(args.manifest)
    energy, randomised, curves, masks, n_sample = [], [], [], None, 0
    figure_cams: dict[str, dict[str, np.ndarray]] = {}  # group -> row name -> CAMs
    figure_images: dict[str, dict[str, np.ndarray]] = {}  # group -> row name -> images (rows may crop differently)
    figure_titles: dict[str, list[str]] = {}
    rows = ablation.load_grid(groups=args.groups)
    size, side = None, None
    for seed in args.seeds:
        trained = {f"{row.group}/{row.name}": load_trained(ablation.run_dir(args.ablation_root, row, seed))
                   for row in rows}
        size = PreprocessConfig(**next(iter(trained.values()))[1].metrics["data"]["preprocess"]).size
        # One CAM grid for every row, at least MIN_GRID cells per side: coarser maps cannot be compared.
        layers, side = layers_for_grid({label: net for label, (net, _) in trained.items()}, size)
        for row in tqdm(rows, desc=f"explaining seed {seed}", disable=None):
            label = f"{row.group}/{row.name}"
            net, run = trained[label]
            cache = run_cache(run, manifest, data, args.ablation_root / "cache")
            cfg = cache.cfg
            per_image, _, masks = lung_energy_report({label: net}, cache, manifest, data, cfg, target_layers=layers)
            energy.append(per_image.assign(seed=seed))
            sample = np.stack(list(held_out_images(cache).values())[: args.randomisation_images])
            verdict, curve = randomisation_report({label: net}, sample, target_layers=layers)
            randomised.append(verdict.assign(seed=seed))
            curves.append(curve.assign(seed=seed))
            n_sample = len(sample)
            if args.figures and seed == args.seeds[0]:
                test = cache.split("test")
                picked = examples_per_class(test.labels, args.figure_images)
                shown = np.asarray(test.images[picked])
                figure_cams.setdefault(row.group, {})[row.name] = cams_for_images(
                    net, shown, targets=list(test.labels[picked]), progress=False, target_layers=layers.get(label))[0]
                figure_images.setdefault(row.group, {})[row.name] = shown
                figure_titles[row.group] = [f"true {CLASSES[t]}" for t in test.labels[picked]]
    summary, randomised = lungs.summarise_lung_energy(pd.concat(energy)).reset_index(), pd.concat(randomised)
    curves = pd.concat(curves, ignore_index=True)
    grid = f"{side}x{side} CAM grid for every row (the deepest layers giving at least {MIN_GRID} cells a side at {size} px)" \
        if side else f"each row's registered CAM layer (no common grid of {MIN_GRID}+ cells at {size} px)"
    header = (f"Made by `python -m nbhelpers.experiments.explain {shlex.join(argv if argv is not None else sys.argv[1:])}` on "
              f"{datetime.now(timezone.utc):%Y-%m-%d}, CPU; Grad-CAM of each row's runs with seeds "
              f"{', '.join(map(str, args.seeds))}, {grid}, each image explained for its true class; lung energy and "
              f"pointing game on {len(masks.image_ids)} distinct held-out "
              f"ieee8023 COVID-19 images with lung masks ({masks.kinds.count('boxes')} with lung boxes only), the uniform "
              f"baseline over the film area (padding and blank borders excluded), each image's values averaged over "
              f"the seeds and intervals resampling patients; randomisation check (Adebayo et al. "
              f"2018: raw maps, cascading and independent re-initialisation, Spearman of absolute values, SSIM, HOG) on "
              f"{n_sample} held-out images per run, one verdict per row and seed, passed when the fully randomised model's Spearman < {PASS_SPEARMAN} and no map is blank.")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in ((f"{args.prefix}_lung_energy", summary), (f"{args.prefix}_randomisation", randomised),
                        (f"{args.prefix}_randomisation_stages", curves)):
        write_with(args.out / f"{name}.csv", lambda p, t=table: t.to_csv(p, index=False))
        write_text(args.out / f"{name}.md", f"{header}\n\n{markdown_table(table, digits=3)}\n")
        print(table.round(3).to_string(index=False))
    for line in verdict_sentences(summary, randomised):
        print(line)
    for group, cams in figure_cams.items():
        from nbhelpers.evaluation.plots import cam_comparison

        images, titles = figure_images[group], figure_titles[group]
        args.figures.mkdir(parents=True, exist_ok=True)
        figure = args.figures / f"{args.prefix}_{group}.png"
        fig = cam_comparison(images, cams, titles)
        write_with(figure, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
        print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
