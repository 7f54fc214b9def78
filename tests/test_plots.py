from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from nbhelpers import plots  # noqa: E402


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
    cams = plots.cam_overlays([np.zeros((8, 8))] * 2, [np.ones((8, 8)) * 0.5] * 2, titles=["x", "y"])
    assert len(cams.axes) == 5  # 2 x 2 panels + colour bar
