"""Checkpoints, the RNG states they carry, and the lock of a run folder.

**Safe run folders.**  Every file of a run (checkpoints, log, configuration, metrics, predictions,
curves) is written to a temporary file beside it and moved into place (:mod:`data_prep.atomic`),
so a killed run or a full disk never leaves half a file; replacing ``last.pt`` keeps the one
before as ``last.prev.pt``.  Checkpoints are read with ``torch.load(weights_only=True)``: a file
holding anything but tensors and plain values is refused instead of unpickled (unpickling can
run code).  A run holds ``OUT/.lock`` while it trains, so two runs cannot write one folder.
``last.pt`` carries every RNG state (:func:`rng_states`), so a resumed CPU run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import filelock
import numpy as np
import torch
from torch import nn

from data_prep import atomic
from data_prep.errors import InputNotFoundError, WorkbookError, first_line
from nbhelpers.training.config import LOCK_NAME, PREV_NAME
from nbhelpers.training.provenance import RunMismatchError

#: Seconds a run waits for another run on the same folder before it stops.
LOCK_TIMEOUT = 10.0


class CheckpointError(WorkbookError, ValueError):
    """A checkpoint file cannot be read: damaged, not a checkpoint, or holding objects that
    ``weights_only`` loading refuses (unpickling them could run code)."""


class RunFolderInUse(WorkbookError, filelock.Timeout):
    """Another training run holds the run folder's lock."""

    def __str__(self) -> str:
        folder = Path(self.lock_file).parent
        return (f"{folder} is in use by another training run (lock {self.lock_file}); "
                "wait for it or choose another --out")


@contextmanager
def hold_run_folder(out_dir: Path | str, timeout: float | None = None) -> Iterator[Path]:
    """Hold ``out_dir/.lock`` for the block (creating the folder); nested calls for the same
    folder in this process share the lock (filelock's own re-entrant singleton: train_run holds
    the folder and calls fit, which asks again).  Waits up to ``timeout`` seconds (default
    :data:`LOCK_TIMEOUT`), then raises :class:`RunFolderInUse` (a ``filelock.Timeout``) naming
    the folder and the lock file.  Once the lock is first taken, the temporary files a killed
    write left (``.last.pt.*.tmp``, up to a checkpoint's size) are deleted: no other process
    writes here."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise atomic.WriteError(f"cannot create the run folder {out_dir}: {error.strerror or error}; "
                                "choose another output folder") from error
    lock = filelock.FileLock(out_dir.resolve() / LOCK_NAME, is_singleton=True)
    first = not lock.is_locked
    try:
        lock.acquire(timeout=LOCK_TIMEOUT if timeout is None else timeout)
    except filelock.Timeout:
        raise RunFolderInUse(str(out_dir / LOCK_NAME)) from None
    if first:
        for stale in out_dir.glob(".*.tmp"):  # half-written files of a killed run: no writer holds the folder now
            stale.unlink(missing_ok=True)
    try:
        yield out_dir
    finally:
        lock.release()


def read_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The whole checkpoint dict at ``path``, read with ``torch.load(weights_only=True)``.

    Raises FileNotFoundError naming a missing file, and :class:`CheckpointError` naming the file
    when it is damaged (a killed write, a truncated copy), not a checkpoint of this project, or
    holds objects other than tensors and plain values (refused without unpickling them: that
    could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint {path} not found: run the training notebook (04) for this run first")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"{path} is not a readable checkpoint (it holds Python objects besides tensors and plain values; "
                "unpickling them could run code, so it was refused: load only checkpoints this project wrote)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line(error)})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line(error)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a readable checkpoint (it holds no model weights)")
    return state


def read_resumable(path: Path, device: torch.device) -> dict[str, Any]:
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



def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the weights stored at ``path`` into ``model``; return the checkpoint's other fields
    (``epoch``, ``val_acc``, ``config``, ``meta``, ``provenance``; ``last.pt`` also holds the
    optimizer state).  The file is read with ``weights_only=True`` (:func:`read_checkpoint`).

    Raises FileNotFoundError naming the path (and saying to train first) when it is absent,
    :class:`CheckpointError` naming a damaged or refused file, and
    :class:`~nbhelpers.training.provenance.RunMismatchError` (a ValueError) naming the model the
    checkpoint holds when its weights do not fit ``model``.
    """
    path = Path(path)
    state = read_checkpoint(path, device)
    try:
        model.load_state_dict(state.pop("model"))
    except RuntimeError as error:
        held = (state.get("provenance") or {}).get("model") or (state.get("meta") or {}).get("model") or "another model"
        raise RunMismatchError(f"{path} holds weights of model {held} that do not fit this model ({first_line(error)}); "
                         "build the model it holds") from None
    return state


def rng_states(augment_rng: torch.Generator) -> dict[str, Any]:
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


def set_rng_states(states: dict[str, Any], augment_rng: torch.Generator) -> None:
    """Put back every RNG state :func:`rng_states` saved (Python, NumPy, torch, CUDA, augmentation)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    augment_rng.set_state(states["augment"].cpu())
