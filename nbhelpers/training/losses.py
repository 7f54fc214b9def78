"""Training losses: cross-entropy, label smoothing, and the class-balanced focal loss.

Seed paper 002 trains with a "balanced focal loss" that raises the weight of small classes and
of misclassified images and lowers that of easy ones, without giving its parameters.  We use
the class-balanced focal loss of Cui et al. (CVPR 2019, "Class-Balanced Loss Based on
Effective Number of Samples"): class ``c`` with ``n_c`` training images gets the weight
``(1 - beta) / (1 - beta ** n_c)`` (the inverse of its effective number of samples), the weights
are rescaled to sum to the number of classes, and each image's loss is the softmax focal loss
``-w_y * (1 - p_y) ** gamma * log p_y`` (Lin et al. 2017), averaged over the batch.  Defaults
``beta=0.999`` and ``gamma=2.0`` are among the values Cui et al. report as best for
moderately sized data sets; ``beta=0`` gives equal weights and ``gamma=0`` plain cross-entropy.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: The loss names :func:`make_loss` knows.
LOSSES = ("ce", "label_smoothing", "cb_focal")
DEFAULT_SMOOTHING = 0.1
DEFAULT_BETA = 0.999
DEFAULT_GAMMA = 2.0


def class_balanced_weights(class_counts: Sequence[int], beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Per-class weights ``(1 - beta) / (1 - beta ** n_c)`` rescaled to sum to the class count.

    ``class_counts`` are the training images per class (in class-index order).  Returns a
    float32 tensor.  Raises ValueError when ``beta`` is outside [0, 1) or a class has no images
    (its weight would be infinite: drop the class or fix the split).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class-balanced beta must be in [0, 1), got {beta}")
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts <= 0).any():
        raise ValueError(f"class_counts must be positive per class, got {list(class_counts)}; "
                         "every class needs training images for the class-balanced loss")
    effective = 1.0 - np.power(beta, counts)
    weights = (1.0 - beta) / effective
    weights = weights / weights.sum() * len(counts)
    return torch.tensor(weights, dtype=torch.float32)


class ClassBalancedFocalLoss(nn.Module):
    """Softmax focal loss with class-balanced weights (module docstring); mean over the batch."""

    def __init__(self, class_counts: Sequence[int], beta: float = DEFAULT_BETA, gamma: float = DEFAULT_GAMMA) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.register_buffer("weight", class_balanced_weights(class_counts, beta))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        focal = (1.0 - log_p.exp()).clamp(min=0.0).pow(self.gamma)
        return -(self.weight[target] * focal * log_p).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, weight={self.weight.tolist()}"


def make_loss(name: str, class_counts: Sequence[int] | None = None, **kw: Any) -> nn.Module:
    """Build the loss ``name``: ``ce``, ``label_smoothing`` (``smoothing=0.1``) or ``cb_focal``
    (``beta=0.999``, ``gamma=2.0``; needs ``class_counts``, the training images per class).

    Returns an ``nn.Module`` called as ``loss(logits, labels)``.  Raises ValueError for an
    unknown name (listing :data:`LOSSES`), a missing ``class_counts`` for ``cb_focal``, or a
    keyword the loss does not take.
    """
    allowed = {"ce": set(), "label_smoothing": {"smoothing"}, "cb_focal": {"beta", "gamma"}}
    if name not in allowed:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    extra = sorted(set(kw) - allowed[name])
    if extra:
        raise ValueError(f"loss {name!r} takes no option(s) {extra}; it takes {sorted(allowed[name]) or 'none'}")
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "label_smoothing":
        return nn.CrossEntropyLoss(label_smoothing=float(kw.get("smoothing", DEFAULT_SMOOTHING)))
    if class_counts is None:
        raise ValueError("loss 'cb_focal' needs class_counts (training images per class), e.g. "
                         "list(train_split.class_counts().values())")
    return ClassBalancedFocalLoss(class_counts, beta=float(kw.get("beta", DEFAULT_BETA)),
                                  gamma=float(kw.get("gamma", DEFAULT_GAMMA)))
