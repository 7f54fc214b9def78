"""Classification metrics as the seed papers report them.

Per class ``c`` (one-vs-rest counts TP, FN, FP, TN): sensitivity = TP / (TP + FN),
specificity = TN / (TN + FP), accuracy_c = (TP + TN) / N; the macro versions average over
classes (seed 000, eqs. 9-14).  Seed 001's "per-class accuracy" (its Table 2) is the share of
the class's images classified correctly, i.e. the class's sensitivity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.schema import CLASSES


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Confusion matrix with true classes as rows and predictions as columns."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class(cm: np.ndarray, classes: tuple[str, ...] = CLASSES) -> pd.DataFrame:
    """One row per class: support, sensitivity (= seed 001's per-class accuracy), specificity,
    precision, F1 and one-vs-rest accuracy, from confusion matrix ``cm``."""
    cm = np.asarray(cm, dtype=float)
    n = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = n - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        prec = tp / (tp + fp)
        table = pd.DataFrame({
            "class": list(classes),
            "support": (tp + fn).astype(int),
            "sensitivity": sens,
            "specificity": tn / (tn + fp),
            "precision": prec,
            "f1": 2 * prec * sens / (prec + sens),
            "ovr_accuracy": (tp + tn) / n,
        })
    return table


def summary(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = CLASSES) -> dict[str, float]:
    """Overall accuracy plus macro sensitivity, specificity, precision, F1 and one-vs-rest
    accuracy (seed 000, eqs. 9-14) from true labels and predicted probabilities (N, classes)."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or len(probs) != len(y_true):
        raise ValueError(f"probs must have shape ({len(y_true)}, {len(classes)}), got {probs.shape}")
    cm = confusion(y_true, probs.argmax(1), len(classes))
    table = per_class(cm, classes)
    out = {"n": int(cm.sum()), "accuracy": float(np.trace(cm) / cm.sum())}
    for column in ("sensitivity", "specificity", "precision", "f1", "ovr_accuracy"):
        out[f"macro_{column}"] = float(np.nanmean(table[column]))
    return out
