"""Scoring a trained model on one split of the preprocessing cache: its class probabilities
(:func:`predict`) and every test metric of a run from them (:func:`evaluate`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from data_prep.schema import CLASSES
from nbhelpers.evaluation import metrics as M
from nbhelpers.pipeline.data import AugmentPolicy, batches, to_model_input


@torch.no_grad()
def predict(model: nn.Module, split, device: torch.device, batch_size: int = 64, in_chans: int = 3) -> np.ndarray:
    """Return softmax probabilities (N, classes) for every image of ``split`` in cache order."""
    model.eval().to(device)
    policy = AugmentPolicy.from_name("off")
    out = []
    for x, _ in batches(split, batch_size, device=device):
        x = to_model_input(x, policy, in_chans=in_chans, train=False)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def evaluate(
    y_true: np.ndarray, probs: np.ndarray, n_boot: int = M.N_BOOTSTRAP, seed: int = 0,
    patients: Sequence[str] | None = None, classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """Every test metric of a run as one JSON-ready dict: summary, per-class table, per-class
    AUC, bootstrap CIs, confusion matrix and expected calibration error.

    ``classes`` names the columns of ``probs`` (the model's outputs, in label-index order).
    ``ci`` resamples ``patients`` (each image's patient) with all their images when given, the
    honest unit when a patient has several films; ``ci_image`` resamples images, kept beside it
    to show how much narrower that would be.  ``n_patients`` counts the distinct patients."""
    y_true, classes = np.asarray(y_true), tuple(classes)
    cm = M.confusion(y_true, probs.argmax(1), len(classes))
    by_image = M.summary_with_ci(y_true, probs, n=n_boot, seed=seed, classes=classes)
    by_patient = (M.summary_with_ci(y_true, probs, n=n_boot, seed=seed, classes=classes, groups=patients)
                  if patients is not None else by_image)
    return {
        **M.summary(y_true, probs, classes),
        "n_patients": len(set(patients)) if patients is not None else None,
        "per_class": M.per_class(cm, classes).to_dict(orient="records"),
        "auc": M.auc_ovr(y_true, probs, classes),
        "ci": by_patient.to_dict(orient="records"),
        "ci_image": by_image.to_dict(orient="records"),
        "confusion": cm.tolist(),
        "ece": M.expected_calibration_error(y_true, probs),
    }
