from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from nbhelpers.evaluation import plots  # noqa: E402


def test_figures_draw_what_they_are_given():
    counts = pd.DataFrame({"source": ["nih", "nih", "ieee8023"], "label": ["normal", "pneumonia", "covid"],
                           "count": [5, 4, 3]})
    fig = plots.counts_bar(counts, x="source", hue="label")
    assert sum(len(c) for c in fig.axes[0].containers) >= 3
    grid = plots.image_grid([np.zeros((8, 8), np.uint8)] * 5, titles=["a"] * 5, ncols=4)
    assert len(grid.axes) == 8 and len(grid.axes[0].images) == 1 and len(grid.axes[7].images) == 0
    log = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [1.1, 0.9],
                        "train_acc": [0.4, 0.7], "val_acc": [0.3, 0.5]})
    curves = plots.training_curves(log)
    assert len(curves.axes[0].lines) == 2
    heat = plots.confusion_heatmap(np.array([[2, 1, 0], [0, 3, 0], [1, 0, 2]]))
    assert [t.get_text() for t in heat.axes[0].texts][:3] == ["2", "1", "0"]


def test_roc_and_reliability_figures():
    roc = pd.DataFrame({"class": ["covid"] * 3 + ["normal"] * 3, "fpr": [0, 0.5, 1] * 2, "tpr": [0, 1, 1] * 2})
    fig = plots.roc_plot(roc, {"covid": 0.75, "normal": 0.75})
    assert len(fig.axes[0].lines) == 3 and "AUC 0.750" in fig.axes[0].get_legend().get_texts()[0].get_text()
    bins = pd.DataFrame({"lower": [0.0, 0.5], "upper": [0.5, 1.0], "count": [0, 4], "confidence": [np.nan, 0.8],
                         "accuracy": [np.nan, 0.5]})
    fig = plots.reliability_diagram(bins, ece=0.3)
    assert len(fig.axes[0].patches) == 1 and "ECE 0.300" in fig.axes[0].get_title()


def test_ablation_bars_show_every_row_and_the_papers_marks():
    summary = pd.DataFrame({"group": ["g", "g"], "name": ["a", "b"], "accuracy_mean": [0.5, 0.6],
                            "accuracy_std": [0.1, np.nan], "paper_accuracy": [0.833, np.nan],
                            "ours_on_paper_metric": [0.5, np.nan]})
    fig = plots.ablation_bars(summary)
    assert len(fig.axes[0].patches) == 2 and [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["paper (its data)", "ours, on the paper's metric"]


def test_interval_plot_greys_thin_cells():
    table = pd.DataFrame({"cell": ["AP", "PA"], "accuracy": [0.5, 0.7], "low": [0.1, 0.6], "high": [0.9, 0.8],
                          "conclusive": [False, True]})
    fig = plots.interval_plot(table, "cell", reference=1 / 3)
    labels = {t.get_text(): t.get_color() for t in fig.axes[0].get_yticklabels()}
    assert labels == {"AP (thin)": "0.55", "PA": "k"}


def test_cam_comparison_has_a_row_per_model():
    cams = {"a": np.zeros((2, 8, 8)), "b": np.ones((2, 8, 8))}
    fig = plots.cam_comparison([np.zeros((8, 8))] * 2, cams, titles=["x", "y"])
    assert len(fig.axes) == 3 * 2 + 1 and fig.axes[2].get_ylabel() == "a"


def test_cam_comparison_overlays_each_row_on_its_own_images():
    cams = {"a": np.zeros((2, 8, 8)), "b": np.ones((2, 8, 8))}
    own = {"a": [np.zeros((8, 8))] * 2, "b": [np.full((8, 8), 7.0)] * 2}
    fig = plots.cam_comparison(own, cams)
    first_b = [ax for ax in fig.axes if ax.get_ylabel() == "b"][0]
    assert first_b.images[0].get_array().max() == 7.0  # row b shows b's images under its CAMs
    with pytest.raises(ValueError, match="no images"):
        plots.cam_comparison({"a": own["a"]}, cams)
