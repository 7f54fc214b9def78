"""The shortcut audit's measurements: is a model reading the disease or the archive?

In the public COVID sets the source and the label nearly coincide (COVID-19 images from
ieee8023/Figure1/Actualmed, normals and pneumonias mostly from NIH/RSNA), so a classifier can
score well by recognising the archive (DeGrave et al., Nature Machine Intelligence 2021).
Three measurements make that visible:

* :func:`per_source_table` — a finished run's test accuracy per (source x class), with counts
  and a 95 % Wilson interval (within one true class, accuracy is that class's sensitivity).
* :func:`within_source_table` — the diagnosis accuracy on the test images of sources that hold
  more than one class (ieee8023, Actualmed, Figure1): there the archive gives no hint.
* :func:`source_probe` — within one diagnosis class, train the same architecture to tell one
  source group from the rest and report its balanced accuracy with a bootstrap interval; chance
  (0.5) is the bar for "no source signal".

``workbook audit probe --manifest M --data-dir D --out O`` runs the probe and
``workbook audit tables --manifest M --run R --out O`` writes both tables of a run.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from data_prep import atomic
from data_prep.schema import CLASSES, label_index
from data_prep.split import DEFAULT_RATIOS, split_by_patient
from data_prep.errors import InputNotFoundError, WorkbookError
from data_prep.options import add_data_dir, add_out
from nbhelpers.evaluation import metrics as M
from nbhelpers.settings.options import add_assignments, add_device, add_set

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
#: Tables ``workbook audit tables`` writes (``.csv`` and ``.md``).
PER_SOURCE_TABLE = "per_source"
WITHIN_SOURCE_TABLE = "within_source"
#: Sources whose images mix COVID-19 with another class: the shortcut-free COVID comparison.
COVID_MIXED_SOURCES = ("ieee8023", "actualmed", "figure1")
#: Label written for the all-classes row of a source in :func:`per_source_table`.
ALL_CLASSES = "all"


class ProbeError(WorkbookError, ValueError):
    """The source probe cannot be set up from this manifest (too few sources, images or patients)."""


# --------------------------------------------------------------------------- intervals


def wilson_interval(correct: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` at confidence ``level``.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small ``n`` and for
    0 % or 100 %.  Returns ``(nan, nan)`` for ``n == 0``; raises ValueError for ``correct``
    outside ``[0, n]`` or ``level`` outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must lie between 0 and n={n}")
    z = stats.norm.ppf(0.5 + level / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 % and 100 % the bound is exactly 0 or 1; the formula leaves float noise there.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return float(low), float(high)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's ``balanced_accuracy_score``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


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


# --------------------------------------------------------------------------- tables of a finished run


def _as_index(values: pd.Series, column: str) -> np.ndarray:
    """Class indices from a column of indices or class names; ValueError names the column."""
    if pd.api.types.is_numeric_dtype(values):
        out = values.to_numpy().astype(np.int64)
        if len(out) and (out.min() < 0 or out.max() >= len(CLASSES)):
            raise ValueError(f"predictions column {column!r} holds indices outside 0..{len(CLASSES) - 1}")
        return out
    return np.array([label_index(str(v)) for v in values], dtype=np.int64)


def join_predictions(manifest: pd.DataFrame | Path | str, predictions: pd.DataFrame | Path | str) -> pd.DataFrame:
    """Attach each test prediction's ``source`` from the manifest (joined on ``image_id``).

    ``predictions`` is a run's ``test_predictions.csv`` (image_id, label, pred, p_*; labels as
    CLASSES indices or names), as a table or path.  Returns image_id, source, y (true index),
    pred (predicted index).  Raises FileNotFoundError naming a missing file, KeyError naming
    missing columns, and ValueError listing image ids the manifest lacks (the run was trained on
    another manifest).
    """
    manifest, predictions = _read_table(manifest, "manifest"), _read_table(predictions, "predictions")
    for name, table, need in (("manifest", manifest, ("image_id", "source")),
                              ("predictions", predictions, ("image_id", "label", "pred"))):
        missing = [c for c in need if c not in table.columns]
        if missing:
            raise KeyError(f"{name} lacks column(s) {missing}; it needs {list(need)}")
    rows = manifest.drop_duplicates("image_id").set_index(manifest.drop_duplicates("image_id")["image_id"].astype(str))
    ids = predictions["image_id"].astype(str)
    unknown = sorted(set(ids) - set(rows.index))
    if unknown:
        raise ValueError(f"{len(unknown)} predicted image(s) are not in the manifest, e.g. {unknown[:3]}; "
                         "pass the manifest the run was trained on")
    patients = rows["patient_id"].astype(str) if "patient_id" in rows.columns else pd.Series(rows.index, rows.index)
    out = pd.DataFrame({
        "image_id": ids.to_numpy(),
        "source": rows.loc[ids, "source"].to_numpy(),
        "patient_id": patients.loc[ids].to_numpy(),
        "y": _as_index(predictions["label"], "label"),
        "pred": _as_index(predictions["pred"], "pred"),
    })
    if "seed" in predictions.columns:
        out["seed"] = predictions["seed"].to_numpy()
    return out


def _joined(manifest: pd.DataFrame | Path | str,
            predictions: pd.DataFrame | Path | str | Sequence[pd.DataFrame | Path | str]) -> pd.DataFrame:
    """:func:`join_predictions` of one prediction table or of several (one per seed, numbered
    in a ``seed`` column when they carry none), with ``correct`` per row."""
    many = predictions if isinstance(predictions, (list, tuple)) else [predictions]
    manifest = _read_table(manifest, "manifest")
    parts = []
    for k, table in enumerate(many):
        joined = join_predictions(manifest, table)
        parts.append(joined if "seed" in joined.columns else joined.assign(seed=k))
    joined = pd.concat(parts, ignore_index=True)
    return joined.assign(correct=(joined["y"] == joined["pred"]).astype(float))


def _read_table(table: pd.DataFrame | Path | str, what: str) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    path = Path(table)
    if not path.is_file():
        raise InputNotFoundError(f"{what} file {path} not found; pass a {what} table or the path of its CSV")
    return pd.read_csv(path, keep_default_na=False)


def _proportion_row(images: pd.DataFrame, level: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Seed-averaged accuracy of one cell over its distinct images, interval over patients
    (:func:`nbhelpers.evaluation.stats.proportion_ci`)."""
    from nbhelpers.evaluation.stats import proportion_ci

    row = proportion_ci(images["correct"].to_numpy(), images["patient_id"].to_numpy(), n_boot, seed, level)
    return {**row, "level": level}


#: Columns of :func:`per_source_table`.
PER_SOURCE_COLUMNS = ["source", "class", "n", "patients", "seeds", "correct", "accuracy", "low", "high", "level"]


def per_source_table(
    manifest: pd.DataFrame | Path | str,
    predictions: pd.DataFrame | Path | str | Sequence[pd.DataFrame | Path | str],
    level: float = CI_LEVEL, n_boot: int = M.N_BOOTSTRAP, seed: int = 0, by: str = "source",
) -> pd.DataFrame:
    """Test accuracy per (source x true class) of one run, or of several seeds' runs on the same
    test images (a list of prediction tables), with counts and intervals.

    Each image counts once: its correctness is averaged over the seeds that scored it, so ``n``
    is the number of distinct images (``patients`` distinct patients, ``seeds`` the runs) and
    ``correct`` the seed-averaged count.  The interval (low, high) is the wider of a bootstrap
    that resamples patients with all their images and the Wilson interval over the distinct
    images (:func:`nbhelpers.evaluation.stats.proportion_ci`).  One row per source and class present in
    the predictions (``accuracy`` there is the class's sensitivity within that source) plus one
    ``class == "all"`` row per source.  ``by`` groups by another manifest column instead of the
    source, e.g. ``view`` (AP against PA films: the view is a confounder where classes differ in
    their view mix); the first column is then named after it.  Inputs and errors as
    :func:`join_predictions`.
    """
    from nbhelpers.evaluation.stats import per_image

    joined = _joined(manifest, predictions)
    if by != "source":
        table = _read_table(manifest, "manifest")
        if by not in table.columns:
            raise KeyError(f"manifest lacks column {by!r} to group the accuracy by")
        values = dict(zip(table["image_id"].astype(str), table[by].astype(str).replace("", "(blank)")))
        joined = joined.assign(source=joined["image_id"].map(values))
    seeds = joined["seed"].nunique()
    images = per_image([joined[["image_id", "patient_id", "source", "y", "correct"]]])
    rows = []
    for source, part in images.groupby("source", sort=True):
        for c, name in enumerate(CLASSES):
            mask = part["y"].to_numpy() == c
            if mask.any():
                rows.append({"source": source, "class": name, "seeds": seeds,
                             **_proportion_row(part[mask], level, n_boot, seed)})
        rows.append({"source": source, "class": ALL_CLASSES, "seeds": seeds, **_proportion_row(part, level, n_boot, seed)})
    return pd.DataFrame(rows, columns=PER_SOURCE_COLUMNS).rename(columns={"source": by})


def within_source_table(
    manifest: pd.DataFrame | Path | str,
    predictions: pd.DataFrame | Path | str,
    sources: Sequence[str] | None = None,
    level: float = CI_LEVEL,
    n_boot: int = M.N_BOOTSTRAP,
    seed: int = 0,
) -> pd.DataFrame:
    """The diagnosis classifier on the test images of each source holding more than one class.

    Within such a source the archive's look says nothing about the label, so this accuracy is
    free of the source shortcut: ieee8023, Actualmed and Figure1 mix COVID-19 with other
    classes; NIH and RSNA mix normal and pneumonia (no COVID-19).  ``sources`` keeps only the
    named ones (e.g. :data:`COVID_MIXED_SOURCES`).  ``predictions`` may be several seeds'
    tables; each image then counts once, its correctness averaged over seeds.  One row per source
    whose test images hold two or more classes: source, n (distinct images), patients, ``n_<class>``
    per class, correct, accuracy with its interval (low, high; see :func:`per_source_table`),
    balanced_accuracy with a patient bootstrap interval (ba_low, ba_high; ``n_boot`` resamples
    from ``seed``), level.  An empty table (same columns) means no test source mixes classes.
    Inputs and errors as :func:`join_predictions`.
    """
    from nbhelpers.evaluation.stats import per_image

    joined = _joined(manifest, predictions)
    if sources is not None:
        joined = joined[joined["source"].isin(list(sources))]
    columns = ["source", "n", "patients", *[f"n_{c}" for c in CLASSES], "correct", "accuracy", "low", "high",
               "balanced_accuracy", "ba_low", "ba_high", "level"]
    rows = []
    images = per_image([joined[["image_id", "patient_id", "source", "y", "correct"]]]) if len(joined) else joined
    for source, part in images.groupby("source", sort=True):
        y = part["y"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        ba, ba_low, ba_high = balanced_accuracy_ci(y, part["correct"].to_numpy(), part["patient_id"].to_numpy(),
                                                   n_boot, seed, level)
        counts = {f"n_{c}": int((y == i).sum()) for i, c in enumerate(CLASSES)}
        rows.append({"source": source, **counts, **_proportion_row(part, level, n_boot, seed),
                     "balanced_accuracy": ba, "ba_low": ba_low, "ba_high": ba_high})
    return pd.DataFrame(rows, columns=columns)


def soft_balanced_accuracy(y: np.ndarray, correct: np.ndarray) -> float:
    """Balanced accuracy from per-image (seed-averaged) correctness: the mean over the classes
    present of each class's mean correctness."""
    y, correct = np.asarray(y), np.asarray(correct, dtype=float)
    if len(y) == 0:
        return float("nan")
    return float(np.mean([correct[y == c].mean() for c in np.unique(y)]))


def balanced_accuracy_ci(y: np.ndarray, correct: np.ndarray, groups: Sequence | np.ndarray | None,
                         n_boot: int = M.N_BOOTSTRAP, seed: int = 0, level: float = CI_LEVEL,
                         reference: np.ndarray | None = None) -> tuple[float, float, float]:
    """:func:`soft_balanced_accuracy` (minus that of ``reference`` correctness on the same images,
    for a paired difference) with a percentile bootstrap interval resampling ``groups``
    (patients) with all their images.  Returns (value, low, high)."""
    y, correct = np.asarray(y), np.asarray(correct, dtype=float)

    def score(idx: np.ndarray) -> float:
        value = soft_balanced_accuracy(y[idx], correct[idx])
        return value - soft_balanced_accuracy(y[idx], reference[idx]) if reference is not None else value

    everything = np.arange(len(y))
    rng = np.random.default_rng(seed)
    draws = np.array([score(idx) for idx in M.resample_indices(len(y), n_boot, rng, groups)])
    draws = draws[np.isfinite(draws)]
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]) if len(draws) else (np.nan, np.nan)
    return score(everything), float(low), float(high)


# --------------------------------------------------------------------------- external sources (DeGrave et al. 2021)

#: A finished run's test predictions (written by :func:`nbhelpers.training.runs.train_run`).
PREDICTIONS_NAME = "test_predictions.csv"
#: A run's predictions for the images of archives it never saw (:func:`score_external`).
EXTERNAL_PREDICTIONS = "external_predictions.csv"
#: Fewest distinct images and patients a cell of :func:`external_table` needs to conclude anything.
MIN_CELL_IMAGES = 10
MIN_CELL_PATIENTS = 5


def external_split(manifest: pd.DataFrame, train_sources: dict[str, Sequence[str]], seed: int = 0,
                   ratios: Sequence[float] = DEFAULT_RATIOS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``manifest`` for the external-source test: per class, the images of the archives in
    ``train_sources`` form the internal set (split train/val/test anew by patient), every other
    image of the class the external set (``split == "test"``, scored by a model that never saw
    its archive).  A patient with films on both sides (a copy joined across archives) stays
    internal only.  Raises ProbeError for a class without internal images."""
    unknown = sorted(set(train_sources) - set(CLASSES))
    if unknown:
        raise ProbeError(f"train_sources names unknown class(es) {unknown}; use some of {CLASSES}")
    inside = pd.Series(False, index=manifest.index)
    for label, sources in train_sources.items():
        inside |= (manifest["label"] == label) & manifest["source"].isin(list(sources))
    named = manifest["label"].isin(list(train_sources))
    internal = manifest[inside | ~named].copy()
    for label in train_sources:
        if not (internal["label"] == label).any():
            raise ProbeError(f"no {label!r} images from {list(train_sources[label])} in the manifest; "
                             "name archives that hold that class")
    internal["split"] = split_by_patient(internal, ratios, seed)
    external = manifest[named & ~inside & ~manifest["patient_id"].isin(set(internal["patient_id"]))].copy()
    external["split"] = "test"
    return internal.reset_index(drop=True), external.reset_index(drop=True)


def score_external(run_folder: Path | str, external: pd.DataFrame, data_dir: Path | str | None,
                   cache_root: Path | str) -> pd.DataFrame:
    """Score the external images with the finished run in ``run_folder`` (its best checkpoint,
    on images preprocessed as it was trained) and write ``external_predictions.csv`` there:
    image_id, patient_id, source, label, pred, p_<class>."""
    from data_prep.datadir import data_dir as resolve_data_dir
    from nbhelpers.pipeline.preprocess import PreprocessConfig
    from nbhelpers.pipeline.cache import build_cache
    from nbhelpers.training.runs import load_trained
    from nbhelpers.evaluation.predict import predict

    net, run = load_trained(run_folder)
    cfg = PreprocessConfig(**run.metrics["data"]["preprocess"])
    cache = build_cache(external, resolve_data_dir(data_dir), Path(cache_root), cfg, progress=False)
    test = cache.split("test")
    probs = predict(net, test, "cpu", in_chans=run.config.in_chans)
    by_id = external.set_index(external["image_id"].astype(str))
    table = pd.DataFrame({"image_id": test.image_ids,
                          "patient_id": by_id.loc[test.image_ids, "patient_id"].astype(str).to_numpy(),
                          "source": by_id.loc[test.image_ids, "source"].to_numpy(),
                          "label": test.labels, "pred": probs.argmax(1)})
    for c, name in enumerate(CLASSES):
        table[f"p_{name}"] = probs[:, c]
    atomic.write_with(Path(run_folder) / EXTERNAL_PREDICTIONS, lambda tmp: table.to_csv(tmp, index=False))
    return table


def _seed_averaged(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One row per image: label, patient, correctness and class probabilities averaged over seeds."""
    stacked = pd.concat([f.assign(image_id=f["image_id"].astype(str)) for f in frames], ignore_index=True)
    stacked["correct"] = (stacked["label"] == stacked["pred"]).astype(float)
    columns = ["correct", *[f"p_{c}" for c in CLASSES]]
    out = stacked.groupby("image_id", sort=False)[columns].mean()
    first = stacked.groupby("image_id", sort=False)[["label", "patient_id", "source"]].first()
    return out.join(first).reset_index()


def _auc_ci(images: pd.DataFrame, c: int, n_boot: int, seed: int, level: float) -> tuple[float, float, float]:
    """One-vs-rest AUROC of class ``c`` on seed-averaged probabilities, patient bootstrap interval."""
    y, score = (images["label"].to_numpy() == c), images[f"p_{CLASSES[c]}"].to_numpy()
    if y.all() or not y.any():
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = [M.binary_auc(y[i], score[i]) for i in M.resample_indices(len(y), n_boot, rng, images["patient_id"])]
    draws = np.array([d for d in draws if np.isfinite(d)])
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]) if len(draws) else (np.nan, np.nan)
    return M.binary_auc(y, score), float(low), float(high)


def external_table(folders: Sequence[Path], n_boot: int = M.N_BOOTSTRAP, seed: int = 0,
                   level: float = CI_LEVEL) -> pd.DataFrame:
    """Internal against external accuracy and AUROC per class, over the seeds' run ``folders`` of
    one external-source row (each holding ``test_predictions.csv`` and ``external_predictions.csv``).

    Each image counts once (its correctness and probabilities averaged over seeds); accuracy is
    the class's sensitivity with an interval over patients (:func:`nbhelpers.evaluation.stats.proportion_ci`),
    AUROC one-vs-rest on the set's images with a patient bootstrap interval (NaN when the set
    holds no negatives).  ``conclusive`` is false where either side has fewer than
    :data:`MIN_CELL_IMAGES` images or :data:`MIN_CELL_PATIENTS` patients: too few to say whether
    the model transfers.  ``drop`` is internal minus external accuracy."""
    from nbhelpers.evaluation.stats import proportion_ci

    sides = {name: _seed_averaged([pd.read_csv(Path(f) / file, keep_default_na=False) for f in folders])
             for name, file in (("internal", PREDICTIONS_NAME), ("external", EXTERNAL_PREDICTIONS))}
    rows = []
    for c, label in enumerate(CLASSES):
        line: dict[str, Any] = {"class": label, "seeds": len(folders)}
        enough = True
        for side, images in sides.items():
            cell = images[images["label"] == c]
            stats_ = proportion_ci(cell["correct"].to_numpy(), cell["patient_id"].to_numpy(), n_boot, seed, level)
            auc, a_low, a_high = _auc_ci(images, c, n_boot, seed, level)
            line.update({f"{side}_sources": "+".join(sorted(set(cell["source"]))), f"{side}_n": stats_["n"],
                         f"{side}_patients": stats_["patients"], f"{side}_accuracy": stats_["accuracy"],
                         f"{side}_low": stats_["low"], f"{side}_high": stats_["high"], f"{side}_auc": auc,
                         f"{side}_auc_low": a_low, f"{side}_auc_high": a_high})
            enough &= stats_["n"] >= MIN_CELL_IMAGES and stats_["patients"] >= MIN_CELL_PATIENTS
        line["drop"] = line["internal_accuracy"] - line["external_accuracy"]
        line["conclusive"] = bool(enough)
        rows.append(line)
    return pd.DataFrame(rows)


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
    table, groups = probe_manifest(_read_table(manifest, "manifest"), label, sources, balance, max_per_group, seed=seed,
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


def add_tables_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook audit tables``."""
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest the run was trained on")
    parser.add_argument("--run", type=Path, required=True, help="a training run folder holding test_predictions.csv")
    add_out(parser, f"{PER_SOURCE_TABLE}.csv/.md and {WITHIN_SOURCE_TABLE}.csv/.md", required=True)


def run_tables_command(args: argparse.Namespace) -> int:
    """``workbook audit tables``: write a finished run's per-source and within-source tables to
    ``--out`` and print them; returns 0."""
    from nbhelpers.settings.tables import provenance_header, write_table
    from nbhelpers.training.config import PREDICTIONS_NAME

    predictions = args.run / PREDICTIONS_NAME
    tables = [(name, make(args.manifest, predictions)) for name, make in
              ((PER_SOURCE_TABLE, per_source_table), (WITHIN_SOURCE_TABLE, within_source_table))]
    header = provenance_header(args.command_line, manifest=args.manifest, notes=f"Test predictions of {args.run}.")
    for name, table in tables:
        write_table(table, args.out, name, header, digits=3)
        print(f"{name}:\n{table.to_string(index=False)}\n")
    return 0
