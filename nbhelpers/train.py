"""Training, prediction and whole training runs over the preprocessed image cache.

:func:`fit` trains a model and keeps the checkpoint with the best validation accuracy (the rule
of the DenseNet seed paper; ties keep the earlier epoch), writing ``log.csv``, ``last.pt`` and
``best.pt`` to the run folder.  Model selection and early stopping look at the validation split
only.  :func:`train_run` goes from names to results: protocol preset (``presets.toml``),
manifest, preprocessing cache, model, :func:`fit`, then **one** evaluation of the test split
with the best-validation checkpoint, written to ``metrics.json`` and ``test_predictions.csv``.
``python -m nbhelpers.train --model M --manifest F --data-dir D --preset P --seed S --out O``
does the same from the shell.

**On a GPU** batches come from the memory-mapped cache as uint8, are copied non-blocking from
pinned memory, and are scaled, augmented and normalised on the device
(:func:`nbhelpers.data.to_model_input`); the model runs in channels_last under bf16 autocast
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
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import tomllib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from data_prep.schema import CLASSES
from nbhelpers import metrics as M
from nbhelpers.data import AugmentPolicy, batches, num_batches, to_model_input
from nbhelpers.device import describe, pick_device
from nbhelpers.losses import LOSSES, make_loss
from nbhelpers.presets import load_preset

LOG_NAME = "log.csv"
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
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
    validation accuracy (0 = never).  ``loss`` / ``loss_options``: see :func:`nbhelpers.losses.make_loss`.
    ``amp``: ``auto`` (bf16 on CUDA where supported, else fp16; off on the CPU), ``bf16``,
    ``fp16`` (CUDA only) or ``off``.  ``channels_last`` applies on CUDA only; ``compile`` wraps
    the model in ``torch.compile``; ``deterministic`` asks CUDA for deterministic kernels.
    Raises ValueError naming the field for an invalid value.
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
        self.betas = tuple(float(b) for b in self.betas)  # TOML gives a list
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
    :class:`nbhelpers.presets.PresetError` for an unknown preset or setting.
    """
    values = load_preset(preset, allowed=[f.name for f in fields(TrainConfig)], **overrides)
    extras = {key: values.pop(key) for key in PRESET_EXTRAS if key in values}
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
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "augment": augment_rng.get_state(),
    }


def _set_rng_states(states: dict[str, Any], augment_rng: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    augment_rng.set_state(states["augment"].cpu())


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = asdict(cfg)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]
                     and not (k == "betas" and tuple(saved.get(k, ())) == now[k]))
    if changed:
        raise ValueError(
            f"cannot resume from {path}: it was trained with different {changed} "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); use the same settings, a new output folder, "
            "or resume=False to start again"
        )


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
) -> pd.DataFrame:
    """Train ``model`` for up to ``cfg.epochs`` epochs and return the per-epoch log as a DataFrame.

    After each epoch the model is scored on ``val_split``; the checkpoint with the best
    validation accuracy is kept as ``best.pt`` (ties keep the earlier epoch), the full state as
    ``last.pt``, and the log (epoch, lr, train/val loss and accuracy, seconds, train images/s)
    as ``log.csv``.  Validation loss is plain cross-entropy whatever the training loss, so it
    compares across losses.  Training stops early after ``cfg.patience`` epochs without a better
    validation accuracy (0: never).  With ``resume`` an existing ``last.pt`` is continued (to
    the same weights an uninterrupted CPU run reaches); without one the run starts afresh.
    ``meta`` (e.g. model name and options) is stored in the checkpoints so the model can be
    rebuilt without the notebook that trained it.  ``on_epoch(log)`` is called after every
    epoch (e.g. to redraw curves).  Raises ValueError when ``last.pt`` was written with other
    settings.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
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
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        _check_resumable(state["config"], cfg, last_path)
        model.load_state_dict(state["model"])
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
                 "meta": meta or {}}
        if improved:
            torch.save(state, out_dir / BEST_NAME)
        state.update({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_acc": best_acc, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "stopped_early": stopped, "log": rows, "rng": _rng_states(augment_rng),
        })
        torch.save(state, last_path)
        log = pd.DataFrame(rows)
        log.to_csv(out_dir / LOG_NAME, index=False)
        if on_epoch is not None:
            on_epoch(log)
        if stopped:
            tqdm.write(f"early stopping after epoch {epoch}: no better validation accuracy for {cfg.patience} epochs "
                       f"(best {best_acc:.4f} at epoch {best_epoch})")
            break
    summary = {"config": asdict(cfg), "meta": meta or {}, "best_epoch": best_epoch, "best_val_acc": best_acc,
               "epochs_run": len(rows), "stopped_early": stopped}
    (out_dir / CONFIG_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return pd.DataFrame(rows)


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the weights stored at ``path`` into ``model``; return the checkpoint's other fields
    (``epoch``, ``val_acc``, ``config``, ``meta``; ``last.pt`` also holds the optimizer state).

    Raises FileNotFoundError naming the path (and saying to train first) when it is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: run the training notebook (04) for this run first")
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state.pop("model"))
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
    y_true: np.ndarray, probs: np.ndarray, n_boot: int = M.N_BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """Every test metric of a run as one JSON-ready dict: summary, per-class table, per-class
    AUC, bootstrap CIs, confusion matrix and expected calibration error."""
    y_true = np.asarray(y_true)
    cm = M.confusion(y_true, probs.argmax(1))
    return {
        **M.summary(y_true, probs),
        "per_class": M.per_class(cm).to_dict(orient="records"),
        "auc": M.auc_ovr(y_true, probs),
        "ci": M.summary_with_ci(y_true, probs, n=n_boot, seed=seed).to_dict(orient="records"),
        "confusion": cm.tolist(),
        "ece": M.expected_calibration_error(y_true, probs),
    }


def _save_predictions(path: Path, split, probs: np.ndarray) -> None:
    table = pd.DataFrame({"image_id": split.image_ids, "label": split.labels, "pred": probs.argmax(1)})
    for c, name in enumerate(CLASSES):
        table[f"p_{name}"] = probs[:, c]
    table.to_csv(path, index=False)


def _save_curves(log: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt  # only for the figure; keeps `import nbhelpers.train` light

    from nbhelpers.plots import training_curves

    fig = training_curves(log)
    fig.savefig(path, dpi=120)
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
    ``out_dir/cache``) with :class:`~nbhelpers.preprocess.PreprocessConfig` at the preset's
    ``image_size`` (``preprocess`` overrides any config field, e.g. ``{"clahe": False}``).  The
    model is built with ``model_options`` after seeding with ``seed``; ``preset_overrides``
    change single preset settings (``epochs=3``, ``pretrained=False``, any TrainConfig field).
    Writes to ``out_dir``: the :func:`fit` files, ``curves.png``, ``test_predictions.csv`` and
    ``metrics.json`` (model, preset, config, seed, device, torch version, date, data: manifest
    hash, cache key, split counts; best epoch; test metrics with bootstrap CIs).  Returns a
    :class:`RunResult`.  Raises :class:`~nbhelpers.presets.PresetError` for an unknown preset or
    setting, FileNotFoundError for a missing manifest, and the model zoo's errors for an
    unknown model or option.
    """
    from nbhelpers import models
    from nbhelpers.config import data_dir as resolve_data_dir
    from nbhelpers.preprocess import PreprocessConfig, build_cache, manifest_hash

    cfg, extras = config_from_preset(preset, seed=seed, **preset_overrides)
    table = read_manifest(manifest)
    source = resolve_data_dir(data_dir)
    out_dir = Path(out_dir)
    pcfg = PreprocessConfig(**{"size": int(extras["image_size"]), **(preprocess or {})})
    device = pick_device(str(device), verbose=progress) if not isinstance(device, torch.device) else device
    seed_everything(cfg.seed)  # the model's random initialisation also follows the seed
    options = dict(model_options or {})
    # The model first: a wrong option or an unreachable weights file stops the run before preprocessing.
    net = models.create(model_name, num_classes=len(CLASSES), in_chans=cfg.in_chans,
                        pretrained=bool(extras.get("pretrained", False)), **options)
    cache = build_cache(table, source, Path(cache_root) if cache_root else out_dir / "cache", pcfg,
                        workers=workers, progress=progress)
    train, val = cache.split("train"), cache.split("val")
    meta = {"model": model_name, "options": options, "preset": preset, "pretrained": bool(extras.get("pretrained")),
            "preprocess": asdict(pcfg), "cache_key": cache.key}
    started = time.perf_counter()
    log = fit(net, train, val, cfg, out_dir, device, meta=meta, resume=resume, progress=progress, on_epoch=on_epoch)
    train_seconds = time.perf_counter() - started
    if len(log):
        _save_curves(log, out_dir / CURVES_NAME)
    fitted = json.loads((out_dir / CONFIG_NAME).read_text())
    best = load_checkpoint(out_dir / BEST_NAME, net, device)
    test_metrics = None
    if "test" in cache.splits:
        test = cache.split("test")  # the one look at the test split in this run
        probs = predict(net, test, device, batch_size=cfg.batch_size, in_chans=cfg.in_chans)
        _save_predictions(out_dir / PREDICTIONS_NAME, test, probs)
        test_metrics = evaluate(test.labels, probs, n_boot=n_boot, seed=cfg.seed)
    result = {
        "model": model_name, "model_options": options, "preset": preset, "seed": cfg.seed,
        "config": asdict(cfg), "pretrained": meta["pretrained"],
        "device": describe(device), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"data_dir": str(source), "manifest": str(manifest) if not isinstance(manifest, pd.DataFrame) else None,
                 "manifest_hash": manifest_hash(table), "cache_key": cache.key, "preprocess": asdict(pcfg),
                 "counts": {s: int(n) for s, n in cache.meta["counts"].items()}},
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "epochs_run": fitted["epochs_run"],
        "stopped_early": fitted["stopped_early"], "train_seconds": train_seconds, "test": test_metrics,
    }
    result = _jsonable(result)
    (out_dir / METRICS_NAME).write_text(json.dumps(result, indent=2) + "\n")
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
    the input of :func:`nbhelpers.metrics.aggregate` (mean ± std over seeds)."""
    rows = []
    for run_dir in run_dirs:
        m = load_run(run_dir).metrics
        test = m.get("test") or {}
        scalars = {k: v for k, v in test.items() if not isinstance(v, (dict, list))}
        rows.append({"model": m["model"], "preset": m["preset"], "seed": m["seed"], "best_epoch": m["best_epoch"],
                     "run_dir": str(run_dir), **scalars})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- command line


def _parse_value(text: str) -> Any:
    """A ``--set``/``--option`` value as TOML reads it (numbers, booleans, lists), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _pairs(items: Sequence[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = _parse_value(value)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see :func:`main`)."""
    p = argparse.ArgumentParser(prog="python -m nbhelpers.train", description="Train one model under a protocol preset "
                                "and evaluate its best-validation checkpoint once on the test split.")
    p.add_argument("--model", required=True, help="registered model name (nbhelpers.models.list_models())")
    p.add_argument("--manifest", type=Path, required=True, help="curated manifest.csv (python -m data_prep)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder of upstream sources (default: $CXR_DATA_DIR)")
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoints, log and metrics")
    p.add_argument("--preset", default="seed001", help="training protocol in nbhelpers/presets.toml")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`train_run` from the command line and print the test summary.

    Returns 0, or :data:`EXIT_SETUP_ERROR` with a one-line message on stderr when the preset,
    manifest, data folder, model name, device or pretrained download fails (nothing has been
    trained then).
    """
    from nbhelpers.device import DeviceError
    from nbhelpers.models import PretrainedWeightsError, UnknownModelError
    from nbhelpers.presets import PresetError

    args = parse_args(argv)
    try:
        result = train_run(
            args.model, args.manifest, args.data_dir, args.out, preset=args.preset, seed=args.seed,
            device=args.device, model_options=_pairs(args.option, "--option"), cache_root=args.cache_root,
            preprocess=_pairs(args.preprocess, "--preprocess"), workers=args.workers, resume=args.resume,
            n_boot=args.n_boot, **_pairs(args.set, "--set"),
        )
    except (PresetError, FileNotFoundError, UnknownModelError, DeviceError, PretrainedWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
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
