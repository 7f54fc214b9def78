"""torchxrayvision's chest X-ray DenseNet121 weights as a backbone, without torchxrayvision.

``pretrained="xrv:densenet121-res224-all"`` (or another name of :data:`XRV_DENSENET_WEIGHTS`)
starts ``densenet121`` / ``densenet121_cbam`` from the weights Cohen et al. trained on eight
public chest X-ray sets (torchxrayvision, arXiv:2002.02497) instead of ImageNet's.  The release
files are read from ``~/.torchxrayvision/models_data/`` (where torchxrayvision keeps them, so a
file it fetched is reused) and fetched from its GitHub release when absent.

Three conversions make our model compute what theirs computes:

* **Keys.** Their DenseNet is torchvision's layout (``features.conv0`` ... ``features.norm5``,
  ``classifier``), so the ``features.*`` tensors load key for key; their 18-pathology classifier
  is dropped for our ``num_classes`` head.
* **First conv.** Theirs takes one grey channel; ours takes ``in_chans`` copies of the grey image
  (:func:`nbhelpers.pipeline.data.to_model_input`).  Their (64, 1, 7, 7) kernel ``w`` becomes
  ``w / in_chans`` on every channel, so on identical channels the sum is exactly ``w * grey``.
* **Input scale.** They feed pixels scaled to [-1024, 1024] (``xrv.utils.normalize``: grey in
  [0, 1] maps to ``2048 * grey - 1024``); ours arrive normalised with ImageNet statistics,
  ``(grey - mean_c) / std_c``.  :class:`XrvInput` in front of the features undoes that and
  applies theirs: ``x * 2048 * std_c + (2048 * mean_c - 1024)``.  It keeps its two buffers in the
  model's state dict, so a checkpoint of a model started from these weights rebuilds it.

The files are pickled torchxrayvision modules, not plain state dicts.  :func:`read_state_dict`
reads their tensors with an unpickler that admits only torch's tensor rebuilders and stand-ins
for the module classes, so no code from the file runs and torchxrayvision need not be installed.
"""

from __future__ import annotations

import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .pretrained import PretrainedWeightsError, probe

XRV_PREFIX = "xrv:"
XRV_RELEASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
XRV_HOST = "github.com"
#: torchxrayvision's DenseNet121 weight names (``xrv.models.DenseNet(weights=NAME)``) and their release files.
XRV_DENSENET_WEIGHTS: dict[str, str] = {
    "densenet121-res224-all":
        "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-nih": "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-pc": "pc-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-chex": "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-rsna": "kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-mimic_nb": "mimic_nb-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-mimic_ch": "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
}
#: torchxrayvision's input scale: a grey value in [0, 1] becomes 2 * XRV_RANGE * grey - XRV_RANGE.
XRV_RANGE = 1024.0
#: Module paths whose classes a weights file may name; each becomes a stand-in holding its state.
_MODULE_PREFIXES = ("torch.nn.modules.", "torchxrayvision.", "torchvision.models.")
_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("__builtin__", "set"), ("torch", "Size"),
}


def xrv_cache_dir() -> Path:
    """Where torchxrayvision keeps its weights: ``~/.torchxrayvision/models_data``."""
    return Path.home() / ".torchxrayvision" / "models_data"


def xrv_weights_name(pretrained: object) -> str | None:
    """The torchxrayvision weight name of a ``pretrained`` value (``"xrv:NAME"``), None for any
    other value.  Raises :class:`PretrainedWeightsError` listing the names for an unknown one."""
    if not (isinstance(pretrained, str) and pretrained.startswith(XRV_PREFIX)):
        return None
    name = pretrained.removeprefix(XRV_PREFIX)
    if name not in XRV_DENSENET_WEIGHTS:
        known = ", ".join(f"{XRV_PREFIX}{n}" for n in XRV_DENSENET_WEIGHTS)
        raise PretrainedWeightsError(f"unknown torchxrayvision weights {pretrained!r}; known: {known}")
    return name


def xrv_weights_file(name: str, model: str) -> Path:
    """The local file of torchxrayvision weights ``name``, fetched into :func:`xrv_cache_dir` when absent.

    Raises :class:`PretrainedWeightsError` in one line naming the file, its URL and where to put
    it when github.com cannot be reached or the download fails.
    """
    filename = XRV_DENSENET_WEIGHTS[name]
    path = xrv_cache_dir() / filename
    if path.is_file():
        return path
    url = XRV_RELEASE + filename

    def offline(reason: object) -> PretrainedWeightsError:
        return PretrainedWeightsError(
            f"torchxrayvision weights {name} for {model} are not at {path} and could not be downloaded "
            f"({reason}): download {url} on a machine with internet and put it there, or use pretrained=True "
            "(ImageNet) or False"
        )

    try:
        probe(XRV_HOST)
    except OSError as err:
        raise offline(err) from None
    from data_prep.fetch import DownloadError, fetch

    try:
        return fetch(url, path)
    except DownloadError as err:
        raise offline(err) from None


class _Stub:
    """Stand-in for a pickled module class: it keeps the unpickled attributes and nothing else."""

    dump_patches = False  # torch's legacy loader asks this when a class's source differs

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _none(*args: Any, **kwargs: Any) -> None:
    return None


class _WeightsUnpickler(pickle.Unpickler):
    """Admits torch's tensor rebuilders and plain containers; module classes become :class:`_Stub`
    subclasses; anything else stops the load."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TORCH_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_MODULE_PREFIXES):
            return type(name, (_Stub,), {"__module__": module})
        if module.startswith("torch.nn.backends"):  # old torch pickled a backend factory per module
            return _none
        raise pickle.UnpicklingError(f"weights file names {module}.{name}, which a weights file has no need for")


class _WeightsPickle:
    """The ``pickle_module`` handed to :func:`torch.load` for module files."""

    Unpickler = _WeightsUnpickler
    __name__ = "cxr_workbook_weights_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _WeightsUnpickler(file, **kwargs).load()


def _tensors(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of an unpickled module tree (its parameters and persistent buffers)."""
    out: dict[str, torch.Tensor] = OrderedDict()
    state = vars(module)
    skip = state.get("_non_persistent_buffers_set", set())
    for group in ("_parameters", "_buffers"):
        for key, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and key not in skip:
                out[prefix + key] = value.detach()
    for key, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_tensors(child, f"{prefix}{key}."))
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a plain state dict, or a pickled module (torchxrayvision's
    release files) read without running code from it.  Raises :class:`PretrainedWeightsError`
    naming the file when it is neither."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "source code of class ... has changed": stand-ins differ
                loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_WeightsPickle)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise PretrainedWeightsError(f"{path} is not a torch weights file ({err}); delete it and rerun") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise PretrainedWeightsError(f"{path} is not a torch weights file ({err}); delete it and rerun") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    tensors = loaded if isinstance(loaded, dict) else _tensors(loaded)
    if not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise PretrainedWeightsError(f"{path} holds no tensors of a model; delete it and rerun")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def xrv_backbone_state_dict(name: str, model: str) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of torchxrayvision weights ``name`` (fetched when absent), their
    1-channel first conv unchanged (the backbone loader adapts it to ``in_chans``)."""
    path = xrv_weights_file(name, model)
    tensors = {k: v for k, v in read_state_dict(path).items() if k.startswith("features.")}
    conv0 = tensors.get("features.conv0.weight")
    if conv0 is None or conv0.ndim != 4 or conv0.shape[1] != 1:
        shape = None if conv0 is None else tuple(conv0.shape)
        raise PretrainedWeightsError(f"{path} is not a torchxrayvision DenseNet121 (first conv {shape}, "
                                     "expected (64, 1, 7, 7)); delete it and rerun")
    return tensors


def spread_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Their 1-channel first-conv ``weight`` (O, 1, kH, kW) as ``in_chans`` channels of ``weight /
    in_chans``: on ``in_chans`` identical channels the convolution sums back to theirs."""
    return (weight / in_chans).repeat(1, in_chans, 1, 1)


def _pixel_statistics(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of our model input (as :func:`nbhelpers.pipeline.data.to_model_input` normalises)."""
    from nbhelpers.pipeline.data import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD

    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (GRAY_MEAN,) * in_chans, (GRAY_STD,) * in_chans


class XrvInput(nn.Module):
    """Maps our normalised input to torchxrayvision's pixel scale: ``x * scale + shift`` per channel,
    with ``scale = 2 * 1024 * std_c`` and ``shift = 2 * 1024 * mean_c - 1024`` (module docstring)."""

    def __init__(self, in_chans: int = 3) -> None:
        super().__init__()
        mean, std = _pixel_statistics(in_chans)
        span = 2 * XRV_RANGE
        self.register_buffer("scale", torch.tensor([span * s for s in std]).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor([span * m - XRV_RANGE for m in mean]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)
