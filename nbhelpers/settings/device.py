"""What a reproducible run needs of the machine: the compute device (``auto`` means CUDA, then
Apple MPS, then CPU, and says which) and one seed for every random generator."""

from __future__ import annotations

import random

import numpy as np
import torch
from data_prep.errors import WorkbookError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


class DeviceError(WorkbookError, RuntimeError):
    """The requested device is not available on this machine."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def pick_device(name: str = "auto", verbose: bool = True) -> torch.device:
    """Return the torch device for ``name`` (``auto``, ``cuda``, ``cuda:N``, ``mps`` or ``cpu``).

    ``auto`` tries CUDA, then MPS, then falls back to the CPU.  Asking explicitly for a device
    that is absent raises :class:`DeviceError` saying what is available, rather than silently
    training for hours on the CPU.  With ``verbose`` one line names the device chosen.
    """
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif _mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    elif kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} was asked for but CUDA is not available here "
            f"(torch {torch.__version__}); use device='auto' or 'cpu', or run on a machine with an NVIDIA GPU"
        )
    elif kind == "mps" and not _mps_available():
        raise DeviceError(f"device {name!r} was asked for but Apple MPS is not available; use 'auto' or 'cpu'")
    else:
        device = torch.device(name)
    if verbose:
        print(f"device: {describe(device)} (asked for {name!r})")
    return device


def describe(device: torch.device) -> str:
    """A one-line human description of ``device`` (GPU name and memory, or CPU thread count)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "mps (Apple GPU)"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
