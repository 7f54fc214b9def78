"""The training loop: optimizer, schedule and mixed precision, one epoch, and :func:`fit`.

:func:`fit` trains a model and keeps the checkpoint with the best validation accuracy (the rule
of the DenseNet seed paper; ties keep the earlier epoch), writing ``log.csv``, ``last.pt`` and
``best.pt`` to the run folder.  Model selection and early stopping look at the validation split
only.

**On a GPU** batches come from the memory-mapped cache as uint8, are copied non-blocking from
pinned memory, and are scaled, augmented and normalised on the device
(:func:`nbhelpers.pipeline.data.to_model_input`); the model runs in channels_last under bf16 autocast
(fp16 with a gradient scaler where bf16 is unsupported), optionally through ``torch.compile``.
Running loss and accuracy stay on the device and are read back only every
:data:`PROGRESS_EVERY` batches, so the CPU does not stall the GPU queue.

**Determinism.**  Everything random flows from ``TrainConfig.seed``: the batch order (a
permutation per ``(seed, epoch)``), the augmentation (its own generator), dropout (torch's
global generator, seeded by :func:`nbhelpers.settings.device.seed_everything`).  On the CPU a
run is bit-exact on one machine: the same seed gives the same weights (another CPU model may
choose other vector kernels, and the last-bit differences grow over training), and a run
interrupted and resumed from ``last.pt`` ends with the same weights as an uninterrupted one (the
checkpoint carries model, optimizer, scheduler, gradient scaler, best score, log and every RNG
state).  On CUDA, cuDNN algorithm choice and atomic adds in some backward kernels (e.g.
``grid_sample``, scatter/index_add, some convolutions) make results differ in the last bits
between runs; ``deterministic=True`` selects deterministic algorithms where they exist (slower,
and torch warns where none exists), and bf16/fp16 autocast is only reproducible on the same GPU
model and software versions.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from data_prep.progress import tqdm

from data_prep import atomic
from data_prep.errors import first_line
from data_prep.schema import CLASSES
from nbhelpers.pipeline.data import AugmentPolicy, batches, num_batches, to_model_input
from nbhelpers.settings.device import seed_everything
from nbhelpers.training.checkpoint import (
    hold_run_folder,
    read_resumable,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from nbhelpers.training.config import (
    BEST_NAME,
    CONFIG_NAME,
    LAST_NAME,
    LOG_NAME,
    OPTIMIZERS,
    PREV_NAME,
    SCHEDULERS,
    TrainConfig,
    TrainConfigError,
)
from nbhelpers.training.losses import make_loss
from nbhelpers.training.provenance import RunMismatchError, check_resumable, jsonable, plain_values, saved_record

#: Batches between progress-bar updates; each update reads the running loss back from the device.
PROGRESS_EVERY = 10


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

    Raises :class:`~nbhelpers.training.config.TrainConfigError` (a ValueError) for ``fp16`` off
    CUDA (CPU autocast supports bf16 only).
    """
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" and device.type != "cuda":
        raise TrainConfigError(f"amp='fp16' needs a CUDA device, not {device}; use amp='bf16' or 'off'")
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.amp == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def configure_backend(cfg: TrainConfig, device: torch.device) -> None:
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
    classes: Sequence[str] = CLASSES,
    ranks: Any = None,
) -> pd.DataFrame:
    """Train ``model`` for up to ``cfg.epochs`` epochs and return the per-epoch log as a DataFrame.

    After each epoch the model is scored on ``val_split``; the checkpoint with the best
    validation accuracy is kept as ``best.pt`` (ties keep the earlier epoch), the full state as
    ``last.pt`` (the one before as ``last.prev.pt``), and the log (epoch, lr, train/val loss and
    accuracy, seconds, train images/s) as ``log.csv``, every file written atomically.
    ``classes`` names the model's outputs in label-index order (the class-balanced loss weighs
    each by its training images).  Validation loss is plain cross-entropy whatever the training
    loss, so it compares across losses.  Training stops early after ``cfg.patience`` epochs
    without a better validation accuracy (0: never).  With ``resume`` an existing ``last.pt`` is
    continued (to the same weights an uninterrupted CPU run reaches) when its record matches:
    ``provenance`` (a :func:`nbhelpers.training.runs.run_provenance` record; ``cfg`` and
    ``meta["model"]`` when absent) may differ only in ``epochs`` and ``patience``; without
    ``last.pt`` the run starts afresh.  ``meta`` (e.g. model name and options) is stored in the
    checkpoints so the model can be rebuilt without the notebook that trained it; the record goes
    to the checkpoints and ``train_config.json``.  ``on_epoch(log)`` is called after every epoch
    (e.g. to redraw curves).  The folder's lock is held throughout.  Raises
    :class:`~nbhelpers.training.provenance.RunMismatchError` (a ValueError) saying what differs
    when ``last.pt`` was written for another run (model, data, settings),
    :class:`~nbhelpers.training.checkpoint.CheckpointError` naming a damaged ``last.pt`` (and
    offering ``last.prev.pt``), :class:`~nbhelpers.training.checkpoint.RunFolderInUse` when
    another run holds the folder, and :class:`data_prep.atomic.WriteError` naming the file when
    the disk is full.

    ``ranks`` makes this one process of a data-parallel run
    (:class:`nbhelpers.training.distributed.Ranks`, through
    :func:`~nbhelpers.training.distributed.fit_distributed`); the default, :class:`OneProcess`
    on ``device``, is a world of one.  Only the main process holds the folder and writes.
    """
    ranks = ranks if ranks is not None else OneProcess(torch.device(device))
    out_dir = Path(out_dir)
    record = plain_values({**(provenance or {}), "config": asdict(cfg)})
    if "model" not in record and meta and "model" in meta:
        record["model"] = meta["model"]
    with hold_run_folder(out_dir) if ranks.main else nullcontext(out_dir):
        return _fit(model, train_split, val_split, cfg, out_dir, ranks, meta or {}, record, resume,
                    progress and ranks.main, on_epoch, len(classes))


@dataclass(frozen=True)
class OneProcess:
    """A run in this process alone: the world of one that :func:`fit` trains in by default.  The
    data-parallel :class:`~nbhelpers.training.distributed.Ranks` offers the same steps."""

    device: torch.device
    main: bool = True
    world: int = 1

    def record(self) -> dict[str, Any] | None:
        """What the run's files record about its processes (nothing for one)."""
        return None

    def barrier(self) -> None:
        """Nothing to wait for."""

    def share(self, value: Any) -> Any:
        return value

    def setup(self, model: nn.Module, cfg: TrainConfig, train_split, num_classes: int) -> tuple[nn.Module, "Trainer"]:
        """The model to save and what every epoch steps with."""
        return model, make_trainer(model, train_split, cfg, self.device, num_classes)

    def train_pass(self, parts: "Trainer", split, cfg: TrainConfig, epoch: int, progress: bool) -> tuple[float, float]:
        """One training pass over ``split``: (mean loss, accuracy)."""
        return run_epoch(parts.net, split, cfg, self.device, parts.policy, parts.loss_fn, parts.optimizer, parts.scaler,
                         parts.dtype, epoch=epoch, desc=f"train {epoch}", generator=parts.augment_rng, progress=progress)

    def val_net(self, model: nn.Module, parts: "Trainer") -> nn.Module:
        """The module that scores the validation split."""
        return parts.net


@dataclass
class Trainer:
    """What every epoch of one run steps with: the module to call (compiled or not), optimizer,
    schedule, gradient scaler, autocast dtype, both losses, both augmentation policies and the
    augmentation's own generator."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    dtype: torch.dtype | None
    loss_fn: nn.Module
    val_loss_fn: nn.Module
    policy: AugmentPolicy
    no_augment: AugmentPolicy
    augment_rng: torch.Generator


@dataclass
class Standing:
    """Where a run stands after its last finished epoch: the log rows, the best validation
    accuracy and its epoch, epochs without improvement, the next epoch, and whether it stopped."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    start: int = 1
    stopped: bool = False


def make_trainer(model: nn.Module, train_split, cfg: TrainConfig, device: torch.device, num_classes: int) -> Trainer:
    """Set up what every epoch steps with (after the global seed and backend switches are set)."""
    net = prepare_model(model, cfg, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    counts = np.bincount(np.asarray(train_split.labels), minlength=num_classes)
    loss_fn = make_loss(cfg.loss, class_counts=counts.tolist(), **cfg.loss_options).to(device)
    return Trainer(net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, dtype=dtype, loss_fn=loss_fn,
                    val_loss_fn=nn.CrossEntropyLoss(), policy=AugmentPolicy.from_name(cfg.augment),
                    no_augment=AugmentPolicy.from_name("off"),
                    augment_rng=torch.Generator().manual_seed(cfg.seed))  # augmentation repeats for a seed on its own


def restore(model: nn.Module, parts: Trainer, cfg: TrainConfig, record: dict[str, Any], last_path: Path,
            device: torch.device) -> Standing:
    """Continue from ``last_path``: check its record, load weights, optimizer, schedule, scaler and
    every RNG state, and return where the run stood."""
    state = read_resumable(last_path, device)
    saved = saved_record(state)
    check_resumable(saved, record, last_path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        held = saved.get("model") or "another model"
        raise RunMismatchError(f"cannot resume from {last_path}: its weights (model {held}) do not fit this model "
                         f"({first_line(error)}); use the model it holds, a new output folder, or start afresh "
                         "without --resume (resume=False)") from None
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"], parts.augment_rng)
    standing = Standing(rows=list(state["log"]), best_acc=state["best_acc"], best_epoch=state["best_epoch"],
                         bad_epochs=state["bad_epochs"], start=state["epoch"] + 1,
                         stopped=bool(state.get("stopped_early")))
    if standing.stopped:
        standing.start = cfg.epochs + 1  # it already stopped: nothing left to run
    return standing


def _epoch(model: nn.Module, parts: Trainer, train_split, val_split, cfg: TrainConfig, ranks, epoch: int,
           standing: Standing, progress: bool) -> bool:
    """Train one epoch (``ranks.train_pass``), score the full validation split on the main process
    and share its numbers, step the schedule and append the log row to ``standing``; returns
    whether the validation accuracy improved."""
    begin = time.perf_counter()
    lr = parts.optimizer.param_groups[0]["lr"]
    train_loss, train_acc = ranks.train_pass(parts, train_split, cfg, epoch, progress)
    train_seconds = time.perf_counter() - begin
    scored = None
    if ranks.main:
        scored = run_epoch(ranks.val_net(model, parts), val_split, cfg, ranks.device, parts.no_augment,
                           parts.val_loss_fn, dtype=parts.dtype, desc=f"val {epoch}", progress=progress)
    val_loss, val_acc = ranks.share(scored)
    if parts.scheduler is not None:
        parts.scheduler.step()
    improved = val_acc > standing.best_acc
    if improved:
        standing.best_acc, standing.best_epoch, standing.bad_epochs = val_acc, epoch, 0
    else:
        standing.bad_epochs += 1
    standing.stopped = cfg.patience > 0 and standing.bad_epochs >= cfg.patience
    standing.rows.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                          "val_loss": val_loss, "val_acc": val_acc, "best": improved,
                          "seconds": time.perf_counter() - begin,
                          "train_images_per_s": len(train_split) / train_seconds})
    return improved


def save_epoch(model: nn.Module, parts: Trainer, cfg: TrainConfig, meta: dict[str, Any], record: dict[str, Any],
               out_dir: Path, standing: Standing, improved: bool, keep_previous: bool) -> None:
    """Write ``best.pt`` (when the epoch improved) and ``last.pt`` with the whole training state."""
    epoch, val_acc = standing.rows[-1]["epoch"], standing.rows[-1]["val_acc"]
    state = {"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc, "config": asdict(cfg),
             "meta": meta, "provenance": record}
    if improved:
        save_checkpoint(state, out_dir / BEST_NAME)
    state.update({
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "best_acc": standing.best_acc, "best_epoch": standing.best_epoch, "bad_epochs": standing.bad_epochs,
        "stopped_early": standing.stopped, "log": standing.rows, "rng": rng_states(parts.augment_rng),
    })
    save_checkpoint(state, out_dir / LAST_NAME, keep_previous=keep_previous)


def _fit(model, train_split, val_split, cfg: TrainConfig, out_dir: Path, ranks, meta: dict[str, Any],
         record: dict[str, Any], resume: bool, progress: bool, on_epoch, num_classes: int) -> pd.DataFrame:
    """:func:`fit` with the folder held by the main process and its run record worked out: the one
    loop, for one process and for every rank of a data-parallel run."""
    seed_everything(cfg.seed)
    configure_backend(cfg, ranks.device)
    model, parts = ranks.setup(model, cfg, train_split, num_classes)
    last_path = out_dir / LAST_NAME
    resuming = resume and last_path.is_file()
    if resuming:
        standing = restore(model, parts, cfg, record, last_path, ranks.device)
    else:
        if ranks.main:  # a fresh run: a last.prev.pt of an earlier run in this folder must not be offered
            (out_dir / PREV_NAME).unlink(missing_ok=True)
        standing = Standing()
    # Only a last.pt of this run is worth keeping as last.prev.pt.
    keep_previous = resuming
    for epoch in tqdm(range(standing.start, cfg.epochs + 1), desc="epochs", unit="epoch", initial=standing.start - 1,
                      total=cfg.epochs, disable=not progress):
        improved = _epoch(model, parts, train_split, val_split, cfg, ranks, epoch, standing, progress)
        if ranks.main:
            save_epoch(model, parts, cfg, meta, record, out_dir, standing, improved, keep_previous)
            log = pd.DataFrame(standing.rows)
            atomic.write_with(out_dir / LOG_NAME, lambda tmp: log.to_csv(tmp, index=False))
            if on_epoch is not None:
                on_epoch(log)
        keep_previous = True
        if standing.stopped:
            if ranks.main:
                tqdm.write(f"early stopping after epoch {epoch}: no better validation accuracy for {cfg.patience} "
                           f"epochs (best {standing.best_acc:.4f} at epoch {standing.best_epoch})")
            break
    if ranks.main:
        summary = {"config": asdict(cfg), "meta": meta, "provenance": record, "best_epoch": standing.best_epoch,
                   "best_val_acc": standing.best_acc, "epochs_run": len(standing.rows),
                   "stopped_early": standing.stopped}
        if ranks.record() is not None:
            summary["distributed"] = ranks.record()
        atomic.write_text(out_dir / CONFIG_NAME, json.dumps(jsonable(summary), indent=2) + "\n")
    ranks.barrier()  # every rank returns once the main process has written the run's files
    return pd.DataFrame(standing.rows)
