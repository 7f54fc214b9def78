"""The model zoo: the seed papers' attention models and their baselines, built by name.

``create(name, num_classes=3, in_chans=3, pretrained=False, **options)`` builds any registered
model; ``list_models()`` names them.  Every model records its Grad-CAM target layers
(:func:`cam_target_layers`, :func:`cam_reshape_transform`).
"""

from __future__ import annotations

from . import baselines, densenet_cbam, hifuse, lgfnet, resnet_fpn  # noqa: F401  (importing registers the models)
from .pretrained import PretrainedWeightsError
from .registry import (
    ModelOptionError,
    ModelSpec,
    UnknownModelError,
    cam_reshape_transform,
    cam_target_layers,
    create,
    list_models,
    model_spec,
    register_model,
)
from .summary import attention_maps, summary_table

__all__ = [
    "ModelOptionError",
    "ModelSpec",
    "attention_maps",
    "summary_table",
    "PretrainedWeightsError",
    "UnknownModelError",
    "cam_reshape_transform",
    "cam_target_layers",
    "create",
    "list_models",
    "model_spec",
    "register_model",
]
