"""``workbook train --model M --manifest F --data-dir D --preset P --seed S --out O``: one training
run from the shell.  It runs :func:`nbhelpers.training.runs.train_run` and prints the test summary.

``torchrun --nproc-per-node N -m nbhelpers train ...`` trains the same run on N processes with
DistributedDataParallel (NCCL on GPUs, gloo on the CPU; ``--dist-backend`` chooses, ``--sync-bn``
synchronises BatchNorm on GPUs); ``--set batch_size`` stays the global batch, and rank 0 alone
writes and prints (:mod:`nbhelpers.training.distributed`).

A problem with the input or the setup (unknown preset, setting or model, a value of the wrong
type, a missing manifest or data folder, a run folder in use, a damaged or foreign ``last.pt``
with ``--resume``, a full disk) raises a :class:`~data_prep.errors.WorkbookError`, which the
``workbook`` program reports as one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_prep.options import add_data_dir, add_out
from nbhelpers.evaluation import metrics as M
from nbhelpers.settings.options import add_assignments, add_device, add_set
from nbhelpers.training import distributed
from nbhelpers.training.config import parse_options, parse_preprocess, parse_set
from nbhelpers.training import tracking
from nbhelpers.training.runs import train_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook train``."""
    parser.add_argument("--model", required=True, help="registered model name (nbhelpers.models.list_models())")
    parser.add_argument("--manifest", type=Path, required=True, help="curated manifest.csv (workbook curate)")
    add_data_dir(parser)
    add_out(parser, "the run: checkpoints, log, metrics and test predictions", required=True)
    parser.add_argument("--preset", default="seed001", help="training protocol in nbhelpers/settings/presets.toml")
    parser.add_argument("--seed", type=int, default=0)
    add_device(parser, "training")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="preprocessing cache folder (default: OUT/cache)")
    parser.add_argument("--workers", type=int, default=1, help="threads decoding images for the cache")
    add_assignments(parser, "--option", "model options", "attention=none")
    add_set(parser)
    add_assignments(parser, "--preprocess", "PreprocessConfig fields", "clahe=false")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--track", choices=tracking.TRACKERS, default=None,
                        help="also send every epoch's curves to TensorBoard (OUT/tensorboard) or MLflow; off by default")
    parser.add_argument("--n-boot", type=int, default=M.N_BOOTSTRAP, help="bootstrap resamples for the test CIs")
    parser.add_argument("--dist-backend", choices=distributed.BACKENDS, default="auto",
                        help="under torchrun: nccl (CUDA GPUs), gloo (CPU) or auto (nccl on CUDA, else gloo)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")


def run_command(args: argparse.Namespace) -> int:
    """``workbook train``: run :func:`~nbhelpers.training.runs.train_run` with the parsed options
    and print the test summary; returns 0.  ``--set`` values are typed by the TrainConfig field
    (or ``image_size`` / ``pretrained``) they set, ``--preprocess`` values by the
    PreprocessConfig field; ``--option`` values are parsed only (the model checks them).  Under
    torchrun the process joins the run's process group first and only rank 0 prints; raises
    :class:`~nbhelpers.training.distributed.DistributedSetupError` for ``--dist-backend nccl``
    without GPUs, and for ``--dist-backend``/``--sync-bn`` outside torchrun."""
    ranks = None
    if distributed.launched():
        ranks = distributed.start(args.device, args.dist_backend, args.sync_bn)
    elif args.dist_backend != "auto" or args.sync_bn:
        raise distributed.DistributedSetupError(
            "--dist-backend and --sync-bn apply to a run started by torchrun "
            "(torchrun --nproc-per-node N -m nbhelpers train ...); leave them out for one process")
    try:
        result = train_run(
            args.model, args.manifest, args.data_dir, args.out, preset=args.preset, seed=args.seed,
            device=args.device, model_options=parse_options(args.option, args.model), cache_root=args.cache_root,
            preprocess=parse_preprocess(args.preprocess), workers=args.workers, resume=args.resume,
            n_boot=args.n_boot, progress=ranks is None or ranks.main, ranks=ranks, track=args.track,
            **parse_set(args.set),
        )
    finally:
        distributed.stop(ranks)
    if ranks is not None and not ranks.main:
        return 0
    test = result.metrics["test"] or {}
    print(json.dumps({k: v for k, v in test.items() if not isinstance(v, (dict, list))}, indent=2))
    print(f"run written to {result.out_dir}")
    return 0
