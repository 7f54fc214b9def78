"""Class-activation maps through the maintained ``grad-cam`` library.

The target layer(s) and any reshape for transformer tokens come from the model registry, so
no notebook needs per-model code.  Every image in a batch gets its own target class (one
``ClassifierOutputTarget`` per image): a single target would explain only the first image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from nbhelpers.models import cam_reshape_transform, cam_target_layers

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}


def examples_per_class(labels: Sequence[int], n: int) -> list[int]:
    """Indices of up to ``n`` images taken round-robin over the classes present in ``labels``
    (first of each class, then second of each, ...), so a small figure shows every class."""
    labels = np.asarray(labels)
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return picked


def compute_cams(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None,
                 method: str = "gradcam") -> np.ndarray:
    """Return CAMs in [0, 1] of shape (B, H, W) for model input ``x`` (B, C, H, W).

    ``targets`` gives the class to explain per image (default: the predicted class).
    Raises ValueError for an unknown method or a target list of the wrong length.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; use one of {', '.join(METHODS)}")
    if targets is not None and len(targets) != len(x):
        raise ValueError(f"{len(targets)} targets for {len(x)} images: give one target class per image")
    model.eval()
    # In-place activations break the gradient hooks on the layers CAM listens to.
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    with torch.enable_grad(), METHODS[method](
        model=model,
        target_layers=cam_target_layers(model),
        reshape_transform=cam_reshape_transform(model),
    ) as cam:
        per_image = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        return cam(input_tensor=x, targets=per_image)
