"""The shortcut audit's tables of a finished run: is a model reading the disease or the archive?

In the public COVID sets the source and the label nearly coincide (COVID-19 images from
ieee8023/Figure1/Actualmed, normals and pneumonias mostly from NIH/RSNA), so a classifier can
score well by recognising the archive (DeGrave et al., Nature Machine Intelligence 2021).

* :func:`per_source_table` — a finished run's test accuracy per (source x class), with counts
  and a 95 % interval over patients (within one true class, accuracy is that class's sensitivity).
* :func:`within_source_table` — the diagnosis accuracy on the test images of sources that hold
  more than one class (ieee8023, Actualmed, Figure1): there the archive gives no hint.

The source probe is in :mod:`nbhelpers.experiments.probes`, the external-source test in
:mod:`nbhelpers.experiments.external_source`.  ``workbook audit tables --manifest M --run R --out O``
writes both tables of a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from data_prep.schema import CLASSES, label_index
from data_prep.errors import InputNotFoundError
from data_prep.options import add_out
from nbhelpers.evaluation import metrics as M
from nbhelpers.evaluation.stats import balanced_accuracy_ci

#: Two-sided confidence level of every interval here.
CI_LEVEL = M.CI_LEVEL

#: Tables ``workbook audit tables`` writes (``.csv`` and ``.md``).
PER_SOURCE_TABLE = "per_source"
WITHIN_SOURCE_TABLE = "within_source"
#: Sources whose images mix COVID-19 with another class: the shortcut-free COVID comparison.
COVID_MIXED_SOURCES = ("ieee8023", "actualmed", "figure1")
#: Label written for the all-classes row of a source in :func:`per_source_table`.
ALL_CLASSES = "all"




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
        from data_prep.manifest import ManifestError

        raise ManifestError(f"{len(unknown)} predicted image(s) are not in the manifest, e.g. {unknown[:3]}; "
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
    """A table given as a frame or a CSV path; a manifest (``what`` names one) through the one
    checked reader, :func:`data_prep.manifest.read_manifest`."""
    if "manifest" in what:
        from data_prep.manifest import read_manifest

        return read_manifest(table, what=what)
    if isinstance(table, pd.DataFrame):
        return table
    path = Path(table)
    if not path.is_file():
        raise InputNotFoundError(f"{what} file {path} not found; pass a {what} table or the path of its CSV")
    return pd.read_csv(path, keep_default_na=False)


def _proportion_row(images: pd.DataFrame, level: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Seed-averaged accuracy of one cell over its distinct images, interval over patients
    (:func:`nbhelpers.evaluation.stats.proportion_ci`)."""
    from nbhelpers.evaluation.stats import conclusive, proportion_ci

    row = proportion_ci(images["correct"].to_numpy(), images["patient_id"].to_numpy(), n_boot, seed, level)
    return {**row, "level": level, "conclusive": conclusive(row["n"], row["patients"])}


#: Columns of :func:`per_source_table`.
PER_SOURCE_COLUMNS = ["source", "class", "n", "patients", "seeds", "correct", "accuracy", "low", "high", "level",
                      "conclusive"]


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
    images (:func:`nbhelpers.evaluation.stats.proportion_ci`); ``conclusive`` is false for a cell
    of fewer than :data:`~nbhelpers.evaluation.stats.MIN_CELL_IMAGES` images or
    :data:`~nbhelpers.evaluation.stats.MIN_CELL_PATIENTS` patients, which no sentence reads.  One row per source and class present in
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
               "balanced_accuracy", "ba_low", "ba_high", "level", "conclusive"]
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


# --------------------------------------------------------------------------- command line


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
