"""One training run on several processes: ``torchrun --nproc-per-node N -m nbhelpers train ...``.

Under ``torchrun`` (the variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set) each
process is one *rank* of a DistributedDataParallel run: NCCL on CUDA GPUs (rank ``k`` uses
``cuda:LOCAL_RANK``), gloo on the CPU.  A plain ``python -m nbhelpers train`` never gets here:
it trains through :func:`nbhelpers.training.loop.fit` without a process group.

**The same run as one process.**  ``batch_size`` stays the *global* batch: every rank walks the
single-process batch order (the permutation of ``(seed, epoch)``) and keeps its contiguous share
of each batch (``batch_size // N`` images; a batch size that does not split evenly is refused).
With augmentation on, every rank augments the whole global batch from the shared augmentation
generator and keeps its share, so each image gets the transform it gets in one process (N times
the augmentation work, a few percent of a step on a GPU).  Each rank's loss is weighted by its
share of the batch before DDP averages the gradients, so the gradient is that of the global batch
mean also for an uneven last batch.  A last batch too small to give every rank two images is
dropped (one process drops a last batch of one image): BatchNorm cannot normalise one image.
What still differs from one process: the order of floating-point sums; BatchNorm statistics,
which each rank takes over its own share unless ``--sync-bn`` (CUDA only: torch's SyncBatchNorm
runs on GPUs) normalises over the global batch; and dropout masks, which every rank draws from the
same seeded generator.

**Who does what.**  Rank 0 alone holds the run folder's lock and writes the log, checkpoints,
``train_config.json``, metrics and predictions; it alone builds the preprocessing cache (the other
ranks wait, then reuse it) and scores the validation split after every epoch on the full split
with the plain model, while the others wait for the result it broadcasts, so model selection and
early stopping see exactly the single-process numbers.  After training the other ranks return and
rank 0 alone scores the test split.  Resuming: every rank reads ``last.pt`` (the folder must be
one every rank sees, i.e. one machine or a shared disk).  On CUDA the generator of each GPU is
restored from rank 0's record of that device, so dropout on GPUs after a resume is not repeated
bit for bit (GPU runs are not bit-exact anyway).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from data_prep.errors import WorkbookError
from data_prep.progress import tqdm
from data_prep.schema import CLASSES
from nbhelpers.pipeline.data import AugmentPolicy, batches, num_batches, to_model_input
from nbhelpers.settings.device import pick_device
from nbhelpers.training import loop
from nbhelpers.training.config import TrainConfig

#: The variables torchrun sets in every process it starts.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BACKENDS = ("auto", "nccl", "gloo")
#: How long a rank waits for the others at one collective (rank 0 builds the cache meanwhile).
TIMEOUT = timedelta(minutes=30)
#: The fewest images a rank trains on in one step (BatchNorm needs two values per channel).
MIN_PER_RANK = 2


class DistributedSetupError(WorkbookError, RuntimeError):
    """A data-parallel run that cannot start as asked: NCCL or SyncBatchNorm without CUDA GPUs, a
    global batch that does not split over the ranks, more ranks than GPUs, options without torchrun."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run: ``rank`` of ``world`` (``local_rank`` on its
    machine), the ``backend`` and ``device`` it trains with, and whether BatchNorm is synchronised."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    sync_bn: bool = False

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes."""
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        """What ``metrics.json`` records about the run's processes."""
        return {"world_size": self.world, "backend": self.backend, "sync_bn": self.sync_bn,
                "device_type": self.device.type}

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        import torch.distributed as dist

        dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the other ranks' ``value`` is ignored)."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` (a tensor on this rank's device) over every rank."""
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    # The steps of the one training loop (nbhelpers.training.loop.OneProcess has the same).
    def setup(self, model: nn.Module, cfg: TrainConfig, train_split, num_classes: int) -> tuple[nn.Module, Any]:
        """The model to save (BatchNorm synchronised when asked) and what every epoch steps with,
        training through DistributedDataParallel (:func:`wrap`)."""
        if self.sync_bn:
            model = sync_batchnorm(model)
        parts = loop.make_trainer(model, train_split, replace(cfg, compile=False), self.device, num_classes)
        parts.net = wrap(model, cfg, self)
        return model, parts

    def train_pass(self, parts, split, cfg: TrainConfig, epoch: int, progress: bool) -> tuple[float, float]:
        """This rank's share of one training pass (:func:`train_epoch`)."""
        return train_epoch(parts.net, split, cfg, self, parts.policy, parts.loss_fn, parts.optimizer, parts.scaler,
                           parts.dtype, epoch=epoch, generator=parts.augment_rng, progress=progress,
                           desc=f"train {epoch}")

    def val_net(self, model: nn.Module, parts) -> nn.Module:
        """Rank 0 scores the full validation split with the plain model."""
        return model


def launched(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by ``torchrun`` (every variable of :data:`ENV_KEYS` set)."""
    env = os.environ if env is None else env
    return all(key in env for key in ENV_KEYS)


def _env_ints(env: Mapping[str, str]) -> tuple[int, int, int]:
    try:
        rank, world, local = (int(env[key]) for key in ENV_KEYS)
    except (KeyError, ValueError):
        shown = ", ".join(f"{k}={env.get(k)!r}" for k in ENV_KEYS)
        raise DistributedSetupError(f"a data-parallel run needs integer {', '.join(ENV_KEYS)} as torchrun sets "
                                    f"them (got {shown}); start it with torchrun --nproc-per-node N") from None
    return rank, world, local


def start(device: str = "auto", backend: str = "auto", sync_bn: bool = False,
          env: Mapping[str, str] | None = None) -> Ranks:
    """Join the process group torchrun set up and return this process's :class:`Ranks`.

    ``device`` is ``auto``, ``cuda`` or ``cpu`` (on CUDA each rank takes ``cuda:LOCAL_RANK``);
    ``backend`` ``auto`` (NCCL on CUDA, else gloo), ``nccl`` or ``gloo``.  Raises
    :class:`DistributedSetupError` for NCCL or ``sync_bn`` without CUDA GPUs, more ranks on a
    machine than GPUs, or missing torchrun variables, before any process group exists; and
    :class:`~nbhelpers.settings.device.DeviceError` for a device that is not there.
    """
    import torch.distributed as dist

    env = os.environ if env is None else env
    if backend not in BACKENDS:
        raise DistributedSetupError(f"unknown --dist-backend {backend!r}; use one of {', '.join(BACKENDS)}")
    rank, world, local = _env_ints(env)
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise DistributedSetupError(f"--dist-backend nccl needs CUDA GPUs, but torch {torch.__version__} sees none "
                                    "here; use --dist-backend gloo (or auto) to train on the CPU")
    chosen = pick_device(device, verbose=False)
    if chosen.type not in ("cuda", "cpu"):
        raise DistributedSetupError(f"a data-parallel run trains on CUDA GPUs or the CPU, not on {chosen.type}; "
                                    "use --device cuda or cpu")
    if backend == "nccl" and chosen.type != "cuda":
        raise DistributedSetupError("--dist-backend nccl needs --device cuda (or auto); use gloo on the CPU")
    if sync_bn and chosen.type != "cuda":
        raise DistributedSetupError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only); on the "
                                    "CPU leave it out: each rank then normalises over its own share of the batch")
    if chosen.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible: "
                                        f"start at most {torch.cuda.device_count()} processes per machine "
                                        "(torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        chosen = torch.device("cuda", local)
    name = backend if backend != "auto" else ("nccl" if chosen.type == "cuda" else "gloo")
    if not dist.is_available():
        raise DistributedSetupError(f"this torch build ({torch.__version__}) has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group(name, rank=rank, world_size=world, timeout=TIMEOUT)
    return Ranks(rank=rank, world=world, local_rank=local, backend=name, device=chosen, sync_bn=sync_bn)


def stop(ranks: Ranks | None) -> None:
    """Leave the process group (nothing for ``None``)."""
    import torch.distributed as dist

    if ranks is not None and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_first(ranks: Ranks | None) -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks once it is done (e.g. building the
    cache that they then reuse); a plain block for ``None``."""
    if ranks is not None and not ranks.main:
        ranks.barrier()
    yield
    if ranks is not None and ranks.main:
        ranks.barrier()


def check_batch(batch_size: int, world: int) -> int:
    """The per-rank batch of a global ``batch_size`` over ``world`` ranks; raises
    :class:`DistributedSetupError` when it does not split evenly."""
    if batch_size % world:
        raise DistributedSetupError(
            f"batch_size {batch_size} does not split over {world} processes: the global batch must be a multiple "
            f"of the number of processes (e.g. --set batch_size={batch_size - batch_size % world or world}, "
            "or another --nproc-per-node)")
    return batch_size // world


def shard(n: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of an ``n``-image batch that ``rank`` trains on: contiguous, in rank
    order, sizes differing by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def drops_last(n: int, batch_size: int, world: int) -> bool:
    """Whether the last batch of an ``n``-image epoch is too small to give every rank
    :data:`MIN_PER_RANK` images (it is then left out of the epoch)."""
    tail = n % batch_size
    return 0 < tail < MIN_PER_RANK * world


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm layer synchronised over the ranks (timm's converter keeps its
    fused BatchNorm + activation layers whole; torch's would drop their activation)."""
    try:
        from timm.layers import convert_sync_batchnorm
    except ImportError:  # without timm there are no fused layers to keep
        convert_sync_batchnorm = nn.SyncBatchNorm.convert_sync_batchnorm
    return convert_sync_batchnorm(model)


def wrap(model: nn.Module, cfg: TrainConfig, ranks: Ranks) -> nn.Module:
    """The module each rank trains through: ``model`` on the rank's device (channels_last on CUDA
    when asked) in DistributedDataParallel, under ``torch.compile`` when ``cfg.compile``.  Convert
    BatchNorm (:func:`sync_batchnorm`) before, so the optimizer sees the final parameters."""
    from torch.nn.parallel import DistributedDataParallel

    model = loop.prepare_model(model, replace(cfg, compile=False), ranks.device)
    cuda = ranks.device.type == "cuda"
    net = DistributedDataParallel(model, device_ids=[ranks.device.index] if cuda else None)
    return torch.compile(net) if cfg.compile else net


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def train_epoch(
    net: nn.Module, split, cfg: TrainConfig, ranks: Ranks, policy: AugmentPolicy, loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer, scaler=None, dtype=None, epoch: int = 0,
    generator: torch.Generator | None = None, progress: bool = True, desc: str = "",
) -> tuple[float, float]:
    """One training pass over ``split`` on this rank's share of every global batch (module
    docstring); returns (mean loss, accuracy) over the images all ranks saw together."""
    net.train(True)
    device, size = ranks.device, cfg.batch_size
    drop_last = drops_last(len(split), size, ranks.world)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, correct
    seen = 0
    stream = batches(split, size, shuffle=True, seed=cfg.seed, epoch=epoch, drop_last=drop_last)
    bar = tqdm(stream, total=num_batches(split, size, drop_last=drop_last), desc=desc, leave=False,
               disable=not (progress and ranks.main))
    for x, y in bar:
        lo, hi = shard(len(y), ranks.world, ranks.rank)
        if policy.active:  # the whole batch's draws, as one process makes them
            x = to_model_input(_to(x, device), policy, in_chans=cfg.in_chans, train=True, generator=generator)[lo:hi]
        else:
            x = to_model_input(_to(x[lo:hi], device), policy, in_chans=cfg.in_chans, train=True)
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        target = _to(y[lo:hi], device)
        factor = (hi - lo) * ranks.world / len(y)  # DDP averages over ranks; this makes it the batch mean
        step_loss = loss_fn if factor == 1 else (lambda logits, t: loss_fn(logits, t) * factor)
        loss, logits = loop.train_step(net, x, target, step_loss, optimizer, dtype, scaler)
        sums[0] += loss.double() / factor * (hi - lo)
        sums[1] += (logits.argmax(1) == target).sum()
        seen += len(y)
    total = ranks.sum(sums).tolist()
    return total[0] / max(seen, 1), total[1] / max(seen, 1)


def fit_distributed(
    model: nn.Module, train_split, val_split, cfg: TrainConfig, out_dir: Path | str, ranks: Ranks,
    meta: dict[str, Any] | None = None, resume: bool = False, progress: bool = True,
    on_epoch: Callable[[pd.DataFrame], None] | None = None, provenance: Mapping[str, Any] | None = None,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """:func:`nbhelpers.training.loop.fit` as one rank of a data-parallel run (module docstring):
    the same files, written by rank 0 alone, the same log on every rank, and checkpoints that a
    single process resumes as well (the record does not hold the number of processes).  Raises
    :class:`DistributedSetupError` for a batch that does not split over the ranks, and what
    :func:`~nbhelpers.training.loop.fit` raises.
    """
    check_batch(cfg.batch_size, ranks.world)
    if len(train_split) < MIN_PER_RANK * ranks.world:
        raise DistributedSetupError(f"the training split has {len(train_split)} images, too few for {ranks.world} "
                                    f"processes ({MIN_PER_RANK} each); train it in one process")
    return loop.fit(model, train_split, val_split, cfg, out_dir, ranks.device, meta=meta, resume=resume,
                    progress=progress, on_epoch=on_epoch, provenance=provenance, classes=classes, ranks=ranks)
