"""The model registry: every model of the workbook by name, with one constructor signature.

Architecture modules register a builder with :func:`register_model`; users call :func:`create`.
A builder takes ``(num_classes, in_chans, pretrained, **options)`` and returns a model whose
Grad-CAM target layers are named by :func:`set_cam_layers`, so CAM code needs no per-model branches.
``pretrained`` reaches a builder as False, True (ImageNet) or ``"xrv:NAME"`` (torchxrayvision's
chest X-ray weights, only for models registered with ``weights=(..., "xrv")``).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn
from data_prep.errors import WorkbookError

from .pretrained import PretrainedWeightsError
from .xrv import XRV_DENSENET_WEIGHTS, XRV_PREFIX, xrv_weights_name

#: Attributes the registry sets on every model it creates.
CAM_LAYERS_ATTR = "cam_layer_names"
CAM_RESHAPE_ATTR = "cam_reshape"
#: How many close matches an unknown name is answered with.
SUGGESTIONS = 3


class UnknownModelError(WorkbookError, KeyError):
    """A model name that is not registered; the message names the closest registered ones."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class ModelOptionError(WorkbookError, TypeError):
    """An option the model does not have; the message names the options it has."""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model name."""

    name: str
    builder: Callable[..., nn.Module]
    options: dict[str, Any] = field(default_factory=dict)  # documented options and their defaults
    source: str = ""  # "seed 001", "timm", "torchvision", ...
    image_size: int = 224  # the input size its paper uses
    description: str = ""
    weights: tuple[str, ...] = ("imagenet",)  # what pretrained= may name: "imagenet" (True), "xrv"


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    options: dict[str, Any] | None = None,
    source: str = "",
    image_size: int = 224,
    description: str = "",
    weights: tuple[str, ...] = ("imagenet",),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder`` under ``name``; raise ValueError if the name is taken.
    ``weights`` names the pretrained weights the builder can load ("imagenet", "xrv")."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice ({_REGISTRY[name].builder.__module__})")
        _REGISTRY[name] = ModelSpec(name, builder, dict(options or {}), source, image_size, description, tuple(weights))
        return builder

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Return the registered names, sorted, optionally filtered by a shell-style ``pattern``."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` of ``name``; raise :class:`UnknownModelError` with close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=SUGGESTIONS, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else "no registered name is close"
        raise UnknownModelError(
            f"unknown model {name!r}: {hint} (list_models() gives all {len(_REGISTRY)} names)"
        )
    return _REGISTRY[name]


def resolve_pretrained(name: str, pretrained: bool | str | None) -> bool | str:
    """What ``pretrained`` asks of model ``name``: False (none), True (ImageNet) or ``"xrv:NAME"``.

    Accepts a bool (or None), "none"/"false", "imagenet"/"true" and ``"xrv:NAME"``; raises
    :class:`PretrainedWeightsError` naming the valid values for anything else, or the models
    that have torchxrayvision weights when ``name`` has none.
    """
    spec = model_spec(name)
    if not isinstance(pretrained, str):
        return bool(pretrained)
    if pretrained.lower() in ("none", "false", ""):
        return False
    if pretrained.lower() in ("imagenet", "true"):
        return True
    if xrv_weights_name(pretrained) is not None:
        if "xrv" not in spec.weights:
            having = ", ".join(n for n, s in sorted(_REGISTRY.items()) if "xrv" in s.weights)
            raise PretrainedWeightsError(f"model {name!r} has no torchxrayvision weights ({pretrained!r}); they exist "
                                         f"for {having}; pretrained=True gives ImageNet weights")
        return str(pretrained)
    names = ", ".join(f"{XRV_PREFIX}{n}" for n in XRV_DENSENET_WEIGHTS)
    raise PretrainedWeightsError(f"pretrained={pretrained!r} for {name!r}: use False, True (or 'imagenet') or one of "
                                 f"{names}")


def create(name: str, num_classes: int = 3, in_chans: int = 3, pretrained: bool | str = False,
           **options: Any) -> nn.Module:
    """Build model ``name`` for ``num_classes`` outputs from ``in_chans``-channel images.

    ``pretrained=True`` (or ``"imagenet"``) loads ImageNet weights where torchvision/timm offer
    them (into the backbone of the seed models); ``pretrained="xrv:densenet121-res224-all"``
    loads torchxrayvision's chest X-ray weights into DenseNet121 backbones (see
    :mod:`nbhelpers.models.xrv`).  ``options`` are the model's documented switches (see
    ``model_spec(name).options``).  Raises :class:`UnknownModelError` for an unknown name,
    :class:`ModelOptionError` (a TypeError) for an unknown option (naming the valid ones),
    ValueError for bad values and :class:`~nbhelpers.models.pretrained.PretrainedWeightsError`
    for a ``pretrained`` value the model has no weights for, or weights that cannot be fetched.
    """
    spec = model_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "none"
        raise ModelOptionError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {valid}")
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"model {name!r}: num_classes and in_chans must be >= 1, got {num_classes}, {in_chans}")
    settings = {**spec.options, **options}
    weights = resolve_pretrained(name, pretrained)
    model = spec.builder(num_classes=num_classes, in_chans=in_chans, pretrained=weights, **settings)
    if not getattr(model, CAM_LAYERS_ATTR, None):
        raise RuntimeError(f"builder of {name!r} did not name its Grad-CAM layers (call set_cam_layers)")
    model.model_name = name
    model.model_options = settings
    return model


def set_cam_layers(model: nn.Module, names: list[str], reshape: Callable | None = None) -> nn.Module:
    """Record the Grad-CAM target layers of ``model`` by their dotted names (checked to exist).

    ``reshape`` turns a layer's token output (B, N, C) into a (B, C, H, W) grid for Grad-CAM; it
    must be a module-level function so the model can still be pickled.  Returns ``model``.
    """
    for n in names:
        model.get_submodule(n)  # raises AttributeError naming the missing layer
    setattr(model, CAM_LAYERS_ATTR, list(names))
    setattr(model, CAM_RESHAPE_ATTR, reshape)
    return model


def cam_target_layers(model: nn.Module) -> list[nn.Module]:
    """Return the layers Grad-CAM should use for ``model``; raise ValueError if none were recorded."""
    names = getattr(model, CAM_LAYERS_ATTR, None)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no recorded Grad-CAM layers; build it with nbhelpers.models.create()"
        )
    return [model.get_submodule(n) for n in names]


def cam_reshape_transform(model: nn.Module) -> Callable | None:
    """Return the token-to-grid function for Grad-CAM on ``model`` (None for convolutional layers)."""
    return getattr(model, CAM_RESHAPE_ATTR, None)


class InputSizeError(WorkbookError, ValueError):
    """An image size a model cannot take (its feature maps would shrink below one pixel)."""


#: Sizes tried, smallest first, to tell a user the smallest one a model accepts.
SIZES_TRIED = (16, 32, 48, 64, 96, 128, 160, 224)


def _takes(name: str, size: int, in_chans: int, options: tuple) -> bool:
    import torch

    model = create(name, in_chans=in_chans, **dict(options)).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size))
    except (RuntimeError, ValueError, AssertionError):
        return False
    return True


_TAKES: dict[tuple, bool] = {}


def check_input_size(name: str, size: int, in_chans: int = 3, **options: Any) -> None:
    """Raise :class:`InputSizeError` when model ``name`` (with ``options``) cannot take ``size`` px
    images, naming the smallest size it takes: one forward pass of a blank image on the CPU,
    remembered for the process, so a run stops before any caching or training rather than
    with torch's "Output size is too small" afterwards."""
    key = (name, size, in_chans, tuple(sorted(options.items())))
    if key not in _TAKES:
        _TAKES[key] = _takes(name, size, in_chans, key[3])
    if _TAKES[key]:
        return
    smallest = next((s for s in SIZES_TRIED if s > size and _takes(name, s, in_chans, key[3])), None)
    hint = f"use image_size >= {smallest}" if smallest else f"use a larger image size (its paper: {model_spec(name).image_size})"
    raise InputSizeError(f"model {name!r} cannot take {size} px images (its feature maps shrink below one pixel); {hint}")
