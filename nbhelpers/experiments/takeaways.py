"""What a run's own numbers say, for the closing "In this run" bullets of each notebook.

Each function takes what its notebook computed (the manifest, the training log, the test
predictions, the paired tests, the probe) and returns sentences read off those numbers, so a
takeaway stays true when a student reruns with other parameters or on another machine.  A
difference whose interval holds 0 is read as within noise, and a verdict is the table's own
(fewer than three seeds: "undetermined").
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from data_prep.schema import CLASSES
from nbhelpers.experiments import findings


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "—"


def _counts(series: pd.Series) -> str:
    return ", ".join(f"{name} {n}" for name, n in series.items())


def curation(manifest: pd.DataFrame, summary: Mapping, views: Sequence[str]) -> list[str]:
    """Notebook 01: the set's size in images and patients, who is tested, the joined patient ids,
    what the paper's recipe would have mislabelled, the views that the view filter does not reach,
    and each class's largest source."""
    films = manifest.groupby("patient_id").size()
    splits = manifest.groupby("split")["patient_id"].agg(["size", "nunique"])
    tested = ", ".join(f"{s} {splits.at[s, 'size']} images of {splits.at[s, 'nunique']} patients"
                       for s in ("train", "val", "test") if s in splits.index)
    lines = [f"{len(manifest)} images of {films.size} patients, {int((films > 1).sum())} of them with several films; "
             f"{tested}."]
    merges = summary.get("patient_merges", {})
    joined = int(merges.get("patients_merged", 0))
    lines.append(f"Copies of one film joined {joined} patient ids into {merges.get('groups', 0)} patients "
                 f"({merges.get('across_sources', 0)} across sources)." if joined else
                 "No copy of a film carried two patient ids.")
    wrong = summary.get("paper_recipe", {}).get("relabelled_here")
    if wrong is not None:
        lines.append(f"The paper's recipe as we read it would give {wrong} of the sources' images a wrong label "
                     "or keep inconclusive ones.")
    view = manifest["view"].fillna("").astype(str)
    other = manifest[(manifest["source"] != "ieee8023") & (view != "") & ~view.isin(list(views))]
    if len(other):
        lines.append(f"`views = {list(views)}` filters ieee8023 only: {len(other)} films of other views from other "
                     f"sources are in the set ({_counts(other.groupby('source').size())}).")
    lines += [f"{label}: {_pct(n, total)} of its films come from {source} ({n} of {total})."
              for label, source, n, total in _largest_sources(manifest)]
    return lines


def _largest_sources(manifest: pd.DataFrame) -> list[tuple[str, str, int, int]]:
    counts = manifest.groupby(["label", "source"]).size()
    out = []
    for label in [c for c in CLASSES if c in counts.index.get_level_values(0)]:
        by_source = counts[label].sort_values(ascending=False)
        out.append((label, str(by_source.index[0]), int(by_source.iloc[0]), int(by_source.sum())))
    return out


def preprocessing(manifest: pd.DataFrame, split: str = "train") -> list[str]:
    """Notebook 02: where each class's training films come from, the cue a model can learn."""
    train = manifest[manifest["split"] == split]
    lines = [f"{label} ({split}): {_counts(train[train['label'] == label].groupby('source').size())}."
             for label in CLASSES if (train["label"] == label).any()]
    mixed = [label for label, _, n, total in _largest_sources(train) if n / total >= 0.9]
    if mixed:
        lines.append(f"{' and '.join(mixed)} come{'s' if len(mixed) == 1 else ''} almost all from one archive: "
                     "its look (contrast, borders, markers) predicts the class, whatever CLAHE does.")
    return lines


def models(table: pd.DataFrame, image_size: int) -> list[str]:
    """Notebook 03: the smallest and the largest model of the profile's list, and what CBAM adds to
    DenseNet121, from the size-and-cost table (``params_m``, ``gmacs_ptflops``)."""
    by_size = table.sort_values("params_m")
    small, large = by_size.iloc[0], by_size.iloc[-1]
    lines = [f"At {image_size} px the smallest model is {small['model']} ({small['params_m']:.1f} M parameters, "
             f"{small['gmacs_ptflops']:.2f} GMACs) and the largest {large['model']} ({large['params_m']:.1f} M, "
             f"{large['gmacs_ptflops']:.2f} GMACs)."]
    rows = table.set_index("model")
    if {"densenet121", "densenet121_cbam"} <= set(rows.index):
        plain, cbam = rows.loc["densenet121"], rows.loc["densenet121_cbam"]
        lines.append(f"CBAM adds {_pct(cbam['params_m'] - plain['params_m'], plain['params_m'])} parameters and "
                     f"{_pct(cbam['gmacs_ptflops'] - plain['gmacs_ptflops'], plain['gmacs_ptflops'])} MACs to DenseNet121.")
    return lines


def training(log: pd.DataFrame, metrics: Mapping, baselines: Mapping[str, Mapping], model: str,
             val_images: int | None = None) -> list[str]:
    """Notebook 04: whether the best epoch was the last (still improving) and how the baselines did
    on validation, with what one validation image is worth."""
    best, ran = int(metrics["best_epoch"]), int(metrics["epochs_run"])
    lines = [f"The best validation accuracy, {metrics['best_val_acc']:.2f}, came at the last epoch ({best} of {ran}): "
             "the model was still improving, so more epochs would likely help." if best >= ran else
             f"The validation accuracy peaked at epoch {best} of {ran}; the later epochs did not beat it."]
    step = f" (one of {val_images} validation images is {1 / val_images:.2f})" if val_images else ""
    for name, other in baselines.items():
        diff = other["best_val_acc"] - metrics["best_val_acc"]
        word = "beat" if diff > 0 else "trailed" if diff < 0 else "tied with"
        lines.append(f"{name} {word} {model} on validation ({other['best_val_acc']:.2f} against "
                     f"{metrics['best_val_acc']:.2f}){step}; notebook 05 compares them on the test split.")
    return lines


def evaluation(test: Mapping, pred: pd.DataFrame, manifest: pd.DataFrame, errors: pd.DataFrame,
               classes: Sequence[str] = CLASSES) -> list[str]:
    """Notebook 05: the accuracy against chance, the weakest class with where its films went, and
    what the most confident mistakes share (source, view)."""
    lines = list(_reading(test))
    confusion = np.asarray(test["confusion"])
    per_class = pd.DataFrame(test["per_class"])
    weakest = per_class.sort_values("sensitivity").iloc[0]
    k = classes.index(weakest["class"])
    row = confusion[k]
    missed = {classes[j]: int(n) for j, n in enumerate(row) if j != k and n}
    if missed:
        lines.append(f"Weakest class: {weakest['class']}, sensitivity {weakest['sensitivity']:.2f} ({int(row[k])} of "
                     f"{int(row.sum())} right); the rest were called {_counts(pd.Series(missed))}.")
    if len(errors):
        info = manifest.set_index("image_id").loc[errors["image_id"]]
        view = info["view"].fillna("").astype(str).replace("", "(blank)")
        lines.append(f"The {len(errors)} most confident mistakes: sources {_counts(info.groupby('source').size())}; "
                     f"views {_counts(view.groupby(view).size())}. Look at them above for markers and borders.")
    return lines


def _reading(test: Mapping) -> list[str]:
    from nbhelpers.evaluation.metrics import reading_notes

    return [note[0].upper() + note[1:] for note in reading_notes(test)[:1]]


def ablations(tests: pd.DataFrame, committed: pd.DataFrame | None) -> list[str]:
    """Notebook 06: each variant's difference in this run, whether it is within noise, and the
    committed grid's verdict on the same variant, with which of the two to believe."""
    lines = []
    for row in tests.itertuples(index=False):
        inside = row.bootstrap_ci_low <= 0 <= row.bootstrap_ci_high
        noise = ("within test-set noise: the patient interval holds 0, so a rerun on another machine can move it "
                 "either way" if inside else "the patient interval excludes 0")
        line = (f"{row.variant} vs {row.baseline}: {row.accuracy_diff:+.2f} [{row.bootstrap_ci_low:+.2f}, "
                f"{row.bootstrap_ci_high:+.2f}] over {int(row.test_images)} test images, {int(row.seeds)} seed"
                f"{'s' if row.seeds != 1 else ''}: {row.verdict}; {noise}.")
        match = None if committed is None else committed[committed["variant"] == row.variant]
        if match is not None and len(match):
            c = match.iloc[0]
            line += (f" The committed grid ({int(c['seeds'])} seeds, {int(c['test_images'])} images) says "
                     f"{c['accuracy_diff']:+.2f} [{c['bootstrap_ci_low']:+.2f}, {c['bootstrap_ci_high']:+.2f}]: "
                     f"{c['verdict']}. Believe the one with more seeds and a verdict; "
                     + ("here that is the committed grid." if int(c["seeds"]) > int(row.seeds) else "here, this run."))
        lines.append(line)
    return lines or ["No variant was compared in this run."]


def same_weights(nets: Mapping[str, object]) -> list[tuple[str, str]]:
    """Pairs ``(first, again)`` of models whose weights are identical: one run (the same model,
    settings and seed, trained twice or copied), to be explained once."""
    import torch

    names, pairs = list(nets), []
    states = {name: nets[name].state_dict() for name in names}
    for i, again in enumerate(names):
        for first in names[:i]:
            a, b = states[first], states[again]
            if a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
                pairs.append((first, again))
                break
    return pairs


def padding_share(bars: np.ndarray, cam: np.ndarray) -> tuple[float, float]:
    """The share of a map's energy on the letterbox bars (``bars``, a bool mask of the image as the
    model saw it, e.g. from :func:`nbhelpers.evaluation.markers.marker_masks`) and the bars' share
    of the image."""
    energy = float(cam.sum())
    return (float(cam[bars].sum()) / energy if energy > 0 else np.nan), float(bars.mean())


def gradcam(model: str, twins: Sequence[tuple[str, str]], bars: np.ndarray, cams: np.ndarray,
            titles: Sequence[str]) -> list[str]:
    """Notebook 07: which rows were one run (:func:`same_weights`), and the films whose map puts more of
    its energy on the letterbox bars than the bars' share of the image."""
    lines = [f"{b} has exactly the weights of {a}: one run (the same model, settings and seed), explained once "
             "above." for a, b in twins]
    on_bars = []
    for mask, cam, title in zip(bars, cams, titles):
        energy, area = padding_share(mask, cam)
        if area > 0 and np.isfinite(energy) and energy > area:
            on_bars.append(f"{title.replace(chr(10), ' ')}: {_pct(energy, 1)} of the map on bars covering "
                           f"{_pct(area, 1)} of the image")
    lines.append(f"{model}'s maps favour the letterbox bars on {len(on_bars)} of {len(titles)} films shown: "
                 + "; ".join(on_bars) + ". A border is the archive's format, not the disease." if on_bars else
                 f"No map of {model} on the films shown favours the letterbox bars over their area.")
    return lines


def shortcut(probe: Mapping, mitigated: Sequence[Mapping], blackout: pd.DataFrame | None) -> list[str]:
    """Notebook 08: the source probe before and after the mitigations, and the blackout rows of
    this run, each read off its interval."""
    lines = [findings.probe_sentence(probe)]
    lines += [f"After the {m['variant']} mitigation: " + findings.probe_sentence(m) for m in mitigated]
    if blackout is not None and len(blackout):
        lines += findings.blackout_sentences(blackout)
    return lines


__all__ = ["ablations", "curation", "evaluation", "gradcam", "models", "padding_share", "preprocessing", "same_weights",
           "shortcut", "training"]
