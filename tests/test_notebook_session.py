"""What a notebook's session shows and checks: readable tables, the supply check before curating,
the missing-step error, quiet progress bars, and one-line errors in IPython."""

from __future__ import annotations

import pandas as pd
import pytest

from data_prep import progress
from data_prep.errors import WorkbookError
from nbhelpers.settings import config
from nbhelpers.tools import notebook


def test_readable_unpacks_dicts_rounds_and_drops_the_index():
    table = pd.DataFrame({"name": ["a", "b"], "ci": [{"low": 0.123456, "high": 0.9}, {"low": 0.2, "high": 0.8}],
                          "x": [1.0 / 3, 2.0 / 3]}, index=[7, 9])
    shown = notebook.readable(table, columns=["name", "ci", "x"])
    assert list(shown.columns) == ["name", "ci.low", "ci.high", "x"]
    assert list(shown.index) == [0, 1]
    assert shown.loc[0, "ci.low"] == 0.123 and shown.loc[0, "x"] == 0.333


def test_show_table_says_when_it_cuts(monkeypatch):
    shown = []
    monkeypatch.setattr(notebook, "_display", shown.append)
    notebook.show_table(pd.DataFrame({"i": range(36), "j": range(36)}), columns=["i"], where="tables/t.csv")
    table = shown[0]
    assert len(table.table) == notebook.SHOW_ROWS and list(table.table.columns) == ["i"]
    assert table.note == "showing 20 of 36 rows; 1 of 2 columns; all in tables/t.csv"
    assert "<caption>showing 20 of 36 rows" in table._repr_html_() and "0x" not in repr(table)
    assert repr(table).splitlines()[0].split() == ["i"] and repr(table).endswith("all in tables/t.csv)")


def _session(profile: str, data_dir, tmp_path, **values) -> notebook.Session:
    settings = config.resolve(profile, data_dir_=str(data_dir), run_dir=str(tmp_path), **values)
    return notebook.Session(settings, device=None)


def test_the_supply_check_stops_the_paper_profile_on_the_public_sources(data_dir, tmp_path):
    with pytest.raises(notebook.SupplyError, match=r"needs 475 images per class.*covid \d+.*profile = \"teach\""):
        notebook.check_supply(_session("full", data_dir, tmp_path))


def test_the_supply_check_passes_the_teach_profile(data_dir, tmp_path):
    counts = notebook.check_supply(_session("teach", data_dir, tmp_path))
    assert min(counts.values()) >= config.load_profile("teach")["per_class"]


def test_a_later_notebook_without_the_curated_set_names_notebook_01(data_dir, tmp_path):
    with pytest.raises(notebook.MissingStepError, match="run notebook 01 first"):
        _ = _session("teach", data_dir, tmp_path).manifest_path


def test_quiet_progress_prints_one_closing_line(monkeypatch, capsys):
    monkeypatch.setenv(progress.PROGRESS_ENV, progress.QUIET)
    assert list(progress.tqdm(range(5), desc="hashing", unit="image")) == [0, 1, 2, 3, 4]
    for _ in progress.tqdm(range(100), desc="batches", leave=False):
        pass
    with progress.tqdm(total=10, desc="cache", unit="img") as bar:
        bar.update(4)
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("hashing: 5 images in ") and lines[1].startswith("cache: 4/10 imgs")
    assert out.err == ""


def test_live_progress_is_tqdm_when_not_quiet(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    from tqdm.auto import tqdm as live

    bar = progress.tqdm(range(2), disable=True)
    assert isinstance(bar, live)


def test_a_workbook_error_shows_as_one_line_in_ipython():
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    notebook._one_line_errors()
    lines = shell.CustomTB(WorkbookError, WorkbookError("no data here;\n set CXR_DATA_DIR"), None)
    assert lines == ["\033[0;31mWorkbookError\033[0m: no data here; set CXR_DATA_DIR"]


def test_a_workbook_error_reaches_the_executed_notebook_and_the_runners_message(tmp_path):
    """Run on the project's kernel as JupyterLab and papermill do: the one line is the failing
    cell's error output (what JupyterLab draws, from the same kernel message) and the runner's
    message, not an empty CellExecutionError."""
    import nbformat
    import papermill as pm

    from nbhelpers.tools.run import _failure_message

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from nbhelpers.tools.notebook import _one_line_errors\n_one_line_errors()"),
                nbformat.v4.new_code_cell("from data_prep.errors import WorkbookError\n"
                                          "raise WorkbookError('unknown model nosuchmodel; use one of densenet121, ...')")]
    source, output = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    with pytest.raises(pm.PapermillExecutionError) as caught:
        pm.execute_notebook(str(source), str(output), kernel_name="cxr-workbook", progress_bar=False,
                            cwd=str(tmp_path))
    message = _failure_message(source, output, caught.value)
    assert "WorkbookError: unknown model nosuchmodel; use one of densenet121" in message
    cells = nbformat.read(output, as_version=4).cells  # papermill puts an error banner cell first
    errors = [o for c in cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "WorkbookError"
    assert errors[0].evalue.startswith("unknown model nosuchmodel")
    assert errors[0].traceback == ["\033[0;31mWorkbookError\033[0m: unknown model nosuchmodel; use one of densenet121, ..."]


def test_a_curated_set_made_with_other_settings_is_refused_not_used(data_dir, tmp_path):
    """`--out R` with 12 per class, then `--out R --only 04 -p per_class=5`: notebook 04 used to
    train on the 36-image set while settings.json said 5."""
    import json

    session = _session("teach", data_dir, tmp_path)
    session.data_out.mkdir(parents=True)
    (session.data_out / "manifest.csv").write_text("image_id,label,split\n")
    made = session.curation_params().as_dict()
    (session.data_out / "summary.json").write_text(json.dumps({"params": made}))
    assert session.manifest_path.name == "manifest.csv"  # same settings: used
    (session.data_out / "summary.json").write_text(json.dumps({"params": {**made, "per_class": made["per_class"] + 1}}))
    with pytest.raises(notebook.StaleStepError, match=r"per_class=\d+ there, \d+ now.*rerun notebook 01"):
        _ = session.manifest_path


def test_whole_float_columns_show_as_counts_and_fractions_stay_floats():
    table = pd.DataFrame({"n": [20.0, float("nan"), 3.0], "accuracy": [1.0, 0.5, 0.25], "all_one": [1.0, 1.0, 1.0]})
    shown = notebook.readable(table)
    assert str(shown["n"].dtype) == "Int64" and shown["n"].isna().tolist() == [False, True, False]
    assert "20.0" not in repr(notebook._Table(shown)) and " 20 " in f" {repr(notebook._Table(shown))} "
    assert shown["accuracy"].dtype.kind == "f"


def test_the_settings_table_shows_what_the_notebook_takes_and_names_the_rest(data_dir, tmp_path, monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(notebook, "_display", shown.append)
    notebook.start("teach", str(data_dir), str(tmp_path), image_size=None, clip_limit=None)
    table = shown[-1].table
    assert list(table["setting"]) == ["profile", "data_dir", "run_dir", "device", "seed", "image_size", "clip_limit"]
    rest = capsys.readouterr().out.splitlines()[-1]
    assert rest.startswith("the profile's other settings, used by other notebooks: ") and "per_class" in rest
    curating = notebook.start("teach", str(data_dir), str(tmp_path), curates=True)
    rows = dict(zip(shown[-1].table["setting"], shown[-1].table["value"]))
    assert rows["min_age"] == 18 and isinstance(rows["min_age"], int) and "views" in rows and curating.profile == "teach"


def test_a_committed_header_is_shown_once_per_notebook(data_dir, tmp_path, capsys):
    session = _session("teach", data_dir, tmp_path)
    for header in ("Made by `a` on d.", "Made by `b` on d.", "Made by `a` on d.", None):
        session.show_header(header)
    assert capsys.readouterr().out.splitlines() == ["Made by `a` on d.", "Made by `b` on d.",
                                                    "(made by the same command as the table above)"]


def test_every_progress_bar_goes_through_the_one_helper():
    """Headless runs print one line per bar only if no module bypasses data_prep.progress."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    direct = re.compile(r"^\s*(from tqdm|import tqdm)", re.MULTILINE)
    bypass = [str(p.relative_to(root)) for folder in ("data_prep", "nbhelpers") for p in (root / folder).rglob("*.py")
              if p.name != "progress.py" and direct.search(p.read_text())]
    assert bypass == []
