"""What a Ray Tune trial costs beyond its work: the same fixed CPU work in this process and as trials.

``workbook bench engine [--trials 5 --trial-seconds 60 --ray-cpus 1 --out FOLDER]`` (the report
goes to ``engine_cpu.txt`` in the ``--out`` folder).

The work of a trial is a sleep-free loop of integer arithmetic in pure Python (one core, no I/O),
calibrated here to take about ``--trial-seconds``; every trial does the same number of steps.
It runs ``--trials`` times one after another in this process (``--engine local``), then as the
trials of one experiment of ``--engine ray`` (:func:`nbhelpers.experiments.engines.run_jobs`, one
CPU per trial, on a Ray started here with ``--ray-cpus`` CPUs: with one, the trials run one after
another as they did here).  The report gives Ray's start, the median wall time of a trial in
process and inside its Ray worker, the experiment's wall time per trial (``trials x median /
CPUs`` is what it would be without any cost), and the overhead of each against the in-process
median.  Other work on the machine slows every timing: the header gives the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from data_prep.options import add_out
from nbhelpers.experiments.engines import LOCAL, Engine, EngineError, Job, connect, run_jobs

DEFAULT_TRIALS = 5
DEFAULT_TRIAL_SECONDS = 60.0
#: Steps of the calibration run (a fraction of a second on a current CPU).
CALIBRATION_STEPS = 2_000_000


def spin(steps: int) -> int:
    """``steps`` steps of integer arithmetic: fixed CPU work, no sleeping, no I/O; returns the result
    (so that the loop cannot be skipped)."""
    x = 0
    for i in range(steps):
        x = (x * 31 + i) % 1_000_003
    return x


def calibrate(seconds: float) -> int:
    """The number of :func:`spin` steps that take about ``seconds`` here."""
    started = time.perf_counter()
    spin(CALIBRATION_STEPS)
    return max(1, round(CALIBRATION_STEPS * seconds / (time.perf_counter() - started)))


def measure(trials: int, seconds: float, ray_cpus: int, root: Path) -> dict[str, float]:
    """Time ``trials`` trials of about ``seconds`` each in this process and through Ray (logs under
    ``root``); returns the measured numbers (seconds, and percentages for the overheads)."""
    import ray

    steps = calibrate(seconds)
    jobs = [Job(root / f"trial{i}", (steps,)) for i in range(trials)]
    here = run_jobs(spin, jobs, LOCAL, root, desc="in process")
    engine = Engine(name="ray", ray_cpus=ray_cpus, max_failures=0)
    engine.check()
    started = time.perf_counter()
    started_here = connect(engine)
    ray_start = time.perf_counter() - started
    try:
        started = time.perf_counter()
        inside = run_jobs(spin, jobs, engine, root, desc="engine bench", verbose=0)
        experiment = time.perf_counter() - started
    finally:
        if started_here:
            ray.shutdown()
    median_here, median_inside = statistics.median(here), statistics.median(inside)
    per_trial = experiment * min(ray_cpus, trials) / trials
    return {"steps": steps, "ray_start": ray_start, "median_here": median_here, "median_inside": median_inside,
            "experiment": experiment, "per_trial": per_trial,
            "inside_overhead": 100 * (median_inside - median_here) / median_here,
            "trial_overhead_s": per_trial - median_here,
            "trial_overhead": 100 * (per_trial - median_here) / median_here}


def format_report(numbers: dict[str, float], trials: int, ray_cpus: int) -> list[str]:
    """The report's lines for :func:`measure`'s ``numbers``."""
    n = numbers
    return [
        f"work per trial: {n['steps']:,.0f} steps of integer arithmetic (pure Python, one core); "
        f"{trials} trials; Ray with {ray_cpus} CPU(s), 1 CPU per trial",
        f"Ray start (ray.init here):             {n['ray_start']:8.2f} s (once per command)",
        f"median trial, in this process:         {n['median_here']:8.2f} s",
        f"median trial, inside its Ray worker:   {n['median_inside']:8.2f} s ({n['inside_overhead']:+.1f} %)",
        f"Ray experiment, wall x CPUs / trials:  {n['per_trial']:8.2f} s "
        f"({n['trial_overhead_s']:+.2f} s, {n['trial_overhead']:+.1f} % per trial)",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook bench engine``."""
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="trials per engine")
    parser.add_argument("--trial-seconds", type=float, default=DEFAULT_TRIAL_SECONDS,
                        help="work of one trial, calibrated in seconds here (default: 60)")
    parser.add_argument("--ray-cpus", type=int, default=1,
                        help="CPUs of the Ray started here, one per trial (default: 1, trials one after another)")
    add_out(parser, "the report, engine_cpu.txt")


def run_command(args: argparse.Namespace) -> int:
    """``workbook bench engine``: run the benchmark, print the report (and write it to ``--out``);
    returns 0.  Raises :class:`~nbhelpers.experiments.engines.EngineError` when Ray is missing or
    cannot start, or for fewer than one trial, CPU or second."""
    import torch

    # Imported here: a Ray worker imports this module for spin() and needs neither torch nor the rest.
    from nbhelpers.tools.bench import emit, header, report_name

    if args.trials < 1 or args.ray_cpus < 1 or args.trial_seconds <= 0:
        raise EngineError(f"--trials and --ray-cpus must be 1 or more and --trial-seconds above 0, got "
                          f"{args.trials}, {args.ray_cpus}, {args.trial_seconds:g}")
    lines = header(args.command_line) + [
        f"load average at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}"]
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        numbers = measure(args.trials, args.trial_seconds, args.ray_cpus, Path(tmp))
    emit(lines + format_report(numbers, args.trials, args.ray_cpus),
         args.out / report_name("engine", torch.device("cpu")) if args.out else None)
    return 0
