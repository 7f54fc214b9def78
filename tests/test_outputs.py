"""The reader's check of executed notebooks: each problem it looks for is built and found, a clean
notebook passes, and the committed ``teach`` run (and its HTML pages) passes it."""

from __future__ import annotations

import nbformat
import pytest

from nbhelpers.settings import config
from nbhelpers.tools import outputs, run

TEACH_RUN = config.RESULTS_DIR / "teach"


TRY = "### Try this: `clip_limit = 4.0`\n\nPredict, then check."


def _run_bullets(text: str = "**In this run**\n\n* 72 images of 72 patients.") -> dict:
    cell = nbformat.v4.new_code_cell("s.takeaway(lines)")
    cell.execution_count = 9
    cell.outputs = [nbformat.from_dict({"output_type": "display_data", "metadata": {},
                                        "data": {"text/markdown": text, "text/plain": "<IPython.core.display.Markdown>"}})]
    return cell


def _notebook(*outs: dict, last: str = "## Takeaway\n\nWhat was shown.", ending: list | None = None) -> dict:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.outputs = [nbformat.from_dict(o) for o in outs]
    ending = [_run_bullets(), nbformat.v4.new_markdown_cell(TRY)] if ending is None else ending
    nb.cells = [cell, nbformat.v4.new_markdown_cell(last), *ending]
    return nb


def _stream(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def _result(text: str) -> dict:
    return {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": {"text/plain": text}}


def test_a_clean_notebook_passes():
    nb = _notebook(_stream("accuracy 0.75 (0.65-0.84)\n"), _stream("one line of a library\n", "stderr"))
    assert outputs.output_problems(nb) == []


@pytest.mark.parametrize("out, expected", [
    ({"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": []}, "error output"),
    (_stream("".join(f"epoch {i}\n" for i in range(12)), "stderr"), "stderr block of 12 lines"),
    (_stream("/x/nbhelpers/evaluation/preview.py:49: UserWarning: not writable\n", "stderr"), "warning shown"),
    (_stream("TqdmWarning: IProgress not found\n", "stderr"), "warning shown"),
    (_result("PosixPath('results/tables/a.csv')"), "Path object"),
    (_stream("data directory: /root/data/cxr-sources\n"), "path of this machine"),
    (_stream("wrote /tmp/pytest-of-root/run/tables/a.csv\n"), "path of this machine"),
    ({"output_type": "display_data", "metadata": {}, "data": {"text/plain": "t", "text/html": (
        '<td class="data row0 col0" >densenet</td><td class="data row0 col1" >20.000</td>'
        '<td class="data row1 col0" >cbam</td><td class="data row1 col1" >18.000</td>')}},
     "a count printed as a float: 20.000"),
])
def test_each_problem_is_found(out, expected):
    problems = outputs.output_problems(_notebook(out))
    assert any(expected in p for p in problems), problems


def test_a_notebook_without_a_takeaway_fails():
    problems = outputs.output_problems(_notebook(last="## More results", ending=[]))
    assert problems == ["end: no markdown cell headed 'Takeaway'"]


@pytest.mark.parametrize("ending, expected", [
    ([_run_bullets()], "0 'Try this' cells"),
    ([_run_bullets(), *[nbformat.v4.new_markdown_cell(TRY)] * 4], "4 'Try this' cells"),
    ([_run_bullets("* nothing"), nbformat.v4.new_markdown_cell(TRY)], "shows nothing headed 'In this run'"),
    ([_run_bullets(), nbformat.v4.new_markdown_cell("## More results"), nbformat.v4.new_markdown_cell(TRY)],
     "only the run's bullets and 'Try this' cells belong"),
])
def test_a_notebook_must_end_with_the_runs_bullets_and_one_to_three_exercises(ending, expected):
    problems = outputs.output_problems(_notebook(ending=ending))
    assert any(expected in p for p in problems), problems


def test_measurements_that_happen_to_be_whole_are_not_counts():
    html = ('<td class="data row0 col0" >4.000</td><td class="data row0 col1" >1.000</td>'
            '<td class="data row1 col0" >1.561</td><td class="data row1 col1" >1.000</td>')
    shown = {"output_type": "display_data", "metadata": {}, "data": {"text/plain": "t", "text/html": html}}
    assert outputs.output_problems(_notebook(shown, _stream("accuracy 1.000, clip 2.0, n 20.000 in prose\n"))) == []
    counts = html.replace(">1.000<", ">3.000<")  # the second column: whole numbers only, one of them 2 or more
    assert outputs.float_count_columns(counts) == ["3.000"]


def test_a_header_shown_twice_is_found_and_once_is_fine():
    header = "Made by `workbook shortcut --out results/tables` on 2026-12-04; data: manifest m.csv.\n"
    once = outputs.output_problems(_notebook(_stream(header + "(made by the same command as the table above)\n")))
    assert once == []
    twice = outputs.output_problems(_notebook(_stream(header + "table\n" + header)))
    assert any("is shown 2 times" in p for p in twice), twice


def test_an_allowed_library_warning_passes_but_ours_never_does():
    theirs = _stream("site-packages/lib/x.py:3: FutureWarning: will change\n", "stderr")
    assert outputs.output_problems(_notebook(theirs), allowed_warnings=["FutureWarning: will change"]) == []
    ours = _stream("/x/nbhelpers/a.py:3: FutureWarning: will change\n", "stderr")
    assert outputs.output_problems(_notebook(ours), allowed_warnings=["FutureWarning: will change"])


def test_render_refuses_a_run_with_problems(tmp_path):
    nbformat.write(_notebook(_result("PosixPath('x')")), tmp_path / "01_x.ipynb")
    with pytest.raises(outputs.UnreadableRun, match="Path object"):
        outputs.render_html(tmp_path, tmp_path / "html")
    assert not (tmp_path / "html").exists()


def test_render_writes_pages_and_an_index(tmp_path):
    nbformat.write(_notebook(_stream("fine\n")), tmp_path / "01_x.ipynb")
    nbformat.write(_notebook(_stream("fine\n")), tmp_path / "02_y.ipynb")
    pages = outputs.render_html(tmp_path, tmp_path / "html")
    assert [p.name for p in pages] == ["01_x.html", "02_y.html"]
    index = (tmp_path / "html" / "index.html").read_text()
    assert index.index("01_x.html") < index.index("02_y.html")


def test_source_notebooks_are_output_free_and_end_with_a_takeaway():
    for path in run.ordered_notebooks():
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
            f"{path.name} holds outputs: clear them before committing"
        problems = outputs.output_problems(nb)
        assert problems == [], f"{path.name}: {problems}"
        assert "TEACH_" not in nb.cells[0].source, f"{path.name}: the measured teach time is not filled in"


def test_the_committed_teach_run_reads_cleanly():
    executed = sorted(TEACH_RUN.glob("[0-9][0-9]_*.ipynb"))
    assert [p.name for p in executed] == [p.name for p in run.ordered_notebooks()], \
        "results/teach must hold every notebook, executed (make teach)"
    assert outputs.run_problems(executed) == {}
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} was not executed"
        assert nb.metadata.get("papermill", {}).get("parameters", {}).get("profile") == "teach", path.name
        assert (TEACH_RUN / "html" / f"{path.stem}.html").is_file(), f"{path.stem}.html missing: make html"


def _with_injected(source: str):
    """A clean notebook whose first cell is papermill's injected-parameters cell holding ``source``."""
    nb = _notebook(_stream("fine\n"))
    injected = nbformat.v4.new_code_cell(source)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(0, injected)
    return nb


def test_the_injected_parameters_are_read_unless_asked_not_to():
    nb = _with_injected('data_dir = "/root/cxr-sources"')
    assert any("cell's code: /root/cxr-sources" in p for p in outputs.output_problems(nb))
    assert outputs.output_problems(nb, injected=False) == []


def test_publish_replaces_this_machines_folders(tmp_path):
    nb = _with_injected(f'run_dir = "{config.REPO_ROOT}/results/runs/teach"')
    nb.metadata["papermill"] = {"parameters": {"run_dir": f"{config.REPO_ROOT}/results/runs/teach", "profile": "teach"}}
    nbformat.write(nb, tmp_path / "01_x.ipynb")
    (copied,) = outputs.publish(tmp_path, tmp_path / "out")
    published = nbformat.read(copied, as_version=4)
    lines = published.cells[0].source.splitlines()
    assert lines[0].startswith("# Parameters") and lines[1:] == ["profile = 'teach'", "run_dir = None"]
    assert outputs.output_problems(published) == []


def test_a_literal_variable_in_the_injected_parameters_is_a_problem():
    nb = _with_injected("data_dir = '$CXR_DATA_DIR'\nprofile = 'teach'")
    assert any("literal $CXR_DATA_DIR" in p for p in outputs.output_problems(nb))


def test_published_parameters_resolve_where_the_data_folder_is_set(data_dir, monkeypatch, tmp_path):
    """Run All on a published notebook: its injected cell must give start() what resolves on the
    reader's machine (the committed run held data_dir = '$CXR_DATA_DIR', a folder nobody has)."""
    monkeypatch.setenv("CXR_DATA_DIR", str(data_dir))
    cell = outputs.published_parameters({"data_dir": "$CXR_DATA_DIR", "profile": "teach", "run_dir": "results/runs/teach",
                                         "settings_file": "results/runs/teach/settings.json"})
    params: dict = {}
    exec(cell, {}, params)
    assert params == {"data_dir": None, "profile": "teach", "run_dir": None, "settings_file": None}
    settings = config.resolve(params["profile"], data_dir_=params["data_dir"], run_dir=str(tmp_path),
                              settings_file=params["settings_file"])
    assert settings.data_dir == data_dir.resolve() or settings.data_dir == data_dir


def test_the_committed_teach_run_reruns_in_place():
    """Its injected parameters hold no literal $VARIABLE and none of this machine's folders."""
    for path in sorted(TEACH_RUN.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        (cell,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        params: dict = {}
        exec(cell.source, {}, params)
        assert all(params[k] is None for k in outputs.MACHINE_PARAMETERS if k in params), (path.name, params)


def test_the_readmes_teach_time_is_the_committed_runs():
    """The README's "about N minutes" for the teach profile is the committed run's measured total."""
    import json
    import re

    total = json.loads((TEACH_RUN / "workbook_run.json").read_text())["total_seconds"] / 60
    readme = (config.REPO_ROOT / "README.md").read_text()
    claims = [int(m) for m in re.findall(r"profile teach\)?[^\n]*?about (\d+) minutes", readme)]
    claims += [int(m) for m in re.findall(r"PROFILE=teach[^\n]*?about (\d+) minutes", readme)]
    assert len(claims) >= 2 and all(abs(c - total) <= max(2, 0.25 * total) for c in claims), (claims, total)
