from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from nbhelpers.evaluation import metrics

RNG = np.random.default_rng(7)
Y_TRUE = RNG.integers(0, 3, 200)
PROBS = RNG.dirichlet(np.ones(3), 200)
# make the predictions better than chance so every cell of the matrix is populated unevenly
PROBS[np.arange(120), Y_TRUE[:120]] += 1.0
PROBS /= PROBS.sum(1, keepdims=True)
Y_PRED = PROBS.argmax(1)


def test_confusion_matches_sklearn():
    np.testing.assert_array_equal(metrics.confusion(Y_TRUE, Y_PRED), confusion_matrix(Y_TRUE, Y_PRED))


def test_summary_matches_sklearn():
    s = metrics.summary(Y_TRUE, PROBS)
    assert s["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert s["macro_sensitivity"] == pytest.approx(recall_score(Y_TRUE, Y_PRED, average="macro"))
    assert s["macro_precision"] == pytest.approx(precision_score(Y_TRUE, Y_PRED, average="macro"))
    assert s["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))


def test_specificity_by_hand():
    cm = np.array([[8, 1, 1], [2, 6, 2], [0, 0, 10]])
    table = metrics.per_class(cm)
    # class 0: TN = all images not of class 0 and not predicted 0 = (6+2+0+10) = 18; FP = 2
    assert table.loc[0, "specificity"] == pytest.approx(18 / 20)
    assert table.loc[1, "sensitivity"] == pytest.approx(0.6)
    assert table["support"].tolist() == [10, 10, 10]


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="shape"):
        metrics.summary(Y_TRUE, PROBS[:, :2])


def test_auc_matches_sklearn_including_ties():
    from sklearn.metrics import roc_auc_score

    auc = metrics.auc_ovr(Y_TRUE, PROBS)
    assert auc["macro"] == pytest.approx(roc_auc_score(Y_TRUE, PROBS, multi_class="ovr", average="macro"))
    tied = np.round(PROBS, 1)  # many equal scores: ties must count one half
    for c, name in enumerate(metrics.CLASSES):
        assert metrics.binary_auc(Y_TRUE == c, tied[:, c]) == pytest.approx(roc_auc_score(Y_TRUE == c, tied[:, c]))
    assert metrics.summary(Y_TRUE, PROBS)["macro_auc"] == pytest.approx(auc["macro"])
    assert np.isnan(metrics.binary_auc(np.ones(5), np.arange(5)))  # one class only: undefined


def test_roc_curves_match_sklearn():
    from sklearn.metrics import roc_curve

    tied = np.round(PROBS, 2)
    curves = metrics.roc_curves(Y_TRUE, tied)
    assert list(curves["class"].unique()) == list(metrics.CLASSES)
    for c, name in enumerate(metrics.CLASSES):
        fpr, tpr, thr = roc_curve(Y_TRUE == c, tied[:, c], drop_intermediate=False)
        ours = curves[curves["class"] == name]
        np.testing.assert_allclose(ours["fpr"], fpr)
        np.testing.assert_allclose(ours["tpr"], tpr)
        np.testing.assert_allclose(ours["threshold"].iloc[1:], thr[1:])


def test_macro_averages_follow_sklearn_when_a_class_is_never_predicted():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 0, 1, 1, 1]]  # class 2 never predicted: its precision is 0/0
    s = metrics.summary(y_true, probs)
    y_pred = probs.argmax(1)
    assert s["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro", zero_division=0))
    assert s["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert s["macro_sensitivity"] == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    assert np.isnan(metrics.per_class(metrics.confusion(y_true, y_pred)).loc[2, "precision"])


def test_per_class_accuracy_is_seed_001_table_2():
    acc = metrics.per_class_accuracy(Y_TRUE, Y_PRED)
    for c, name in enumerate(metrics.CLASSES):
        assert acc[name] == pytest.approx(np.mean(Y_PRED[Y_TRUE == c] == c))


def test_bootstrap_ci_brackets_the_value_and_repeats_for_a_seed():
    table = metrics.summary_with_ci(Y_TRUE, PROBS, n=200, seed=3)
    assert "n" not in set(table["metric"]) and "macro_auc" in set(table["metric"])
    assert (table["low"] <= table["value"]).all() and (table["value"] <= table["high"]).all()
    acc = table.set_index("metric").loc["accuracy"]
    # The normal-approximation interval of a proportion is a sanity check on the width.
    half = 1.96 * np.sqrt(acc["value"] * (1 - acc["value"]) / len(Y_TRUE))
    assert acc["high"] - acc["low"] == pytest.approx(2 * half, rel=0.25)
    again = metrics.summary_with_ci(Y_TRUE, PROBS, n=200, seed=3)
    assert table.equals(again)
    custom = metrics.bootstrap_ci(Y_TRUE, PROBS, lambda y, p: {"mean_p": float(p.max(1).mean())}, n=50)
    assert list(custom["metric"]) == ["mean_p"]
    with pytest.raises(ValueError, match="n >= 1"):
        metrics.bootstrap_ci(Y_TRUE, PROBS, n=0)


def test_calibration_bins_and_ece_by_hand():
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    bins = metrics.calibration_bins(y_true, probs, n_bins=5)
    assert bins["count"].tolist() == [0, 0, 2, 0, 2]
    assert bins.loc[2, "confidence"] == pytest.approx(0.6) and bins.loc[2, "accuracy"] == pytest.approx(0.5)
    assert bins.loc[4, "accuracy"] == pytest.approx(1.0)
    # ECE = 2/4 * |0.5 - 0.6| + 2/4 * |1.0 - 0.9| = 0.1
    assert metrics.expected_calibration_error(y_true, probs, n_bins=5) == pytest.approx(0.1)


def test_aggregate_gives_mean_and_sample_std_per_model():
    import pandas as pd

    runs = pd.DataFrame({"model": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0],
                         "accuracy": [0.90, 0.80, 0.85, 0.70], "n": [10, 10, 10, 10]})
    table = metrics.aggregate(runs).set_index("model")
    assert table.loc["a", "runs"] == 3 and table.loc["a", "accuracy_mean"] == pytest.approx(0.85)
    assert table.loc["a", "accuracy_std"] == pytest.approx(np.std([0.9, 0.8, 0.85], ddof=1))
    assert table.loc["a", "accuracy"] == "85.00 ± 5.00"
    assert table.loc["b", "accuracy"] == "70.00" and np.isnan(table.loc["b", "accuracy_std"])
    assert "seed_mean" not in table.columns and "n_mean" not in table.columns
    with pytest.raises(KeyError, match="lacks column"):
        metrics.aggregate(runs, by="fold")
