"""The source probe: can the architecture tell the archives apart within one diagnosis?

:func:`source_probe` trains the same architecture, within one diagnosis class, to tell one source
group from the rest (through the classifier's own training path, the group names as its classes)
and reports its balanced accuracy with an interval over patients; chance (0.5) is the bar for
"no source signal".  ``workbook audit probe --manifest M --data-dir D --out O`` runs it.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from data_prep import atomic
from data_prep.schema import CLASSES
from data_prep.split import DEFAULT_RATIOS, split_by_patient
from data_prep.errors import WorkbookError
from data_prep.options import add_data_dir, add_out
from nbhelpers.evaluation import metrics as M
from nbhelpers.evaluation.stats import balanced_accuracy
from nbhelpers.experiments.audit import COVID_MIXED_SOURCES, _read_table
from nbhelpers.settings.options import add_assignments, add_device, add_set

#: Two-sided confidence level of every interval here.
CI_LEVEL = M.CI_LEVEL
#: Two-sided confidence level of every interval here.
CI_LEVEL = M.CI_LEVEL
#: The balanced accuracy of a two-group probe that has learnt nothing.
CHANCE = 0.5
#: Two-sided confidence level of every interval here.
CI_LEVEL = M.CI_LEVEL
#: The balanced accuracy of a two-group probe that has learnt nothing.
CHANCE = 0.5
#: The probe's two groups travel through the preprocessing cache as these class names (the cache
#: stores labels as CLASSES indices): group 0 (the named or largest source) as index 0, group 1
#: (every other source of the class) as index 1.  They mean "group 0/1", not a diagnosis.
PROBE_CARRIERS: tuple[str, str] = (CLASSES[0], CLASSES[1])
#: Two-sided confidence level of every interval here.
CI_LEVEL = M.CI_LEVEL
#: The balanced accuracy of a two-group probe that has learnt nothing.
CHANCE = 0.5
#: The probe's two groups travel through the preprocessing cache as these class names (the cache
#: stores labels as CLASSES indices): group 0 (the named or largest source) as index 0, group 1
#: (every other source of the class) as index 1.  They mean "group 0/1", not a diagnosis.
PROBE_CARRIERS: tuple[str, str] = (CLASSES[0], CLASSES[1])
#: Losses the source probe trains with.
PROBE_LOSSES = ("ce", "label_smoothing")
#: Files the probe writes to its output folder (the training run itself goes to ``run/``).
PROBE_JSON = "probe.json"
PROBE_PREDICTIONS = "probe_predictions.csv"
PROBE_RUN_DIR = "run"
PROBE_CACHE_DIR = "cache"

class ProbeError(WorkbookError, ValueError):
    """The source probe cannot be set up from this manifest (too few sources, images or patients)."""


def _scores_with_ci(y_true: np.ndarray, y_pred: np.ndarray, n_boot: int, seed: int, level: float,
                    groups: Sequence | np.ndarray | None = None) -> pd.DataFrame:
    """Bootstrap intervals of accuracy and balanced accuracy of hard predictions, resampling
    ``groups`` (each image's patient) with all their images, or the images without groups."""
    n_classes = int(max(np.max(y_true), np.max(y_pred))) + 1
    onehot = np.eye(n_classes)[np.asarray(y_pred)]

    def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        pred = p.argmax(1)
        return {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": balanced_accuracy(y, pred)}

    return M.bootstrap_ci(np.asarray(y_true), onehot, scores, n=n_boot, seed=seed, level=level,
                          groups=groups).set_index("metric")


# --------------------------------------------------------------------------- the source probe


def probe_manifest(
    manifest: pd.DataFrame,
    label: str | Sequence[str] = "normal",
    sources: Sequence[str] | None = None,
    balance: bool = True,
    max_per_group: int | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    by: str = "source",
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The probe's own manifest: images of class ``label`` relabelled by source group, newly split.

    ``by`` names the manifest column the groups come from: ``source`` (the archive, the default)
    or any other, e.g. ``view`` for the view probe (can the model tell AP from PA films within one
    class?), with ``sources`` then naming the values of group 0 (``["PA"]``); rows with a blank
    value are left out.

    ``label`` may name several classes (e.g. ``["normal", "pneumonia"]``): the groups are then
    formed, balanced and capped within each class separately, so both groups hold the classes in
    the same proportions and the diagnosis cannot stand in for the source.
    Group 0 is ``sources`` (default: the source with most ``label`` images), group 1 every other
    source of that class.  With ``balance`` the larger group is cut (seeded sample) to the size of
    the smaller, so accuracy and balanced accuracy agree; ``max_per_group`` caps both groups.
    The ``label`` column then holds :data:`PROBE_CARRIERS` (group 0 -> ``covid``, 1 ->
    ``pneumonia``) so :func:`nbhelpers.pipeline.cache.build_cache` can store it, ``group`` the group
    index, and ``split`` a new patient-grouped split stratified by group
    (:func:`data_prep.split.split_by_patient`).  Returns the table and ``{group name: sources}``.
    Raises ProbeError when the class is absent, has a single source, a named source holds no
    such image, or a split lacks a group (too few patients: use more images).
    """
    need = [c for c in ("image_id", "source", "path", "patient_id", "label") if c not in manifest.columns]
    if need:
        raise KeyError(f"manifest lacks column(s) {need} needed by the source probe")
    labels = [label] if isinstance(label, str) else list(label)
    if len(labels) == 1:
        label = labels[0]  # ["normal"] (a command line's one choice) is the single-class probe
    unknown = sorted(set(labels) - set(CLASSES))
    if unknown or not labels:
        raise ProbeError(f"unknown class(es) {unknown or labels} for the source probe; use some of {CLASSES}")
    if len(labels) > 1:
        rng = np.random.default_rng(seed)
        parts, named = [], None
        for one in labels:
            part, named_one = probe_manifest(manifest, one, sources, balance, max_per_group, ratios,
                                             int(rng.integers(2**31)), by=by)
            parts.append(part)
            named = named or named_one
            if list(named_one.values())[0] != list(named.values())[0]:
                raise ProbeError(f"group 0 differs between classes ({list(named)} vs {list(named_one)}); "
                                 "name its sources explicitly with sources=[...]")
        table = pd.concat(parts, ignore_index=True).drop(columns="split")
        return _split_probe(table, ratios, seed), named
    if by not in manifest.columns:
        raise KeyError(f"manifest lacks column {by!r} that the probe's groups come from")
    rows = manifest[(manifest["label"] == label) & (manifest[by].astype(str).str.strip() != "")]
    counts = rows[by].value_counts()
    if len(counts) < 2:
        raise ProbeError(f"class {label!r} has images from {len(counts)} source(s) ({list(counts.index)}) in this "
                         "manifest; the source probe needs at least two: pick another label")
    first = list(sources) if sources else [str(counts.index[0])]
    absent = sorted(set(first) - set(counts.index))
    if absent:
        raise ProbeError(f"source(s) {absent} hold no {label!r} images here; sources with them: {list(counts.index)}")
    rest = sorted(set(counts.index) - set(first))
    if not rest:
        raise ProbeError(f"sources={first} covers every source of class {label!r}; leave at least one out")
    rng = np.random.default_rng(seed)
    group = rows[by].isin(first).map({True: 0, False: 1})
    size = int(group.value_counts().min()) if balance else None
    if max_per_group is not None:
        size = min(size, max_per_group) if size is not None else max_per_group
    parts = []
    for g in (0, 1):
        part = rows[group == g]
        if size is not None and len(part) > size:
            part = part.iloc[np.sort(rng.choice(len(part), size, replace=False))]
        parts.append(part.assign(group=g, label=PROBE_CARRIERS[g]))
    return _split_probe(pd.concat(parts, ignore_index=True), ratios, seed), {"+".join(first): first, "+".join(rest): rest}


def _split_probe(table: pd.DataFrame, ratios: Sequence[float], seed: int) -> pd.DataFrame:
    """A new patient-grouped split of a probe table; ProbeError when a split lacks a group."""
    table = table.copy()
    table["split"] = split_by_patient(table, ratios=ratios, seed=seed).to_numpy()
    for split in ("train", "val", "test"):
        present = set(table.loc[table["split"] == split, "group"])
        if present != {0, 1}:
            raise ProbeError(f"the probe's {split} split holds group(s) {sorted(present)} only ({len(table)} images "
                             f"of {table['patient_id'].nunique()} patients); use more images (max_per_group)")
    return table


def _probe_run(
    manifest: pd.DataFrame | Path | str, label: str | Sequence[str], sources: Sequence[str] | None, model: str,
    preset: str, seed: int, image_size: int | None, epochs: int | None, balance: bool, max_per_group: int | None,
    preprocess: dict[str, Any] | None, overrides: dict[str, Any], by: str = "source",
) -> tuple[pd.DataFrame, dict[str, list[str]], dict[str, Any]]:
    """The probe's manifest, its groups, and the arguments its training run takes alike in
    :func:`nbhelpers.training.runs.plan_run` and :func:`nbhelpers.training.runs.train_run`: the
    probe manifest, the group names as the run's classes, and the task ``"<by> probe"`` in its
    record, so a two-output probe is never taken for a diagnosis run (nothing trained or cached)."""
    table, groups = probe_manifest(_read_table(manifest, "probe pool table"), label, sources, balance, max_per_group, seed=seed,
                                   by=by)
    sizes = {"size": image_size} if image_size is not None else {}
    run = {"model_name": model, "manifest": table, "preset": preset, "seed": seed,
           "preprocess": {**sizes, **(preprocess or {})}, "classes": tuple(groups), "task": f"{by} probe",
           "epochs": epochs, **overrides}
    return table, groups, run


def probe_provenance(
    manifest: pd.DataFrame | Path | str,
    label: str | Sequence[str] = "normal",
    sources: Sequence[str] | None = None,
    model: str = "densenet121",
    preset: str = "smoke",
    seed: int = 0,
    image_size: int | None = None,
    epochs: int | None = None,
    balance: bool = True,
    max_per_group: int | None = None,
    preprocess: dict[str, Any] | None = None,
    by: str = "source",
    **overrides: Any,
) -> dict[str, Any]:
    """The :func:`nbhelpers.training.runs.run_provenance` record of the probe :func:`source_probe` with
    these arguments would train (its manifest hash covers the label, groups, balancing, cap and
    seed), with its ``task``; nothing is trained.  Raises as :func:`source_probe` before training."""
    from nbhelpers.training.runs import run_provenance

    return run_provenance(**_probe_run(manifest, label, sources, model, preset, seed, image_size, epochs, balance,
                                       max_per_group, preprocess, overrides, by)[2])


def source_probe(
    manifest: pd.DataFrame | Path | str,
    data_dir: Path | str | None,
    out_dir: Path | str,
    label: str | Sequence[str] = "normal",
    sources: Sequence[str] | None = None,
    model: str = "densenet121",
    preset: str = "smoke",
    seed: int = 0,
    image_size: int | None = None,
    epochs: int | None = None,
    device: str = "cpu",
    balance: bool = True,
    max_per_group: int | None = None,
    n_boot: int = M.N_BOOTSTRAP,
    level: float = CI_LEVEL,
    progress: bool = True,
    preprocess: dict[str, Any] | None = None,
    by: str = "source",
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``model`` to tell the source groups of class ``label`` apart; report balanced accuracy.

    With ``by="view"`` (and ``sources=["PA"]``) the groups are views instead: the view probe.

    Builds :func:`probe_manifest` (``sources``, ``balance``, ``max_per_group``, ``seed``) and
    trains on it with :func:`nbhelpers.training.runs.train_run`, the classifier's own training
    path: a model with one output per group, from preset ``preset`` (``epochs`` and
    ``overrides`` change single settings, checked for type), its images cached at
    ``image_size`` (default: the preset's; ``preprocess`` sets other
    :class:`~nbhelpers.pipeline.preprocess.PreprocessConfig` fields, e.g. ``{"lung_crop": True}``
    to probe a mitigation) under ``out_dir/cache``, the run in ``out_dir/run`` (afresh: an
    earlier probe's results there are removed first), its best-validation checkpoint scored once
    on the probe's test split.  Returns (and writes atomically as ``probe.json``) the groups,
    split counts, settings, ``provenance`` (:func:`probe_provenance`), and ``test``: n (images),
    patients, balanced_accuracy with a bootstrap interval over patients (low, high), accuracy,
    AUC, chance (0.5); ``probe_predictions.csv`` holds each test image's source, group,
    prediction and p_group1.  Raises ProbeError for an unusable manifest or a loss outside
    :data:`PROBE_LOSSES`, AssignmentError (a ValueError) for a setting of the wrong type, and the
    trainer's and model zoo's errors for an unknown preset, setting or model.
    """
    from nbhelpers.training.provenance import jsonable
    from nbhelpers.training.runs import plan_run, train_run

    table, groups, run_args = _probe_run(manifest, label, sources, model, preset, seed, image_size, epochs, balance,
                                         max_per_group, preprocess, dict(overrides), by)
    loss = plan_run(**run_args).cfg.loss
    if loss not in PROBE_LOSSES:
        raise ProbeError(f"the source probe trains two outputs; loss {loss!r} is not supported, use one of {PROBE_LOSSES}")
    out_dir = Path(out_dir)
    for name in (PROBE_JSON, PROBE_PREDICTIONS):  # an earlier probe's results must not outlive this one's start
        (out_dir / name).unlink(missing_ok=True)
    run = train_run(data_dir=data_dir, out_dir=out_dir / PROBE_RUN_DIR, device=device,
                    cache_root=out_dir / PROBE_CACHE_DIR, progress=progress, n_boot=n_boot, **run_args)
    predictions = _probe_predictions(run.test_predictions, table, list(groups))
    atomic.write_with(out_dir / PROBE_PREDICTIONS, lambda tmp: predictions.to_csv(tmp, index=False))
    names, m = list(groups), run.metrics
    result = {
        "label": label if isinstance(label, str) else "+".join(label), "by": by,
        "groups": {str(i): {"name": n, "sources": groups[n]} for i, n in enumerate(names)},
        "counts": {s: {names[g]: int(((table["split"] == s) & (table["group"] == g)).sum()) for g in (0, 1)}
                   for s in ("train", "val", "test")},
        "model": model, "preset": preset, "seed": m["seed"], "image_size": m["data"]["preprocess"]["size"],
        "config": m["config"], "preprocess": m["data"]["preprocess"], "provenance": m["provenance"],
        "balance": balance, "max_per_group": max_per_group, "device": m["device"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "best_epoch": m["best_epoch"], "best_val_acc": m["best_val_acc"],
        "test": _probe_test(predictions, n_boot, run.config.seed, level),
    }
    result = jsonable(result)
    atomic.write_text(out_dir / PROBE_JSON, json.dumps(result, indent=2) + "\n")
    return result


def _probe_predictions(path: Path, table: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Each test image of the probe's run (its ``test_predictions.csv`` at ``path``, one
    ``p_<group name>`` column per output) with its source from the probe manifest ``table``:
    image_id, patient_id, source, group, pred, p_group1."""
    scored = pd.read_csv(path, dtype={"image_id": str, "patient_id": str}, keep_default_na=False)
    by_id = table.set_index(table["image_id"].astype(str))
    return pd.DataFrame({"image_id": scored["image_id"], "patient_id": scored["patient_id"],
                         "source": by_id.loc[scored["image_id"], "source"].to_numpy(),
                         "group": scored["label"], "pred": scored["pred"], "p_group1": scored[f"p_{names[1]}"]})


def _probe_test(predictions: pd.DataFrame, n_boot: int, seed: int, level: float) -> dict[str, Any]:
    """The probe's test scores from :func:`_probe_predictions`: n (images), patients,
    balanced_accuracy with a bootstrap interval over patients (low, high), accuracy, AUC, chance."""
    y, pred, patients = predictions["group"].to_numpy(), predictions["pred"].to_numpy(), predictions["patient_id"].to_numpy()
    ci = _scores_with_ci(y, pred, n_boot, seed, level, groups=patients)  # patients, not images, resampled
    return {"n": int(len(y)), "patients": int(len(set(patients))), "unit": "patient",
            "balanced_accuracy": ci.loc["balanced_accuracy", "value"],
            "low": ci.loc["balanced_accuracy", "low"], "high": ci.loc["balanced_accuracy", "high"],
            "level": level, "n_boot": n_boot, "accuracy": ci.loc["accuracy", "value"],
            "auc": M.binary_auc(y == 1, predictions["p_group1"].to_numpy()), "chance": CHANCE}


def probe_pool(table: pd.DataFrame, result) -> pd.DataFrame:
    """Every image that passed curation's filters and de-duplication, balanced or not: the rows of
    ``table`` (from :func:`data_prep.table.load_table`) kept in ``result.manifest`` (a
    :class:`data_prep.CurationResult`) or dropped only by balancing.  The probe needs them all:
    the non-NIH normals are few."""
    dropped = result.dropped
    keep = set(result.manifest["image_id"]) | set(dropped.loc[dropped["reason"] == "balance", "image_id"])
    return table[table["image_id"].isin(keep)].reset_index(drop=True)


def probe_pool_from_sources(data_dir: Path | str, per_class: int, views: Sequence[str] | None = None,
                            allow_ap: bool = False, min_age: float | None = 18, seed: int = 0,
                            split: Sequence[float] = DEFAULT_RATIOS) -> pd.DataFrame:
    """The probe's pool straight from the sources: every image that passes curation's filters and
    de-duplication (:func:`probe_pool`), taking *every* class from the sources that mix classes
    (:data:`COVID_MIXED_SOURCES`; the paper takes only COVID-19 from ieee8023), so that each
    non-COVID class has images from more than one archive.  The other arguments are curation's
    (:class:`data_prep.CurationParams`)."""
    from data_prep.recipe import CurationParams, every_class_from
    from data_prep.curate import curate
    from data_prep.table import load_table

    table, report = load_table(Path(data_dir))
    kwargs = {"views": list(views)} if views else {}
    params = CurationParams(per_class=per_class, balance="down", allow_ap=allow_ap, min_age=min_age, seed=seed,
                            split=tuple(split), source_classes=every_class_from(COVID_MIXED_SOURCES), **kwargs)
    return probe_pool(table, curate(table, params, data_dir=Path(data_dir), report=report))


# --------------------------------------------------------------------------- command line


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook audit probe``."""
    parser.add_argument("--manifest", type=Path, required=True, help="curated manifest.csv (workbook curate)")
    add_data_dir(parser)
    add_out(parser, "probe.json, the predictions, the run and the cache", required=True)
    parser.add_argument("--label", nargs="+", default=["normal"], choices=CLASSES,
                        help="the diagnosis class(es) probed; with several, groups are balanced within each")
    parser.add_argument("--sources", nargs="*", default=None, help="sources of group 0 (default: the largest)")
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None)
    add_device(parser, "the probe")
    parser.add_argument("--no-balance", action="store_true", help="keep every image of the larger group")
    parser.add_argument("--max-per-group", type=int, default=None)
    parser.add_argument("--n-boot", type=int, default=M.N_BOOTSTRAP)
    add_set(parser)
    add_assignments(parser, "--preprocess", "PreprocessConfig fields", "lung_crop=true mask_markers=true")


def run_probe_command(args: argparse.Namespace) -> int:
    """``workbook audit probe``: train the source probe and print its result; returns 0.
    ``--set`` values are typed by the setting they change (``pretrained=false`` is False),
    ``--preprocess`` values by the PreprocessConfig field."""
    from nbhelpers.training.config import parse_preprocess, parse_set

    label = args.label[0] if len(args.label) == 1 else args.label
    result = source_probe(args.manifest, args.data_dir, args.out, label=label, sources=args.sources,
                          model=args.model, preset=args.preset, seed=args.seed, image_size=args.image_size,
                          device=args.device, balance=not args.no_balance, max_per_group=args.max_per_group,
                          n_boot=args.n_boot, preprocess=parse_preprocess(args.preprocess), **parse_set(args.set))
    print(json.dumps({"label": result["label"], "groups": result["groups"], **result["test"]}, indent=2))
    print(f"probe written to {args.out}")
    return 0
