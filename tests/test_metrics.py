from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from nbhelpers import metrics

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
