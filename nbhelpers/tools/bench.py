"""Throughput and design measurements of the image pipeline, run from the command line.

``python -m nbhelpers.tools.bench loader --data-dir D [--n N --size S --batch-size B --out FILE]``
prints images/s for (a) decode + CLAHE + resize from the source files and (b) batches from the
preprocessing cache (plus (b) followed by :func:`nbhelpers.pipeline.data.to_model_input`, without and
with the ``paper`` augmentation, on the CPU).  ``python -m nbhelpers.tools.bench clahe-order ...``
prints the evidence behind CLAHE-before-resize (see :mod:`nbhelpers.pipeline.preprocess`).

The images are the first ``N`` of a seeded shuffle of every image file under the data folder
(annotation masks excluded); labels are irrelevant to speed and assigned in turn.  Source files
are read once before timing, so (a) measures decoding, not the disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from data_prep.atomic import write_text
from data_prep.schema import CLASSES
from data_prep.datadir import data_dir as resolve_data_dir
from nbhelpers.pipeline.data import AugmentPolicy, batches, to_model_input
from data_prep.images import IMAGE_SUFFIXES, load_gray
from nbhelpers.pipeline.preprocess import (
    PreprocessConfig,
    build_cache,
    clahe_order_difference,
    load_prepared,
    prepare,
    resize,
)

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


def sample_images(data_dir: Path, n: int, seed: int) -> list[Path]:
    """Return ``n`` image files under ``data_dir`` (seeded shuffle, annotation masks skipped).

    Raises FileNotFoundError naming the folder when it holds no images.
    """
    files = sorted(
        p for p in data_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not set(SKIP_FOLDERS) & set(p.relative_to(data_dir).parts)
    )
    if not files:
        raise FileNotFoundError(
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


def header(argv: Sequence[str]) -> list[str]:
    """Lines naming the command, date, machine and library versions, for the top of a result file."""
    return [
        f"$ python -m nbhelpers.tools.bench {shlex.join(argv)}",
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
    data_dir: Path, n: int, size: int, batch_size: int, seed: int, min_seconds: float = MIN_TIMED_SECONDS
) -> list[str]:
    """Measure both loading paths on ``n`` real images; return the report lines.

    Cached-path rates repeat shuffled epochs for at least ``min_seconds`` each.
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
        if torch.cuda.is_available():
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
        lines.append("(e) GPU path not measured: no CUDA device on this machine")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``loader`` or ``clahe-order``; prints the report and optionally writes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m nbhelpers.tools.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("loader", "clahe-order"):
        p = sub.add_parser(name)
        p.add_argument("--data-dir", default=None, help="source folder (default: $CXR_DATA_DIR)")
        p.add_argument("--n", type=int, default=DEFAULT_N, help="number of images")
        p.add_argument("--seed", type=int, default=DEFAULT_SEED)
        p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
        if name == "loader":
            p.add_argument("--size", type=int, default=DEFAULT_SIZE)
            p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
            p.add_argument("--min-seconds", type=float, default=MIN_TIMED_SECONDS,
                           help="time each cached-path measurement for at least this long")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    if args.command == "loader":
        body = bench_loader(data_dir, args.n, args.size, args.batch_size, args.seed, args.min_seconds)
    else:
        body = bench_clahe_order(data_dir, args.n, args.seed)
    emit(header(argv) + body, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
