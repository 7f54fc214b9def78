"""Training, prediction and whole training runs over the preprocessed image cache.

:func:`fit` trains a model and keeps the checkpoint with the best validation accuracy (the rule
of the DenseNet seed paper; ties keep the earlier epoch), writing ``log.csv``, ``last.pt`` and
``best.pt`` to the run folder.  Model selection and early stopping look at the validation split
only.  :func:`train_run` goes from names to results: protocol preset (``presets.toml``),
manifest, preprocessing cache, model, :func:`fit`, then **one** evaluation of the test split
with the best-validation checkpoint, written to ``metrics.json`` and ``test_predictions.csv``.
``python -m nbhelpers.training.train --model M --manifest F --data-dir D --preset P --seed S --out O``
does the same from the shell.

**On a GPU** batches come from the memory-mapped cache as uint8, are copied non-blocking from
pinned memory, and are scaled, augmented and normalised on the device
(:func:`nbhelpers.pipeline.data.to_model_input`); the model runs in channels_last under bf16 autocast
(fp16 with a gradient scaler where bf16 is unsupported), optionally through ``torch.compile``.
Running loss and accuracy stay on the device and are read back only every
:data:`PROGRESS_EVERY` batches, so the CPU does not stall the GPU queue.

**Determinism.**  Everything random flows from ``TrainConfig.seed``: the batch order (a
permutation per ``(seed, epoch)``), the augmentation (its own generator), dropout (torch's
global generator, seeded by :func:`seed_everything`).  On the CPU a run is bit-exact on one
machine: the same seed gives the same weights (another CPU model may choose other vector kernels,
and the last-bit differences grow over training), and a run interrupted and resumed from ``last.pt`` ends with the
same weights as an uninterrupted one (the checkpoint carries model, optimizer, scheduler,
gradient scaler, best score, log and every RNG state).  On CUDA, cuDNN algorithm choice and
atomic adds in some backward kernels (e.g. ``grid_sample``, scatter/index_add, some
convolutions) make results differ in the last bits between runs; ``deterministic=True`` selects
deterministic algorithms where they exist (slower, and torch warns where none exists), and
bf16/fp16 autocast is only reproducible on the same GPU model and software versions.

**Safe run folders.**  Every file of a run (checkpoints, log, configuration, metrics, predictions,
curves) is written to a temporary file beside it and moved into place (:mod:`data_prep.atomic`),
so a killed run or a full disk never leaves half a file; replacing ``last.pt`` keeps the one
before as ``last.prev.pt``.  Checkpoints are read with ``torch.load(weights_only=True)``: a file
holding anything but tensors and plain values is refused instead of unpickled (unpickling can
run code).  A run holds ``OUT/.lock`` while it trains, so two runs cannot write one folder.
What a run would train (model, options, pretrained, TrainConfig, manifest hash, preprocessing
and cache key) is one record, :func:`run_provenance`; resuming, and reusing a finished run in
the ablation grid or the shortcut probes, compare it with the record the run stored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import filelock
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from data_prep import atomic
from data_prep.schema import CLASSES
from nbhelpers.evaluation import metrics as M
from nbhelpers.pipeline.data import AugmentPolicy, batches, num_batches, to_model_input
from nbhelpers.settings.device import describe, pick_device
from nbhelpers.settings.keyvalue import (
    AssignmentError,
    check_fields,
    check_value,
    expected_type,
    parse_assignments,
    type_name,
    unknown_key_message,
)
from nbhelpers.training.losses import LOSSES, make_loss
from nbhelpers.settings.presets import load_preset

LOG_NAME = "log.csv"
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
#: The ``last.pt`` before the newest, kept so a damaged ``last.pt`` is not the end of a run.
PREV_NAME = "last.prev.pt"
#: The lock file a training run holds in its folder.
LOCK_NAME = ".lock"
#: Seconds a run waits for another run on the same folder before it stops.
LOCK_TIMEOUT = 10.0
CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "test_predictions.csv"
CURVES_NAME = "curves.png"
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("none", "step", "cosine")
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: Batches between progress-bar updates; each update reads the running loss back from the device.
PROGRESS_EVERY = 10
#: Preset settings that are not TrainConfig fields: they choose the model and the preprocessing.
PRESET_EXTRAS = ("description", "image_size", "pretrained")
#: What each preset extra must hold (a string here would make ``bool("false")`` True).
PRESET_EXTRA_TYPES: dict[str, type] = {"description": str, "image_size": int, "pretrained": bool}
#: Manifest columns a training run needs, and the splits it cannot do without.
RUN_COLUMNS = ("image_id", "path", "label", "split")
RUN_SPLITS = ("train", "val")
#: Exit status of the command line for a setup mistake (unknown preset or model, missing file).
EXIT_SETUP_ERROR = 2
#: TrainConfig fields that may change when resuming (the rest must match ``last.pt``).
RESUMABLE_CHANGES = ("epochs", "patience")


@dataclass
class TrainConfig:
    """What one training run needs besides the model and the data (presets fill it; see presets.toml).

    ``scheduler``: ``none``, ``step`` (lr x ``gamma`` every ``step_size`` epochs) or ``cosine``
    (to zero over ``epochs``).  ``patience``: stop after that many epochs without a better
    validation accuracy (0 = never).  ``loss`` / ``loss_options``: see :func:`nbhelpers.training.losses.make_loss`.
    ``amp``: ``auto`` (bf16 on CUDA where supported, else fp16; off on the CPU), ``bf16``,
    ``fp16`` (CUDA only) or ``off``.  ``channels_last`` applies on CUDA only; ``compile`` wraps
    the model in ``torch.compile``; ``deterministic`` asks CUDA for deterministic kernels.
    Every field is first checked against the type of its default (``epochs=1.5`` or
    ``epochs="abc"`` stop with :class:`~nbhelpers.settings.keyvalue.AssignmentError`, a ValueError naming
    the field and the expected type; an integer is accepted where a number is expected), then
    against its range.  Raises ValueError naming the field for an invalid value.
    """

    epochs: int = 50
    batch_size: int = 32
    lr: float = 2e-4
    optimizer: str = "adam"  # seed 001: Adam, betas (0.9, 0.999)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    scheduler: str = "none"
    step_size: int = 8
    gamma: float = 0.8
    patience: int = 0
    loss: str = "ce"
    loss_options: dict[str, float] = field(default_factory=dict)
    augment: str = "off"
    seed: int = 0
    in_chans: int = 3
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        schema = train_schema()
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if value is None:  # check_value lets None through (it means "the default" on a command line)
                raise AssignmentError(f"TrainConfig.{name} must be {type_name(expected_type(schema[name]))}, got None")
        for name, value in check_fields(values, schema, "TrainConfig").items():
            setattr(self, name, value)
        self.betas = tuple(self.betas)  # TOML and the command line give a list
        checks = [
            ("optimizer", self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}"),
            ("scheduler", self.scheduler in SCHEDULERS, f"one of {SCHEDULERS}"),
            ("amp", self.amp in AMP_MODES, f"one of {AMP_MODES}"),
            ("loss", self.loss in LOSSES, f"one of {LOSSES}"),
            ("epochs", int(self.epochs) >= 1, "an integer >= 1"),
            ("batch_size", int(self.batch_size) >= 1, "an integer >= 1"),
            ("patience", int(self.patience) >= 0, "an integer >= 0 (0 turns early stopping off)"),
            ("step_size", int(self.step_size) >= 1, "an integer >= 1"),
            ("lr", float(self.lr) > 0, "> 0"),
            ("betas", len(self.betas) == 2, "two numbers"),
        ]
        for name, ok, need in checks:
            if not ok:
                message = need if need.startswith("unknown") else f"TrainConfig.{name} must be {need}, got {getattr(self, name)!r}"
                raise ValueError(message)


def _defaults(cls: type) -> dict[str, Any]:
    """A dataclass's field defaults, tuples as lists (the schema form of a fixed-length list)."""
    out = {}
    for f in fields(cls):
        value = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def train_schema() -> dict[str, Any]:
    """Every :class:`TrainConfig` field with its default, the schema of its types."""
    return _defaults(TrainConfig)


def set_schema() -> dict[str, Any]:
    """What ``--set`` accepts: every TrainConfig field plus the preset's ``image_size`` and ``pretrained``."""
    return {**train_schema(), "image_size": int, "pretrained": bool}


def preprocess_schema() -> dict[str, Any]:
    """What ``--preprocess`` accepts: every :class:`~nbhelpers.pipeline.preprocess.PreprocessConfig` field and its default."""
    from nbhelpers.pipeline.preprocess import PreprocessConfig

    return _defaults(PreprocessConfig)


def _none_as_text(items: Sequence[str], values: dict[str, Any], hints: Mapping[str, Any]) -> dict[str, Any]:
    """Put back the word ``none`` where the setting holds text (``scheduler=none``,
    ``attention=none``): the reader takes ``none`` for "no value", which a preset would then
    ignore and a model would refuse."""
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip()
        if values.get(key, ...) is None and raw.strip().lower() == "none" and isinstance(hints.get(key), str):
            values[key] = raw.strip()
    return values


def parse_set(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """Typed preset overrides from ``KEY=VALUE`` items (``pretrained=false`` is False); raises
    :class:`~nbhelpers.settings.keyvalue.AssignmentError` naming an unknown key or a value of the wrong type."""
    schema = set_schema()
    values = parse_assignments(items, schema, "a preset setting (a TrainConfig field, image_size or pretrained)", flag)
    return _none_as_text(items, values, schema)


def parse_preprocess(items: Sequence[str], flag: str = "--preprocess") -> dict[str, Any]:
    """Typed PreprocessConfig overrides from ``KEY=VALUE`` items; raises AssignmentError as :func:`parse_set`."""
    schema = preprocess_schema()
    return _none_as_text(items, parse_assignments(items, schema, "a PreprocessConfig field", flag), schema)


def parse_options(items: Sequence[str], model: str | None = None, flag: str = "--option") -> dict[str, Any]:
    """Model options from ``KEY=VALUE`` items, parsed only (:func:`nbhelpers.models.create`
    checks them); with ``model`` named, ``none`` stays the word where its default is text."""
    values = parse_assignments(items, None, flag=flag)
    if model is None:
        return values
    from nbhelpers import models

    try:
        hints = dict(models.model_spec(model).options)
    except models.UnknownModelError:
        return values  # train_run names the unknown model
    return _none_as_text(items, values, hints)


def check_preprocess(preprocess: Mapping[str, Any] | None) -> dict[str, Any]:
    """``preprocess`` overrides checked against PreprocessConfig's fields and types (from Python or
    a grid file); raises AssignmentError naming an unknown field (with close matches) or a wrong type."""
    schema = preprocess_schema()
    values = dict(preprocess or {})
    for key in values:
        if key not in schema:
            raise AssignmentError(f"preprocess {unknown_key_message(key, schema, 'a PreprocessConfig field')}")
    return check_fields(values, schema, "PreprocessConfig")


@dataclass
class RunResult:
    """What :func:`train_run` produced: the run folder and its log, metrics and configuration."""

    out_dir: Path
    log: pd.DataFrame
    metrics: dict[str, Any]
    config: TrainConfig

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / BEST_NAME

    @property
    def test_predictions(self) -> Path:
        return self.out_dir / PREDICTIONS_NAME


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_from_preset(preset: str = "seed001", **overrides: Any) -> tuple[TrainConfig, dict[str, Any]]:
    """Return the :class:`TrainConfig` of ``preset`` with ``overrides`` applied, plus the preset's
    other settings (``description``, ``image_size``, ``pretrained``).

    Any TrainConfig field may be overridden; ``None`` values are ignored.  Raises
    :class:`nbhelpers.settings.presets.PresetError` for an unknown preset or setting, and
    :class:`~nbhelpers.settings.keyvalue.AssignmentError` (a ValueError) naming the setting when a value
    has the wrong type (``image_size`` must be an integer, ``pretrained`` true or false, the
    rest as :class:`TrainConfig` says).
    """
    values = load_preset(preset, allowed=[f.name for f in fields(TrainConfig)], **overrides)
    extras = {key: values.pop(key) for key in PRESET_EXTRAS if key in values}
    for key, value in extras.items():
        extras[key] = check_value(f"preset {preset!r} setting {key}", value, PRESET_EXTRA_TYPES[key])
    extras.setdefault("pretrained", False)
    return TrainConfig(**values), extras


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg.optimizer`` names; raise ValueError for an unknown one."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use one of {OPTIMIZERS}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch learning-rate schedule ``cfg.scheduler`` names (``None`` for ``none``)."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "none":
        return None
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}; use one of {SCHEDULERS}")


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``cfg.amp`` on ``device`` (``None``: full float32).

    Raises ValueError for ``fp16`` off CUDA (CPU autocast supports bf16 only).
    """
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device, not {device}; use amp='bf16' or 'off'")
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.amp == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _configure_backend(cfg: TrainConfig, device: torch.device) -> None:
    """cuDNN autotuning for speed, or deterministic kernels when asked (global torch switches)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = not cfg.deterministic
    torch.backends.cudnn.allow_tf32 = not cfg.deterministic


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` (channels_last on CUDA when asked) and return the module to
    call: ``torch.compile(model)`` when ``cfg.compile``, else ``model`` itself (same weights)."""
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def _input(x: torch.Tensor, policy: AugmentPolicy, cfg: TrainConfig, train: bool, generator, device) -> torch.Tensor:
    x = to_model_input(x, policy, in_chans=cfg.in_chans, train=train, generator=generator)
    if cfg.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_step(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
    dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a prepared batch; returns (loss, logits) still on the device."""
    with autocast(x.device, dtype):
        logits = net(x)
    loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), logits.detach()


def run_epoch(
    net: nn.Module, split, cfg: TrainConfig, device: torch.device, policy: AugmentPolicy, loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer | None = None, scaler=None, dtype=None, epoch: int = 0, desc: str = "",
    generator: torch.Generator | None = None, progress: bool = True,
) -> tuple[float, float]:
    """One pass over ``split``: trains when an optimizer is given, else evaluates; returns
    (mean loss, accuracy) over the images seen."""
    training = optimizer is not None
    net.train(training)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    # A last training batch of one image is dropped: BatchNorm cannot normalise a single image.
    drop_last = training and len(split) % cfg.batch_size == 1 and len(split) > 1
    stream = batches(split, cfg.batch_size, shuffle=training, seed=cfg.seed, epoch=epoch, drop_last=drop_last,
                     device=device)
    total = num_batches(split, cfg.batch_size, drop_last=drop_last)
    bar = tqdm(stream, total=total, desc=desc, leave=False, disable=not progress)
    with torch.set_grad_enabled(training):
        for i, (x, y) in enumerate(bar, 1):
            x = _input(x, policy, cfg, training, generator, device)
            if training:
                loss, logits = train_step(net, x, y, loss_fn, optimizer, dtype, scaler)
            else:
                with autocast(device, dtype):
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
            total_loss += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if progress and (i % PROGRESS_EVERY == 0 or i == total):
                bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
    return total_loss.item() / max(seen, 1), correct.item() / max(seen, 1)


def _rng_states(augment_rng: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),  # (version, tuple of ints, float or None): plain values
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "augment": augment_rng.get_state(),
    }


def _set_rng_states(states: dict[str, Any], augment_rng: torch.Generator) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    augment_rng.set_state(states["augment"].cpu())


# --------------------------------------------------------------------------- what a run trains


@dataclass
class RunPlan:
    """Everything :func:`train_run` decides before any work: the training config, the preset's
    extras, the checked manifest, the preprocessing config, the model options and the
    :func:`run_provenance` record."""

    cfg: TrainConfig
    extras: dict[str, Any]
    table: pd.DataFrame
    preprocess: Any  # nbhelpers.pipeline.preprocess.PreprocessConfig (imported lazily: keeps this module light)
    options: dict[str, Any]
    provenance: dict[str, Any]


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, NaN as None), so records compare alike
    whether they come from memory, ``metrics.json`` or a checkpoint."""
    return json.loads(json.dumps(_jsonable(value)))


def plan_run(
    model_name: str, manifest: pd.DataFrame | Path | str, preset: str = "seed001", seed: int = 0,
    model_options: Mapping[str, Any] | None = None, preprocess: Mapping[str, Any] | None = None,
    **preset_overrides: Any,
) -> RunPlan:
    """Work out what :func:`train_run` with these arguments would train, without training or
    preprocessing anything (the manifest is read and hashed).

    ``preprocess`` may set ``size`` (default: the preset's ``image_size``).  Raises what
    :func:`config_from_preset`, :func:`read_manifest` and :func:`check_preprocess` raise.
    """
    from nbhelpers.pipeline.preprocess import PreprocessConfig, cache_key, manifest_hash

    cfg, extras = config_from_preset(preset, seed=seed, **preset_overrides)
    table = read_manifest(manifest)
    pcfg = PreprocessConfig(**check_preprocess({"size": extras["image_size"], **(preprocess or {})}))
    options = dict(model_options or {})
    provenance = _plain({
        "model": model_name, "options": options, "pretrained": extras["pretrained"], "config": asdict(cfg),
        "manifest_hash": manifest_hash(table), "preprocess": asdict(pcfg), "cache_key": cache_key(table, pcfg),
    })
    return RunPlan(cfg=cfg, extras=extras, table=table, preprocess=pcfg, options=options, provenance=provenance)


def run_provenance(
    model_name: str, manifest: pd.DataFrame | Path | str, preset: str = "seed001", seed: int = 0,
    model_options: Mapping[str, Any] | None = None, preprocess: Mapping[str, Any] | None = None,
    **preset_overrides: Any,
) -> dict[str, Any]:
    """The record of what a run with these :func:`train_run` arguments trains: ``model``,
    ``options``, ``pretrained``, ``config`` (the effective TrainConfig), ``manifest_hash``,
    ``preprocess`` and ``cache_key``, as plain JSON values.  Finished runs store it (checkpoints,
    ``train_config.json``, ``metrics.json``); resuming and reusing a run compare it with
    :func:`provenance_differences`.  Raises as :func:`plan_run`.
    """
    return plan_run(model_name, manifest, preset, seed, model_options, preprocess, **preset_overrides).provenance


_NOT_RECORDED = object()


def _flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig fields by their own names, PreprocessConfig fields as ``preprocess.<field>``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "config" and isinstance(value, Mapping):
            out.update(value)
        elif key == "preprocess" and isinstance(value, Mapping):
            out.update({f"preprocess.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def provenance_differences(
    saved: Mapping[str, Any] | None, now: Mapping[str, Any], ignore: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """What differs between a stored :func:`run_provenance` record and the current one, as
    ``(name, "name saved, not now")`` pairs (TrainConfig fields by name, preprocessing fields as
    ``preprocess.<field>``); names in ``ignore`` are skipped; ``saved=None`` (a run written before
    records were kept) differs in every entry.  An empty list means the run is the same."""
    old, new = _flatten(_plain(dict(saved or {}))), _flatten(_plain(dict(now)))
    out = []
    for key in dict.fromkeys([*new, *old]):
        if key in ignore:
            continue
        a, b = old.get(key, _NOT_RECORDED), new.get(key, _NOT_RECORDED)
        if a != b:
            shown = ["(not recorded)" if v is _NOT_RECORDED else v if isinstance(v, str) else json.dumps(v)
                     for v in (a, b)]
            out.append((key, f"{key} {shown[0]}, not {shown[1]}"))
    return out


def _saved_record(state: Mapping[str, Any]) -> dict[str, Any]:
    """The run record a checkpoint holds; one written before records were kept has only its
    config and model name."""
    saved = state.get("provenance")
    if saved is None:
        meta = state.get("meta") or {}
        saved = {"config": state.get("config", {}), **({"model": meta["model"]} if "model" in meta else {})}
    return dict(saved)


def _check_resumable(saved: Mapping[str, Any] | None, now: Mapping[str, Any], path: Path) -> None:
    differences = provenance_differences(saved, now, ignore=RESUMABLE_CHANGES)
    if differences:
        raise ValueError(
            f"cannot resume from {path}: it was trained with different {[k for k, _ in differences]} "
            f"(it holds {'; '.join(text for _, text in differences)}); use the same settings, a new output folder, "
            "or start afresh without --resume (resume=False)"
        )


# --------------------------------------------------------------------------- checkpoints and the run folder


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: damaged, not a checkpoint, or holding objects that
    ``weights_only`` loading refuses (unpickling them could run code)."""


class RunFolderInUse(filelock.Timeout):
    """Another training run holds the run folder's lock."""

    def __str__(self) -> str:
        folder = Path(self.lock_file).parent
        return (f"{folder} is in use by another training run (lock {self.lock_file}); "
                "wait for it or choose another --out")


#: Run folders this process holds, with their nesting depth (train_run holds the lock and calls
#: fit, which asks again; a second FileLock on the same file would wait for the first).
_HELD: dict[str, int] = {}


@contextmanager
def hold_run_folder(out_dir: Path | str, timeout: float | None = None) -> Iterator[Path]:
    """Hold ``out_dir/.lock`` for the block (creating the folder); nested calls for the same
    folder in this process share the lock.  Waits up to ``timeout`` seconds (default
    :data:`LOCK_TIMEOUT`), then raises :class:`RunFolderInUse` (a ``filelock.Timeout``) naming
    the folder and the lock file."""
    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield out_dir
        finally:
            _HELD[key] -= 1
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise atomic.WriteError(f"cannot create the run folder {out_dir}: {error.strerror or error}; "
                                "choose another output folder") from error
    lock = filelock.FileLock(out_dir / LOCK_NAME, timeout=LOCK_TIMEOUT if timeout is None else timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunFolderInUse(str(out_dir / LOCK_NAME)) from None
    _HELD[key] = 1
    try:
        yield out_dir
    finally:
        del _HELD[key]
        lock.release()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The whole checkpoint dict at ``path``, read with ``torch.load(weights_only=True)``.

    Raises FileNotFoundError naming a missing file, and :class:`CheckpointError` naming the file
    when it is damaged (a killed write, a truncated copy), not a checkpoint of this project, or
    holds objects other than tensors and plain values (refused without unpickling them: that
    could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: run the training notebook (04) for this run first")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"{path} is not a readable checkpoint (it holds Python objects besides tensors and plain values; "
                "unpickling them could run code, so it was refused: load only checkpoints this project wrote)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(error)})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(error)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a readable checkpoint (it holds no model weights)")
    return state


def _read_resumable(path: Path, device: torch.device) -> dict[str, Any]:
    """``last.pt`` for resuming; a damaged one raises CheckpointError offering ``last.prev.pt``."""
    try:
        return read_checkpoint(path, device)
    except CheckpointError as error:
        previous = path.with_name(PREV_NAME)
        offer = "start afresh without --resume (resume=False)"
        if previous.is_file():
            try:
                epoch = read_checkpoint(previous, "cpu")["epoch"]
            except CheckpointError:
                pass
            else:
                offer = (f"the previous good one is {previous}: move it to {path.name} to resume after epoch {epoch}, "
                         f"or {offer}")
        raise CheckpointError(f"{error}; {offer}") from None


#: PyTorch's own words when it cannot finish writing a checkpoint (a full disk among the causes).
_TORCH_WRITE_FAILED = re.compile(r"enforce fail|PytorchStreamWriter|file write failed|unexpected pos")


def _keep_previous(path: Path) -> None:
    """Keep the current ``path`` as ``last.prev.pt`` (a hard link, else a copy), atomically."""
    previous = path.with_name(PREV_NAME)
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copy2(path, tmp)  # file systems without hard links
    os.replace(tmp, previous)


def save_checkpoint(state: Mapping[str, Any], path: Path | str, keep_previous: bool = False) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then
    ``os.replace``): a killed process leaves the previous file whole.  With ``keep_previous`` the
    file being replaced is kept as ``last.prev.pt``.  Returns ``path``.  Raises
    :class:`data_prep.atomic.WriteError` with one line naming ``path`` when the disk is full or
    the folder unwritable (also where PyTorch only says "enforce fail ... file write failed")."""
    path = Path(path)

    def writer(tmp: Path) -> None:
        try:
            torch.save(dict(state), tmp)
        except RuntimeError as error:
            if _TORCH_WRITE_FAILED.search(str(error)) and not re.search(r"No space left|error code: 28", str(error)):
                raise atomic.WriteError(f"cannot write {path}: PyTorch could not finish the file (is the disk full?); "
                                        "free some space or choose another output folder") from error
            raise  # atomic_path turns a recognisable full disk into a WriteError naming the path
        if keep_previous and path.is_file():
            _keep_previous(path)

    return atomic.write_with(path, writer)


def fit(
    model: nn.Module,
    train_split,
    val_split,
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device | str,
    meta: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[pd.DataFrame], None] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Train ``model`` for up to ``cfg.epochs`` epochs and return the per-epoch log as a DataFrame.

    After each epoch the model is scored on ``val_split``; the checkpoint with the best
    validation accuracy is kept as ``best.pt`` (ties keep the earlier epoch), the full state as
    ``last.pt`` (the one before as ``last.prev.pt``), and the log (epoch, lr, train/val loss and
    accuracy, seconds, train images/s) as ``log.csv``, every file written atomically.
    Validation loss is plain cross-entropy whatever the training loss, so it compares across
    losses.  Training stops early after ``cfg.patience`` epochs without a better validation
    accuracy (0: never).  With ``resume`` an existing ``last.pt`` is continued (to the same
    weights an uninterrupted CPU run reaches) when its record matches: ``provenance`` (a
    :func:`run_provenance` record; ``cfg`` and ``meta["model"]`` when absent) may differ only in
    ``epochs`` and ``patience``; without ``last.pt`` the run starts afresh.  ``meta`` (e.g. model
    name and options) is stored in the checkpoints so the model can be rebuilt without the
    notebook that trained it; the record goes to the checkpoints and ``train_config.json``.
    ``on_epoch(log)`` is called after every epoch (e.g. to redraw curves).  The folder's lock is
    held throughout.  Raises ValueError saying what differs when ``last.pt`` was written for
    another run (model, data, settings), :class:`CheckpointError` naming a damaged ``last.pt``
    (and offering ``last.prev.pt``), :class:`RunFolderInUse` when another run holds the folder,
    and :class:`data_prep.atomic.WriteError` naming the file when the disk is full.
    """
    out_dir = Path(out_dir)
    record = _plain({**(provenance or {}), "config": asdict(cfg)})
    if "model" not in record and meta and "model" in meta:
        record["model"] = meta["model"]
    with hold_run_folder(out_dir):
        return _fit(model, train_split, val_split, cfg, out_dir, torch.device(device), meta or {}, record, resume,
                    progress, on_epoch)


def _fit(model, train_split, val_split, cfg: TrainConfig, out_dir: Path, device: torch.device, meta: dict[str, Any],
         record: dict[str, Any], resume: bool, progress: bool, on_epoch) -> pd.DataFrame:
    seed_everything(cfg.seed)
    _configure_backend(cfg, device)
    net = prepare_model(model, cfg, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    counts = np.bincount(np.asarray(train_split.labels), minlength=len(CLASSES))
    loss_fn = make_loss(cfg.loss, class_counts=counts.tolist(), **cfg.loss_options).to(device)
    val_loss_fn = nn.CrossEntropyLoss()
    policy = AugmentPolicy.from_name(cfg.augment)
    no_augment = AugmentPolicy.from_name("off")
    augment_rng = torch.Generator().manual_seed(cfg.seed)  # augmentation repeats for a seed on its own
    rows: list[dict[str, Any]] = []
    best_acc, best_epoch, bad_epochs, start, stopped = -1.0, 0, 0, 1, False
    last_path = out_dir / LAST_NAME
    resuming = resume and last_path.is_file()
    if resuming:
        state = _read_resumable(last_path, device)
        saved = _saved_record(state)
        _check_resumable(saved, record, last_path)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            held = saved.get("model") or "another model"
            raise ValueError(f"cannot resume from {last_path}: its weights (model {held}) do not fit this model "
                             f"({_first_line(error)}); use the model it holds, a new output folder, or start afresh "
                             "without --resume (resume=False)") from None
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_states(state["rng"], augment_rng)
        rows, best_acc, best_epoch = list(state["log"]), state["best_acc"], state["best_epoch"]
        bad_epochs, start = state["bad_epochs"], state["epoch"] + 1
        stopped = bool(state.get("stopped_early"))
        if stopped:
            start = cfg.epochs + 1  # it already stopped: nothing left to run
    else:
        # A fresh run: a last.prev.pt of an earlier run in this folder must not be offered for resuming it.
        (out_dir / PREV_NAME).unlink(missing_ok=True)
    # Only a last.pt of this run is worth keeping as last.prev.pt.
    keep_previous = resuming
    for epoch in tqdm(range(start, cfg.epochs + 1), desc="epochs", initial=start - 1, total=cfg.epochs,
                      disable=not progress):
        begin = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = run_epoch(net, train_split, cfg, device, policy, loss_fn, optimizer, scaler, dtype,
                                           epoch=epoch, desc=f"train {epoch}", generator=augment_rng,
                                           progress=progress)
        train_seconds = time.perf_counter() - begin
        val_loss, val_acc = run_epoch(net, val_split, cfg, device, no_augment, val_loss_fn, dtype=dtype,
                                       desc=f"val {epoch}", progress=progress)
        if scheduler is not None:
            scheduler.step()
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch, bad_epochs = val_acc, epoch, 0
        else:
            bad_epochs += 1
        stopped = cfg.patience > 0 and bad_epochs >= cfg.patience
        rows.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                     "val_loss": val_loss, "val_acc": val_acc, "best": improved,
                     "seconds": time.perf_counter() - begin, "train_images_per_s": len(train_split) / train_seconds})
        state = {"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc, "config": asdict(cfg),
                 "meta": meta, "provenance": record}
        if improved:
            save_checkpoint(state, out_dir / BEST_NAME)
        state.update({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_acc": best_acc, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "stopped_early": stopped, "log": rows, "rng": _rng_states(augment_rng),
        })
        save_checkpoint(state, last_path, keep_previous=keep_previous)
        keep_previous = True
        log = pd.DataFrame(rows)
        atomic.write_with(out_dir / LOG_NAME, lambda tmp: log.to_csv(tmp, index=False))
        if on_epoch is not None:
            on_epoch(log)
        if stopped:
            tqdm.write(f"early stopping after epoch {epoch}: no better validation accuracy for {cfg.patience} epochs "
                       f"(best {best_acc:.4f} at epoch {best_epoch})")
            break
    summary = {"config": asdict(cfg), "meta": meta, "provenance": record, "best_epoch": best_epoch,
               "best_val_acc": best_acc, "epochs_run": len(rows), "stopped_early": stopped}
    atomic.write_text(out_dir / CONFIG_NAME, json.dumps(_jsonable(summary), indent=2) + "\n")
    return pd.DataFrame(rows)


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the weights stored at ``path`` into ``model``; return the checkpoint's other fields
    (``epoch``, ``val_acc``, ``config``, ``meta``, ``provenance``; ``last.pt`` also holds the
    optimizer state).  The file is read with ``weights_only=True`` (:func:`read_checkpoint`).

    Raises FileNotFoundError naming the path (and saying to train first) when it is absent,
    :class:`CheckpointError` naming a damaged or refused file, and ValueError naming the model
    the checkpoint holds when its weights do not fit ``model``.
    """
    path = Path(path)
    state = read_checkpoint(path, device)
    try:
        model.load_state_dict(state.pop("model"))
    except RuntimeError as error:
        held = (state.get("provenance") or {}).get("model") or (state.get("meta") or {}).get("model") or "another model"
        raise ValueError(f"{path} holds weights of model {held} that do not fit this model ({_first_line(error)}); "
                         "build the model it holds") from None
    return state


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


# --------------------------------------------------------------------------- whole runs


def read_manifest(manifest: pd.DataFrame | Path | str) -> pd.DataFrame:
    """Return the manifest table (reading it when given a path), checked for what training needs.

    Raises FileNotFoundError naming a missing file and how to make one, KeyError naming missing
    columns, and ValueError when the train or validation split is empty.
    """
    if not isinstance(manifest, pd.DataFrame):
        path = Path(manifest)
        if not path.is_file():
            raise FileNotFoundError(
                f"manifest {path} not found: curate the data first (notebook 01, or "
                f"`python -m data_prep --data-dir D --out {path.parent}`), or pass the manifest.csv it wrote"
            )
        manifest = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in RUN_COLUMNS if c not in manifest.columns]
    if missing:
        raise KeyError(f"manifest lacks column(s) {missing}; a training manifest needs {list(RUN_COLUMNS)}")
    empty = [s for s in RUN_SPLITS if not (manifest["split"] == s).any()]
    if empty:
        raise ValueError(f"manifest has no images in split(s) {empty}; training needs {list(RUN_SPLITS)}")
    return manifest


def _jsonable(value: Any) -> Any:
    """NaN/inf to None and numpy scalars to Python, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(
    y_true: np.ndarray, probs: np.ndarray, n_boot: int = M.N_BOOTSTRAP, seed: int = 0,
    patients: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every test metric of a run as one JSON-ready dict: summary, per-class table, per-class
    AUC, bootstrap CIs, confusion matrix and expected calibration error.

    ``ci`` resamples ``patients`` (each image's patient) with all their images when given, the
    honest unit when a patient has several films; ``ci_image`` resamples images, kept beside it
    to show how much narrower that would be.  ``n_patients`` counts the distinct patients."""
    y_true = np.asarray(y_true)
    cm = M.confusion(y_true, probs.argmax(1))
    by_image = M.summary_with_ci(y_true, probs, n=n_boot, seed=seed)
    by_patient = M.summary_with_ci(y_true, probs, n=n_boot, seed=seed, groups=patients) if patients is not None else by_image
    return {
        **M.summary(y_true, probs),
        "n_patients": len(set(patients)) if patients is not None else None,
        "per_class": M.per_class(cm).to_dict(orient="records"),
        "auc": M.auc_ovr(y_true, probs),
        "ci": by_patient.to_dict(orient="records"),
        "ci_image": by_image.to_dict(orient="records"),
        "confusion": cm.tolist(),
        "ece": M.expected_calibration_error(y_true, probs),
    }


def _save_predictions(path: Path, split, probs: np.ndarray, patients: Sequence[str] | None = None) -> None:
    table = pd.DataFrame({"image_id": split.image_ids, "label": split.labels, "pred": probs.argmax(1)})
    if patients is not None:
        table.insert(1, "patient_id", list(patients))
    for c, name in enumerate(CLASSES):
        table[f"p_{name}"] = probs[:, c]
    atomic.write_with(path, lambda tmp: table.to_csv(tmp, index=False))


def _save_curves(log: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt  # only for the figure; keeps `import nbhelpers.training.train` light

    from nbhelpers.evaluation.plots import training_curves

    fig = training_curves(log)
    try:
        # The temporary name ends in .tmp: the format must be named.
        atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def train_run(
    model_name: str,
    manifest: pd.DataFrame | Path | str,
    data_dir: Path | str | None,
    out_dir: Path | str,
    preset: str = "seed001",
    seed: int = 0,
    device: torch.device | str = "auto",
    model_options: dict[str, Any] | None = None,
    cache_root: Path | str | None = None,
    preprocess: dict[str, Any] | None = None,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    n_boot: int = M.N_BOOTSTRAP,
    on_epoch: Callable[[pd.DataFrame], None] | None = None,
    **preset_overrides: Any,
) -> RunResult:
    """Train ``model_name`` under protocol ``preset`` and evaluate it once on the test split.

    ``manifest`` is a curated manifest (table or CSV path), ``data_dir`` the source folder
    (``None``: ``$CXR_DATA_DIR``).  The images are preprocessed into ``cache_root`` (default
    ``out_dir/cache``) with :class:`~nbhelpers.pipeline.preprocess.PreprocessConfig` at the preset's
    ``image_size`` (``preprocess`` overrides any config field, e.g. ``{"clahe": False}``).  The
    model is built with ``model_options`` after seeding with ``seed``; ``preset_overrides``
    change single preset settings (``epochs=3``, ``pretrained=False``, any TrainConfig field),
    checked for type before any work.  The run holds ``out_dir/.lock`` throughout; without
    ``resume`` the results of an earlier run in ``out_dir`` are removed first, with ``resume``
    ``last.pt`` is continued only when its :func:`run_provenance` record matches (``epochs`` and
    ``patience`` may change).  Writes to ``out_dir``, each file atomically: the :func:`fit`
    files, ``curves.png``, ``test_predictions.csv`` and ``metrics.json`` (model, preset, config,
    seed, device, torch version, date, data: manifest hash, cache key, split counts;
    ``provenance``; best epoch; test metrics with bootstrap CIs).  Returns a :class:`RunResult`.
    Raises :class:`~nbhelpers.settings.presets.PresetError` for an unknown preset or setting,
    :class:`~nbhelpers.settings.keyvalue.AssignmentError` (a ValueError) for a setting of the wrong type,
    FileNotFoundError for a missing manifest, the model zoo's errors for an unknown model or
    option, ValueError saying what differs when ``resume`` meets another run's ``last.pt``,
    :class:`RunFolderInUse` when another run holds ``out_dir`` and
    :class:`data_prep.atomic.WriteError` naming the file when the disk is full.
    """
    from nbhelpers import models
    from data_prep.datadir import data_dir as resolve_data_dir
    from nbhelpers.pipeline.preprocess import build_cache

    plan = plan_run(model_name, manifest, preset, seed, model_options, preprocess, **preset_overrides)
    cfg, extras, table, pcfg, options = plan.cfg, plan.extras, plan.table, plan.preprocess, plan.options
    source = resolve_data_dir(data_dir)
    out_dir = Path(out_dir)
    device = pick_device(str(device), verbose=progress) if not isinstance(device, torch.device) else device
    seed_everything(cfg.seed)  # the model's random initialisation also follows the seed
    # The model first: a wrong option or an unreachable weights file stops the run before preprocessing.
    net = models.create(model_name, num_classes=len(CLASSES), in_chans=cfg.in_chans,
                        pretrained=extras["pretrained"], **options)
    with hold_run_folder(out_dir):
        last = out_dir / LAST_NAME
        if resume and last.is_file():
            # Say what differs before the cache is built (fit checks again, with the weights).
            _check_resumable(_saved_record(_read_resumable(last, torch.device("cpu"))), plan.provenance, last)
        if not resume:
            # A fresh run: results of an earlier run here must not be mistaken for this one's.
            for name in (METRICS_NAME, PREDICTIONS_NAME, CURVES_NAME):
                (out_dir / name).unlink(missing_ok=True)
        cache = build_cache(table, source, Path(cache_root) if cache_root else out_dir / "cache", pcfg,
                            workers=workers, progress=progress)
        train, val = cache.split("train"), cache.split("val")
        meta = {"model": model_name, "options": options, "preset": preset, "pretrained": extras["pretrained"],
                "preprocess": asdict(pcfg), "cache_key": cache.key}
        started = time.perf_counter()
        log = fit(net, train, val, cfg, out_dir, device, meta=meta, resume=resume, progress=progress,
                  on_epoch=on_epoch, provenance=plan.provenance)
        train_seconds = time.perf_counter() - started
        if len(log):
            _save_curves(log, out_dir / CURVES_NAME)
        fitted = json.loads((out_dir / CONFIG_NAME).read_text())
        best = load_checkpoint(out_dir / BEST_NAME, net, device)
        test_metrics = None
        if "test" in cache.splits:
            test = cache.split("test")  # the one look at the test split in this run
            probs = predict(net, test, device, batch_size=cfg.batch_size, in_chans=cfg.in_chans)
            patients = None  # a manifest without patients: every image is its own patient
            if "patient_id" in table.columns:
                patient_of = dict(zip(table["image_id"].astype(str), table["patient_id"].astype(str)))
                patients = [patient_of.get(str(i), str(i)) for i in test.image_ids]
            _save_predictions(out_dir / PREDICTIONS_NAME, test, probs, patients)
            test_metrics = evaluate(test.labels, probs, n_boot=n_boot, seed=cfg.seed, patients=patients)
        result = {
            "model": model_name, "model_options": options, "preset": preset, "seed": cfg.seed,
            "config": asdict(cfg), "pretrained": meta["pretrained"],
            "device": describe(device), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": {"data_dir": str(source),
                     "manifest": str(manifest) if not isinstance(manifest, pd.DataFrame) else None,
                     "manifest_hash": plan.provenance["manifest_hash"], "cache_key": cache.key,
                     "preprocess": asdict(pcfg), "counts": {s: int(n) for s, n in cache.meta["counts"].items()}},
            "provenance": plan.provenance,
            "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "epochs_run": fitted["epochs_run"],
            "stopped_early": fitted["stopped_early"], "train_seconds": train_seconds, "test": test_metrics,
        }
        result = _jsonable(result)
        atomic.write_text(out_dir / METRICS_NAME, json.dumps(result, indent=2) + "\n")
    return RunResult(out_dir=out_dir, log=log, metrics=result, config=cfg)


def load_run(out_dir: Path | str) -> RunResult:
    """Read a finished :func:`train_run` folder back (log, metrics.json, config).

    Raises FileNotFoundError naming the folder when its ``metrics.json`` is absent.
    """
    out_dir = Path(out_dir)
    path = out_dir / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a finished training run (train it with train_run)")
    result = json.loads(path.read_text())
    log = pd.read_csv(out_dir / LOG_NAME) if (out_dir / LOG_NAME).is_file() else pd.DataFrame()
    return RunResult(out_dir=out_dir, log=log, metrics=result, config=TrainConfig(**result["config"]))


def runs_table(run_dirs: Sequence[Path | str]) -> pd.DataFrame:
    """One row per finished run: model, preset, seed, best epoch and the test summary metrics —
    the input of :func:`nbhelpers.evaluation.metrics.aggregate` (mean ± std over seeds)."""
    rows = []
    for run_dir in run_dirs:
        m = load_run(run_dir).metrics
        test = m.get("test") or {}
        scalars = {k: v for k, v in test.items() if not isinstance(v, (dict, list))}
        rows.append({"model": m["model"], "preset": m["preset"], "seed": m["seed"], "best_epoch": m["best_epoch"],
                     "run_dir": str(run_dir), **scalars})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see :func:`main`)."""
    p = argparse.ArgumentParser(prog="python -m nbhelpers.training.train", description="Train one model under a protocol preset "
                                "and evaluate its best-validation checkpoint once on the test split.")
    p.add_argument("--model", required=True, help="registered model name (nbhelpers.models.list_models())")
    p.add_argument("--manifest", type=Path, required=True, help="curated manifest.csv (python -m data_prep)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder of upstream sources (default: $CXR_DATA_DIR)")
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoints, log and metrics")
    p.add_argument("--preset", default="seed001", help="training protocol in nbhelpers/settings/presets.toml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--cache-root", type=Path, default=None, help="preprocessing cache folder (default: OUT/cache)")
    p.add_argument("--workers", type=int, default=1, help="threads decoding images for the cache")
    p.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE", help="model options, e.g. attention=none")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="preset overrides, e.g. epochs=3 amp=off")
    p.add_argument("--preprocess", nargs="*", default=[], metavar="KEY=VALUE", help="PreprocessConfig overrides")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--n-boot", type=int, default=M.N_BOOTSTRAP, help="bootstrap resamples for the test CIs")
    return p.parse_args(argv)


def setup_errors() -> tuple[type[BaseException], ...]:
    """The errors a command reports as one line and :data:`EXIT_SETUP_ERROR`: a wrong preset,
    setting, manifest, model, device or value (ValueError, TypeError), a run folder in use, a
    full disk, a damaged cache or checkpoint.  Anything else is a bug and keeps its traceback."""
    from nbhelpers.settings.device import DeviceError
    from nbhelpers.models import PretrainedWeightsError, UnknownModelError
    from nbhelpers.pipeline.preprocess import CacheError
    from nbhelpers.settings.presets import PresetError

    return (PresetError, FileNotFoundError, UnknownModelError, DeviceError, PretrainedWeightsError, CacheError,
            atomic.WriteError, filelock.Timeout, ValueError, TypeError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (for ``error: ...`` on stderr)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`train_run` from the command line and print the test summary.

    ``--set`` values are typed by the TrainConfig field (or ``image_size`` / ``pretrained``) they
    set, ``--preprocess`` values by the PreprocessConfig field; ``--option`` values are parsed
    only.  Returns 0, or :data:`EXIT_SETUP_ERROR` with one line ``error: ...`` on stderr for the
    errors of :func:`setup_errors` (unknown preset, setting or model, a value of the wrong type,
    missing manifest or data, device, pretrained download, a run folder in use, a damaged or
    foreign ``last.pt`` with ``--resume``, a full disk).
    """
    args = parse_args(argv)
    try:
        result = train_run(
            args.model, args.manifest, args.data_dir, args.out, preset=args.preset, seed=args.seed,
            device=args.device, model_options=parse_options(args.option, args.model), cache_root=args.cache_root,
            preprocess=parse_preprocess(args.preprocess), workers=args.workers, resume=args.resume,
            n_boot=args.n_boot, **parse_set(args.set),
        )
    except setup_errors() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    test = result.metrics["test"] or {}
    print(json.dumps({k: v for k, v in test.items() if not isinstance(v, (dict, list))}, indent=2))
    print(f"run written to {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def load_trained(out_dir: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, RunResult]:
    """Rebuild the model of a finished :func:`train_run` folder (name and options from its
    ``metrics.json``) with its best-validation weights, in eval mode on ``device``.

    Raises FileNotFoundError naming the folder when the run has not finished.
    """
    from nbhelpers import models

    run = load_run(out_dir)
    net = models.create(run.metrics["model"], num_classes=len(CLASSES), in_chans=run.config.in_chans,
                        **run.metrics.get("model_options", {}))
    load_checkpoint(Path(out_dir) / BEST_NAME, net, device)
    return net.to(device).eval(), run
