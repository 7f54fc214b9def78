"""Training throughput and inference speed per model on the current device, printed as a table.

``workbook bench train --models densenet121 densenet121_cbam resnet50 --size 224 --batch-size 32
--device auto --data-dir D [--steps N --compile --out FOLDER]`` (the report goes to
``train_<device>.txt`` in the ``--out`` folder: ``train_cpu.txt``, ``train_cuda.txt``)

For every model, with the training settings of :func:`nbhelpers.training.loop.fit` (Adam, autocast and
channels_last as :class:`~nbhelpers.training.config.TrainConfig` chooses them on this device):

* ``train_bare``: images/s of optimisation steps (forward, backward, optimizer) on random
  tensors already on the device — the model's own ceiling, no input pipeline;
* ``train_data``: images/s of the trainer's real epoch loop (:func:`nbhelpers.training.loop.run_epoch`):
  shuffled uint8 batches from a preprocessing cache of real images, copied to the device,
  augmented there with the ``paper`` policy and normalised by :func:`nbhelpers.pipeline.data.to_model_input`;
* ``data/bare``: their ratio — the target on one H100 is at least 0.80 (the input pipeline is
  not the bottleneck);
* ``infer_b1`` / ``infer_b64``: inference images/s (FPS) at batch 1 and 64, ``bare`` on random
  device tensors and ``data`` from the cache through ``to_model_input``.

The cache holds ``steps x batch`` real images sampled from the data folder (labels assigned in
turn; speed does not depend on them), built once in a temporary folder before timing.  Each
timing is the best of ``--repeats`` runs that alternate between the two paths after one
untimed warm-up each, bracketed by CUDA synchronisation.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from data_prep.progress import tqdm

from data_prep.datadir import data_dir as resolve_data_dir
from data_prep.options import add_data_dir, add_out
from nbhelpers import models
from nbhelpers.settings.options import add_device
from nbhelpers.tools.bench import emit, report_name, sample_images, sample_manifest
from nbhelpers.pipeline.data import AugmentPolicy, batches, to_model_input
from nbhelpers.settings.device import describe, pick_device
from nbhelpers.pipeline.cache import CachedSplit, build_cache
from nbhelpers.pipeline.preprocess import PreprocessConfig
from nbhelpers.training.config import TrainConfig
from nbhelpers.training.loop import amp_dtype, autocast, make_optimizer, prepare_model, run_epoch, train_step

DEFAULT_MODELS = ("densenet121", "densenet121_cbam", "resnet50", "mobilenetv2", "efficientnet_b0")
DEFAULT_SIZE = 224
DEFAULT_BATCH = 32
DEFAULT_STEPS = 20
DEFAULT_SEED = 0
#: Timed repetitions per measurement; the best is reported (see :func:`_best_rates`).
DEFAULT_REPEATS = 3
#: Inference batch sizes reported (the issue's batch 1 and 64).
INFER_BATCHES = (1, 64)
#: Inference passes timed at batch 1 (batch 64 times one pass over the cached images).
INFER_B1_STEPS = 16
#: The share of bare throughput the full training loop should reach on one H100.
TARGET_RATIO = 0.80
AUGMENT = "paper"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rates(fns: dict[str, Callable[[], int]], device: torch.device, repeats: int) -> dict[str, float]:
    """Images/s of each ``fn() -> images processed``: the best of ``repeats`` timings.

    Every function gets one untimed warm-up call; the timed calls then alternate between the
    functions, so a burst of other work on the machine hits them alike, and the best (least
    disturbed) timing of each is kept, as ``timeit`` advises.
    """
    for fn in fns.values():
        fn()
    best = {key: 0.0 for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            done = fn()
            _sync(device)
            best[key] = max(best[key], done / (time.perf_counter() - start))
    return best


def _random_batch(batch: int, size: int, cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(batch, cfg.in_chans, size, size, generator=gen).to(device)
    if cfg.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 3, (batch,), generator=gen).to(device)


def bench_model(
    name: str, split: CachedSplit, size: int, batch_size: int, steps: int, device: torch.device, cfg: TrainConfig,
    repeats: int = DEFAULT_REPEATS,
) -> dict[str, float]:
    """Measure one model (see the module docstring); returns the row of the table."""
    torch.manual_seed(cfg.seed)
    model = models.create(name, num_classes=3, in_chans=cfg.in_chans)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    net = prepare_model(model, cfg, device)
    optimizer = make_optimizer(model, cfg)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss()
    x, y = _random_batch(batch_size, size, cfg, device)

    def bare_train() -> int:
        net.train()
        for _ in range(steps):
            train_step(net, x, y, loss_fn, optimizer, dtype, scaler)
        return steps * batch_size

    policy, gen = AugmentPolicy.from_name(AUGMENT), torch.Generator().manual_seed(cfg.seed)

    def data_train() -> int:
        run_epoch(net, split, cfg, device, policy, loss_fn, optimizer, scaler, dtype, epoch=1, generator=gen,
                   progress=False)
        return len(split)

    row = {"model": name, "params_M": params,
           **_best_rates({"train_bare": bare_train, "train_data": data_train}, device, repeats)}
    row["data/bare"] = row["train_data"] / row["train_bare"]
    net.eval()
    off = AugmentPolicy.from_name("off")
    for b in INFER_BATCHES:
        xb = x[:1].expand(b, -1, -1, -1).contiguous() if b > len(x) else x[:b]
        n_pass = INFER_B1_STEPS if b == 1 else max(1, len(split) // b)

        @torch.no_grad()
        def bare_infer() -> int:
            with autocast(device, dtype):
                for _ in range(n_pass):
                    net(xb)
            return n_pass * b

        @torch.no_grad()
        def data_infer() -> int:
            done = 0
            with autocast(device, dtype):
                for images, _ in batches(split, b, device=device):
                    net(to_model_input(images, off, in_chans=cfg.in_chans))
                    done += len(images)
                    if done >= n_pass * b:
                        break
            return done

        row.update(_best_rates({f"infer_b{b}_bare": bare_infer, f"infer_b{b}_data": data_infer}, device, repeats))
    return row


def header(command_line: str, device: torch.device) -> list[str]:
    """The command as typed, date, device and library versions, for the top of a result file."""
    return [
        f"$ {command_line}",
        f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"device: {describe(device)}; machine {platform.machine()} cpus={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()}",
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        # Other work on the machine slows CPU timings; say how busy it was when the run started.
        f"load average at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
    ]


def run(
    model_names: Sequence[str], data_dir: Path, size: int, batch_size: int, steps: int, device: torch.device,
    seed: int = DEFAULT_SEED, compile: bool = False, repeats: int = DEFAULT_REPEATS,
) -> tuple[pd.DataFrame, list[str]]:
    """Benchmark every model of ``model_names``; returns the table and the lines describing the set-up.

    Raises :class:`~nbhelpers.models.UnknownModelError` for an unknown name before any timing.
    """
    for name in model_names:
        models.model_spec(name)  # fail fast on a typo
    cfg = TrainConfig(batch_size=batch_size, seed=seed, augment=AUGMENT, compile=compile)
    n = max(steps * batch_size, max(INFER_BATCHES))
    paths = sample_images(data_dir, n, seed)
    pcfg = PreprocessConfig(size=size)
    notes = [
        f"images: {len(paths)} real images from {data_dir} (seed {seed}), {pcfg}",
        f"timing: best of {repeats} alternating runs after one warm-up; "
        f"training: batch {batch_size}, {steps} steps per timing, Adam, augmentation {AUGMENT!r} on the device, "
        f"autocast {amp_dtype(cfg, device)}, channels_last {cfg.channels_last and device.type == 'cuda'}, "
        f"torch.compile {compile}",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-train-") as tmp:
        cache = build_cache(sample_manifest(paths, data_dir), data_dir, Path(tmp), pcfg, progress=False)
        split = cache.split("train")
        # Keep exactly steps x batch images for training timings (no short last batch).
        train_split = CachedSplit("train", split.images[: steps * batch_size], split.labels[: steps * batch_size],
                                  split.image_ids[: steps * batch_size], split.path)
        for name in tqdm(model_names, desc="models"):
            row = bench_model(name, train_split, size, batch_size, steps, device, cfg, repeats)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return pd.DataFrame(rows), notes


def format_table(table: pd.DataFrame, device: torch.device) -> list[str]:
    """The table as aligned text plus the verdict on the data-path target."""
    lines = ["images/s (train_*: training steps; infer_b*: inference FPS at that batch size)",
             table.to_string(index=False, float_format=lambda v: f"{v:,.2f}" if v < 10 else f"{v:,.1f}")]
    worst = table["data/bare"].min()
    if device.type == "cuda":
        verdict = "met" if worst >= TARGET_RATIO else "NOT met"
        lines.append(f"target data/bare >= {TARGET_RATIO:.2f} on the GPU: {verdict} (lowest {worst:.2f})")
    else:
        lines.append(f"data/bare target ({TARGET_RATIO:.2f}) applies to a CUDA GPU; on this CPU augmentation and "
                     f"model share the same cores, lowest ratio here {worst:.2f}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook bench train``."""
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="registered model names")
    add_data_dir(parser)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="training batch size")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per timing")
    add_device(parser)
    parser.add_argument("--compile", action="store_true", help="time the models under torch.compile")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs per measurement (best kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 gives stable numbers on a busy machine")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    add_out(parser, "the report, train_<device>.txt")


def run_command(args: argparse.Namespace) -> int:
    """``workbook bench train``: run the benchmark, print the report (and write it to ``--out``); returns 0."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, verbose=False)
    table, notes = run(args.models, resolve_data_dir(args.data_dir), args.size, args.batch_size, args.steps, device,
                       seed=args.seed, compile=args.compile, repeats=args.repeats)
    emit(header(args.command_line, device) + notes + format_table(table, device),
         args.out / report_name("train", device) if args.out else None)
    return 0
