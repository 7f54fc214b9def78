"""Run the workbook: execute the ordered notebooks headlessly with papermill under one profile.

``workbook run --profile smoke --data-dir /path/to/cxr-sources`` (what ``make workbook`` calls)
executes ``notebooks/NN_*.ipynb`` in order, writes executed copies to ``results/runs/<profile>/``
and stops at the first failing notebook, naming it and the failing cell's error (exit status 1;
a setting that stops the run before anything runs exits with 2).

**Overrides** (``-p clahe=false -p image_size=32``) are resolved once, before anything runs: each
key must be a setting of the profile or a parameter that a selected notebook declares (else the
run stops, naming the closest matches), and each value must have that setting's type.  The
profile with its overrides is written to ``<run>/settings.json`` and every notebook reads it
(parameter ``settings_file``), so a setting reaches every notebook that uses it, also those that
do not declare it as a parameter; notebook-only parameters (``epochs``, ``errors``, ...) go to
the notebooks that declare them.  ``workbook_run.json`` records which notebooks got which.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from data_prep import datadir
from data_prep.atomic import write_text
from data_prep.errors import InputNotFoundError, WorkbookError
from data_prep.options import add_data_dir, add_out
from data_prep.progress import PROGRESS_ENV, QUIET
from nbhelpers.settings import config, keyvalue

NOTEBOOK_DIR = config.REPO_ROOT / "notebooks"
#: Per-cell limit in seconds: generous for a GPU epoch loop, yet a hung kernel ends the run.
DEFAULT_CELL_TIMEOUT = 4 * 3600
#: Seconds a second workbook run on the same run folder waits before it stops.
RUN_LOCK_TIMEOUT = 10


class NotebookFailed(WorkbookError, RuntimeError):
    """A notebook raised while running; the message names the notebook, the cell's error and the
    executed copy that holds the traceback.  The run exits with status 1 (not 2: the settings
    were fine, the notebook failed)."""

    exit_status = 1


class RunFolderBusy(WorkbookError, RuntimeError):
    """Another workbook run holds the run folder's lock."""


@dataclass
class NotebookResult:
    name: str
    output: Path
    seconds: float


def ordered_notebooks(folder: Path = NOTEBOOK_DIR, only: Sequence[str] = ()) -> list[Path]:
    """Return the workbook's notebooks ``NN_*.ipynb`` in run order, optionally only those whose
    number or name starts with one of ``only`` (e.g. ``["01", "04"]``); raise if none match."""
    notebooks = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in only)]
    if not notebooks:
        raise InputNotFoundError(f"no notebooks matching {list(only) or 'NN_*.ipynb'} in {folder}")
    return notebooks


def ensure_kernel(name: str = config.KERNEL_NAME) -> None:
    """Register this Python environment as Jupyter kernel ``name`` if no kernel of that name
    exists, so papermill (and JupyterLab) find the kernel the notebooks declare."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name in KernelSpecManager().find_kernel_specs():
        return
    from ipykernel.kernelspec import install

    install(kernel_name=name, display_name=f"Python ({name})", prefix=sys.prefix)
    print(f"registered Jupyter kernel {name!r} for {sys.executable}")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``["epochs=3", "model=resnet50"]`` into a dict without checking the keys (see
    :func:`nbhelpers.settings.keyvalue.parse_value` for how values read); :func:`resolve_overrides`
    is the checked form the runner uses."""
    return keyvalue.parse_assignments(pairs, flag="-p")


def declared_parameters(notebooks: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Per notebook name, the parameters its ``parameters`` cell declares with their defaults (as
    Python values where the cell writes a literal, so a default of ``8`` says "an integer")."""
    import papermill as pm

    return {nb.name: {k: _literal(v.get("default")) for k, v in pm.inspect_notebook(str(nb)).items()}
            for nb in notebooks}


def _literal(source: Any) -> Any:
    try:
        return ast.literal_eval(source) if isinstance(source, str) else source
    except (ValueError, SyntaxError):
        return source


@dataclass
class ResolvedRun:
    """The settings of one workbook run, resolved once: the profile's values with the overrides
    applied (``values``), the overrides as given (``overrides``), and per notebook the
    notebook-only parameters it receives (``notebook_parameters``)."""

    values: dict[str, Any]
    overrides: dict[str, Any]
    notebook_parameters: dict[str, dict[str, Any]]

    def applied_to(self, declared: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """Per override, the notebooks it reaches: all of them for a profile setting (through
        ``settings.json``), those declaring it for a notebook-only parameter."""
        return {key: sorted(declared) if key in self.values else
                sorted(nb for nb, params in declared.items() if key in params) for key in self.overrides}


def resolve_overrides(profile: str, pairs: Sequence[str], declared: dict[str, dict[str, Any]]) -> ResolvedRun:
    """Resolve ``-p KEY=VALUE`` items for ``profile`` and the selected notebooks (``declared``,
    from :func:`declared_parameters`), before anything runs.

    Raises :class:`nbhelpers.settings.keyvalue.AssignmentError` for a key that neither the profile nor any
    selected notebook knows (naming close matches), for a runner option given as a parameter
    (``profile``, ``data_dir``, ...) and for a value of the wrong type.
    """
    values = config.load_profile(profile)
    schema: dict[str, Any] = dict(config.profile_schema(values))
    for params in declared.values():
        for key, default in params.items():
            if key not in schema and key not in config.RUN_PARAMETERS:
                schema[key] = config.NOTEBOOK_PARAMETERS.get(key, keyvalue.expected_type(default))
    for pair in pairs:
        key = pair.partition("=")[0].strip()
        if key in config.RUN_PARAMETERS:
            flag = {"profile": "--profile", "data_dir": "--data-dir", "run_dir": "--out"}.get(key, "no flag: the runner writes it")
            raise keyvalue.AssignmentError(f"-p {key}=... is the runner's own setting; use {flag}")
    overrides = keyvalue.parse_assignments(
        pairs, schema, what=f"a setting of profile {profile!r} nor a parameter of the selected notebooks", flag="-p")
    for key, value in overrides.items():
        if value is None and key in values and key not in config.OPTIONAL_SETTINGS:
            raise keyvalue.AssignmentError(f"-p {key}=none: {key} needs a value ({keyvalue.type_name(schema[key])})")
    resolved = dict(values)
    resolved.update({k: v for k, v in overrides.items() if k in values})  # none is kept: min_age=none keeps every age
    per_notebook = {nb: {k: v for k, v in overrides.items() if k in params and k not in values}
                    for nb, params in declared.items()}
    return ResolvedRun(values=resolved, overrides=overrides, notebook_parameters=per_notebook)


def _failure_message(notebook: Path, output: Path, error: Exception) -> str:
    ename = getattr(error, "ename", type(error).__name__)
    evalue = getattr(error, "evalue", str(error))
    cell = getattr(error, "exec_count", None)
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"notebook {notebook.name} failed{where}: {ename}: {evalue}\n  executed copy: {output}"


def local_kernel_manager() -> type:
    """The kernel manager papermill starts its kernels with: IPC sockets in the runtime folder,
    not TCP on localhost, so the kernel has nothing to warn about (no "running over TCP without
    encryption" in a headless log) and nothing listens on a port."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(transport="ipc", **kwargs)

    return IPCKernelManager


def run_notebook(notebook: Path, output: Path, parameters: dict[str, Any], cell_timeout: int,
                 declared: dict[str, Any] | None = None) -> float:
    """Execute one notebook with papermill, passing only the parameters it declares (``declared``,
    read from the notebook when not given); return its wall time in seconds or raise
    :class:`NotebookFailed`."""
    import papermill as pm

    if declared is None:
        declared = pm.inspect_notebook(str(notebook))
    passed = {k: v for k, v in parameters.items() if k in declared}
    start = time.perf_counter()
    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = QUIET  # the kernel inherits it: one line per progress bar, headless
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=passed,
            kernel_name=config.KERNEL_NAME,
            cwd=str(notebook.parent),
            execution_timeout=cell_timeout,
            progress_bar=True,
            kernel_manager_class=local_kernel_manager(),
        )
    except Exception as error:  # papermill raises its own error type, nbclient timeouts others
        raise NotebookFailed(_failure_message(notebook, output, error)) from error
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous
    return time.perf_counter() - start


def run_workbook(
    profile: str = "teach",
    data_dir: str | None = None,
    out_dir: Path | None = None,
    only: Sequence[str] = (),
    overrides: Sequence[str] = (),
    cell_timeout: int = DEFAULT_CELL_TIMEOUT,
    notebook_dir: Path = NOTEBOOK_DIR,
) -> list[NotebookResult]:
    """Run the ordered notebooks of ``notebook_dir`` under ``profile`` with ``overrides``
    (``KEY=VALUE`` items); return one :class:`NotebookResult` each.

    Checks the profile, the overrides (:func:`resolve_overrides`), their values
    (:func:`nbhelpers.tools.validate.check_settings`) and the data folder before
    anything runs, so a wrong setting fails in a second rather than after an hour.  Writes the
    resolved settings to ``<run>/settings.json`` for every notebook.  Raises
    :class:`NotebookFailed` at the first failure.
    """
    config.load_profile(profile)
    notebooks = ordered_notebooks(notebook_dir, only=only)
    declared = declared_parameters(notebooks)
    resolved = resolve_overrides(profile, overrides, declared)
    from nbhelpers.tools.validate import check_settings

    check_settings(resolved.values)
    data = datadir.data_dir(data_dir)
    run_dir = (out_dir or config.RESULTS_DIR / "runs" / profile).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    lock = FileLock(str(run_dir / ".workbook.lock"))
    try:
        lock.acquire(timeout=RUN_LOCK_TIMEOUT)
    except Timeout:
        raise RunFolderBusy(f"{run_dir} is in use by another workbook run (lock {run_dir / '.workbook.lock'}); "
                             "wait for it to finish or pass another --out") from None
    try:
        return _run_locked(profile, data, run_dir, notebooks, declared, resolved, cell_timeout)
    finally:
        lock.release()


def _run_locked(profile: str, data: Path, run_dir: Path, notebooks: Sequence[Path], declared: dict[str, dict[str, Any]],
                resolved: ResolvedRun, cell_timeout: int) -> list[NotebookResult]:
    """:func:`run_workbook` once the run folder is locked; ``workbook_run.json`` is written also
    when a notebook fails, saying which ran, which failed and which overrides reached which."""
    settings_file = config.write_settings(run_dir, profile, resolved.values, resolved.overrides)
    ensure_kernel()
    base = {"profile": profile, "data_dir": str(data), "run_dir": str(run_dir), "settings_file": str(settings_file)}
    for notebook in notebooks:
        if "settings_file" not in declared[notebook.name]:
            raise NotebookFailed(f"notebook {notebook.name} declares no settings_file parameter, so the run's "
                                 "settings cannot reach it; add `settings_file = None` to its parameters cell")
    results: list[NotebookResult] = []
    failed: str | None = None
    try:
        for i, notebook in enumerate(notebooks, 1):
            print(f"[{i}/{len(notebooks)}] {notebook.name} (profile {profile})", flush=True)
            output = run_dir / notebook.name
            parameters = {**base, **resolved.notebook_parameters[notebook.name]}
            failed = notebook.name
            seconds = run_notebook(notebook, output, parameters, cell_timeout, declared[notebook.name])
            failed = None
            print(f"[{i}/{len(notebooks)}] {notebook.name} done in {seconds:.0f} s -> {output}", flush=True)
            results.append(NotebookResult(notebook.name, output, seconds))
    finally:
        summary = {
            "profile": profile,
            "data_dir": str(data),
            "overrides": resolved.overrides,
            "overrides_reach": resolved.applied_to(declared),
            "settings": resolved.values,
            "notebooks": {r.name: round(r.seconds, 1) for r in results},
            "failed": failed,
            "total_seconds": round(sum(r.seconds for r in results), 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        write_text(run_dir / "workbook_run.json", json.dumps(summary, indent=2, default=str) + "\n")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook run``."""
    parser.add_argument("--profile", default="teach",
                        help="run profile from nbhelpers/settings/profiles.toml: smoke, teach (default) or full")
    add_data_dir(parser)
    add_out(parser, "the executed notebooks and everything they write", default_text="results/runs/<profile>")
    parser.add_argument("--only", nargs="+", default=(), metavar="NN", help="run only notebooks starting with these numbers")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a profile setting or notebook parameter (repeatable), e.g. -p epochs=3")
    parser.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT, help="seconds one cell may run")
    parser.add_argument("--list", action="store_true", help="list the notebooks and profiles, run nothing")


def run_command(args: argparse.Namespace) -> int:
    """``workbook run``: list the notebooks and profiles, or run the workbook; returns 0 when every
    notebook ran (a failing notebook raises :class:`NotebookFailed`, exit status 1)."""
    if args.list:
        for nb in ordered_notebooks():
            print(nb.name)
        for name, values in config.load_profiles().items():
            print(f"profile {name}: {values.get('description', '')}")
        return 0
    data = None if args.data_dir is None else str(args.data_dir)
    results = run_workbook(args.profile, data, args.out, args.only, args.param, args.cell_timeout)
    print(f"workbook: {len(results)} notebooks ran in {sum(r.seconds for r in results):.0f} s")
    return 0
