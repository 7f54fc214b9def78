from __future__ import annotations

import nbformat
import pytest

from nbhelpers import run


def _notebook(path, *sources, params="x = 1"):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "cxr-workbook", "display_name": "Python (cxr-workbook)", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_parse_overrides_reads_literals_and_plain_strings():
    assert run.parse_overrides(["epochs=3", "model=resnet50", "lr=1e-3", "views=['PA']"]) == {
        "epochs": 3, "model": "resnet50", "lr": 1e-3, "views": ["PA"]}
    with pytest.raises(ValueError, match="name=value"):
        run.parse_overrides(["epochs"])


def test_notebooks_are_found_in_order():
    names = [p.name[:2] for p in run.ordered_notebooks()]
    assert names == sorted(names) and names[:7] == ["01", "02", "03", "04", "05", "06", "07"]
    assert [p.name[:2] for p in run.ordered_notebooks(only=["04"])] == ["04"]
    with pytest.raises(FileNotFoundError):
        run.ordered_notebooks(only=["99"])


@pytest.mark.slow
def test_runner_passes_declared_parameters_and_names_the_failing_cell(tmp_path):
    run.ensure_kernel()
    good = _notebook(tmp_path / "01_good.ipynb", "assert x == 5, x")
    run.run_notebook(good, tmp_path / "out_good.ipynb", {"x": 5, "undeclared": 1}, cell_timeout=120)
    assert "x = 5" in (tmp_path / "out_good.ipynb").read_text()
    bad = _notebook(tmp_path / "02_bad.ipynb", "raise ValueError('no lungs found')")
    with pytest.raises(run.NotebookFailed, match=r"02_bad.ipynb failed in cell .*ValueError: no lungs found"):
        run.run_notebook(bad, tmp_path / "out_bad.ipynb", {}, cell_timeout=120)


def test_main_reports_a_missing_data_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)
    assert run.main(["--profile", "smoke", "--out", str(tmp_path)]) == 1
    assert "CXR_DATA_DIR" in capsys.readouterr().err
    assert run.main(["--profile", "nope", "--data-dir", str(tmp_path)]) == 1
    assert "unknown profile" in capsys.readouterr().err
