"""Run the workbook: execute the ordered notebooks headlessly with papermill under one profile.

``python -m nbhelpers.run --profile smoke --data-dir /path/to/cxr-sources`` (or the ``workbook``
console script) executes ``notebooks/NN_*.ipynb`` in order, passes each the parameters it
declares, writes executed copies to ``results/runs/<profile>/`` and stops at the first
failing notebook, naming it and the failing cell's error.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nbhelpers import config

NOTEBOOK_DIR = config.REPO_ROOT / "notebooks"
#: Per-cell limit in seconds: generous for a GPU epoch loop, yet a hung kernel ends the run.
DEFAULT_CELL_TIMEOUT = 4 * 3600


class NotebookFailed(RuntimeError):
    """A notebook raised while running; the message names the notebook and the cell's error."""


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
        raise FileNotFoundError(f"no notebooks matching {list(only) or 'NN_*.ipynb'} in {folder}")
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
    """Turn ``["epochs=3", "model='resnet50'"]`` into a dict; values are Python literals where
    they parse as one, else plain strings (so ``model=resnet50`` works too)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"parameter {pair!r} is not of the form name=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _failure_message(notebook: Path, output: Path, error: Exception) -> str:
    ename = getattr(error, "ename", type(error).__name__)
    evalue = getattr(error, "evalue", str(error))
    cell = getattr(error, "exec_count", None)
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"notebook {notebook.name} failed{where}: {ename}: {evalue}\n  executed copy: {output}"


def run_notebook(notebook: Path, output: Path, parameters: dict[str, Any], cell_timeout: int) -> float:
    """Execute one notebook with papermill, passing only the parameters it declares; return
    its wall time in seconds or raise :class:`NotebookFailed`."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    passed = {k: v for k, v in parameters.items() if k in declared}
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=passed,
            kernel_name=config.KERNEL_NAME,
            cwd=str(notebook.parent),
            execution_timeout=cell_timeout,
            progress_bar=True,
        )
    except Exception as error:  # papermill raises its own error type, nbclient timeouts others
        raise NotebookFailed(_failure_message(notebook, output, error)) from error
    return time.perf_counter() - start


def run_workbook(
    profile: str = "full",
    data_dir: str | None = None,
    out_dir: Path | None = None,
    only: Sequence[str] = (),
    overrides: dict[str, Any] | None = None,
    cell_timeout: int = DEFAULT_CELL_TIMEOUT,
) -> list[NotebookResult]:
    """Run the ordered notebooks under ``profile``; return one :class:`NotebookResult` each.

    Checks the profile and the data folder before anything runs, so a wrong setting fails in
    a second rather than after an hour.  Raises :class:`NotebookFailed` at the first failure.
    """
    config.load_profile(profile)
    data = config.data_dir(data_dir)
    run_dir = (out_dir or config.RESULTS_DIR / "runs" / profile).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_kernel()
    notebooks = ordered_notebooks(only=only)
    parameters = {"profile": profile, "data_dir": str(data), "run_dir": str(run_dir), **(overrides or {})}
    results: list[NotebookResult] = []
    for i, notebook in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {notebook.name} (profile {profile})", flush=True)
        output = run_dir / notebook.name
        seconds = run_notebook(notebook, output, parameters, cell_timeout)
        print(f"[{i}/{len(notebooks)}] {notebook.name} done in {seconds:.0f} s -> {output}", flush=True)
        results.append(NotebookResult(notebook.name, output, seconds))
    summary = {
        "profile": profile,
        "data_dir": str(data),
        "parameters": parameters,
        "notebooks": {r.name: round(r.seconds, 1) for r in results},
        "total_seconds": round(sum(r.seconds for r in results), 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    (run_dir / "workbook_run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbook", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", help="run profile from nbhelpers/profiles.toml (default: full)")
    parser.add_argument("--data-dir", help=f"folder of the upstream sources (default: ${config.DATA_ENV})")
    parser.add_argument("--out", type=Path, help="where executed notebooks and results go (default: results/runs/<profile>)")
    parser.add_argument("--only", nargs="+", default=(), metavar="NN", help="run only notebooks starting with these numbers")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a notebook parameter (repeatable), e.g. -p epochs=3")
    parser.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT, help="seconds one cell may run")
    parser.add_argument("--list", action="store_true", help="list the notebooks and profiles, run nothing")
    args = parser.parse_args(argv)
    if args.list:
        for nb in ordered_notebooks():
            print(nb.name)
        for name, values in config.load_profiles().items():
            print(f"profile {name}: {values.get('description', '')}")
        return 0
    try:
        results = run_workbook(args.profile, args.data_dir, args.out, args.only,
                               parse_overrides(args.param), args.cell_timeout)
    except (NotebookFailed, config.DataNotFoundError, config.ProfileError, FileNotFoundError, ValueError) as error:
        print(f"workbook: {error}", file=sys.stderr)
        return 1
    print(f"workbook: {len(results)} notebooks ran in {sum(r.seconds for r in results):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
