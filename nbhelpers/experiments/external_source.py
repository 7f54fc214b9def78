"""The external-source test (DeGrave et al. 2021): train with one archive per class, score the
films of the same class from every other archive as external.

A model that learnt the disease keeps its accuracy on another archive's films; one that learnt
the archive does not.  :func:`external_split` builds the split, :func:`score_external` scores a
finished run on the external films, :func:`external_table` sets internal against external
accuracy and AUROC per class, each image once over the seeds, intervals over patients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from data_prep import atomic
from data_prep.schema import CLASSES
from data_prep.split import DEFAULT_RATIOS, split_by_patient
from nbhelpers.evaluation import metrics as M
from nbhelpers.evaluation.stats import MIN_CELL_IMAGES, MIN_CELL_PATIENTS
from nbhelpers.experiments.probes import ProbeError
from nbhelpers.training.config import PREDICTIONS_NAME

#: Two-sided confidence level of every interval here.
CI_LEVEL = M.CI_LEVEL


# --------------------------------------------------------------------------- external sources (DeGrave et al. 2021)

#: A run's predictions for the images of archives it never saw (:func:`score_external`).
EXTERNAL_PREDICTIONS = "external_predictions.csv"


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
    """One row per image: label, patient, source, correctness and class probabilities averaged over
    seeds.  A table without a ``source`` column (a training run's ``test_predictions.csv``) takes
    each image's source from its id, ``"<source>:<path>"`` (:data:`data_prep.schema.TABLE_COLUMNS`)."""
    stacked = pd.concat([f.assign(image_id=f["image_id"].astype(str)) for f in frames], ignore_index=True)
    if "source" not in stacked.columns:
        stacked["source"] = stacked["image_id"].str.split(":", n=1).str[0]
    stacked["correct"] = (stacked["label"] == stacked["pred"]).astype(float)
    for c, name in enumerate(CLASSES):
        stacked[f"called_{name}"] = (stacked["pred"] == c).astype(float)
    columns = ["correct", *[f"p_{c}" for c in CLASSES], *[f"called_{c}" for c in CLASSES]]
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


def _drop_ci(inside: np.ndarray, inside_groups: np.ndarray, outside: np.ndarray, outside_groups: np.ndarray,
             n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of mean(inside) - mean(outside), the two sets (distinct patients)
    resampled by patient independently; NaNs when either is empty."""
    if len(inside) == 0 or len(outside) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    a = [inside[i].mean() for i in M.resample_indices(len(inside), n_boot, rng, inside_groups)]
    b = [outside[i].mean() for i in M.resample_indices(len(outside), n_boot, rng, outside_groups)]
    low, high = np.quantile(np.array(a) - np.array(b), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def external_table(folders: Sequence[Path], n_boot: int = M.N_BOOTSTRAP, seed: int = 0,
                   level: float = CI_LEVEL) -> pd.DataFrame:
    """Internal against external sensitivity, specificity and AUROC per class, over the seeds' run
    ``folders`` of one external-source row (each holding ``test_predictions.csv`` and
    ``external_predictions.csv``).

    Each image counts once (its correctness, calls and probabilities averaged over seeds).
    ``*_accuracy`` is the class's **sensitivity** (its images called that class) with an interval
    over patients (:func:`nbhelpers.evaluation.stats.proportion_ci`); ``*_specificity`` the share
    of the set's other images *not* called that class (a model that calls every external film
    COVID-19 has a high COVID sensitivity and a low specificity); AUROC is one-vs-rest on the set's
    images with a patient bootstrap interval (NaN when the set holds no negatives).  ``drop`` is
    internal minus external sensitivity, with a bootstrap interval resampling each side's
    patients (``drop_low`` / ``drop_high``).  ``conclusive`` is false where either side has fewer
    than :data:`MIN_CELL_IMAGES` images or :data:`MIN_CELL_PATIENTS` patients of the class."""
    from nbhelpers.evaluation.stats import proportion_ci

    sides = {name: _seed_averaged([pd.read_csv(Path(f) / file, keep_default_na=False) for f in folders])
             for name, file in (("internal", PREDICTIONS_NAME), ("external", EXTERNAL_PREDICTIONS))}
    rows = []
    for c, label in enumerate(CLASSES):
        line: dict[str, Any] = {"class": label, "seeds": len(folders)}
        enough = True
        for side, images in sides.items():
            cell = images[images["label"] == c]
            others = images[images["label"] != c]
            stats_ = proportion_ci(cell["correct"].to_numpy(), cell["patient_id"].to_numpy(), n_boot, seed, level)
            spec = proportion_ci(1.0 - others[f"called_{label}"].to_numpy(), others["patient_id"].to_numpy(),
                                 n_boot, seed, level)
            auc, a_low, a_high = _auc_ci(images, c, n_boot, seed, level)
            line.update({f"{side}_sources": "+".join(sorted(set(cell["source"]))), f"{side}_n": stats_["n"],
                         f"{side}_patients": stats_["patients"], f"{side}_accuracy": stats_["accuracy"],
                         f"{side}_low": stats_["low"], f"{side}_high": stats_["high"],
                         f"{side}_specificity": spec["accuracy"], f"{side}_spec_low": spec["low"],
                         f"{side}_spec_high": spec["high"], f"{side}_auc": auc,
                         f"{side}_auc_low": a_low, f"{side}_auc_high": a_high})
            enough &= stats_["n"] >= MIN_CELL_IMAGES and stats_["patients"] >= MIN_CELL_PATIENTS
        line["drop"] = line["internal_accuracy"] - line["external_accuracy"]
        inside = sides["internal"][sides["internal"]["label"] == c]
        outside = sides["external"][sides["external"]["label"] == c]
        line["drop_low"], line["drop_high"] = _drop_ci(
            inside["correct"].to_numpy(), inside["patient_id"].to_numpy(), outside["correct"].to_numpy(),
            outside["patient_id"].to_numpy(), n_boot, seed, level)
        line["conclusive"] = bool(enough)
        rows.append(line)
    return pd.DataFrame(rows)
