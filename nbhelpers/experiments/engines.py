"""Where the grid's runs train: in this process (``local``), as Ray Tune trials (``ray``) or as a
SLURM job array through submitit (``slurm``).

:func:`nbhelpers.experiments.ablation.run_grid` first decides which runs must train (a finished run
whose record matches what would be trained now is reused); what is left is a list of :class:`Job`:
calls of one training function, each writing one run folder.  :func:`run_jobs` makes the calls: one after another here (the default, as it
always was), or each call as one Ray trial or one array task, with the same function, the same
arguments and the same folder.  So the tables do not depend on the engine, and any engine finishes
what another one started: run the command again, what finished is reused by its record and only the
rest trains.  That is also how a crashed Ray experiment resumes: a new experiment over the runs
still missing, not ``Tuner.restore`` of the old one, whose list of trials names runs that may have
finished (or changed settings) since.

* **Ray** (:mod:`nbhelpers.experiments.engine_ray`): one trial per run through ``ray.tune.Tuner``
  (a ``grid_search`` over the jobs), ``--cpus-per-trial`` and ``--gpus-per-trial`` (``0.25``: four
  trials share a GPU) per trial, ``--max-failures`` retries of a trial that crashed.  It joins the
  cluster at ``--address`` (or ``$RAY_ADDRESS``), else starts Ray here with ``--ray-cpus`` CPUs.
* **SLURM** (:mod:`nbhelpers.experiments.engine_slurm`): one submitit job array
  (``--partition``, ``--time-min``, ``--gpus-per-job``, ``--cpus-per-job``,
  ``--array-parallelism``), the failed tasks submitted again up to ``--max-failures`` times.
  ``--slurm-cluster local`` runs the array as processes of this machine, ``debug`` in this process.

Their logs go to ``<grid root>/engine_logs/{ray,slurm}/``.  Paths of a job are made absolute
before it leaves this process (a trial starts in its own folder); on a cluster of several machines
the grid root, the manifest and the data folder must be on a file system that all of them share.
Every option is checked before anything is written: an engine that is not installed, a Ray
address that does not answer, ``--engine slurm`` where there is no ``sbatch``, or GPUs asked of a
machine without any raise :class:`EngineError`.  ``workbook bench engine``
(:mod:`nbhelpers.tools.bench_engine`) measures what a Ray trial costs beyond its work.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from data_prep.errors import WorkbookError, first_line
from data_prep.progress import tqdm

ENGINES = ("local", "ray", "slurm")
#: Where ``--engine slurm`` sends its array: SLURM itself, processes of this machine, or this process.
SLURM_CLUSTERS = ("slurm", "local", "debug")
#: The pins of requirements.txt, named in the message when a package is missing.
RAY_PIN = "ray[tune]==2.60.0"
SUBMITIT_PIN = "submitit==1.5.4"
#: The folder under the grid root that holds the engines' own logs and records.
LOG_DIR = "engine_logs"
#: Seconds a Ray address has to accept a connection before it counts as unreachable.
CONNECT_TIMEOUT = 5.0
#: The options that only one engine reads (fields of :class:`Engine`).
RAY_OPTIONS = ("address", "ray_cpus", "cpus_per_trial", "gpus_per_trial")
SLURM_OPTIONS = ("partition", "time_min", "gpus_per_job", "cpus_per_job", "array_parallelism", "slurm_cluster")
#: Retries of a run that crashed on Ray or SLURM.
MAX_FAILURES = 2
#: Tries to start Ray here: its processes must come up within 30 s, which a busy machine can miss.
START_ATTEMPTS = 3


class EngineError(WorkbookError, ValueError):
    """Options the chosen engine cannot run with, a package it lacks or a cluster it cannot reach."""


class RunsFailed(WorkbookError, RuntimeError):
    """Runs that still failed on Ray or SLURM after their retries; the message names the first
    one, what it raised and the folder of the engine's logs, which hold every traceback."""


@dataclass(frozen=True)
class Job:
    """One call of the training function: ``function(*args, **kwargs)`` writes the run ``folder``."""

    folder: Path
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def portable(self) -> "Job":
        """The same call with every :class:`~pathlib.Path` argument made absolute, for a process
        that starts in another folder."""
        def absolute(value: Any) -> Any:
            return value.absolute() if isinstance(value, Path) else value

        return Job(Path(self.folder).absolute(), tuple(absolute(a) for a in self.args),
                   {k: absolute(v) for k, v in self.kwargs.items()})


@dataclass(frozen=True)
class Engine:
    """Where :func:`run_jobs` trains, and with what (see the module docstring for each option)."""

    name: str = "local"
    address: str | None = None
    ray_cpus: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = MAX_FAILURES
    partition: str | None = None
    time_min: int = 60
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    array_parallelism: int = 16
    slurm_cluster: str = "slurm"

    def ray_address(self) -> str | None:
        """The Ray cluster to join: ``address``, else ``$RAY_ADDRESS``; ``None``: start one here."""
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def check(self, device: str = "auto") -> None:
        """Raise :class:`EngineError` for anything that would stop this engine from training with
        ``device`` (the ``--device`` of the runs), before any folder is written."""
        if self.name not in ENGINES:
            raise EngineError(f"unknown engine {self.name!r}; use one of {', '.join(ENGINES)}")
        if self.max_failures < 0:
            raise EngineError(f"--max-failures must be 0 or more, got {self.max_failures}")
        if self.name == "ray":
            _check_ray(self, device)
        elif self.name == "slurm":
            _check_slurm(self, device)


LOCAL = Engine()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _no_gpu_here(flag: str, value: float, fix: str) -> EngineError:
    return EngineError(f"{flag} {value:g} asks for GPUs, but this machine has none (torch.cuda.is_available() "
                       f"is False): {fix}")


def _check_ray(engine: Engine, device: str) -> None:
    try:
        importlib.import_module("ray.tune")  # only for --engine ray: it takes seconds
    except ImportError as error:
        raise EngineError(f"--engine ray needs Ray Tune, which is not installed here ({first_line(error)}): "
                          f"pip install '{RAY_PIN}'") from None
    if engine.cpus_per_trial <= 0:
        raise EngineError(f"--cpus-per-trial must be above 0, got {engine.cpus_per_trial:g}")
    gpus = engine.gpus_per_trial
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise EngineError(f"--gpus-per-trial must be a fraction of one GPU (0.25, 0.5) or a whole number, got {gpus:g}")
    if engine.ray_cpus is not None and engine.ray_cpus < 1:
        raise EngineError(f"--ray-cpus must be 1 or more, got {engine.ray_cpus}")
    address = engine.ray_address()
    if address is None and gpus > 0 and not _cuda_available():
        raise _no_gpu_here("--gpus-per-trial", gpus, "drop it, or give --address of a Ray cluster with GPUs")
    if gpus == 0 and device.startswith("cuda"):
        raise EngineError(f"--device {device} needs --gpus-per-trial above 0: a trial sees only the GPUs Ray gives it")
    if gpus == 0 and address is None and _cuda_available():
        print("note: with --gpus-per-trial 0 the trials train on the CPU, though this machine has a GPU")
    if address is not None:
        check_reachable(address, "--address" if engine.address else "$RAY_ADDRESS")


def check_reachable(address: str, origin: str = "--address") -> None:
    """Raise :class:`EngineError` when nothing accepts a connection at the Ray ``address``
    (``host:port`` or ``ray://host:port``; ``auto`` and other names are left to Ray) within
    :data:`CONNECT_TIMEOUT` seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        raise unreachable(address, origin, error.strerror or str(error) or type(error).__name__) from None


def unreachable(address: str, origin: str, why: str) -> EngineError:
    """The one-line error for a Ray cluster that does not answer at ``address``."""
    drop = "drop --address" if origin == "--address" else "unset RAY_ADDRESS"
    return EngineError(f"cannot reach Ray at {address}: {why}; start one with `ray start --head` or {drop}")


def _check_slurm(engine: Engine, device: str) -> None:
    try:
        importlib.import_module("submitit")
    except ImportError as error:
        raise EngineError(f"--engine slurm needs submitit, which is not installed here ({first_line(error)}): "
                          f"pip install '{SUBMITIT_PIN}'") from None
    if engine.slurm_cluster not in SLURM_CLUSTERS:
        raise EngineError(f"unknown --slurm-cluster {engine.slurm_cluster!r}; use one of {', '.join(SLURM_CLUSTERS)}")
    if engine.slurm_cluster == "slurm" and shutil.which("sbatch") is None:
        raise EngineError("no SLURM here (sbatch not found): use --engine local or --engine ray")
    for flag, value, least in (("--time-min", engine.time_min, 1), ("--gpus-per-job", engine.gpus_per_job, 0),
                               ("--cpus-per-job", engine.cpus_per_job, 1),
                               ("--array-parallelism", engine.array_parallelism, 1)):
        if value < least:
            raise EngineError(f"{flag} must be {least} or more, got {value}")
    if engine.slurm_cluster != "slurm" and engine.gpus_per_job > 0 and not _cuda_available():
        raise _no_gpu_here("--gpus-per-job", engine.gpus_per_job, "drop it, or run on SLURM (--slurm-cluster slurm)")
    if engine.gpus_per_job == 0 and device.startswith("cuda"):
        raise EngineError(f"--device {device} needs --gpus-per-job 1 or more: a job sees only the GPUs SLURM gives it")


def run_jobs(function: Callable[..., Any], jobs: Sequence[Job], engine: Engine | None = None,
             root: Path | str = ".", desc: str = "runs", verbose: int = 1) -> list[float]:
    """Make every call of ``jobs`` with ``engine`` (default: one after another in this process,
    with a ``desc`` progress bar), the engine's logs under ``root/engine_logs``; returns each
    call's wall seconds as measured where it ran, in the order of ``jobs``.

    The local engine raises what ``function`` raises, at the first failing call.  Ray and SLURM
    make every call (each up to ``1 + max_failures`` times), then raise :class:`RunsFailed`
    naming the first failed folder, its error and the logs; :class:`EngineError` when Ray cannot
    be reached or started.  ``engine.check`` is the caller's, before it writes anything.
    """
    engine = engine or LOCAL
    if engine.name == "local":
        seconds = []
        for job in tqdm(jobs, desc=desc, unit="run"):
            started = time.perf_counter()
            function(*job.args, **job.kwargs)
            seconds.append(time.perf_counter() - started)
        return seconds
    if not jobs:
        return []  # nothing to train: no cluster to start or join
    jobs = [job.portable() for job in jobs]
    logs = Path(root).absolute() / LOG_DIR / engine.name
    name = f"{'-'.join(desc.split())}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
    if engine.name == "ray":
        from nbhelpers.experiments.engine_ray import tune_jobs

        started_here = connect(engine)
        print(f"ray: {len(jobs)} runs as the trials of {logs / name} ({engine.cpus_per_trial:g} CPU, "
              f"{engine.gpus_per_trial:g} GPU each; up to {engine.max_failures} retries)")
        try:
            outcome = tune_jobs(function, jobs, {"cpu": engine.cpus_per_trial, "gpu": engine.gpus_per_trial},
                                engine.max_failures, logs, name, verbose)
        finally:
            if started_here:
                import ray

                ray.shutdown()
        where, records = "Ray", logs / name
    else:
        from nbhelpers.experiments.engine_slurm import array_jobs

        parameters = {"name": f"workbook-{name}", "timeout_min": engine.time_min, "gpus_per_node": engine.gpus_per_job,
                      "cpus_per_task": engine.cpus_per_job, "slurm_partition": engine.partition,
                      "slurm_array_parallelism": engine.array_parallelism}
        outcome = array_jobs(function, jobs, parameters, engine.slurm_cluster, logs, engine.max_failures, desc)
        where, records = f"SLURM ({engine.slurm_cluster})", logs
    failed = [(job, error) for job, (error, _) in zip(jobs, outcome) if error is not None]
    raise_failures(failed, len(jobs), where, 1 + engine.max_failures, records)
    return [seconds for _, seconds in outcome]


def connect(engine: Engine) -> bool:
    """Join the Ray cluster at ``engine.ray_address()``, or start Ray here with ``ray_cpus`` CPUs
    (no dashboard; the workers' output stays in Ray's logs); returns whether this call did, so that
    the caller shuts down only what it started.  Ray already running in this process is used as it
    is.  Raises :class:`EngineError` when Ray cannot be reached or started."""
    import ray

    if ray.is_initialized():
        return False
    address = engine.ray_address()
    for attempt in range(1 if address is not None else START_ATTEMPTS):
        try:
            if address is not None:
                ray.init(address=address, log_to_driver=False)
            else:  # "local": a Ray of its own, never a cluster that an earlier `ray start` left running
                ray.init(address="local", num_cpus=engine.ray_cpus, include_dashboard=False, log_to_driver=False)
            return True
        except Exception as error:  # ray.init raises a bare Exception when its processes start too slowly
            ray.shutdown()  # what did start of this try
            if address is not None:
                raise unreachable(address, "--address" if engine.address else "$RAY_ADDRESS",
                                  first_line(error)) from None
            if attempt == START_ATTEMPTS - 1:
                raise EngineError(f"cannot start Ray here ({START_ATTEMPTS} tries): {first_line(error)}; "
                                  "give --address of a running cluster") from None
    return True


def raise_failures(failed: Sequence[tuple[Job, BaseException | str]], total: int, where: str, tries: int,
                   logs: Path) -> None:
    """Raise for the ``failed`` (job, error) pairs of ``total`` runs, if any (see :func:`run_jobs`)."""
    if not failed:
        return
    job, error = min(failed, key=lambda pair: str(pair[0].folder))
    text = error if isinstance(error, str) else f"{type(error).__name__}: {first_line(error)}"
    message = (f"{len(failed)} of {total} runs failed on {where} ({tries} tries each); first: {job.folder}: {text}; "
               f"logs under {logs}; run the command again to train only the runs that did not finish")
    raise RunsFailed(message)


def add_engine(parser: argparse.ArgumentParser, what: str = "the runs") -> None:
    """``--engine local|ray|slurm`` and the options of Ray and SLURM, for a command that trains ``what``."""
    group = parser.add_argument_group("engine", f"where {what} train (default: one after another in this process)")
    group.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: in this process; ray: Ray Tune trials; slurm: a submitit job array")
    group.add_argument("--max-failures", type=int, default=MAX_FAILURES,
                       help=f"ray, slurm: retries of a run that crashed (default: {MAX_FAILURES})")
    group.add_argument("--address", help="ray: the cluster to join (default: $RAY_ADDRESS, else start Ray here)")
    group.add_argument("--ray-cpus", type=int, help="ray: CPUs of a Ray started here (default: all)")
    group.add_argument("--cpus-per-trial", type=float, help="ray: CPUs per trial (default: 1)")
    group.add_argument("--gpus-per-trial", type=float,
                       help="ray: GPUs per trial, whole or a fraction (0.25: four trials share one; default: 0)")
    group.add_argument("--partition", help="slurm: the partition (default: the cluster's)")
    group.add_argument("--time-min", type=int, help="slurm: minutes each job may run (default: 60)")
    group.add_argument("--gpus-per-job", type=int, help="slurm: GPUs per job (default: 0)")
    group.add_argument("--cpus-per-job", type=int, help="slurm: CPUs per job (default: 1)")
    group.add_argument("--array-parallelism", type=int, help="slurm: jobs of the array running at once (default: 16)")
    group.add_argument("--slurm-cluster", choices=SLURM_CLUSTERS,
                       help="slurm: where the array runs; local: processes of this machine, debug: this process "
                            "(both for laptops and tests; default: slurm)")


def from_args(args: argparse.Namespace) -> Engine:
    """The :class:`Engine` of :func:`add_engine`'s options (an option not given keeps the default
    of :class:`Engine`); raises :class:`EngineError` for an option of another engine than the one
    chosen (``--gpus-per-trial`` without ``--engine ray``)."""
    chosen = {"ray": RAY_OPTIONS, "slurm": SLURM_OPTIONS}.get(args.engine, ())
    given = {name: getattr(args, name) for name in (*RAY_OPTIONS, *SLURM_OPTIONS) if getattr(args, name, None) is not None}
    for name in given:
        if name not in chosen:
            owner = "ray" if name in RAY_OPTIONS else "slurm"
            raise EngineError(f"--{name.replace('_', '-')} is an option of --engine {owner}, not of --engine {args.engine}")
    return Engine(name=args.engine, max_failures=args.max_failures, **given)
