"""Classification metrics as the seed papers report them, with their uncertainty.

Per class ``c`` (one-vs-rest counts TP, FN, FP, TN): sensitivity = TP / (TP + FN),
specificity = TN / (TN + FP), accuracy_c = (TP + TN) / N; the macro versions average over
classes (seed 000, eqs. 9-14).  Seed 001's "per-class accuracy" (its Table 2) is the share of
the class's images classified correctly, i.e. the class's sensitivity
(:func:`per_class_accuracy`).  Precision and F1 are per class and macro-averaged, as
scikit-learn's ``average="macro"``; AUC is one-vs-rest per class and macro-averaged, as
``roc_auc_score(..., multi_class="ovr", average="macro")``.  Per-class tables show an undefined
value (0/0, e.g. the precision of a class never predicted) as NaN; macro averages follow
scikit-learn: over the classes present in the labels or predictions, undefined sensitivity,
precision and F1 counting as 0.  A class absent from ``y_true`` has no AUC and is left out of
the macro AUC (where scikit-learn refuses to compute one).

Uncertainty: :func:`bootstrap_ci` resamples the test set with replacement (percentile interval,
1,000 resamples, one seed).  Given each image's patient (``groups``) it resamples **patients**
with all their images (a cluster bootstrap, :func:`nbhelpers.evaluation.stats.resample_indices`): films of one patient are
not independent, and many ieee8023 patients have several, so an interval that resamples images
is too narrow.  :func:`aggregate` summarises several runs (seeds or folds)
as mean ± sample standard deviation, the way seed 002's tables do.  Calibration:
:func:`calibration_bins` (reliability diagram) and :func:`expected_calibration_error`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from data_prep.schema import CLASSES
from nbhelpers.evaluation.stats import CI_LEVEL, N_BOOTSTRAP, resample_indices  # noqa: F401  (re-exported)

#: Equal-width confidence bins of the reliability diagram and ECE (Guo et al. 2017 use 15).
N_CALIBRATION_BINS = 15
#: The per-class columns :func:`per_class` computes; their macro means are in :func:`summary`.
PER_CLASS_COLUMNS = ("sensitivity", "specificity", "precision", "f1", "ovr_accuracy")
#: Numeric run-table columns that describe a run rather than score it (left out by :func:`aggregate`).
NOT_METRICS = ("n", "seed", "fold", "best_epoch")
#: Macro averages in which an undefined per-class value counts as 0 (as scikit-learn's zero_division=0).
ZERO_WHEN_UNDEFINED = ("sensitivity", "precision", "f1")


def _check_probs(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != n_classes or len(probs) != len(y_true):
        raise ValueError(f"probs must have shape ({len(y_true)}, {n_classes}), got {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("no predictions to score: y_true is empty")
    return y_true.astype(np.int64), probs


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Confusion matrix with true classes as rows and predictions as columns."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class support and the :data:`PER_CLASS_COLUMNS` from a confusion matrix (NaN for 0/0)."""
    cm = np.asarray(cm, dtype=float)
    n = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = n - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        prec = tp / (tp + fp)
        return {
            "support": tp + fn,
            "sensitivity": sens,
            "specificity": tn / (tn + fp),
            "precision": prec,
            "f1": 2 * prec * sens / (prec + sens),
            "ovr_accuracy": (tp + tn) / n,
        }


def per_class(cm: np.ndarray, classes: tuple[str, ...] = CLASSES) -> pd.DataFrame:
    """One row per class: support, sensitivity (= seed 001's per-class accuracy), specificity,
    precision, F1 and one-vs-rest accuracy, from confusion matrix ``cm``."""
    rates = _rates(cm)
    table = pd.DataFrame({"class": list(classes), **rates})
    table["support"] = table["support"].astype(int)
    return table


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...] = CLASSES) -> pd.Series:
    """Seed 001's Table 2: for each class, the share of its images predicted correctly (NaN when absent)."""
    sens = _rates(confusion(y_true, y_pred, len(classes)))["sensitivity"]
    return pd.Series(sens, index=list(classes), name="per_class_accuracy")


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve for binary labels ``y`` (1 = positive) and scores, ties counted half.

    Computed as the Mann-Whitney U statistic from average ranks.  Returns NaN when ``y`` holds
    only one class (AUC is undefined).
    """
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ovr(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = CLASSES) -> dict[str, float]:
    """One-vs-rest AUC per class (keyed by class name) and their mean under ``"macro"``.

    Raises ValueError when ``probs`` is not (N, classes).  A class absent from ``y_true`` gets
    NaN and is left out of the macro mean.
    """
    y_true, probs = _check_probs(y_true, probs, len(classes))
    out = {name: binary_auc(y_true == c, probs[:, c]) for c, name in enumerate(classes)}
    values = [v for v in out.values() if not np.isnan(v)]
    out["macro"] = float(np.mean(values)) if values else float("nan")
    return out


def roc_curves(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = CLASSES) -> pd.DataFrame:
    """One-vs-rest ROC curve points of every class as a long table: class, threshold, fpr, tpr.

    Each curve starts at (0, 0) with threshold +inf and has one point per distinct score (the
    points scikit-learn's ``roc_curve(..., drop_intermediate=False)`` gives).  Classes absent
    from ``y_true`` (or with no negatives) are skipped.
    """
    y_true, probs = _check_probs(y_true, probs, len(classes))
    frames = []
    for c, name in enumerate(classes):
        pos = y_true == c
        if pos.all() or not pos.any():
            continue
        order = np.argsort(-probs[:, c], kind="stable")
        score, hit = probs[order, c], pos[order]
        last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # last index of each distinct score
        tps, fps = np.cumsum(hit)[last], np.cumsum(~hit)[last]
        frames.append(pd.DataFrame({
            "class": name,
            "threshold": np.r_[np.inf, score[last]],
            "fpr": np.r_[0.0, fps / (~pos).sum()],
            "tpr": np.r_[0.0, tps / pos.sum()],
        }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["class", "threshold", "fpr", "tpr"])


def summary(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = CLASSES) -> dict[str, float]:
    """Overall accuracy plus macro sensitivity, specificity, precision, F1, one-vs-rest accuracy
    (seed 000, eqs. 9-14) and one-vs-rest AUC from true labels and probabilities (N, classes).

    Keys: ``n``, ``accuracy``, ``macro_sensitivity``, ``macro_specificity``, ``macro_precision``,
    ``macro_f1``, ``macro_ovr_accuracy``, ``macro_auc``.  Raises ValueError for a wrong shape.
    """
    y_true, probs = _check_probs(y_true, probs, len(classes))
    cm = confusion(y_true, probs.argmax(1), len(classes))
    rates = _rates(cm)
    # scikit-learn's macro convention: average over the classes seen in y_true or y_pred, an
    # undefined (0/0) sensitivity, precision or F1 counting as 0 (a class never predicted earns
    # no credit).
    seen = (cm.sum(0) + cm.sum(1)) > 0
    out = {"n": int(cm.sum()), "accuracy": float(np.trace(cm) / cm.sum())}
    for column in PER_CLASS_COLUMNS:
        values = rates[column][seen]
        if column in ZERO_WHEN_UNDEFINED:
            values = np.nan_to_num(values, nan=0.0)
        finite = values[np.isfinite(values)]
        out[f"macro_{column}"] = float(finite.mean()) if len(finite) else float("nan")
    out["macro_auc"] = auc_ovr(y_true, probs, classes)["macro"]
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] = summary,
    n: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = CI_LEVEL,
    groups: Sequence | np.ndarray | None = None,
) -> pd.DataFrame:
    """Percentile bootstrap confidence intervals of every metric ``metric_fn`` returns.

    ``metric_fn(y_true, probs) -> {name: value}`` (default :func:`summary`) is applied to the
    full data (``value``) and to ``n`` resamples drawn with replacement from
    ``numpy.random.default_rng(seed)``: of the images, or, given ``groups`` (each image's
    patient), of the patients with all their images (:func:`resample_indices`).  ``low`` /
    ``high`` are the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled values (NaN
    resamples, e.g. an AUC for a class missing from a resample, are ignored).  Returns one row
    per metric: metric, value, low, high, level, n_boot, unit (``image`` or ``patient``) and
    clusters (the number of distinct images or patients resampled).  Raises ValueError for
    ``n < 1`` or ``level`` outside (0, 1).
    """
    if n < 1:
        raise ValueError(f"bootstrap needs n >= 1 resamples, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    point = metric_fn(y_true, probs)
    rng = np.random.default_rng(seed)
    draws = {key: np.empty(n) for key in point}
    for i, idx in enumerate(resample_indices(len(y_true), n, rng, groups)):
        for key, value in metric_fn(y_true[idx], probs[idx]).items():
            draws[key][i] = value
    tail = (1.0 - level) / 2 * 100
    rows = []
    for key, value in point.items():
        finite = draws[key][np.isfinite(draws[key])]
        low, high = np.percentile(finite, [tail, 100 - tail]) if len(finite) else (np.nan, np.nan)
        rows.append({"metric": key, "value": float(value), "low": float(low), "high": float(high), "level": level,
                     "n_boot": n, "unit": "image" if groups is None else "patient",
                     "clusters": len(y_true) if groups is None else len(set(map(str, groups)))})
    return pd.DataFrame(rows)


def summary_with_ci(
    y_true: np.ndarray, probs: np.ndarray, n: int = N_BOOTSTRAP, seed: int = 0, level: float = CI_LEVEL,
    classes: tuple[str, ...] = CLASSES, groups: Sequence | np.ndarray | None = None,
) -> pd.DataFrame:
    """:func:`summary` with bootstrap confidence intervals (see :func:`bootstrap_ci`; pass each
    image's patient as ``groups`` to resample patients); the sample size ``n`` row is left out."""
    table = bootstrap_ci(y_true, probs, lambda y, p: summary(y, p, classes), n=n, seed=seed, level=level,
                         groups=groups)
    return table[table["metric"] != "n"].reset_index(drop=True)


def calibration_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_CALIBRATION_BINS) -> pd.DataFrame:
    """Reliability-diagram bins of the top-class confidence: equal-width bins over [0, 1].

    Returns one row per bin: lower, upper, count, confidence (mean top probability), accuracy
    (share of correct top predictions) — NaN for empty bins.  A confidence exactly on a bin
    edge belongs to the bin below it (bins are (lower, upper], the first also holds 0).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n_classes = np.shape(probs)[1] if np.ndim(probs) == 2 else len(CLASSES)
    y_true, probs = _check_probs(y_true, probs, n_classes)
    conf = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=n_bins) / count
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "count": count,
                         "confidence": mean_conf, "accuracy": accuracy})


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_CALIBRATION_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over :func:`calibration_bins`."""
    bins = calibration_bins(y_true, probs, n_bins)
    full = bins[bins["count"] > 0]
    return float((full["count"] * (full["accuracy"] - full["confidence"]).abs()).sum() / full["count"].sum())


def format_mean_std(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """``"91.52 ± 2.50"``: ``mean`` and ``std`` times ``scale`` (percent by default)."""
    if np.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def aggregate(
    runs: pd.DataFrame,
    by: str | Sequence[str] = "model",
    metrics: Sequence[str] | None = None,
    scale: float = 100.0,
    digits: int = 2,
) -> pd.DataFrame:
    """Summarise several runs (seeds or folds) per group as mean ± sample std (ddof=1), like seed 002.

    ``runs`` has one row per run with the ``by`` column(s) and metric columns (e.g. rows of
    :func:`summary`, or :func:`nbhelpers.training.runs.runs_table`).  ``metrics`` defaults to every
    numeric column except ``by`` and :data:`NOT_METRICS`.  Returns one row per group: ``by``, ``runs`` (count), and for each
    metric ``<m>_mean``, ``<m>_std`` (NaN for a single run) and ``<m>`` formatted by
    :func:`format_mean_std`.  Raises KeyError naming missing columns.
    """
    keys = [by] if isinstance(by, str) else list(by)
    if metrics is None:
        skip = set(keys) | set(NOT_METRICS)
        metrics = [c for c in runs.columns if c not in skip and pd.api.types.is_numeric_dtype(runs[c])]
    missing = [c for c in [*keys, *metrics] if c not in runs.columns]
    if missing:
        raise KeyError(f"runs table lacks column(s) {missing}; it has {list(runs.columns)}")
    grouped = runs.groupby(keys, sort=False)
    table = grouped.size().rename("runs").reset_index()
    for m in metrics:
        stats = grouped[m].agg(["mean", "std"]).reset_index(drop=True)
        table[f"{m}_mean"] = stats["mean"].to_numpy()
        table[f"{m}_std"] = stats["std"].to_numpy()
        table[m] = [format_mean_std(a, b, scale, digits) for a, b in zip(stats["mean"], stats["std"])]
    return table


def interval_widths(by_patient: pd.DataFrame | Sequence[dict], by_image: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    """Put a run's patient-bootstrap and image-bootstrap intervals side by side (the ``ci`` and
    ``ci_image`` lists of :func:`nbhelpers.evaluation.predict.evaluate`): metric, value, both intervals and
    ``width_ratio`` (patient width / image width; above 1 where a patient's films agree)."""
    patient = pd.DataFrame(by_patient).set_index("metric")
    image = pd.DataFrame(by_image).set_index("metric")
    out = pd.DataFrame({
        "value": patient["value"],
        "patient_low": patient["low"], "patient_high": patient["high"],
        "image_low": image["low"], "image_high": image["high"],
    })
    with np.errstate(invalid="ignore", divide="ignore"):
        out["width_ratio"] = (out["patient_high"] - out["patient_low"]) / (out["image_high"] - out["image_low"])
    return out.reset_index()


def reading_notes(test: dict, classes: Sequence[str] = CLASSES) -> list[str]:
    """Sentences saying how to read a test result (``metrics.json``'s ``test``): the accuracy
    with its interval against chance, and each degenerate case by name (a model that predicts
    one class for every image, a test split too small to say much)."""
    chance = 1 / len(classes)
    interval = next((c for c in test.get("ci", []) if c["metric"] == "accuracy"), None)
    n, patients = test.get("n"), test.get("n_patients")
    notes = []
    if interval is not None:
        where = ("above chance: the interval excludes it" if interval["low"] > chance else
                 "below chance" if interval["high"] < chance else "not distinguishable from chance")
        notes.append(f"accuracy {test['accuracy']:.2f} (95 % interval over {interval['unit']}s {interval['low']:.2f}-"
                     f"{interval['high']:.2f}) on {n} test images of {patients} patients; chance is {chance:.2f}: {where}.")
    predicted = np.asarray(test.get("confusion", [[0]])).sum(axis=0)
    if predicted.sum() and (predicted > 0).sum() == 1:
        only = classes[int(np.argmax(predicted))]
        notes.append(f"the model predicts {only!r} for every test image: a constant predictor. Its accuracy is that "
                     "class's share, its per-class numbers and AUC say nothing, and its ECE only measures how far its "
                     "fixed confidence lies from that share.")
    if n is not None and n < 30:
        notes.append(f"{n} test images: one image moves the accuracy by {1 / n:.2f}; read the interval, not the digits.")
    return notes
