"""The GPU check: what one GPU machine does with this workbook, measured in one run of about 8 minutes.

Build its cache where the sources are, once (:mod:`nbhelpers.tools.gpu_cache`; ``gpu_cache/`` is
git-ignored), then run the check on the GPU machine with its own ``python3``, the repository and
that folder being all it needs::

    workbook gpu-check build-cache --data-dir D --out gpu_cache     # here
    bash benchmarks/gpu_check.sh                                    # there (or: make gpu-check)

The script runs ``python3 -m nbhelpers.tools.gpu_check --cache gpu_cache --out ${OUT:-results/benchmarks}``:
four steps, each writing one file that starts with the command, the hardware and the date.

1. ``gpu_env.txt``: GPUs (name, memory, compute capability), torch / CUDA / cuDNN / NCCL
   versions, bf16 support, and two measured ceilings (a bf16 matrix product, a device copy);
2. ``gpu_throughput.txt``: training images/s of densenet121, densenet121_cbam and resnet50 at
   224 px (bf16 autocast, channels_last), ``torch.compile`` off and on, through the real input
   pipeline (cache -> pinned memory -> augmentation on the GPU) and on bare GPU tensors, and their ratio;
3. ``gpu_protocol.txt``: the ``seed001`` protocol at full length (50 epochs, 224 px, seed 0) on
   the cached set for densenet121 and densenet121_cbam from scratch (the machine reaches no
   weights): test metrics with patient-level intervals, and the wall time;
4. ``gpu_ddp.txt``: torchrun / DistributedDataParallel with NCCL on the GPUs present against one
   process, for a few steps.

Each step has a share of the time budget (``--minutes``; time a step leaves unused passes on) and
stops between models or epochs when it is spent, saying so in its file.  A failing step or model
writes its error there and the rest still run (exit status 1).  ``--dry-run`` runs every step on
the CPU at toy size (32 px, 2 steps, 1 epoch, gloo).  The GPU machine lacks the curation's
imagehash and pydicom, papermill, grad-cam and ptflops: the steps import the package's training
code lazily, and ``data_prep`` imports imagehash only when it hashes images.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from data_prep.errors import WorkbookError
from nbhelpers.tools.gpu_cache import DEFAULT_CACHE, Packed, read_packed

DEFAULT_OUT = Path("results/benchmarks")
MODELS = ("densenet121", "densenet121_cbam", "resnet50")
PROTOCOL_MODELS = ("densenet121", "densenet121_cbam")
PROTOCOL = "seed001"
DEFAULT_MINUTES = 8.0
#: Each step's share of the budget, in order.
SHARES = {"env": 0.04, "throughput": 0.46, "protocol": 0.35, "ddp": 0.15}
#: Seconds a model's first compiled step is expected to need on the GPU (skipped when less is left).
COMPILE_SECONDS = 45.0
#: The toy sizes of --dry-run.
DRY = {"size": 32, "batch": 4, "steps": 2, "repeats": 1, "epochs": 1, "n_boot": 50, "per_split": 12}


class GpuCheckError(WorkbookError, RuntimeError):
    """The GPU check cannot run as asked: no CUDA GPU without --dry-run."""


@dataclass
class Check:
    """What every step works with."""

    data: Packed
    out: Path
    device: Any
    dry_run: bool
    command_line: str
    models: tuple[str, ...] = MODELS
    protocol_models: tuple[str, ...] = PROTOCOL_MODELS
    batch: int = 32
    steps: int = 16
    repeats: int = 2
    epochs: int | None = None  # None: the protocol's own
    n_boot: int = 1000
    failed: list[str] = field(default_factory=list)

    def subset(self, n: int):
        """The first ``n`` training images as a split (no short batch)."""
        from nbhelpers.pipeline.cache import CachedSplit

        train = self.data.splits["train"]
        n = min(n, len(train) - len(train) % self.batch)
        return CachedSplit("train", train.images[:n], train.labels[:n], train.image_ids[:n], train.path)


def _best_seconds(fn: Callable[[], None], device, repeats: int) -> float:
    from nbhelpers.tools.bench_ddp import sync

    best = float("inf")
    for _ in range(repeats):
        sync(device)
        begin = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - begin)
    return best


def _guarded(check: Check, what: str, lines: list[str], fn: Callable[[], Any]) -> Any:
    """``fn()``, or None after noting its failure in ``lines``: one model failing (a compiler
    error, say) must not hide the numbers of the others."""
    try:
        return fn()
    except Exception as error:  # recorded in the step's file and in the exit status
        check.failed.append(what)
        lines.append(f"FAILED {what}: {type(error).__name__}: {' '.join(str(error).split())[:500]}")
        return None


def step_env(check: Check, budget: float) -> list[str]:
    """Versions, GPUs and two measured ceilings (bf16 matrix product, device-to-device copy)."""
    import platform
    import subprocess

    import torch

    lines = [f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]
    for name in ("torchvision", "timm", "numpy", "pandas", "scipy", "sklearn", "cv2"):
        spec = importlib.util.find_spec(name)
        lines.append(f"{name}: {getattr(__import__(name), '__version__', '?') if spec else 'absent'}")
    device = check.device
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version()
        lines.append(f"NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}; "
                     f"GPUs: {torch.cuda.device_count()}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability "
                         f"{p.major}.{p.minor}, {p.multi_processor_count} multiprocessors")
        lines.append(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            lines += [f"nvidia-smi: {line}" for line in smi.stdout.splitlines()]
        except (OSError, subprocess.TimeoutExpired) as error:
            lines.append(f"nvidia-smi: not available ({error})")
    else:
        lines.append(f"no CUDA GPU: dry run on the CPU ({torch.get_num_threads()} torch threads)")
    n, dtype = (256, torch.float32) if check.dry_run else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    seconds = _best_seconds(lambda: [a @ b for _ in range(10)], device, 3)
    lines.append(f"measured: {str(dtype).split('.')[-1]} matrix product {n}^3: {2 * n**3 * 10 / seconds / 1e12:.3g} "
                 "TFLOP/s (random data, best of 3 x 10)")
    x = torch.empty(2**24 if check.dry_run else 2**30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = _best_seconds(lambda: [y.copy_(x) for _ in range(5)], device, 3)
    lines.append(f"measured: device copy of {x.numel() / 2**20:.0f} MiB: {2 * x.numel() * 5 / seconds / 1e9:.0f} GB/s "
                 "(bytes read + written)")
    return lines


def _throughput_row(check: Check, name: str, split, compiled: bool) -> dict[str, Any]:
    """Training images/s of one model: bare device tensors and the real input pipeline."""
    from dataclasses import replace

    import torch
    from torch import nn

    from nbhelpers import models
    from nbhelpers.pipeline.data import AugmentPolicy
    from nbhelpers.tools.bench_ddp import sync
    from nbhelpers.training.config import TrainConfig
    from nbhelpers.training.loop import amp_dtype, make_optimizer, prepare_model, run_epoch, train_step

    device, size = check.device, split.images.shape[-1]
    cfg = TrainConfig(batch_size=check.batch, seed=0, augment="paper")
    torch.manual_seed(0)
    model = models.create(name, num_classes=3, in_chans=cfg.in_chans)
    net = prepare_model(model, replace(cfg, compile=False), device)
    if compiled:
        net = torch.compile(net, backend="eager" if check.dry_run else "inductor")
    optimizer, dtype, loss_fn = make_optimizer(model, cfg), amp_dtype(cfg, device), nn.CrossEntropyLoss()
    x = torch.randn(check.batch, cfg.in_chans, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
    y = torch.randint(0, 3, (check.batch,), device=device)
    steps = len(split) // check.batch
    policy, generator = AugmentPolicy.from_name("paper"), torch.Generator().manual_seed(0)

    def bare() -> None:
        net.train()
        for _ in range(steps):
            train_step(net, x, y, loss_fn, optimizer, dtype, None)

    def data() -> None:
        run_epoch(net, split, cfg, device, policy, loss_fn, optimizer, None, dtype, epoch=1, generator=generator,
                  progress=False)

    begin = time.perf_counter()
    bare(), data(), sync(device)  # warm-up: kernels, cuDNN autotuning, compilation
    warm = time.perf_counter() - begin
    rates = {"train_bare": len(split) / _best_seconds(bare, device, check.repeats),
             "train_data": len(split) / _best_seconds(data, device, check.repeats)}
    return {"model": name, "compile": compiled, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "warmup_s": warm, **rates, "data/bare": rates["train_data"] / rates["train_bare"]}


def step_throughput(check: Check, budget: float) -> list[str]:
    """Images/s of every model, compile off then on, through the input pipeline and on bare tensors."""
    import pandas as pd
    import torch

    from nbhelpers.tools.bench_train import TARGET_RATIO

    end, split = time.monotonic() + budget, check.subset(check.steps * check.batch)
    lines = [f"{len(split)} cached training images at {split.images.shape[-1]} px, batch {check.batch}, "
             f"{len(split) // check.batch} steps per timing, best of {check.repeats} after one warm-up; Adam, "
             "augmentation 'paper' on the device, autocast as TrainConfig(amp='auto') picks, channels_last on CUDA"]
    rows = []
    for compiled in (False, True):
        for name in check.models:
            need = COMPILE_SECONDS if compiled and not check.dry_run else 0.0
            if time.monotonic() + need > end:
                lines.append(f"stopped early: {name} compile={compiled} not measured, the step's budget of "
                             f"{budget:.0f} s is spent")
                continue
            row = _guarded(check, f"{name} compile={compiled}", lines,
                           lambda: _throughput_row(check, name, split, compiled))
            rows += [row] if row else []
            if compiled:
                torch._dynamo.reset()
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
    if rows:
        table = pd.DataFrame(rows)
        lines += ["images/s (warmup_s: the first pass of each path, compilation included)",
                  table.to_string(index=False, float_format=lambda v: f"{v:,.2f}" if v < 10 else f"{v:,.1f}"),
                  f"lowest data/bare: {table['data/bare'].min():.2f} (target on a GPU: {TARGET_RATIO:.2f})"]
    return lines


class _BudgetSpent(GpuCheckError):
    """Raised after an epoch once a protocol run's share of the budget is spent (caught by the step)."""


def _ci_line(ci: list[dict[str, Any]], metric: str) -> str:
    row = next((r for r in ci if r["metric"] == metric), None)
    if row is None:
        return f"{metric}: n/a"
    return (f"{metric}: {row['value']:.4f} [{row['low']:.4f}, {row['high']:.4f}] "
            f"({row['unit']} bootstrap, {row['n_boot']})")


def step_protocol(check: Check, budget: float) -> list[str]:
    """The seed001 protocol for each protocol model from scratch: test metrics with intervals, wall time."""
    import tempfile

    import pandas as pd
    import torch

    from nbhelpers import models
    from nbhelpers.evaluation.predict import evaluate, predict
    from nbhelpers.settings.device import seed_everything
    from nbhelpers.training.checkpoint import load_checkpoint
    from nbhelpers.training.config import BEST_NAME, LOG_NAME, config_from_preset
    from nbhelpers.training.loop import fit

    overrides = {"epochs": check.epochs, "batch_size": check.batch} if check.epochs else {}
    cfg, extras = config_from_preset(PROTOCOL, seed=0, **overrides)
    train, val, test = (check.data.splits[s] for s in ("train", "val", "test"))
    lines = [f"protocol {PROTOCOL}: {extras['description']}", f"here: from scratch (pretrained=False), {cfg}",
             f"images: train {len(train)}, val {len(val)}, test {len(test)} at {train.images.shape[-1]} px"]
    end = time.monotonic() + budget

    def one(name: str, deadline: float) -> list[str]:
        def guard(log: pd.DataFrame) -> None:
            if time.monotonic() > deadline and len(log) < cfg.epochs:
                raise _BudgetSpent()

        seed_everything(cfg.seed)
        net = models.create(name, num_classes=3, in_chans=cfg.in_chans, pretrained=False)
        begin = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cxr-gpu-check-") as run_dir:
            try:
                fit(net, train, val, cfg, Path(run_dir), check.device, meta={"model": name}, progress=False,
                    on_epoch=guard)
                stopped = ""
            except _BudgetSpent:
                stopped = " (stopped early: its share of the step's budget was spent)"
            log = pd.read_csv(Path(run_dir) / LOG_NAME)
            trained = time.perf_counter() - begin
            load_checkpoint(Path(run_dir) / BEST_NAME, net, check.device)
        probs = predict(net, test, check.device, batch_size=cfg.batch_size, in_chans=cfg.in_chans)
        scores = evaluate(test.labels, probs, n_boot=check.n_boot, seed=cfg.seed,
                          patients=check.data.patients(test.image_ids))
        best = log.loc[log["val_acc"].idxmax()]
        out = ["", f"== {name}: {len(log)} of {cfg.epochs} epochs{stopped}; training {trained:.1f} s, "
                  f"with test scoring {time.perf_counter() - begin:.1f} s; best epoch {int(best['epoch'])} "
                  f"(val acc {best['val_acc']:.4f}); mean {log['train_images_per_s'].mean():.0f} train images/s",
                  f"test: {scores['n']} images of {scores['n_patients']} patients; ECE {scores['ece']:.4f}"]
        out += ["  " + _ci_line(scores["ci"], m) for m in
                  ("accuracy", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc")]
        out += ["  per class: " + "; ".join(f"{r['class']} sens {r['sensitivity']:.3f} spec {r['specificity']:.3f}"
                                           for r in scores["per_class"])]
        out += ["  log:", *("    " + row for row in log[["epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                                                         "seconds"]].round(4).to_string(index=False).splitlines())]
        return out

    for i, name in enumerate(check.protocol_models):
        deadline = time.monotonic() + (end - time.monotonic()) / (len(check.protocol_models) - i)
        lines += _guarded(check, name, lines, lambda: one(name, deadline)) or []
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def step_ddp(check: Check, budget: float) -> list[str]:
    """A few DDP training epochs under torchrun (NCCL on every GPU here; gloo in the dry run) against one process."""
    from nbhelpers.tools import bench_ddp

    return bench_ddp.check_lines(check.subset(check.steps * check.batch), check.models[0], check.batch,
                                 check.device.type, epochs=1 if check.dry_run else 2, budget=budget,
                                 entry="nbhelpers.tools.gpu_check")


STEPS: dict[str, tuple[str, Callable[[Check, float], list[str]]]] = {
    "env": ("gpu_env.txt", step_env), "throughput": ("gpu_throughput.txt", step_throughput),
    "protocol": ("gpu_protocol.txt", step_protocol), "ddp": ("gpu_ddp.txt", step_ddp),
}


def run_check(check: Check, minutes: float = DEFAULT_MINUTES, only: Sequence[str] | None = None) -> int:
    """Run the steps in order, each within its share of ``minutes``, writing its file to
    ``check.out``; returns 0, or 1 when a step failed (its file holds the error)."""
    import traceback

    from nbhelpers.tools.bench import emit
    from nbhelpers.tools.bench_train import header

    names = [n for n in STEPS if not only or n in only]
    end = time.monotonic() + minutes * 60
    for i, name in enumerate(names):
        shares = [SHARES[n] for n in names[i:]]
        budget = max(0.0, end - time.monotonic()) * SHARES[name] / sum(shares)
        file_name, step = STEPS[name]
        begin = time.perf_counter()
        try:
            body = step(check, budget)
        except Exception as error:  # a check harness: record it in the step's file and go on to the next step
            check.failed.append(name)
            body = [f"FAILED: {type(error).__name__}: {error}", *traceback.format_exc().splitlines()]
        took = time.perf_counter() - begin
        lines = header(check.command_line, check.device) + [
            f"step: {name}{' (dry run: CPU, toy size)' if check.dry_run else ''}; budget {budget:.0f} s, "
            f"took {took:.1f} s",
            f"cache: {check.data.meta.get('counts')} images per split, key {check.data.meta.get('cache_key')}",
            "", *body]
        emit(lines, check.out / file_name)
    return 1 if check.failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the check (``workbook gpu-check run``, ``python -m nbhelpers.tools.gpu_check``)."""
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, metavar="FOLDER",
                        help="folder of build-cache (default: gpu_cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FOLDER",
                        help="folder for gpu_*.txt (default: results/benchmarks)")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="time budget of all steps")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=None, help="run only these steps")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="models of the throughput and DDP steps")
    parser.add_argument("--protocol-models", nargs="+", default=list(PROTOCOL_MODELS),
                        help="models of the protocol step")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at toy size (checks the check)")


def run_command(args: argparse.Namespace) -> int:
    """Run the check; raises :class:`GpuCheckError` without a CUDA GPU (unless ``--dry-run``) or a cache."""
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise GpuCheckError(f"no CUDA GPU here (torch {torch.__version__}); run it on a GPU machine, "
                            "or pass --dry-run to check the check on the CPU")
    toy = DRY if args.dry_run else {}
    data = read_packed(args.cache, size=toy.get("size"), per_split=toy.get("per_split"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(1)
    else:  # as fit() sets them for a run that is not asked to be deterministic
        torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    check = Check(data=data, out=args.out, device=torch.device("cuda" if not args.dry_run else "cpu"),
                  dry_run=args.dry_run, command_line=getattr(args, "command_line", " ".join(sys.argv)),
                  models=tuple(args.models), protocol_models=tuple(args.protocol_models),
                  **({k: toy[k] for k in ("batch", "steps", "repeats", "epochs", "n_boot")} if toy else {}))
    return run_check(check, args.minutes, args.steps)


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m nbhelpers.tools.gpu_check ...``: the check (or, with ``--worker``, one process
    of its DDP step); a :class:`WorkbookError` is one line on stderr and exit status 2."""
    from data_prep.errors import run_reporting

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        from nbhelpers.tools import bench_ddp

        return bench_ddp.main(argv)
    parser = argparse.ArgumentParser(prog="python3 -m nbhelpers.tools.gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python3 -m nbhelpers.tools.gpu_check", *argv])
    return run_reporting(run_command, args)


if __name__ == "__main__":
    sys.exit(main())
