"""Data-parallel training throughput: N ranks under torchrun against one process on the same cores.

``workbook bench ddp --data-dir D [--model mobilenetv2 --size 64 --batch-size 16 --steps 8
--epochs 3 --ranks 2 --threads 1 --device cpu --out FOLDER]`` (the report goes to
``ddp_<device>.txt`` in ``--out``)

Both set-ups train one model from the same seed with the same global batch and ``paper``
augmentation on a small cache of real images (``steps x batch`` of them, so no batch is short):

* **one process** with ``ranks x threads`` torch threads, through the trainer's own epoch
  (:func:`nbhelpers.training.loop.run_epoch`);
* **torchrun**: ``ranks`` processes of ``threads`` threads each, each training its share of every
  batch (:func:`nbhelpers.training.distributed.train_epoch`; gloo on the CPU, NCCL on GPUs).

Each set-up runs in a fresh interpreter (``python -m nbhelpers.tools.bench_ddp --worker``, under
``torchrun --standalone`` for the ranks) that trains one untimed warm-up epoch, then ``epochs``
timed ones; the report gives the best and mean images/s, their ratio and the per-epoch losses of
both.  The losses agree closely for a model without BatchNorm; with BatchNorm each rank
normalises over its own share unless ``--sync-bn`` (GPUs only).  Other work on the machine slows
CPU timings: the header records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from data_prep.errors import WorkbookError, one_line

DEFAULT_MODEL = "mobilenetv2"
DEFAULT_SIZE = 64
DEFAULT_BATCH = 16
DEFAULT_STEPS = 8
DEFAULT_EPOCHS = 3
DEFAULT_RANKS = 2
#: Seconds one set-up may take before it is stopped.
TIMEOUT = 900


class BenchRunError(WorkbookError, RuntimeError):
    """A benchmark process failed or did not finish; the message quotes its last error line."""


def _open_split(folder: Path):
    """The ``train`` split stored as ``train_images.npy`` / ``train_labels.npy`` in ``folder`` (the
    layout of a preprocessing cache), memory-mapped."""
    import numpy as np

    from nbhelpers.pipeline.cache import CachedSplit

    images = np.load(folder / "train_images.npy", mmap_mode="r")
    labels = np.load(folder / "train_labels.npy")
    return CachedSplit("train", images, labels, [str(i) for i in range(len(labels))], folder)


def sync(device) -> None:
    """Wait for the work queued on ``device`` (a CUDA GPU; nothing to wait for on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> int:
    """One set-up's process (or one rank of it): train and time the epochs, rank 0 writes the result."""
    import torch
    from torch import nn

    from nbhelpers import models
    from nbhelpers.pipeline.data import AugmentPolicy
    from nbhelpers.settings.device import describe, pick_device, seed_everything
    from nbhelpers.training import distributed
    from nbhelpers.training.config import TrainConfig
    from nbhelpers.training.loop import amp_dtype, make_optimizer, prepare_model, run_epoch

    torch.set_num_threads(args.threads)
    ranks = distributed.start(args.device, args.dist_backend, args.sync_bn) if distributed.launched() else None
    try:
        device = ranks.device if ranks else pick_device(args.device, verbose=False)
        split = _open_split(args.data)
        cfg = TrainConfig(batch_size=args.batch_size, lr=1e-3, augment="paper", seed=0, compile=args.compile)
        seed_everything(cfg.seed)
        model = models.create(args.model, num_classes=3, in_chans=cfg.in_chans)
        if ranks is not None and ranks.sync_bn:
            model = distributed.sync_batchnorm(model)
        net = distributed.wrap(model, cfg, ranks) if ranks else prepare_model(model, cfg, device)
        optimizer, dtype = make_optimizer(model, cfg), amp_dtype(cfg, device)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        loss_fn, policy = nn.CrossEntropyLoss(), AugmentPolicy.from_name(cfg.augment)
        generator = torch.Generator().manual_seed(cfg.seed)
        epochs = []
        for epoch in range(args.epochs + 1):  # epoch 0 warms up (allocator, kernels, compilation)
            sync(device)
            begin = time.perf_counter()
            if ranks is not None:
                loss, _ = distributed.train_epoch(net, split, cfg, ranks, policy, loss_fn, optimizer, scaler, dtype,
                                                  epoch=epoch, generator=generator, progress=False)
            else:
                loss, _ = run_epoch(net, split, cfg, device, policy, loss_fn, optimizer, scaler, dtype, epoch=epoch,
                                    generator=generator, progress=False)
            sync(device)
            epochs.append({"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - begin})
        if ranks is None or ranks.main:
            result = {"images": len(split), "epochs": epochs, "processes": ranks.world if ranks else 1,
                      "threads": torch.get_num_threads(), "backend": ranks.backend if ranks else None,
                      "device": describe(device), "sync_bn": bool(ranks and ranks.sync_bn)}
            args.result.write_text(json.dumps(result))
    finally:
        distributed.stop(ranks)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(data: Path, *, ranks: int | None, threads: int, model: str, batch_size: int, epochs: int,
           device: str = "cpu", backend: str = "auto", sync_bn: bool = False, compile: bool = False,
           timeout: float = TIMEOUT, entry: str = "nbhelpers.tools.bench_ddp") -> dict[str, Any]:
    """Run one set-up on the ``train_images.npy`` / ``train_labels.npy`` of ``data``: one process
    (``ranks`` None) or ``ranks`` processes under torchrun, ``threads`` torch threads each; returns
    rank 0's result (images, per-epoch loss and seconds, processes, threads, backend, device).
    ``entry`` is the module the processes run (one whose ``--worker`` calls :func:`main`).
    Raises :class:`BenchRunError` quoting the last error line when a process fails or runs past
    ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="cxr-bench-ddp-") as tmp:
        result = Path(tmp) / "result.json"
        worker_args = ["-m", entry, "--worker", "--data", str(data), "--result", str(result),
                       "--model", model, "--batch-size", str(batch_size), "--epochs", str(epochs),
                       "--threads", str(threads), "--device", device, "--dist-backend", backend,
                       *(["--sync-bn"] if sync_bn else []), *(["--compile"] if compile else [])]
        launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                                             str(ranks), "--master-port", str(_free_port())]
        command = [sys.executable, *launcher, *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                                  cwd=Path(__file__).resolve().parents[2])
        except subprocess.TimeoutExpired:
            raise BenchRunError(f"{' '.join(command[:6])} ... ran past {timeout:.0f} s; use fewer --steps") from None
        if done.returncode != 0 or not result.is_file():
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            errors = [line for line in lines if "Error" in line or line.startswith("error:")]
            raise BenchRunError(f"the {'torchrun' if ranks else 'single-process'} benchmark exited with "
                                f"{done.returncode}: {(errors or lines or ['no output'])[-1].strip()}")
        return json.loads(result.read_text())


def rates(result: dict[str, Any]) -> tuple[float, float]:
    """(best, mean) images/s over the timed epochs of a :func:`launch` result."""
    seconds = [e["seconds"] for e in result["epochs"][1:]] or [e["seconds"] for e in result["epochs"]]
    return result["images"] / min(seconds), result["images"] * len(seconds) / sum(seconds)


def compare(single: dict[str, Any], ranked: dict[str, Any]) -> list[str]:
    """The report lines of one single-process and one torchrun :func:`launch` result."""
    lines = [f"{'set-up':<12} {'processes':>9} {'threads':>7} {'best img/s':>10} {'mean img/s':>10}  epoch losses "
             "(warm-up first)"]
    for name, result in (("one process", single), ("torchrun", ranked)):
        best, mean = rates(result)
        losses = " ".join(f"{e['loss']:.5f}" for e in result["epochs"])
        lines.append(f"{name:<12} {result['processes']:>9} {result['threads']:>7} {best:>10.1f} {mean:>10.1f}  "
                     f"{losses}")
    ratio = rates(ranked)[0] / rates(single)[0]
    diffs = [abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-12)
             for a, b in zip(single["epochs"], ranked["epochs"])]
    lines += [f"torchrun / one process (best images/s): {ratio:.2f}",
              f"largest relative difference of the per-epoch mean losses: {max(diffs):.2e} "
              f"(BatchNorm {'synchronised' if ranked['sync_bn'] else 'per rank: only rough agreement expected'})",
              f"backend {ranked['backend']}, device {ranked['device']}"]
    return lines


def check_lines(split, model: str, batch_size: int, device: str, epochs: int, budget: float,
                entry: str = "nbhelpers.tools.bench_ddp") -> list[str]:
    """The GPU check's DDP step (:mod:`nbhelpers.tools.gpu_check`): one process against torchrun
    on every GPU here with NCCL and SyncBatchNorm (2 CPU ranks with gloo when ``device`` is
    ``cpu``), on ``split`` with the global ``batch_size`` (cut to a multiple of the ranks), within
    ``budget`` seconds; returns the report lines."""
    import numpy as np
    import torch

    cuda = device == "cuda"
    ranks, backend = (torch.cuda.device_count(), "nccl") if cuda else (2, "gloo")
    batch_size -= batch_size % ranks
    end = time.monotonic() + budget
    common = dict(model=model, batch_size=batch_size, epochs=epochs, device=device, entry=entry,
                  threads=4 if cuda else 1)
    with tempfile.TemporaryDirectory(prefix="cxr-ddp-check-") as tmp:
        np.save(Path(tmp) / "train_images.npy", np.ascontiguousarray(split.images))
        np.save(Path(tmp) / "train_labels.npy", split.labels)
        single = launch(Path(tmp), ranks=None, timeout=max(end - time.monotonic(), 60.0), **common)
        ranked = launch(Path(tmp), ranks=ranks, backend=backend, sync_bn=cuda,
                        timeout=max(end - time.monotonic(), 60.0), **common)
    return [f"{model}: {len(split)} images at {split.images.shape[-1]} px, global batch {batch_size}, one warm-up "
            f"epoch + {epochs} timed; torchrun --nproc-per-node {ranks} ({backend}{', SyncBatchNorm' if cuda else ''}) "
            "against one process", *compare(single, ranked)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook bench ddp``."""
    from data_prep.options import add_data_dir, add_out
    from nbhelpers.settings.options import add_device

    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name")
    add_data_dir(parser)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="global training batch")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="timed epochs after one warm-up")
    parser.add_argument("--ranks", type=int, default=DEFAULT_RANKS, help="torchrun processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per torchrun process")
    add_device(parser, "training")
    parser.add_argument("--seed", type=int, default=0, help="which real images are sampled")
    add_out(parser, "the report, ddp_<device>.txt")


def run_command(args: argparse.Namespace) -> int:
    """``workbook bench ddp``: time both set-ups, print the report (and write it to ``--out``); returns 0."""
    from data_prep.datadir import data_dir as resolve_data_dir
    from nbhelpers.pipeline.cache import build_cache
    from nbhelpers.pipeline.preprocess import PreprocessConfig
    from nbhelpers.settings.device import pick_device
    from nbhelpers.tools.bench import emit, report_name, sample_images, sample_manifest
    from nbhelpers.tools.bench_train import header
    from nbhelpers.training.distributed import check_batch

    check_batch(args.batch_size, args.ranks)
    device = pick_device(args.device, verbose=False)
    source = resolve_data_dir(args.data_dir)
    n = args.steps * args.batch_size
    paths = sample_images(source, n, args.seed)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-ddp-cache-") as tmp:
        cache = build_cache(sample_manifest(paths[:n], source), source, Path(tmp), PreprocessConfig(size=args.size),
                            progress=False)
        common = dict(model=args.model, batch_size=args.batch_size, epochs=args.epochs, device=device.type)
        single = launch(cache.path, ranks=None, threads=args.ranks * args.threads, **common)
        ranked = launch(cache.path, ranks=args.ranks, threads=args.threads, **common)
    notes = [f"images: {len(paths)} real images from {source} (seed {args.seed}), {args.size} px; model {args.model}, "
             f"global batch {args.batch_size}, {args.steps} steps per epoch, augmentation 'paper', Adam lr 1e-3; "
             f"one warm-up epoch, then {args.epochs} timed"]
    emit(header(args.command_line, device) + notes + compare(single, ranked),
         args.out / report_name("ddp", device) if args.out else None)
    return 0


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nbhelpers.tools.bench_ddp",
                                     description="one process of `workbook bench ddp` (started by launch())")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dist-backend", default="auto")
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--compile", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of a benchmark process; a :class:`~data_prep.errors.WorkbookError` is one line and exit 2."""
    args = _worker_parser().parse_args(argv)
    try:
        return worker(args)
    except WorkbookError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_status


if __name__ == "__main__":
    sys.exit(main())
