"""The grid's runs as Ray Tune trials (``--engine ray``; :mod:`nbhelpers.experiments.engines` chooses,
checks and connects).

One ``ray.tune.Tuner`` experiment per command: a ``grid_search`` over the indices of the jobs, each
trial one call of the training function with its resources (``tune.with_resources``), a crashed
trial retried up to ``max_failures`` times (``FailureConfig``), the experiment's records under
``<grid root>/engine_logs/ray/<name>``.  Ray is imported only when this engine runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from nbhelpers.experiments.engines import Job


def _trial(config: Mapping[str, Any], function: Callable[..., Any], jobs: Sequence["Job"]) -> None:
    """One trial: the job of index ``config["job"]``, its wall time reported to Tune."""
    from ray import tune

    job = jobs[config["job"]]
    started = time.perf_counter()
    function(*job.args, **job.kwargs)
    tune.report({"seconds": time.perf_counter() - started})


def cause(error: BaseException) -> BaseException:
    """The error a trial's function raised, out of the wrappers Ray puts around it."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def tune_jobs(function: Callable[..., Any], jobs: Sequence["Job"], resources: Mapping[str, float], max_failures: int,
              storage: Path, name: str, verbose: int = 1) -> list[tuple[BaseException | None, float]]:
    """Run every job as one trial of the experiment ``storage/name`` on the Ray this process is
    connected to, with ``resources`` (``{"cpu": 1, "gpu": 0.25}``) per trial; returns, in the
    order of ``jobs``, each trial's error (``None`` when it finished, else what the function
    raised, or Ray's error for a worker that died) and the wall seconds the trial measured."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(_trial, function=function, jobs=list(jobs)), dict(resources))
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search(list(range(len(jobs))))},
        # A reused worker keeps its imports (torch and timm take seconds to import on a busy CPU).
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    outcome: list[tuple[BaseException | None, float]] = [(None, float("nan"))] * len(jobs)
    for result in tuner.fit():
        error = cause(result.error) if result.error is not None else None
        outcome[result.config["job"]] = (error, float((result.metrics or {}).get("seconds", float("nan"))))
    return outcome
