"""Training and prediction loops over the preprocessed image cache.

:func:`fit` trains a model with the best-validation-accuracy checkpoint rule of the DenseNet
seed paper, writing ``log.csv``, ``last.pt`` and ``best.pt`` to the run folder it is given.
Model selection looks at the validation split only; the test split is never touched here.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from nbhelpers.data import AugmentPolicy, batches, num_batches, to_model_input

LOG_NAME = "log.csv"
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
OPTIMIZERS = ("adam", "adamw")


@dataclass
class TrainConfig:
    """What one training run needs besides the model and the data."""

    epochs: int = 50
    batch_size: int = 32
    lr: float = 2e-4
    optimizer: str = "adam"  # seed 001: Adam, betas (0.9, 0.999)
    weight_decay: float = 0.0
    augment: str = "off"
    seed: int = 0
    in_chans: int = 3


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg.optimizer`` names; raise ValueError for an unknown one."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use one of {OPTIMIZERS}")


def _run_epoch(model, split, cfg, device, policy, optimizer=None, epoch=0, desc="", generator=None):
    """One pass over ``split``: trains when an optimizer is given, else evaluates; returns
    (mean loss, accuracy)."""
    training = optimizer is not None
    model.train(training)
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    stream = batches(split, cfg.batch_size, shuffle=training, seed=cfg.seed, epoch=epoch, device=device)
    with torch.set_grad_enabled(training):
        for x, y in tqdm(stream, total=num_batches(split, cfg.batch_size), desc=desc, leave=False):
            x = to_model_input(x, policy, in_chans=cfg.in_chans, train=training, generator=generator)
            logits = model(x)
            loss = loss_fn(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def fit(
    model: nn.Module,
    train_split,
    val_split,
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    meta: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Train ``model`` for ``cfg.epochs`` epochs and return the per-epoch log as a DataFrame.

    After each epoch the model is scored on ``val_split``; the checkpoint with the best
    validation accuracy is kept as ``best.pt`` (ties keep the earlier epoch), the latest as
    ``last.pt``.  ``meta`` (e.g. model name and options) is stored in both checkpoints so the
    model can be rebuilt without the notebook that trained it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    policy = AugmentPolicy.from_name(cfg.augment)
    augment_rng = torch.Generator().manual_seed(cfg.seed)  # augmentation repeats for a seed on its own
    rows, best_acc = [], -1.0
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="epochs"):
        start = time.perf_counter()
        train_loss, train_acc = _run_epoch(model, train_split, cfg, device, policy, optimizer,
                                           epoch=epoch, desc=f"train {epoch}", generator=augment_rng)
        val_loss, val_acc = _run_epoch(model, val_split, cfg, device, policy, desc=f"val {epoch}")
        rows.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                     "val_loss": val_loss, "val_acc": val_acc, "seconds": time.perf_counter() - start})
        state = {"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc,
                 "config": asdict(cfg), "meta": meta or {}}
        torch.save(state, out_dir / LAST_NAME)
        if val_acc > best_acc:
            best_acc = val_acc
            torch.save(state, out_dir / BEST_NAME)
        pd.DataFrame(rows).to_csv(out_dir / LOG_NAME, index=False)
    (out_dir / "train_config.json").write_text(json.dumps({"config": asdict(cfg), "meta": meta or {}}, indent=2) + "\n")
    return pd.DataFrame(rows)


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the weights stored at ``path`` into ``model``; return the checkpoint's other fields.

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
