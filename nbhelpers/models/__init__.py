"""The model zoo: the seed papers' attention models and their baselines, built by name.

``create(name, num_classes=3, in_chans=3, pretrained=False, **options)`` builds any registered
model; ``list_models()`` names them.  Every model records its Grad-CAM target layers
(:func:`cam_target_layers`, :func:`cam_reshape_transform`).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

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

#: Modules of this package that hold machinery, not models; every other module holds models and
#: registers them when imported (``@register_model``), so a new model is one new module.
SUPPORT_MODULES = frozenset({"attention", "complexity", "pretrained", "registry", "summary", "xrv"})


def model_modules(folder: Path | str = Path(__file__).parent) -> list[str]:
    """The model modules in ``folder``: every public module but :data:`SUPPORT_MODULES`."""
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)])
                  if not m.name.startswith("_") and m.name not in SUPPORT_MODULES)


for _name in model_modules():  # importing registers the models
    importlib.import_module(f"{__name__}.{_name}")

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
    "model_modules",
    "model_spec",
    "register_model",
]
