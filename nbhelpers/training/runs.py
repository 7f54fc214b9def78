"""Whole training runs: from names to a run folder with its test metrics, and back.

:func:`train_run` goes from names to results: protocol preset (``presets.toml``), manifest,
preprocessing cache, model, :func:`nbhelpers.training.loop.fit`, then **one** evaluation of the
test split with the best-validation checkpoint, written to ``metrics.json`` and
``test_predictions.csv``.  ``workbook train`` does the same from the shell.
What a run would train (model, options, pretrained, TrainConfig, manifest hash, preprocessing
and cache key, and the task when it is not the diagnosis) is one record, :func:`run_provenance`;
resuming, and reusing a finished run in the ablation grid or the shortcut probes, compare it
with the record the run stored (:func:`nbhelpers.training.provenance.provenance_differences`).

A run learns the three diagnoses of :data:`data_prep.schema.CLASSES` unless given other
``classes`` (the source probe learns archive groups).  The preprocessing cache stores each
image's label as its index among the diagnoses, so output ``k`` of a run with other classes
learns the images labelled ``CLASSES[k]``: such a task writes its groups into the manifest's
``label`` column under those names.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from data_prep import atomic
from data_prep import manifest as data_manifest
from data_prep.errors import InputNotFoundError
from data_prep.manifest import ManifestError
from data_prep.schema import CLASSES
from nbhelpers.evaluation import metrics as M
from nbhelpers.evaluation.predict import evaluate, predict
from nbhelpers.settings.device import describe, pick_device, seed_everything
from nbhelpers.training.checkpoint import hold_run_folder, load_checkpoint, read_resumable
from nbhelpers.training.config import (
    BEST_NAME,
    CONFIG_NAME,
    CURVES_NAME,
    LAST_NAME,
    LOG_NAME,
    METRICS_NAME,
    PREDICTIONS_NAME,
    TrainConfig,
    check_preprocess,
    config_from_preset,
)
from nbhelpers.training import tracking
from nbhelpers.training.loop import fit
from nbhelpers.training.provenance import check_resumable, jsonable, plain_values, saved_record

if TYPE_CHECKING:
    from nbhelpers.training.distributed import Ranks

#: Manifest columns a training run needs, and the splits it cannot do without.
RUN_COLUMNS = ("image_id", "path", "label", "split")
RUN_SPLITS = ("train", "val")


@dataclass
class RunResult:
    """What :func:`train_run` produced: the run folder and its log, metrics and configuration."""

    out_dir: Path
    log: pd.DataFrame
    metrics: dict[str, Any]
    config: TrainConfig

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / BEST_NAME

    @property
    def test_predictions(self) -> Path:
        return self.out_dir / PREDICTIONS_NAME


@dataclass
class RunPlan:
    """Everything :func:`train_run` decides before any work: the training config, the preset's
    extras, the checked manifest, the preprocessing config, the model options, the names of the
    model's outputs and the :func:`run_provenance` record."""

    cfg: TrainConfig
    extras: dict[str, Any]
    table: pd.DataFrame
    preprocess: Any  # nbhelpers.pipeline.preprocess.PreprocessConfig (imported lazily: keeps this module light)
    options: dict[str, Any]
    provenance: dict[str, Any]
    classes: tuple[str, ...] = CLASSES


def read_manifest(manifest: pd.DataFrame | Path | str) -> pd.DataFrame:
    """Return the manifest table (reading it when given a path), checked for what training needs:
    the checks of :func:`data_prep.manifest.read_manifest` (file, columns, labels, splits, no image,
    file or patient in two splits) and images in the train and validation splits.

    Raises :class:`~data_prep.errors.InputNotFoundError` (a FileNotFoundError) naming a missing
    file and how to make one, :class:`ManifestError` (a ValueError) for a manifest that cannot be
    trained on, and :class:`data_prep.split.LeakError` for one that would test on training images.
    """
    manifest = data_manifest.read_manifest(manifest, RUN_COLUMNS)
    empty = [s for s in RUN_SPLITS if not (manifest["split"] == s).any()]
    if empty:
        raise ManifestError(f"manifest has no images in split(s) {empty}; training needs {list(RUN_SPLITS)}")
    return manifest


def check_classes(classes: Sequence[str], table: pd.DataFrame) -> tuple[str, ...]:
    """``classes`` as a tuple, checked against what a run on ``table`` can learn: two to
    ``len(CLASSES)`` distinct names (the cache carries output ``k`` as label ``CLASSES[k]``), and
    no image labelled with a diagnosis beyond the last output.  Raises ValueError saying which
    (:class:`ManifestError` for labels without an output)."""
    if isinstance(classes, str) or not 2 <= len(classes) <= len(CLASSES):
        raise ValueError(f"classes must name 2 to {len(CLASSES)} outputs, got {classes!r}")
    classes = tuple(classes)
    if len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be distinct non-empty names, got {list(classes)}")
    beyond = sorted(set(table["label"].astype(str)) & set(CLASSES[len(classes):]))
    if beyond:
        raise ManifestError(f"manifest labels {beyond} have no output among the run's classes {list(classes)}: "
                         f"its outputs learn the images labelled {list(CLASSES[:len(classes)])}, in that order")
    return classes


def plan_run(
    model_name: str, manifest: pd.DataFrame | Path | str, preset: str = "seed001", seed: int = 0,
    model_options: Mapping[str, Any] | None = None, preprocess: Mapping[str, Any] | None = None,
    classes: Sequence[str] = CLASSES, task: str | None = None, **preset_overrides: Any,
) -> RunPlan:
    """Work out what :func:`train_run` with these arguments would train, without training or
    preprocessing anything (the manifest is read and hashed).

    ``preprocess`` may set ``size`` (default: the preset's ``image_size``); ``task`` (e.g.
    ``"source probe"``) goes into the record of a run that is not the diagnosis classifier.
    Raises what :func:`nbhelpers.training.config.config_from_preset`, :func:`read_manifest`,
    :func:`nbhelpers.training.config.check_preprocess` and :func:`check_classes` raise.
    """
    from nbhelpers.pipeline.cache import cache_key, manifest_hash
    from nbhelpers.pipeline.preprocess import PreprocessConfig

    cfg, extras = config_from_preset(preset, seed=seed, **preset_overrides)
    table = read_manifest(manifest)
    classes = check_classes(classes, table)
    pcfg = PreprocessConfig(**check_preprocess({"size": extras["image_size"], **(preprocess or {})}))
    options = dict(model_options or {})
    provenance = plain_values({
        "model": model_name, "options": options, "pretrained": extras["pretrained"], "config": asdict(cfg),
        "manifest_hash": manifest_hash(table), "preprocess": asdict(pcfg), "cache_key": cache_key(table, pcfg),
        **({"task": task} if task is not None else {}),
    })
    return RunPlan(cfg=cfg, extras=extras, table=table, preprocess=pcfg, options=options, provenance=provenance,
                   classes=classes)


def run_provenance(
    model_name: str, manifest: pd.DataFrame | Path | str, preset: str = "seed001", seed: int = 0,
    model_options: Mapping[str, Any] | None = None, preprocess: Mapping[str, Any] | None = None,
    classes: Sequence[str] = CLASSES, task: str | None = None, **preset_overrides: Any,
) -> dict[str, Any]:
    """The record of what a run with these :func:`train_run` arguments trains: ``model``,
    ``options``, ``pretrained``, ``config`` (the effective TrainConfig), ``manifest_hash``,
    ``preprocess`` and ``cache_key`` (plus ``task`` when given), as plain JSON values.  Finished
    runs store it (checkpoints, ``train_config.json``, ``metrics.json``); resuming and reusing a
    run compare it with :func:`nbhelpers.training.provenance.provenance_differences`.  Raises as
    :func:`plan_run`.
    """
    return plan_run(model_name, manifest, preset, seed, model_options, preprocess, classes, task,
                    **preset_overrides).provenance


def _save_predictions(path: Path, split, probs: np.ndarray, classes: Sequence[str],
                      patients: Sequence[str] | None = None) -> None:
    table = pd.DataFrame({"image_id": split.image_ids, "label": split.labels, "pred": probs.argmax(1)})
    if patients is not None:
        table.insert(1, "patient_id", list(patients))
    for c, name in enumerate(classes):
        table[f"p_{name}"] = probs[:, c]
    atomic.write_with(path, lambda tmp: table.to_csv(tmp, index=False))


def _save_curves(log: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt  # only for the figure; keeps `import nbhelpers.training.runs` light

    from nbhelpers.evaluation.plots import training_curves

    fig = training_curves(log)
    try:
        # The temporary name ends in .tmp: the format must be named.
        atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def _score_test(net: nn.Module, cache, plan: RunPlan, device: torch.device, out_dir: Path,
                n_boot: int) -> dict[str, Any] | None:
    """The one look at the test split: write ``test_predictions.csv`` and return its metrics
    (``None`` when the cache holds no test split)."""
    if "test" not in cache.splits:
        return None
    cfg, table = plan.cfg, plan.table
    test = cache.split("test")
    probs = predict(net, test, device, batch_size=cfg.batch_size, in_chans=cfg.in_chans)
    patients = None  # a manifest without patients: every image is its own patient
    if "patient_id" in table.columns:
        patient_of = dict(zip(table["image_id"].astype(str), table["patient_id"].astype(str)))
        patients = [patient_of.get(str(i), str(i)) for i in test.image_ids]
    _save_predictions(out_dir / PREDICTIONS_NAME, test, probs, plan.classes, patients)
    return evaluate(test.labels, probs, n_boot=n_boot, seed=cfg.seed, patients=patients, classes=plan.classes)


def _metrics_record(model_name: str, preset: str, manifest: pd.DataFrame | Path | str, source: Path, plan: RunPlan,
                    cache, device: torch.device, best: Mapping[str, Any], fitted: Mapping[str, Any],
                    train_seconds: float, test_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """What ``metrics.json`` holds for a finished run, as strict JSON values."""
    cfg = plan.cfg
    return jsonable({
        "model": model_name, "model_options": plan.options, "preset": preset, "seed": cfg.seed,
        "config": asdict(cfg), "pretrained": plan.extras["pretrained"], "classes": list(plan.classes),
        "device": describe(device), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"data_dir": str(source),
                 "manifest": str(manifest) if not isinstance(manifest, pd.DataFrame) else None,
                 "manifest_hash": plan.provenance["manifest_hash"], "cache_key": cache.key,
                 "preprocess": asdict(plan.preprocess),
                 "counts": {s: int(n) for s, n in cache.meta["counts"].items()}},
        "provenance": plan.provenance,
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "epochs_run": fitted["epochs_run"],
        "stopped_early": fitted["stopped_early"], "train_seconds": train_seconds, "test": test_metrics,
    })


def train_run(
    model_name: str,
    manifest: pd.DataFrame | Path | str,
    data_dir: Path | str | None,
    out_dir: Path | str,
    preset: str = "seed001",
    seed: int = 0,
    device: torch.device | str = "auto",
    model_options: dict[str, Any] | None = None,
    cache_root: Path | str | None = None,
    preprocess: dict[str, Any] | None = None,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    n_boot: int = M.N_BOOTSTRAP,
    on_epoch: Callable[[pd.DataFrame], None] | None = None,
    classes: Sequence[str] = CLASSES,
    task: str | None = None,
    ranks: Ranks | None = None,
    track: str | None = None,
    **preset_overrides: Any,
) -> RunResult:
    """Train ``model_name`` under protocol ``preset`` and evaluate it once on the test split.

    ``manifest`` is a curated manifest (table or CSV path), ``data_dir`` the source folder
    (``None``: ``$CXR_DATA_DIR``).  The images are preprocessed into ``cache_root`` (default
    ``out_dir/cache``) with :class:`~nbhelpers.pipeline.preprocess.PreprocessConfig` at the preset's
    ``image_size`` (``preprocess`` overrides any config field, e.g. ``{"clahe": False}``).  The
    model is built with one output per name of ``classes`` (default the three diagnoses; see the
    module docstring for other classes) and ``model_options`` after seeding with ``seed``;
    ``task`` names a run that is not the diagnosis classifier in its record (:func:`plan_run`);
    ``preset_overrides`` change single preset settings (``epochs=3``, ``pretrained=False``, any
    TrainConfig field), checked for type before any work.  The run holds ``out_dir/.lock``
    throughout; without ``resume`` the results of an earlier run in ``out_dir`` are removed
    first, with ``resume`` ``last.pt`` is continued only when its :func:`run_provenance` record
    matches (``epochs`` and ``patience`` may change).  Writes to ``out_dir``, each file
    atomically: the :func:`~nbhelpers.training.loop.fit` files, ``curves.png``,
    ``test_predictions.csv`` (a ``p_<class>`` column per output) and ``metrics.json`` (model,
    preset, config, classes, seed, device, torch version, date, data: manifest hash, cache key,
    split counts; ``provenance``; best epoch; test metrics with bootstrap CIs).  Returns a
    :class:`RunResult`.  Raises :class:`~nbhelpers.settings.presets.PresetError` for an unknown
    preset or setting, :class:`~nbhelpers.settings.keyvalue.AssignmentError` (a ValueError) for
    a setting of the wrong type, FileNotFoundError for a missing manifest, the model zoo's errors
    for an unknown model or option, ValueError for unusable ``classes`` or saying what differs
    when ``resume`` meets another run's ``last.pt``,
    :class:`~nbhelpers.training.checkpoint.RunFolderInUse` when another run holds ``out_dir`` and
    :class:`data_prep.atomic.WriteError` naming the file when the disk is full.

    ``ranks`` (from :func:`nbhelpers.training.distributed.start`, under torchrun) makes this
    process one rank of a data-parallel run on ``ranks.device``: rank 0 builds the cache and writes
    every file, the others train their share and return a result without metrics
    (:mod:`nbhelpers.training.distributed`); ``metrics.json`` then records the processes.
    ``track`` ("tensorboard" or "mlflow", off by default) also sends every epoch's log row to that
    tracker (:mod:`nbhelpers.training.tracking`), checked before any work.
    """
    from data_prep.datadir import data_dir as resolve_data_dir
    from nbhelpers import models
    from nbhelpers.pipeline.cache import build_cache
    from nbhelpers.training.distributed import check_batch, fit_distributed, main_first

    plan = plan_run(model_name, manifest, preset, seed, model_options, preprocess, classes, task, **preset_overrides)
    cfg, extras, table, pcfg, options = plan.cfg, plan.extras, plan.table, plan.preprocess, plan.options
    if ranks is not None:
        check_batch(cfg.batch_size, ranks.world)
        device = ranks.device
    main = ranks is None or ranks.main
    source = resolve_data_dir(data_dir)
    out_dir = Path(out_dir)
    device = pick_device(str(device), verbose=progress) if not isinstance(device, torch.device) else device
    seed_everything(cfg.seed)  # the model's random initialisation also follows the seed
    # The model first: a wrong option or an unreachable weights file stops the run before preprocessing.
    net = models.create(model_name, num_classes=len(plan.classes), in_chans=cfg.in_chans,
                        pretrained=extras["pretrained"], **options)
    models.registry.check_input_size(model_name, pcfg.size, cfg.in_chans, **options)  # before the cache, not after
    tracking.check(track)
    with hold_run_folder(out_dir) if main else nullcontext():
        last = out_dir / LAST_NAME
        if resume and last.is_file():
            # Say what differs before the cache is built (fit checks again, with the weights).
            check_resumable(saved_record(read_resumable(last, torch.device("cpu"))), plan.provenance, last)
        if not resume and main:
            # A fresh run: results of an earlier run here must not be mistaken for this one's.
            for name in (METRICS_NAME, PREDICTIONS_NAME, CURVES_NAME):
                (out_dir / name).unlink(missing_ok=True)
        with main_first(ranks):  # the other ranks reuse the cache rank 0 built
            cache = build_cache(table, source, Path(cache_root) if cache_root else out_dir / "cache", pcfg,
                                workers=workers, progress=progress)
        meta = {"model": model_name, "options": options, "preset": preset, "pretrained": extras["pretrained"],
                "preprocess": asdict(pcfg), "cache_key": cache.key, "classes": list(plan.classes),
                **({"task": task} if task is not None else {})}
        started = time.perf_counter()
        tracker = tracking.Tracker(track, out_dir, {**meta, "seed": seed, **asdict(cfg)}) if track and main else None
        try:
            if ranks is None:
                log = fit(net, cache.split("train"), cache.split("val"), cfg, out_dir, device, meta=meta,
                          resume=resume, progress=progress, on_epoch=tracking.chain(on_epoch, tracker),
                          provenance=plan.provenance, classes=plan.classes)
            else:
                log = fit_distributed(net, cache.split("train"), cache.split("val"), cfg, out_dir, ranks, meta=meta,
                                      resume=resume, progress=progress, on_epoch=tracking.chain(on_epoch, tracker),
                                      provenance=plan.provenance, classes=plan.classes)
        finally:
            if tracker is not None:
                tracker.close()
        train_seconds = time.perf_counter() - started
        if not main:
            return RunResult(out_dir=out_dir, log=log, metrics={}, config=cfg)
        if len(log):
            _save_curves(log, out_dir / CURVES_NAME)
        fitted = json.loads((out_dir / CONFIG_NAME).read_text())
        best = load_checkpoint(out_dir / BEST_NAME, net, device)
        test_metrics = _score_test(net, cache, plan, device, out_dir, n_boot)
        result = _metrics_record(model_name, preset, manifest, source, plan, cache, device, best, fitted,
                                 train_seconds, test_metrics)
        if ranks is not None:
            result["distributed"] = ranks.record()
        atomic.write_text(out_dir / METRICS_NAME, json.dumps(result, indent=2) + "\n")
    return RunResult(out_dir=out_dir, log=log, metrics=result, config=cfg)


def load_run(out_dir: Path | str) -> RunResult:
    """Read a finished :func:`train_run` folder back (log, metrics.json, config).

    Raises :class:`~data_prep.errors.InputNotFoundError` (a FileNotFoundError) naming the folder
    when its ``metrics.json`` is absent.
    """
    out_dir = Path(out_dir)
    path = out_dir / METRICS_NAME
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: {out_dir} is not a finished training run (train it with train_run)")
    result = json.loads(path.read_text())
    log = pd.read_csv(out_dir / LOG_NAME) if (out_dir / LOG_NAME).is_file() else pd.DataFrame()
    return RunResult(out_dir=out_dir, log=log, metrics=result, config=TrainConfig(**result["config"]))


def runs_table(run_dirs: Sequence[Path | str]) -> pd.DataFrame:
    """One row per finished run: model, preset, seed, best epoch and the test summary metrics —
    the input of :func:`nbhelpers.evaluation.metrics.aggregate` (mean ± std over seeds)."""
    rows = []
    for run_dir in run_dirs:
        m = load_run(run_dir).metrics
        test = m.get("test") or {}
        scalars = {k: v for k, v in test.items() if not isinstance(v, (dict, list))}
        rows.append({"model": m["model"], "preset": m["preset"], "seed": m["seed"], "best_epoch": m["best_epoch"],
                     "run_dir": str(run_dir), **scalars})
    return pd.DataFrame(rows)


def load_trained(out_dir: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, RunResult]:
    """Rebuild the model of a finished :func:`train_run` folder (name, options and classes from
    its ``metrics.json``; a run that recorded no classes learnt the three diagnoses) with its
    best-validation weights, in eval mode on ``device``.

    Raises FileNotFoundError naming the folder when the run has not finished.
    """
    from nbhelpers import models

    run = load_run(out_dir)
    net = models.create(run.metrics["model"], num_classes=len(run.metrics.get("classes", CLASSES)),
                        in_chans=run.config.in_chans, **run.metrics.get("model_options", {}))
    load_checkpoint(Path(out_dir) / BEST_NAME, net, device)
    return net.to(device).eval(), run
