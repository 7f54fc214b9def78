from __future__ import annotations

import json

import nbformat
import pytest

from nbhelpers.settings import config, keyvalue
from nbhelpers.tools import cli, run


def _notebook(path, *sources, params="x = 1"):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "cxr-workbook", "display_name": "Python (cxr-workbook)", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def declared():
    return run.declared_parameters(run.ordered_notebooks())


def test_parse_overrides_reads_literals_and_plain_strings():
    assert run.parse_overrides(["epochs=3", "model=resnet50", "lr=1e-3", "views=['PA']", "clahe=False"]) == {
        "epochs": 3, "model": "resnet50", "lr": 1e-3, "views": ["PA"], "clahe": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        run.parse_overrides(["epochs"])


def test_notebooks_are_found_in_order():
    names = [p.name[:2] for p in run.ordered_notebooks()]
    assert names == sorted(names) and names[:7] == ["01", "02", "03", "04", "05", "06", "07"]
    assert [p.name[:2] for p in run.ordered_notebooks(only=["04"])] == ["04"]
    with pytest.raises(FileNotFoundError):
        run.ordered_notebooks(only=["99"])


def test_every_notebook_parameter_has_a_known_type_and_takes_the_run_settings(declared):
    # A parameter the runner cannot type-check would let `-p name=garbage` through.
    profile_keys = set(config.load_profile("full"))
    for name, params in declared.items():
        assert "settings_file" in params, name
        untyped = {k for k, v in params.items() if keyvalue.expected_type(v) is None or v == []}
        unknown = untyped - profile_keys - set(config.RUN_PARAMETERS) - set(config.NOTEBOOK_PARAMETERS)
        assert not unknown, (name, unknown)
        source = (config.REPO_ROOT / "notebooks" / name).read_text()
        assert "settings_file=settings_file" in source, name


def test_a_typo_stops_before_anything_runs_naming_the_close_match(declared):
    with pytest.raises(keyvalue.AssignmentError, match=r"'epochz'.*did you mean epochs"):
        run.resolve_overrides("smoke", ["epochz=3"], declared)
    # epochs is a parameter of notebooks 04 and 06 only: with notebook 01 alone nothing knows it
    only_01 = {k: v for k, v in declared.items() if k.startswith("01")}
    with pytest.raises(keyvalue.AssignmentError, match="'epochs'"):
        run.resolve_overrides("smoke", ["epochs=3"], only_01)
    with pytest.raises(keyvalue.AssignmentError, match="--data-dir"):
        run.resolve_overrides("smoke", ["data_dir=/x"], declared)


def test_wrong_types_name_the_key_the_type_and_the_value(declared):
    with pytest.raises(keyvalue.AssignmentError, match=r"image_size must be an integer, got 'abc'"):
        run.resolve_overrides("smoke", ["image_size=abc"], declared)
    with pytest.raises(keyvalue.AssignmentError, match=r"clahe must be true or false, got 'maybe'"):
        run.resolve_overrides("smoke", ["clahe=maybe"], declared)
    with pytest.raises(keyvalue.AssignmentError, match=r"epochs must be an integer, got '1.5'"):
        run.resolve_overrides("smoke", ["epochs=1.5"], declared)


def test_profile_overrides_reach_every_notebook_and_notebook_parameters_those_declaring_them(declared):
    resolved = run.resolve_overrides("smoke", ["clahe=False", "image_size=32", "epochs=2", "pretrained=false",
                                               "seeds=0,1"], declared)
    assert resolved.values["clahe"] is False and resolved.values["image_size"] == 32
    assert resolved.values["seeds"] == [0, 1]
    reach = resolved.applied_to(declared)
    assert reach["clahe"] == sorted(declared)  # through settings.json, also 04 which does not declare it
    assert reach["epochs"] == ["04_training.ipynb", "06_ablations.ipynb"]
    assert resolved.notebook_parameters["04_training.ipynb"] == {"epochs": 2, "pretrained": False}
    assert resolved.notebook_parameters["01_data_curation.ipynb"] == {}


def test_a_session_started_from_the_run_settings_sees_every_override(tmp_path, declared):
    resolved = run.resolve_overrides("smoke", ["clahe=False", "image_size=32"], declared)
    path = config.write_settings(tmp_path, "smoke", resolved.values, resolved.overrides)
    from nbhelpers.tools.notebook import start

    s = start("smoke", run_dir=str(tmp_path), need_data=False, settings_file=str(path), model=None)
    assert (s.clahe, s.image_size) == (False, 32)
    assert s.preprocess_options["clahe"] is False
    assert all(row.preprocess["clahe"] is False for row in s.grid_rows(["cbam"]))
    assert {r.name: r.preprocess["clahe"] for r in s.grid_rows(["clahe"])} == {"cbam_clahe": True, "cbam_no_clahe": False}
    with pytest.raises(config.ProfileError, match="written for profile 'smoke'"):
        start("full", run_dir=str(tmp_path), need_data=False, settings_file=str(path))


@pytest.mark.slow
def test_runner_passes_declared_parameters_and_names_the_failing_cell(tmp_path):
    run.ensure_kernel()
    good = _notebook(tmp_path / "01_good.ipynb", "assert x == 5, x")
    run.run_notebook(good, tmp_path / "out_good.ipynb", {"x": 5, "undeclared": 1}, cell_timeout=120)
    assert "x = 5" in (tmp_path / "out_good.ipynb").read_text()
    bad = _notebook(tmp_path / "02_bad.ipynb", "raise ValueError('no lungs found')")
    with pytest.raises(run.NotebookFailed, match=r"02_bad.ipynb failed in cell .*ValueError: no lungs found"):
        run.run_notebook(bad, tmp_path / "out_bad.ipynb", {}, cell_timeout=120)


@pytest.mark.slow
def test_an_override_reaches_a_notebook_that_does_not_declare_it(tmp_path):
    # Before: `-p clahe=False -p image_size=32` reached only the notebook declaring them.
    run.ensure_kernel()
    folder = tmp_path / "nbs"
    folder.mkdir()
    params = ('profile = "smoke"\ndata_dir = None\nrun_dir = None\nsettings_file = None\n')
    body = ("import json, pathlib\nfrom nbhelpers.tools.notebook import start\n"
            "s = start(profile, data_dir, run_dir, settings_file=settings_file{extra})\n"
            "pathlib.Path(run_dir, '{name}.json').write_text(json.dumps([s.clahe, s.image_size]))")
    _notebook(folder / "01_declares.ipynb", body.format(extra=", clahe=clahe, image_size=image_size", name="01"),
              params=params + "clahe = None\nimage_size = None\n")
    _notebook(folder / "02_does_not.ipynb", body.format(extra="", name="02"), params=params)
    out = tmp_path / "run"
    run.run_workbook("smoke", str(tmp_path), out, overrides=["clahe=False", "image_size=32"], cell_timeout=120,
                     notebook_dir=folder)
    for name in ("01", "02"):
        assert json.loads((out / f"{name}.json").read_text()) == [False, 32], name
    record = json.loads((out / "workbook_run.json").read_text())
    assert record["overrides"] == {"clahe": False, "image_size": 32}
    assert record["overrides_reach"]["clahe"] == ["01_declares.ipynb", "02_does_not.ipynb"]


def test_main_reports_setup_mistakes_in_one_line_with_status_2(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)
    assert cli.main(["run", "--profile", "smoke", "--out", str(tmp_path)]) == 2
    assert "CXR_DATA_DIR" in capsys.readouterr().err
    assert cli.main(["run", "--profile", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "unknown profile" in capsys.readouterr().err
    out = tmp_path / "out"
    assert cli.main(["run", "--profile", "smoke", "--data-dir", str(tmp_path), "--out", str(out), "-p", "epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and "epochs" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing ran, nothing written


def test_none_keeps_every_age_and_is_refused_where_a_value_is_needed(declared):
    # Before: -p min_age=none was recorded as applied and silently dropped.
    resolved = run.resolve_overrides("smoke", ["min_age=none"], declared)
    assert resolved.values["min_age"] is None and resolved.overrides == {"min_age": None}
    with pytest.raises(keyvalue.AssignmentError, match="image_size needs a value"):
        run.resolve_overrides("smoke", ["image_size=none"], declared)


def test_bare_words_in_brackets_are_a_list(declared):
    # Before: -p views=[PA] became the one view "[PA]" and kept no ieee8023 film.
    resolved = run.resolve_overrides("smoke", ["views=[PA, AP]", "ablation_groups=[cbam,clahe]"], declared)
    assert resolved.values["views"] == ["PA", "AP"] and resolved.values["ablation_groups"] == ["cbam", "clahe"]


def test_a_second_run_on_the_same_folder_stops_with_status_2(tmp_path, capsys, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(run, "RUN_LOCK_TIMEOUT", 0.1)
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / ".workbook.lock")):
        assert cli.main(["run", "--profile", "smoke", "--data-dir", str(tmp_path), "--out", str(out), "--only", "01"]) == 2
    assert "in use by another workbook run" in capsys.readouterr().err


@pytest.mark.parametrize("pair, named", [
    ("per_class=-5", "per_class=-5"), ("device=tpu", "device='tpu'"), ("model=nosuchmodel", "model='nosuchmodel'"),
    ("preset=nosuch", "preset='nosuch'"), ("split=[0.5,0.5]", "split=[0.5, 0.5]"), ("image_size=0", "image_size=0"),
    ("image_size=8", "image_size=8"), ("ablation_groups=[nosuch]", "ablation_groups=['nosuch']"),
    ("clip_limit=-1", "clip_limit"), ("tile_grid=0", "tile_grid"),
])
def test_a_value_out_of_range_stops_before_notebook_01(capsys, tmp_path, pair, named):
    """Each was accepted before: earlier notebooks ran, then a later one failed (most with no text)."""
    out = tmp_path / "out"
    assert cli.main(["run", "--profile", "smoke", "--data-dir", str(tmp_path), "--out", str(out), "-p", pair]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"setting {named}" in err and "not allowed" in err, err
    assert not out.exists()  # no notebook ran


def test_the_image_size_check_names_the_smallest_size_a_model_takes():
    from nbhelpers.models.registry import InputSizeError, check_input_size

    with pytest.raises(InputSizeError, match=r"'densenet121_cbam' cannot take 8 px images.*image_size >= 32"):
        check_input_size("densenet121_cbam", 8)
    with pytest.raises(InputSizeError, match=r"'vgg16' cannot take 16 px.*image_size >= 32"):
        check_input_size("vgg16", 16)
    check_input_size("densenet121_cbam", 64)  # the profiles' size passes


@pytest.mark.parametrize("args, message", [
    (["--preprocess", "size=7"], "PreprocessConfig.size"), (["--preprocess", "clip_limit=-1"], "clip_limit"),
    (["--preprocess", "tile_grid=0"], "tile_grid"), (["--set", "image_size=7"], "size"),
    (["--set", "image_size=8"], "cannot take 8 px"),
])
def test_train_refuses_bad_sizes_in_one_line_before_the_cache(data_dir, tmp_path, capsys, args, message):
    from conftest import real_manifest

    manifest = tmp_path / "manifest.csv"
    real_manifest(data_dir, 4, ["train", "train", "val", "test"]).to_csv(manifest, index=False)
    code = cli.main(["train", "--model", "densenet121_cbam", "--preset", "smoke", "--manifest", str(manifest),
                     "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run" / "cache").exists()


def test_a_new_notebook_parameter_is_declared_in_one_place(tmp_path):
    """A parameter with a literal default needs nothing but its line in the parameters cell: the
    runner types it from the default, refuses a wrong value and passes a right one on."""
    import nbformat

    source = config.REPO_ROOT / "notebooks" / "05_evaluation.ipynb"
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\nthrowaway_knob = 3  # a parameter added in this cell alone"
    copy = tmp_path / source.name
    nbformat.write(nb, copy)
    declared = run.declared_parameters([copy])
    assert declared[copy.name]["throwaway_knob"] == 3
    resolved = run.resolve_overrides("smoke", ["throwaway_knob=5"], declared)
    assert resolved.notebook_parameters[copy.name]["throwaway_knob"] == 5
    with pytest.raises(keyvalue.AssignmentError, match="throwaway_knob"):
        run.resolve_overrides("smoke", ["throwaway_knob=abc"], declared)
