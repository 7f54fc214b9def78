"""Throughput and design measurements of the image pipeline, run from the command line.

``workbook bench loader --data-dir D [--n N --size S --batch-size B --out FOLDER]`` prints
images/s for (a) decode + CLAHE + resize from the source files and (b) batches from the
preprocessing cache (plus (b) followed by :func:`nbhelpers.pipeline.data.to_model_input`, without and
with the ``paper`` augmentation, on the CPU, and on the GPU when ``--device`` is one); with
``--out`` the report goes to ``loader_<device>.txt`` there (``loader_cpu.txt``, ``loader_cuda.txt``).
``workbook bench clahe-order ...`` prints the evidence behind CLAHE-before-resize (see
:mod:`nbhelpers.pipeline.preprocess`), written to ``clahe_order.txt``.

The images are the first ``N`` of a seeded shuffle of every image file under the data folder
(annotation masks excluded); labels are irrelevant to speed and assigned in turn.  Source files
are read once before timing, so (a) measures decoding, not the disk.
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
from data_prep.progress import tqdm

from data_prep.atomic import write_text
from data_prep.datadir import data_dir as resolve_data_dir
from data_prep.errors import InputNotFoundError
from data_prep.images import IMAGE_SUFFIXES, load_gray
from data_prep.options import add_data_dir, add_out
from data_prep.schema import CLASSES
from nbhelpers.pipeline.data import AugmentPolicy, batches, to_model_input
from nbhelpers.pipeline.preprocess import PreprocessConfig, clahe_order_difference, load_prepared, prepare, resize
from nbhelpers.pipeline.cache import build_cache
from nbhelpers.settings.device import pick_device
from nbhelpers.settings.options import add_device

DEFAULT_N = 200
DEFAULT_SIZE = 224
DEFAULT_BATCH = 32
DEFAULT_SEED = 0
#: Cached-path timings repeat epochs until at least this many seconds have passed (stable numbers).
MIN_TIMED_SECONDS = 2.0
#: Folders whose images are not radiographs (lung masks) and are left out of the sample.
SKIP_FOLDERS = ("annotations",)
#: Output sizes compared by the CLAHE-order measurement (smoke and full profile sizes).
ORDER_SIZES = (64, 224)
#: Grey-level difference counted as visible in the CLAHE-order measurement.
VISIBLE_DIFF = 10
#: The file ``workbook bench clahe-order --out FOLDER`` writes its report to.
CLAHE_ORDER_REPORT = "clahe_order.txt"


def sample_images(data_dir: Path, n: int, seed: int) -> list[Path]:
    """Return ``n`` image files under ``data_dir`` (seeded shuffle, annotation masks skipped).

    Raises :class:`data_prep.errors.InputNotFoundError` (a FileNotFoundError) naming the folder
    when it holds no images.
    """
    files = sorted(
        p for p in data_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not set(SKIP_FOLDERS) & set(p.relative_to(data_dir).parts)
    )
    if not files:
        raise InputNotFoundError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {data_dir}; is it the source-data folder?"
        )
    order = np.random.default_rng(seed).permutation(len(files))[:n]
    return [files[i] for i in order]


def sample_manifest(paths: Sequence[Path], data_dir: Path) -> pd.DataFrame:
    """A minimal manifest over ``paths`` (all in split ``train``, labels assigned in turn)."""
    rel = [p.relative_to(data_dir).as_posix() for p in paths]
    return pd.DataFrame({
        "image_id": [f"bench:{r}" for r in rel],
        "path": rel,
        "label": [CLASSES[i % len(CLASSES)] for i in range(len(rel))],
        "split": "train",
    })


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _time_epochs(run_epoch: Callable[[int], int], min_seconds: float) -> float:
    """Images/s of ``run_epoch(epoch) -> images`` repeated until ``min_seconds`` have passed."""
    run_epoch(0)  # warm-up: page cache and allocator
    done, epoch, start = 0, 1, time.perf_counter()
    while done == 0 or time.perf_counter() - start < min_seconds:
        done += run_epoch(epoch)
        epoch += 1
    return _rate(done, time.perf_counter() - start)


def report_name(kind: str, device: torch.device) -> str:
    """The file a timing report of ``kind`` (``loader``, ``train``) goes to in the ``--out``
    folder: ``<kind>_<device type>.txt``, since timings hold for one kind of device only."""
    return f"{kind}_{device.type}.txt"


def header(command_line: str) -> list[str]:
    """Lines naming the command as typed, date, machine and library versions, for the top of a result file."""
    return [
        f"$ {command_line}",
        f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}".replace("  ", " "),
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
    ]


def emit(lines: Sequence[str], out: Path | None) -> None:
    """Print a report's ``lines`` and, with ``out``, also write them to that file."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out is not None:
        write_text(out, text)


def bench_loader(
    data_dir: Path, n: int, size: int, batch_size: int, seed: int, min_seconds: float = MIN_TIMED_SECONDS,
    gpu: bool | None = None,
) -> list[str]:
    """Measure both loading paths on ``n`` real images; return the report lines.

    Cached-path rates repeat shuffled epochs for at least ``min_seconds`` each.  ``gpu`` adds
    the path to a CUDA device (default: when one is available).
    """
    cfg = PreprocessConfig(size=size)
    paths = sample_images(data_dir, n, seed)
    for p in paths:
        p.read_bytes()  # into the OS file cache, so the timing below is decoding, not disk
    lines = [f"images: {len(paths)} from {data_dir} (seed {seed}); config {cfg}"]

    start = time.perf_counter()
    for p in tqdm(paths, desc="decode+CLAHE+resize", unit="img", leave=False):
        load_prepared(p, cfg)
    source_rate = _rate(len(paths), time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        start = time.perf_counter()
        cache = build_cache(sample_manifest(paths, data_dir), data_dir, Path(tmp), cfg, progress=False)
        build_rate = _rate(len(paths), time.perf_counter() - start)
        split = cache.split("train")

        def raw(epoch: int) -> int:
            return sum(len(x) for x, _ in batches(split, batch_size, shuffle=True, seed=seed, epoch=epoch))

        def model_input(policy: AugmentPolicy, train: bool, device: str | None = None) -> Callable[[int], int]:
            gen = torch.Generator().manual_seed(seed)

            def run(epoch: int) -> int:
                count = 0
                for x, _ in batches(split, batch_size, shuffle=True, seed=seed, epoch=epoch, device=device):
                    count += len(to_model_input(x, policy, train=train, generator=gen))
                if device == "cuda":
                    torch.cuda.synchronize()  # count finished work, not queued kernels
                return count

            return run

        paper = AugmentPolicy.from_name("paper")
        cached_rate = _time_epochs(raw, min_seconds)
        input_rate = _time_epochs(model_input(AugmentPolicy.from_name("off"), train=False), min_seconds)
        paper_rate = _time_epochs(model_input(paper, train=True), min_seconds)
        gpu_rate = None
        measure_gpu = torch.cuda.is_available() if gpu is None else gpu
        if measure_gpu:
            gpu_rate = _time_epochs(model_input(paper, train=True, device="cuda"), min_seconds)

    lines += [
        f"(a) decode + CLAHE + resize from source files: {source_rate:10.1f} images/s",
        f"(b) batches from the cache (uint8, batch {batch_size}):   {cached_rate:10.1f} images/s",
        f"    cached / source speed-up: {cached_rate / source_rate:.0f}x",
        f"(c) (b) + to_model_input, policy off:          {input_rate:10.1f} images/s",
        f"(d) (b) + to_model_input, policy paper (CPU):   {paper_rate:10.1f} images/s",
        f"cache build (decode + preprocess + write):     {build_rate:10.1f} images/s",
    ]
    if gpu_rate is not None:
        lines.append(f"(e) (b) to the GPU + to_model_input, paper:     {gpu_rate:10.1f} images/s")
    else:
        lines.append("(e) GPU path not measured: no CUDA device asked for or on this machine")
    return lines


def bench_clahe_order(data_dir: Path, n: int, seed: int) -> list[str]:
    """Measure CLAHE before vs after resizing on ``n`` real images; return the report lines.

    Per output size: the mean absolute difference between the two orders, and each order's
    *cross-size consistency* — how far the 64 px image differs from the 224 px image shrunk to
    64 px (zero would mean the enhancement does not depend on the training size) — and speed.
    """
    images = [load_gray(p) for p in sample_images(data_dir, n, seed)]
    lines = [f"images: {len(images)} from {data_dir} (seed {seed}); mean source size "
             f"{np.mean([im.shape[0] for im in images]):.0f}x{np.mean([im.shape[1] for im in images]):.0f}"]
    for size in ORDER_SIZES:
        diffs = [clahe_order_difference(im, PreprocessConfig(size=size)) for im in images]
        lines.append(f"size {size}: before vs after resize differ by {np.mean([d['mean_abs'] for d in diffs]):.2f} "
                     f"grey levels on average; {100 * np.mean([d['frac_gt10'] for d in diffs]):.1f}% of pixels "
                     f"by more than {VISIBLE_DIFF}")
    small, large = ORDER_SIZES[0], ORDER_SIZES[-1]
    for stage in ("before_resize", "after_resize"):
        cfg_small = PreprocessConfig(size=small, resize="stretch", clahe_stage=stage)
        cfg_large = PreprocessConfig(size=large, resize="stretch", clahe_stage=stage)
        gaps = []
        for im in images:
            direct = prepare(im, cfg_small).astype(np.int16)
            shrunk = resize(prepare(im, cfg_large), small, "stretch").astype(np.int16)
            gaps.append(np.abs(direct - shrunk).mean())
        rates = []
        for size in ORDER_SIZES:
            cfg = PreprocessConfig(size=size, clahe_stage=stage)
            start = time.perf_counter()
            for im in images:
                prepare(im, cfg)
            rates.append(f"{size}px {_rate(len(images), time.perf_counter() - start):.0f} img/s")
        lines.append(f"{stage}: {small}px vs {large}px-shrunk-to-{small}px differ by {np.mean(gaps):.2f} grey levels; "
                     f"prepare() speed (decoded images) {', '.join(rates)}")
    return lines


def _add_sample_arguments(parser: argparse.ArgumentParser, report: str) -> None:
    """The options both measurements share: the data, the sample and the output folder."""
    add_data_dir(parser)
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="number of images")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    add_out(parser, f"the report, {report}")


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook bench loader``."""
    _add_sample_arguments(parser, "loader_<device>.txt")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--min-seconds", type=float, default=MIN_TIMED_SECONDS,
                        help="time each cached-path measurement for at least this long")
    add_device(parser, "the optional GPU path (e) (the CPU paths are always measured)")


def run_loader_command(args: argparse.Namespace) -> int:
    """``workbook bench loader``: measure the input pipeline, print the report (and write it to
    ``--out``); returns 0."""
    device = pick_device(args.device, verbose=False)
    body = bench_loader(resolve_data_dir(args.data_dir), args.n, args.size, args.batch_size, args.seed,
                        args.min_seconds, gpu=device.type == "cuda")
    emit(header(args.command_line) + body, args.out / report_name("loader", device) if args.out else None)
    return 0


def add_clahe_order_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook bench clahe-order``."""
    _add_sample_arguments(parser, CLAHE_ORDER_REPORT)


def run_clahe_order_command(args: argparse.Namespace) -> int:
    """``workbook bench clahe-order``: measure CLAHE before vs after resizing, print the report
    (and write it to ``--out``); returns 0."""
    body = bench_clahe_order(resolve_data_dir(args.data_dir), args.n, args.seed)
    emit(header(args.command_line) + body, args.out / CLAHE_ORDER_REPORT if args.out else None)
    return 0
