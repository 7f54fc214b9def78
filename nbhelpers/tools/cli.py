"""``workbook``: every command of the project, as subcommands of one program.

``workbook <subcommand> --help`` (or ``python -m nbhelpers <subcommand> --help``) lists a
subcommand's options.  Each subcommand's options and work live in the module that does the work,
as a pair of functions (one adds the options to a parser, one runs the parsed namespace); this
module only puts them together, so it imports them and none of them imports it.

The options shared by several subcommands mean the same everywhere: ``--data-dir`` (default
``$CXR_DATA_DIR``), ``--out`` (always a folder), ``--device`` (default ``auto``), ``--set
KEY=VALUE`` (typed by :mod:`nbhelpers.settings.keyvalue`) and ``--grid-root`` (the folder of
``workbook grid``'s runs).  A problem with the input or the setup
(:class:`data_prep.errors.WorkbookError`) is one line ``error: ...`` on stderr and exit status 2
(1 for a failing notebook); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from data_prep import command as curation_command
from data_prep import copies, download
from data_prep.datadir import DATA_ENV
from data_prep.errors import run_reporting
from nbhelpers.experiments import ablation, audit, explain, findings, shortcut
from nbhelpers.experiments import probes
from nbhelpers.models import complexity
from nbhelpers.tools import bench, bench_train, outputs
from nbhelpers.tools import bench_engine
from nbhelpers.tools import bench_curate, bench_ddp, bench_download, gpu_cache, gpu_check, lung_box
from nbhelpers.tools import run as workbook_run
from nbhelpers.training import command as training_command

PROG = "workbook"
DESCRIPTION = ("The chest X-ray workbook's commands, one subcommand each; "
               "`workbook SUBCOMMAND --help` lists the options of one.")


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its one-line help, the function adding its options and the one running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: The subcommands in the order of the work: run everything, curate, train, then the experiments
#: and the measurements.  ``audit`` and ``bench`` have subcommands of their own.
SUBCOMMANDS: dict[str, Subcommand | dict[str, Subcommand]] = {
    "run": Subcommand("run the notebooks in order under one profile (papermill)",
                      workbook_run.add_arguments, workbook_run.run_command),
    "html": Subcommand("check an executed run as a reader would, then render it to HTML pages",
                       outputs.add_arguments, outputs.run_command),
    "curate": Subcommand("curate the balanced COVID-19 / pneumonia / normal set from the sources",
                         curation_command.add_curate_arguments, curation_command.run_curate_command),
    "download": Subcommand("fetch the sources from upstream (pinned versions)",
                           download.add_download_arguments, download.run_download_command),
    "copies": Subcommand("measure the copy-finding thresholds on edited copies of real films",
                         copies.add_measure_arguments, copies.run_measure_command),
    "train": Subcommand("train one model under a protocol preset and score it once on the test split",
                        training_command.add_arguments, training_command.run_command),
    "grid": Subcommand("train the ablation grid over seeds and test each variant against its baseline",
                       ablation.add_arguments, ablation.run_command),
    "explain": Subcommand("CAM lung energy and the randomisation check of the grid's runs",
                          explain.add_arguments, explain.run_command),
    "audit": {
        "probe": Subcommand("train the architecture to tell the sources apart within one class",
                            probes.add_probe_arguments, probes.run_probe_command),
        "tables": Subcommand("per-source and within-source accuracy of a finished run",
                             audit.add_tables_arguments, audit.run_tables_command),
    },
    "shortcut": Subcommand("do the shortcut mitigations work? probes, within-source accuracy, blackout, external",
                           shortcut.add_arguments, shortcut.run_command),
    "findings": Subcommand("write the committed tables' readings into results/README.md (--check: are they current?)",
                           findings.add_arguments, findings.run_command),
    "complexity": Subcommand("parameters, MACs and CPU latency of every registered model",
                             complexity.add_arguments, complexity.run_command),
    "bench": {
        "loader": Subcommand("input-pipeline throughput: from source files and from the cache",
                             bench.add_loader_arguments, bench.run_loader_command),
        "clahe-order": Subcommand("CLAHE before against after resizing",
                                  bench.add_clahe_order_arguments, bench.run_clahe_order_command),
        "train": Subcommand("training and inference throughput per model",
                            bench_train.add_arguments, bench_train.run_command),
        "ddp": Subcommand("training throughput of N ranks under torchrun against one process with N threads",
                          bench_ddp.add_arguments, bench_ddp.run_command),
        "engine": Subcommand("Ray Tune's cost per trial against the same work in this process",
                             bench_engine.add_arguments, bench_engine.run_command),
        "download": Subcommand("`workbook download --teach` from a local server: bytes and seconds per source",
                               bench_download.add_arguments, bench_download.run_command),
        "curate": Subcommand("curation of 1,000 to 64,000 synthetic films: stages, band, memory, planted copies",
                             bench_curate.add_arguments, bench_curate.run_command),
    },
    "lung-box": Subcommand("the lung-crop rule against the ieee8023 lung masks",
                           lung_box.add_lung_box_arguments, lung_box.run_lung_box_command),
    "gpu-check": {
        "build-cache": Subcommand("curate and pack the paper set at 224 px for the GPU check (gpu_cache/)",
                                  gpu_cache.add_build_arguments, gpu_cache.run_build_command),
        "run": Subcommand("the GPU check: environment, throughput, the seed001 protocol, DDP (gpu_*.txt)",
                          gpu_check.add_arguments, gpu_check.run_command),
    },
}
#: The one-line help of the subcommands that have subcommands of their own.
GROUP_HELP = {"audit": "the shortcut audit of one run: source probe and per-source tables",
              "bench": "throughput and design measurements",
              "gpu-check": "a ready-made check of a GPU machine: build its cache here, run it there"}


def _add(parsers: argparse._SubParsersAction, name: str, subcommand: Subcommand) -> None:
    parser = parsers.add_parser(name, help=subcommand.help, description=subcommand.help)
    subcommand.add_arguments(parser)
    parser.set_defaults(handler=subcommand.run)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``workbook`` with every subcommand; the parsed namespace's ``handler`` runs it."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parsers = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, entry in SUBCOMMANDS.items():
        if isinstance(entry, Subcommand):
            _add(parsers, name, entry)
            continue
        group = parsers.add_parser(name, help=GROUP_HELP[name], description=GROUP_HELP[name])
        inner = group.add_subparsers(dest=f"{name}_subcommand", required=True, metavar="SUBCOMMAND")
        for inner_name, subcommand in entry.items():
            _add(inner, inner_name, subcommand)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: the process's arguments); ``command_line`` records the command as
    typed (``workbook grid --manifest ...``), for the headers of the files it writes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = recorded_command(argv)
    return args


#: Options naming the reader's own source folder: a recorded command shows the environment
#: setting in their place, so a committed header names the data by its manifest, not by a path
#: on the machine that made it.
FOLDER_OPTIONS = ("--data-dir",)


def recorded_command(argv: Sequence[str]) -> str:
    """``workbook <argv>`` as a shell line, each :data:`FOLDER_OPTIONS` value written as
    ``"$CXR_DATA_DIR"``."""
    words, keep = [PROG], list(argv)
    for i, word in enumerate(keep):
        option = word.split("=", 1)[0]
        if option in FOLDER_OPTIONS and "=" in word:
            words.append(f'{option}="${DATA_ENV}"')
        elif i and keep[i - 1] in FOLDER_OPTIONS:
            words.append(f'"${DATA_ENV}"')
        else:
            words.append(shlex.quote(word))
    return " ".join(words)


def dispatch(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand, letting every error propagate."""
    args = parse_args(argv)
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``workbook`` program: run the subcommand of ``argv``; a
    :class:`~data_prep.errors.WorkbookError` is one line on stderr and its exit status."""
    args = parse_args(argv)
    return run_reporting(args.handler, args)
