"""Figures the notebooks show: counts, image grids, training curves, confusion matrices, CAMs.

Each function returns a matplotlib Figure (so the notebook can save it) and draws nothing
it does not return.  Images are uint8 or float grayscale arrays (H, W).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from data_prep.schema import CLASSES

#: One colour per class in every figure (Okabe-Ito, readable with colour-blindness).
CLASS_COLORS = {"covid": "#D55E00", "pneumonia": "#009E73", "normal": "#0072B2"}


def palette(values) -> dict[str, str] | None:
    """The class palette when ``values`` are class names, else None (seaborn's default)."""
    present = {str(v) for v in values}
    return {c: CLASS_COLORS[c] for c in CLASSES if c in present} if present <= set(CLASS_COLORS) else None


def legend_outside(ax: plt.Axes, title: str | None = None) -> None:
    """Move an axis' legend to its right, off the data."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False, title=title, fontsize=8)


def _order(values) -> list[str] | None:
    """Classes in their usual order, splits as train, val, test; other values as they come."""
    present = list(dict.fromkeys(str(v) for v in values))
    for usual in (list(CLASSES), ["train", "val", "test"]):
        if set(present) <= set(usual):
            return [v for v in usual if v in present]
    return None


def counts_bar(counts: pd.DataFrame, x: str, hue: str, title: str = "", ylabel: str = "images") -> plt.Figure:
    """Grouped bar chart of a long table with columns ``x``, ``hue`` and ``count``; classes in
    their colours, the legend beside the bars."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colours = palette(counts[hue])
    sns.barplot(data=counts, x=x, y="count", hue=hue, ax=ax, palette=colours, saturation=1,
                order=_order(counts[x]), hue_order=list(colours) if colours else _order(counts[hue]))
    for container in ax.containers:
        ax.bar_label(container, fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    legend_outside(ax, hue)
    fig.tight_layout()
    return fig


def wrap_title(title: str, width: int = 26) -> str:
    """``title`` wrapped line by line to ``width`` characters, so neighbouring titles never meet."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in str(title).splitlines() or [""])


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] = (), ncols: int = 4,
               size: float = 2.4, title: str | None = None, map_label: str | None = None,
               map_range: tuple[float, float] = (0.0, 1.0)) -> plt.Figure:
    """Show grayscale ``images`` in a grid with optional per-image ``titles`` and a figure ``title``.

    A uint8 image is drawn on its full 0..255 scale, so one image looks the same in every grid
    (a dark film stays dark).  Any other image (a map, a float array) is scaled to its own range,
    or, with ``map_label``, drawn in the viridis colour map on ``map_range`` with one colour bar
    so labelled with the maps' unit."""
    n = max(len(images), 1)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + (0.8 if map_label else 0), size * nrows),
                             squeeze=False)
    mappable = None
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            image = np.asarray(images[i])
            if image.dtype == np.uint8:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            elif map_label:
                mappable = ax.imshow(image, cmap="viridis", vmin=map_range[0], vmax=map_range[1])
            else:
                ax.imshow(image, cmap="gray")
            if i < len(titles):
                ax.set_title(wrap_title(titles[i], width=int(11 * size)), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label=map_label)
    return fig


def training_curves(log: pd.DataFrame) -> plt.Figure:
    """Loss and accuracy per epoch (train and validation) from a training log."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    for split, style in (("train", "-o"), ("val", "--s")):
        ax_loss.plot(log["epoch"], log[f"{split}_loss"], style, label=split)
        ax_acc.plot(log["epoch"], log[f"{split}_acc"], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    return fig


def confusion_heatmap(cm: np.ndarray, classes: Sequence[str] = CLASSES, title: str = "") -> plt.Figure:
    """Confusion matrix as counts with row-normalised shading (true rows, predicted columns)."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    sns.heatmap(share, annot=cm, fmt="d", cmap="Blues", vmin=0, vmax=1, cbar_kws={"label": "share of true class"},
                xticklabels=classes, yticklabels=classes, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def roc_plot(roc: pd.DataFrame, aucs: dict[str, float] | None = None, title: str = "") -> plt.Figure:
    """One-vs-rest ROC curves from a long table (class, fpr, tpr), the AUC of each in the legend."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for name, curve in roc.groupby("class", sort=False):
        label = f"{name} (AUC {aucs[name]:.3f})" if aucs and name in aucs else name
        ax.step(curve["fpr"], curve["tpr"], where="post", label=label, color=CLASS_COLORS.get(str(name)))
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="chance")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def reliability_diagram(bins: pd.DataFrame, ece: float | None = None, title: str = "") -> plt.Figure:
    """Accuracy against confidence per bin (columns lower, upper, count, confidence, accuracy),
    with the diagonal of perfect calibration and bar widths of the bins."""
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.2, 4.6), sharex=True, height_ratios=(3, 1))
    full = bins[bins["count"] > 0]
    width = full["upper"] - full["lower"]
    ax.bar(full["lower"], full["accuracy"], width=width, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], ":", color="0.4", label="perfect calibration")
    ax.set(ylabel="accuracy", ylim=(0, 1), title=title + (f" ECE {ece:.3f}" if ece is not None else ""))
    ax.legend(fontsize=8, loc="upper left")
    ax_count.bar(full["lower"], full["count"], width=width, align="edge", color="0.6")
    ax_count.set(xlabel="confidence of the top class", ylabel="images", xlim=(0, 1))
    fig.tight_layout()
    return fig


def ablation_bars(summary: pd.DataFrame, metric: str = "accuracy") -> plt.Figure:
    """Mean ``metric`` per ablation row (bars), grouped by ablation group, with the 95 % patient
    bootstrap interval of the seed-averaged accuracy where the summary has it (else ± one std
    over seeds), and the paper's reported accuracy (on its own data, a fraction) as a marker."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(summary) + 1.5), 3.6))
    x = np.arange(len(summary))
    colours = dict(zip(summary["group"].unique(), sns.color_palette(n_colors=summary["group"].nunique())))
    mean = summary[f"{metric}_mean"]
    if metric == "accuracy" and "accuracy_boot_low" in summary and summary["accuracy_boot_low"].notna().all():
        yerr = np.vstack([mean - summary["accuracy_boot_low"], summary["accuracy_boot_high"] - mean])
        ylabel = "test accuracy (95 % interval over patients)"
    else:
        yerr, ylabel = summary[f"{metric}_std"].fillna(0), f"test {metric} (± std over seeds)"
    ax.bar(x, mean, yerr=yerr, capsize=3, color=[colours[g] for g in summary["group"]])
    paper = summary["paper_accuracy"].astype(float) if "paper_accuracy" in summary else pd.Series(dtype=float)
    if metric == "accuracy" and paper.notna().any():  # a legend only for markers that are drawn
        has = paper.notna().to_numpy()
        ax.scatter(x[has], paper[has], marker="_", s=300, color="k", label="paper (its data)", zorder=3)
        if "ours_on_paper_metric" in summary:  # ours on the metric the paper reports (paper 000: its ACC)
            ax.scatter(x[has], summary.loc[has, "ours_on_paper_metric"], marker="D", s=22, facecolor="white",
                       edgecolor="k", label="ours, on the paper's metric", zorder=4)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)
    ax.set_xticks(x, summary["name"], rotation=40, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, ylim=(0, 1))
    fig.tight_layout()
    return fig


def interval_plot(table: pd.DataFrame, label: str, value: str = "accuracy", low: str = "low", high: str = "high",
                  title: str = "", reference: float | None = None, xlabel: str = "accuracy") -> plt.Figure:
    """One point with its interval per row of ``table`` (labelled by ``label``), a row per line.
    Rows whose ``conclusive`` column is false (too few images or patients to read) are drawn in
    grey and marked "(thin)"; ``reference`` (e.g. chance) is a dashed line."""
    fig, ax = plt.subplots(figsize=(6.0, 0.28 * len(table) + 1.2))
    y = np.arange(len(table))[::-1]
    ok = table["conclusive"].astype(bool).to_numpy() if "conclusive" in table else np.ones(len(table), bool)
    for yi, (_, row), good in zip(y, table.iterrows(), ok):
        colour = "k" if good else "0.7"
        ax.plot([row[low], row[high]], [yi, yi], color=colour, lw=1.5)
        ax.plot(row[value], yi, "o", color=colour, ms=4)
    names = [f"{n}" + ("" if good else " (thin)") for n, good in zip(table[label].astype(str), ok)]
    ax.set_yticks(y, names, fontsize=8)
    for tick, good in zip(ax.get_yticklabels()[::-1], ok[::-1]):
        tick.set_color("k" if good else "0.55")
    if reference is not None:
        ax.axvline(reference, ls="--", color="0.5", lw=1)
    ax.set(xlabel=xlabel, xlim=(0, 1), title=wrap_title(title, 60) if title else "")
    fig.tight_layout()
    return fig


def cam_comparison(images: Sequence[np.ndarray] | Mapping[str, Sequence[np.ndarray]], cams: dict[str, np.ndarray],
                   titles: Sequence[str] = (), alpha: float = 0.45) -> plt.Figure:
    """The same images (columns) explained by several models or methods (rows, keyed by label),
    each CAM overlaid in the jet colour map, with one shared colour bar.

    ``images`` may map each label to its own version of the images (models trained on other
    preprocessing, e.g. a lung crop): each row then overlays its CAMs on its own images and the
    top row shows the first label's."""
    labels = list(cams)
    rows = dict(images) if isinstance(images, Mapping) else {label: images for label in labels}
    missing = [label for label in labels if label not in rows]
    if missing:
        raise ValueError(f"no images for CAM row(s) {missing}; give one image list per label")
    images = rows[labels[0]] if labels else list(images)
    n = len(images)
    wrapped = [wrap_title(t) for t in titles]
    lines = max((t.count("\n") + 1 for t in wrapped), default=0)
    fig, axes = plt.subplots(len(labels) + 1, n, figsize=(2.3 * n + 0.8, 2.3 * (len(labels) + 1) + 0.15 * lines),
                             squeeze=False)
    fig.subplots_adjust(top=1 - 0.15 * lines / fig.get_figheight() - 0.02, wspace=0.08, hspace=0.08)
    mappable = None
    for j in range(n):
        axes[0, j].imshow(images[j], cmap="gray")
        axes[0, j].set_title(wrapped[j] if j < len(wrapped) else "", fontsize=8)
        for i, label in enumerate(labels, 1):
            axes[i, j].imshow(rows[label][j], cmap="gray")
            mappable = axes[i, j].imshow(cams[label][j], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        for i in range(len(labels) + 1):
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
    for i, label in enumerate(["image"] + labels):
        axes[i, 0].set_ylabel(label, fontsize=8)
    if mappable is not None:
        fig.subplots_adjust(right=0.9)
        fig.colorbar(mappable, cax=fig.add_axes((0.92, 0.15, 0.015, 0.7)), label="CAM (normalised)")
    return fig
