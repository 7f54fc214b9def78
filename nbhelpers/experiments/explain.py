"""Measure where trained models look: lung energy and the weight-randomisation check, per model.

:func:`lung_energy_report` explains the held-out (validation and test) images that have ieee8023
lung masks or boxes with every given model, each for its true class, and summarises the share
of CAM energy inside the lungs against the uniform-map baseline over the film, and the pointing
game; :func:`randomisation_report` runs the Adebayo et al. sanity check (cascading and
independent) per model; :func:`verdict_sentences` says in words what passed and failed.  The
command explains every ablation row at one common CAM grid of at least 7x7 cells
(:func:`nbhelpers.evaluation.cam.layers_for_grid`), since a 2x2 map (DenseNet at 64 px) cannot localise.  Notebook 07 and the command line below share them:

``workbook explain --grid-root results/runs/ablation-cpu64 --manifest M --seeds 0 1 2 --out results/tables``
explains the ablation rows' runs of those seeds and writes ``cam_lung_energy.{csv,md}`` and
``cam_randomisation.{csv,md}``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from data_prep.progress import tqdm

from data_prep.atomic import write_with
from data_prep.errors import InputNotFoundError
from data_prep.manifest import read_manifest
from data_prep.options import add_data_dir, add_out
from nbhelpers.evaluation import lungs
from nbhelpers.pipeline import lungmasks
from data_prep.schema import CLASSES
from nbhelpers.evaluation.cam import MIN_GRID, cam_grid, cams_for_images, examples_per_class, layers_for_grid
from nbhelpers.evaluation.sanity import PASS_SPEARMAN, randomisation_check, randomisation_verdict
from nbhelpers.pipeline.data import to_model_input
from nbhelpers.pipeline.cache import ImageCache
from nbhelpers.pipeline.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from nbhelpers.experiments.ablation import Row

HELD_OUT = ("val", "test")


def run_cache(run, manifest: pd.DataFrame, data_dir: Path, cache_root: Path) -> ImageCache:
    """The image cache with the preprocessing that the finished run ``run`` (a
    :class:`nbhelpers.training.runs.RunResult`) was trained on: a model is explained on the images it saw."""
    from nbhelpers.pipeline.cache import build_cache

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
    """The cascading and independent randomisation check (:func:`nbhelpers.evaluation.sanity.randomisation_check`)
    of every model on ``images`` (uint8 (N, H, W)).

    Returns ``(verdicts, stages)``: one row per model with :func:`nbhelpers.evaluation.sanity.randomisation_verdict`
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
        low = row.excess_ci_low if np.isfinite(row.excess_ci_low) else row.excess_mean
        high = row.excess_ci_high if np.isfinite(row.excess_ci_high) else row.excess_mean
        if low > 0:
            reading = "passed: its maps favour the lungs"
        elif high < 0:
            reading = "failed: its maps favour the lungs less than a uniform map would"
        else:
            reading = "failed: not shown to favour the lungs over a uniform map (the interval includes no excess)"
        seeds = getattr(row, "seeds", 1)
        lines.append(
            f"{row.model}: lung energy {row.energy_mean:.2f} against {row.area_mean:.2f} for a uniform map on the film "
            f"({reading}); "
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook explain``."""
    parser.add_argument("--grid-root", type=Path, required=True, help="the --out folder of workbook grid")
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest the grid was trained on")
    add_data_dir(parser)
    parser.add_argument("--groups", nargs="+", help="only these ablation groups")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="which seeds' runs to explain (each image's values are averaged over them)")
    parser.add_argument("--randomisation-images", type=int, default=24, help="held-out images for the sanity check")
    add_out(parser, "the tables", required=True)
    parser.add_argument("--figures", type=Path, help="also draw each group's CAMs on the same test images here")
    parser.add_argument("--figure-images", type=int, default=6, help="test images per figure")
    parser.add_argument("--prefix", default="cam", help="file names: PREFIX_lung_energy, PREFIX_randomisation, PREFIX_<group>.png")


@dataclass
class _Explained:
    """What explaining the rows' runs seed by seed gathers: per-image lung energy, randomisation
    verdicts and curves (one frame per row and seed), the CAM grid, and for the figures each
    group's images, CAMs (by row name) and titles."""

    energy: list[pd.DataFrame] = field(default_factory=list)
    verdicts: list[pd.DataFrame] = field(default_factory=list)
    curves: list[pd.DataFrame] = field(default_factory=list)
    masks: lungmasks.LungMasks | None = None
    sanity_images: int = 0
    size: int | None = None
    side: int | None = None
    figure_cams: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    figure_images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # rows may crop differently
    figure_titles: dict[str, list[str]] = field(default_factory=dict)


def _explain_seed(args: argparse.Namespace, rows: Sequence[Row], seed: int, manifest: pd.DataFrame, data: Path,
                  found: _Explained) -> None:
    """Explain every row's run of ``seed`` at one CAM grid of at least :data:`MIN_GRID` cells a
    side (coarser maps cannot be compared) and add what it finds to ``found``."""
    from nbhelpers.experiments import ablation
    from nbhelpers.training.runs import load_trained

    trained = {f"{row.group}/{row.name}": load_trained(ablation.run_dir(args.grid_root, row, seed)) for row in rows}
    found.size = PreprocessConfig(**next(iter(trained.values()))[1].metrics["data"]["preprocess"]).size
    layers, found.side = layers_for_grid({label: net for label, (net, _) in trained.items()}, found.size)
    for row in tqdm(rows, desc=f"explaining seed {seed}", unit="run", disable=None):
        label = f"{row.group}/{row.name}"
        net, run = trained[label]
        cache = run_cache(run, manifest, data, args.grid_root / "cache")
        per_image, _, found.masks = lung_energy_report({label: net}, cache, manifest, data, cache.cfg, target_layers=layers)
        found.energy.append(per_image.assign(seed=seed))
        sample = np.stack(list(held_out_images(cache).values())[: args.randomisation_images])
        verdict, curve = randomisation_report({label: net}, sample, target_layers=layers)
        found.verdicts.append(verdict.assign(seed=seed))
        found.curves.append(curve.assign(seed=seed))
        found.sanity_images = len(sample)
        if args.figures and seed == args.seeds[0]:
            test = cache.split("test")
            picked = examples_per_class(test.labels, args.figure_images)
            shown = np.asarray(test.images[picked])
            found.figure_cams.setdefault(row.group, {})[row.name] = cams_for_images(
                net, shown, targets=list(test.labels[picked]), progress=False, target_layers=layers.get(label))[0]
            found.figure_images.setdefault(row.group, {})[row.name] = shown
            found.figure_titles[row.group] = [f"true {CLASSES[t]}" for t in test.labels[picked]]


def _notes(found: _Explained) -> str:
    """What the tables' header says about the CAMs, the lung-energy measure and the randomisation check."""
    grid = (f"{found.side}x{found.side} CAM grid for every row (the deepest layers giving at least {MIN_GRID} cells a "
            f"side at {found.size} px)" if found.side else
            f"each row's registered CAM layer (no common grid of {MIN_GRID}+ cells at {found.size} px)")
    masks = found.masks
    return (f"Grad-CAM of each row's runs, {grid}, each image explained for its true class; lung energy and "
            f"pointing game on {len(masks.image_ids)} distinct held-out ieee8023 COVID-19 images with lung masks "
            f"({masks.kinds.count('boxes')} with lung boxes only), the uniform baseline over the film area (padding "
            "and blank borders excluded), each image's values averaged over the seeds and intervals resampling "
            "patients; `lung_verdict` and `looks_outside` read the excess's interval, not its mean; randomisation "
            "check (Adebayo et al. 2018: raw maps, cascading and independent re-initialisation, Spearman of absolute values, SSIM, HOG) on "
            f"{found.sanity_images} held-out images per run, one verdict per row and seed, passed when the fully "
            f"randomised model's Spearman < {PASS_SPEARMAN} and no map is blank.")


def run_command(args: argparse.Namespace) -> int:
    """``workbook explain``: explain the grid rows' runs of ``--seeds``, write the lung-energy and
    randomisation tables to ``--out`` (and with ``--figures`` each group's CAMs), print the verdicts;
    returns 0."""
    from data_prep.datadir import data_dir as resolve_data_dir
    from nbhelpers.evaluation.plots import cam_comparison
    from nbhelpers.experiments import ablation
    from nbhelpers.settings.tables import provenance_header, write_table

    if not args.manifest.is_file():
        raise InputNotFoundError(f"manifest {args.manifest} not found; pass the manifest the grid was trained on")
    data, manifest = resolve_data_dir(args.data_dir), read_manifest(args.manifest, ("path", "patient_id"))
    rows = ablation.load_grid(groups=args.groups)
    found = _Explained()
    for seed in args.seeds:
        _explain_seed(args, rows, seed, manifest, data, found)
    summary = lungs.summarise_lung_energy(pd.concat(found.energy)).reset_index()
    verdicts, curves = pd.concat(found.verdicts), pd.concat(found.curves, ignore_index=True)
    header = provenance_header(args.command_line, manifest=args.manifest, seeds=args.seeds, device="cpu",
                               notes=_notes(found))
    for name, table in (("lung_energy", summary), ("randomisation", verdicts), ("randomisation_stages", curves)):
        write_table(table, args.out, f"{args.prefix}_{name}", header, digits=3)
        print(table.round(3).to_string(index=False))
    for line in verdict_sentences(summary, verdicts):
        print(line)
    for group, cams in found.figure_cams.items():
        figure = args.figures / f"{args.prefix}_{group}.png"
        fig = cam_comparison(found.figure_images[group], cams, found.figure_titles[group])
        write_with(figure, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
        print(f"wrote {figure}")
    return 0
