"""The grid's runs as a SLURM job array through submitit (``--engine slurm``;
:mod:`nbhelpers.experiments.engines` chooses and checks).

One ``submitit.AutoExecutor`` array per round: every job one task, its resources from the command
line (``update_parameters``: ``timeout_min``, ``gpus_per_node``, ``cpus_per_task``,
``slurm_partition``, ``slurm_array_parallelism``), the tasks that failed submitted again in the
next round, up to ``max_failures`` rounds more.  The cluster ``local`` runs the tasks as
processes of this machine, ``debug`` in this process (a failure there opens the debugger, as
submitit's debug executor does).  submitit is imported only when this engine runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from data_prep.progress import tqdm

if TYPE_CHECKING:
    from nbhelpers.experiments.engines import Job


def _task(function: Callable[..., Any], job: "Job") -> float:
    """One task of the array: the job's call; returns its wall seconds."""
    started = time.perf_counter()
    function(*job.args, **job.kwargs)
    return time.perf_counter() - started


def error_text(error: BaseException) -> str:
    """What a failed task raised, on one line.  For a task of another process submitit passes the
    traceback as text between two rules of dashes, then the paths of the task's logs: the last
    line of the traceback names the error, the ``.err`` log holds all of it."""
    blocks = [[line.strip() for line in block.splitlines() if line.strip()] for block in str(error).split("-" * 22)]
    if len(blocks) < 3 or not blocks[1]:
        lines = [line for block in blocks for line in block]
        return lines[-1] if lines else type(error).__name__
    logs = [line.removeprefix("- ") for line in blocks[-1] if line.endswith(".err")]
    return blocks[1][-1] + (f" (traceback in {logs[0]})" if logs else "")


def array_jobs(function: Callable[..., Any], jobs: Sequence["Job"], parameters: Mapping[str, Any], cluster: str,
               folder: Path, max_failures: int, desc: str = "runs") -> list[tuple[str | None, float]]:
    """Run every job as one task of a job array on ``cluster`` (``slurm``, ``local`` or
    ``debug``) with the executor ``parameters``, logs under ``folder/<job id>``; returns, in the
    order of ``jobs``, each task's error of its last try as one line (``None`` when it finished)
    and its wall seconds."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    executor.update_parameters(**parameters)
    outcome: list[tuple[str | None, float]] = [(None, float("nan"))] * len(jobs)
    pending = list(range(len(jobs)))
    for attempt in range(1 + max_failures):
        tasks = executor.map_array(_task, [function] * len(pending), [jobs[i] for i in pending])
        print(f"slurm ({cluster}): {len(tasks)} runs as job array {tasks[0].job_id.split('_')[0]}, logs under {folder}"
              + (f" (retry {attempt} of the failed ones)" if attempt else ""))
        failed = []
        for index, task in zip(pending, tqdm(tasks, desc=desc)):
            try:
                outcome[index] = (None, float(task.result()))
            except Exception as error:  # a failed task is kept for the retry; the others are still awaited
                outcome[index] = (error_text(error), float("nan"))
                failed.append(index)
        pending = failed
        if not pending:
            break
    return outcome
