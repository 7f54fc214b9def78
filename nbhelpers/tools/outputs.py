"""Read an executed notebook as a student would, and list what would trip them up.

:func:`output_problems` returns one line per problem in an executed notebook: an error output,
a stderr block longer than :data:`MAX_STDERR_LINES`, a warning raised by the project's own code,
a ``PosixPath(...)`` shown as a result, a path of the machine it ran on, a count printed as a
float (``20.000``), a committed table's header shown twice, a parameter holding a literal
``$VARIABLE``, or a notebook that does not end with its lessons: a markdown cell headed
``Takeaway``, the run's own bullets ("In this run") and one to three "Try this" exercises.  The tests run it on the committed
``teach`` run and on a fresh smoke run; ``workbook html`` refuses to render a run that has any.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterable, Sequence

from data_prep.atomic import write_text
from data_prep.errors import WorkbookError
from data_prep.options import add_out

#: Longest stderr block a notebook may show (a line or two of a library's notice is fine).
MAX_STDERR_LINES = 5
#: How a takeaway cell begins.
TAKEAWAY = re.compile(r"^#+\s*Takeaway", re.IGNORECASE | re.MULTILINE)
#: A warning printed by Python's warnings module from a file of this project.
OWN_WARNING = re.compile(r"(nbhelpers|data_prep)/[\w/]+\.py:\d+: \w*Warning")
#: Any warning category printed by the warnings module, e.g. ``TqdmWarning: IProgress not found``.
ANY_WARNING = re.compile(r"\b\w*Warning: ")
#: Absolute paths of a machine (a home, a temp or a work folder) that mean nothing to a reader.
#: A parameter whose value is a literal ``$VARIABLE`` (``data_dir = '$CXR_DATA_DIR'``).
LITERAL_VARIABLE = re.compile(r"=\s*['\"](\$\w+)")
#: The injected parameters a published notebook sets to None: their defaults (the environment's
#: CXR_DATA_DIR, results/runs/<profile>, the profile itself) hold on the reader's machine, this
#: machine's folders do not.
MACHINE_PARAMETERS = ("data_dir", "run_dir", "settings_file")
HOST_PATH = re.compile(r"(?<![\w.$~])/(?:root|home|tmp|work|Users|var/folders)/[\w.-]+")
#: A "Try this" exercise cell: ``### Try this: `name = value` `` (the change to make).
TRY_THIS = re.compile(r"^#+\s*Try this: `(\w+) = (.+?)`", re.MULTILINE)
MAX_EXERCISES = 3
#: What the run's own takeaway bullets are headed (``Session.takeaway``).
RUN_TAKEAWAY = "In this run"
#: A committed table's provenance header (``Made by `command` on date; ...``), to its first full stop.
HEADER = re.compile(r"^Made by `[^`]+` on [^\n]+", re.MULTILINE)
#: A cell of a table as notebooks show it (pandas' Styler HTML): its column and its text.
TABLE_CELL = re.compile(r'class="data row\d+ (col\d+)"\s*>([^<]*)<')
#: A whole number printed with zero decimals (``20.000``).
WHOLE_AS_FLOAT = re.compile(r"-?\d+\.0+")


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else str(text)


def output_problems(notebook: dict, allowed_warnings: Sequence[str] = (), injected: bool = True) -> list[str]:
    """Problems a reader would meet in the executed ``notebook`` (an nbformat dict), one line
    each, naming the cell.  ``allowed_warnings`` are substrings of warnings from other libraries
    that are accepted (each must be justified where it is passed).  With ``injected`` false the
    parameters papermill injected (this machine's folders, until :func:`publish` replaces them)
    are not read."""
    problems: list[str] = []
    cells = notebook.get("cells", [])
    for number, cell in enumerate(cells):
        where = f"cell {number}"
        is_injected = "injected-parameters" in cell.get("metadata", {}).get("tags", [])
        skip = not injected and is_injected
        if cell.get("cell_type") == "code" and not skip and (match := HOST_PATH.search("".join(cell.get("source", "")))):
            problems.append(f"{where}: a path of this machine in the cell's code: {match.group(0)}")
        if is_injected and (match := LITERAL_VARIABLE.search("".join(cell.get("source", "")))):
            problems.append(f"{where}: an injected parameter holds the literal {match.group(1)}, which Run All cannot "
                            "resolve; publish it as None (the environment setting)")
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            kind, text = output.get("output_type"), _text(output)
            if kind == "error":
                problems.append(f"{where}: error output {output.get('ename')}: {output.get('evalue')}")
                continue
            if kind == "stream" and output.get("name") == "stderr":
                lines = [line for line in text.splitlines() if line.strip()]
                if len(lines) > MAX_STDERR_LINES:
                    problems.append(f"{where}: stderr block of {len(lines)} lines: {lines[0][:80]!r} ...")
            for match in ANY_WARNING.finditer(text):
                line = text[max(0, text.rfind("\n", 0, match.start()) + 1):].splitlines()[0]
                if OWN_WARNING.search(line) or not any(a in line for a in allowed_warnings):
                    problems.append(f"{where}: warning shown: {line.strip()[:120]}")
            html = "".join(output.get("data", {}).get("text/html", "")) if kind != "stream" else ""
            for shown in float_count_columns(html):
                problems.append(f"{where}: a count printed as a float: {shown}")
            if kind in ("execute_result", "display_data") and "PosixPath(" in text:
                problems.append(f"{where}: a Path object shown as a result: {text.strip()[:80]}")
            if kind != "error" and (match := HOST_PATH.search(text)):
                problems.append(f"{where}: a path of this machine shown: {match.group(0)}")
    problems += _ending_problems(cells) + _repeated_headers(cells)
    return problems


def float_count_columns(html: str) -> list[str]:
    """The first cell of each column of a shown table whose every value is a whole number printed
    with decimals (``20.000``; at least one of them 2 or more): a count that became a float.  A
    column of measurements that holds one whole value among others (``4.000`` beside ``1.561``) is
    not one."""
    columns: dict[str, list[str]] = {}
    for column, value in TABLE_CELL.findall(html):
        if value.strip():
            columns.setdefault(column, []).append(value.strip())
    return [values[0] for values in columns.values()
            if all(WHOLE_AS_FLOAT.fullmatch(v) for v in values) and any(abs(float(v)) >= 2 for v in values)]


def _ending_problems(cells: list[dict]) -> list[str]:
    """The notebook must end with its lessons: a markdown cell headed 'Takeaway', then only the
    run's own bullets (code cells, whose output, once executed, says "In this run") and one to
    three "Try this" cells."""
    heads = [i for i, c in enumerate(cells) if c.get("cell_type") == "markdown" and TAKEAWAY.search(_source(c))]
    if not heads:
        return ["end: no markdown cell headed 'Takeaway'"]
    problems, tries = [], 0
    for number, cell in enumerate(cells[heads[-1] + 1:], start=heads[-1] + 1):
        if not _source(cell).strip():
            continue
        if cell.get("cell_type") == "markdown" and TRY_THIS.match(_source(cell)):
            tries += 1
        elif cell.get("cell_type") == "code" and tries == 0:
            shown = " ".join(_text(o) + str(o.get("data", {}).get("text/markdown", "")) for o in cell.get("outputs", []))
            if cell.get("execution_count") is not None and RUN_TAKEAWAY not in shown:
                problems.append(f"cell {number}: the run's takeaway shows nothing headed {RUN_TAKEAWAY!r}")
        else:
            problems.append(f"cell {number}: after the takeaway, only the run's bullets and 'Try this' cells belong")
    if not 1 <= tries <= MAX_EXERCISES:
        problems.append(f"end: {tries} 'Try this' cells after the takeaway (1 to {MAX_EXERCISES} belong there)")
    return problems


def _repeated_headers(cells: list[dict]) -> list[str]:
    """A committed table's provenance header shown more than once in one notebook."""
    seen: dict[str, int] = {}
    for cell in cells:
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            for header in HEADER.findall(_text(output)):
                seen[header] = seen.get(header, 0) + 1
    return [f"the header {h[:60]!r}... is shown {n} times (once is enough)" for h, n in seen.items() if n > 1]


def _source(cell: dict) -> str:
    return "".join(cell.get("source", ""))


def run_problems(paths: Iterable[Path], allowed_warnings: Sequence[str] = (), injected: bool = True) -> dict[str, list[str]]:
    """:func:`output_problems` of each executed notebook in ``paths``, keyed by its name (only
    those with problems)."""
    import nbformat

    out = {}
    for path in paths:
        found = output_problems(nbformat.read(path, as_version=4), allowed_warnings, injected)
        if found:
            out[Path(path).name] = found
    return out


class UnreadableRun(WorkbookError, ValueError):
    """An executed run holds problems a reader would meet (see :func:`output_problems`)."""


def render_html(run_dir: Path, out_dir: Path, allowed_warnings: Sequence[str] = ()) -> list[Path]:
    """Render the executed notebooks ``NN_*.ipynb`` of ``run_dir`` to ``out_dir/NN_*.html`` (nbconvert's
    lab template, figures embedded) with an ``index.html`` linking them in order; return the pages.
    Refuses (:class:`UnreadableRun`, nothing written) when a notebook has a problem."""
    import nbformat
    from nbconvert import HTMLExporter

    notebooks = sorted(Path(run_dir).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise UnreadableRun(f"no executed notebooks NN_*.ipynb in {run_dir}: run `workbook run --out {run_dir}` first")
    problems = run_problems(notebooks, allowed_warnings)
    if problems:
        first = next(iter(problems.items()))
        raise UnreadableRun(f"{sum(map(len, problems.values()))} problem(s) in {len(problems)} notebook(s), e.g. "
                            f"{first[0]}: {first[1][0]}; fix them and rerun before rendering")
    exporter = HTMLExporter(template_name="lab")
    pages = []
    for path in notebooks:
        body, _ = exporter.from_notebook_node(nbformat.read(path, as_version=4))
        pages.append(write_text(Path(out_dir) / f"{path.stem}.html", body))
    links = "\n".join(f'<li><a href="{p.name}">{p.stem.replace("_", " ")}</a></li>' for p in pages)
    write_text(Path(out_dir) / "index.html", f"<!doctype html><meta charset='utf-8'><title>cxr-workbook</title>"
                                             f"<h1>cxr-workbook: the executed notebooks</h1><ol>\n{links}\n</ol>\n")
    return pages


def published_parameters(params: dict) -> str:
    """The injected-parameters cell of a published notebook: the run's parameters, with those
    naming this machine's folders (:data:`MACHINE_PARAMETERS`) set to None, so Run All resolves
    them on the reader's machine (``CXR_DATA_DIR``, ``results/runs/<profile>``)."""
    lines = [f"{k} = {None if k in MACHINE_PARAMETERS else v!r}" for k, v in params.items()]
    return "\n".join(["# Parameters (this machine's folders set to None: your CXR_DATA_DIR and results/runs/<profile>)",
                      *lines])


def publish(run_dir: Path, dest: Path) -> list[Path]:
    """Copy the executed notebooks of ``run_dir`` and its ``workbook_run.json`` to ``dest`` with
    this machine's folders replaced by what a reader can use (see
    :func:`nbhelpers.settings.config.display_path`) in the parameters papermill injected and in
    its metadata; returns the copied notebooks."""
    import json

    import nbformat

    from nbhelpers.settings.config import display_path

    def shown(value):
        return display_path(value) if isinstance(value, str) and value.startswith("/") else value

    copied = []
    for path in sorted(Path(run_dir).glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        params = nb.metadata.get("papermill", {}).get("parameters", {})
        for key, value in list(params.items()):
            params[key] = shown(value)
        for cell in nb.cells:
            if "injected-parameters" in cell.metadata.get("tags", []):
                cell.source = published_parameters(params)
        for key in ("input_path", "output_path"):
            if key in nb.metadata.get("papermill", {}):
                nb.metadata["papermill"][key] = Path(nb.metadata["papermill"][key]).name
        copied.append(write_text(Path(dest) / path.name, nbformat.writes(nb) + "\n"))
    record = Path(run_dir) / "workbook_run.json"
    if record.is_file():
        data = json.loads(record.read_text())
        data["data_dir"] = shown(data.get("data_dir"))
        write_text(Path(dest) / record.name, json.dumps(data, indent=2) + "\n")
    return copied


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook html``."""
    parser.add_argument("run_dir", type=Path, help="folder of an executed run (workbook run --out)")
    add_out(parser, "the HTML pages", default_text="RUN_DIR/html")
    parser.add_argument("--publish", type=Path, metavar="FOLDER",
                        help="first copy the run's notebooks and timings here, without this machine's folders, "
                             "and render that copy (to FOLDER/html unless --out)")


def run_command(args: argparse.Namespace) -> int:
    """``workbook html``: check an executed run as a reader would and render it to HTML."""
    source = args.run_dir
    if args.publish is not None:
        print(f"{len(publish(args.run_dir, args.publish))} notebooks copied to {args.publish}")
        source = args.publish
    out = args.out or source / "html"
    pages = render_html(source, out)
    print(f"{len(pages)} pages in {out}, index.html links them in order")
    return 0
