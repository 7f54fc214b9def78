"""Each notebook runs headlessly through papermill in the smoke profile on the real mirror.

Notebooks build on each other's outputs, so a shared run folder is filled in order: asking for
notebook 05 first runs 01-04 once.  Each test then checks what its notebook wrote.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

from data_prep.schema import CLASSES
from nbhelpers.tools import outputs, run

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

NOTEBOOKS = {p.name[:2]: p for p in run.ordered_notebooks()}


def _exercises() -> list[tuple[str, str, object]]:
    """Every "Try this" cell of the notebooks: (notebook number, parameter, value)."""
    found = []
    for key, path in sorted(NOTEBOOKS.items()):
        for cell in nbformat.read(path, as_version=4).cells:
            match = outputs.TRY_THIS.match(cell.source) if cell.cell_type == "markdown" else None
            if match:
                found.append((key, match.group(1), ast.literal_eval(match.group(2))))
    return found


EXERCISES = _exercises()


class Workbook:
    def __init__(self, run_dir: Path, data_dir: Path):
        self.run_dir, self.data_dir = run_dir, data_dir
        self.done: dict[str, Path] = {}

    def ran(self, number: str) -> Path:
        """Run every notebook up to and including ``number`` once; return the executed copy."""
        for key in sorted(NOTEBOOKS):
            if key > number:
                break
            if key not in self.done:
                out = self.run_dir / NOTEBOOKS[key].name
                params = {"profile": "smoke", "data_dir": str(self.data_dir), "run_dir": str(self.run_dir)}
                run.run_notebook(NOTEBOOKS[key], out, params, cell_timeout=900)
                self.done[key] = out
        return self.done[number]


@pytest.fixture(scope="module")
def workbook(tmp_path_factory, data_dir) -> Workbook:
    run.ensure_kernel()
    return Workbook(tmp_path_factory.mktemp("smoke-run"), data_dir)


def _table(workbook: Workbook, name: str) -> pd.DataFrame:
    return pd.read_csv(workbook.run_dir / "tables" / f"{name}.csv")


def _figure(workbook: Workbook, name: str) -> None:
    path = workbook.run_dir / "figures" / f"{name}.png"
    assert path.is_file() and path.stat().st_size > 5_000, f"figure {path} missing or empty"


def test_every_notebook_is_well_formed():
    for path in NOTEBOOKS.values():
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "cxr-workbook", path.name
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        # papermill skips any line it cannot parse (e.g. a comment holding '='): all must parse
        assigned = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line}
        declared = set(papermill.inspect_notebook(str(path)))
        assert assigned == declared and {"profile", "data_dir", "run_dir"} <= declared, path.name
        assert max(map(len, tagged[0].source.splitlines())) <= 100, f"{path.name}: a parameters line runs off the page"
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), path.name
        assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), \
            f"{path.name}: commit notebooks without outputs"


def test_01_data_curation(workbook):
    workbook.ran("01")
    manifest = pd.read_csv(workbook.run_dir / "data" / "manifest.csv")
    counts = manifest["label"].value_counts()
    assert set(counts.index) == set(CLASSES) and counts.nunique() == 1  # balanced
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1  # no patient in two splits
    assert (workbook.data_dir / manifest["path"]).map(Path.is_file).all()
    _figure(workbook, "01_counts")
    merges = _table(workbook, "01_patient_merges")
    assert {"patient", "joined", "evidence"} <= set(merges.columns) and len(merges) >= 1
    band = _table(workbook, "01_band_pairs")
    assert band["decision"].str.startswith("one film").any()  # the captioned ieee8023 re-post
    _figure(workbook, "01_band_pairs")


def test_02_preprocessing(workbook):
    workbook.ran("02")
    _figure(workbook, "02_clahe")
    assert any((workbook.run_dir / "cache").rglob("*.npy"))


def test_03_models(workbook):
    workbook.ran("03")
    table = _table(workbook, "03_complexity")
    assert {"densenet121", "densenet121_cbam"} <= set(table["model"])
    assert (table["params_m"] > 1).all()
    cbam = table.set_index("model")["params_m"]
    assert cbam["densenet121_cbam"] > cbam["densenet121"]  # the attention modules add weights


def test_04_training(workbook):
    workbook.ran("04")
    log = pd.read_csv(next((workbook.run_dir / "train").glob("*/log.csv")))
    assert len(log) >= 1 and log["train_loss"].notna().all() and (log["val_acc"].between(0, 1)).all()
    assert any((workbook.run_dir / "train").glob("*/best.pt"))
    _figure(workbook, "04_curves")


def test_05_evaluation(workbook):
    workbook.ran("05")
    per_source = _table(workbook, "05_per_source")
    assert {"nih", "ieee8023"} <= set(per_source["source"]) and (per_source["n"] > 0).all()
    comparison = _table(workbook, "05_model_comparison")
    assert {"densenet121_cbam", "mobilenetv2", "resnet50", "efficientnet_b0"} <= set(comparison["model"])
    assert comparison["accuracy"].between(0, 1).all() and (comparison["preset"] == "smoke").all()
    summary = _table(workbook, "05_test_metrics")
    assert summary["accuracy"].between(0, 1).all() and (summary["n"] > 0).all()
    per_class = _table(workbook, "05_per_class")
    assert list(per_class["class"]) == list(CLASSES)
    ci = _table(workbook, "05_test_metrics_ci").set_index("metric")
    assert (ci["patient_low"] <= ci["value"] + 1e-9).all() and (ci["value"] <= ci["patient_high"] + 1e-9).all()
    assert (ci["image_low"] <= ci["value"] + 1e-9).all() and "width_ratio" in ci.columns
    for name in ("05_confusion", "05_roc", "05_calibration"):
        _figure(workbook, name)


def test_06_ablations(workbook):
    workbook.ran("06")
    table = _table(workbook, "06_ablation")
    assert {"densenet121", "densenet121_cbam"} <= set(table["name"])
    assert table["accuracy_mean"].between(0, 1).all() and (table["seeds"] >= 1).all()
    tests = _table(workbook, "06_paired_tests")
    assert set(tests["baseline"]) == {"densenet121"} and tests["p_holm"].between(0, 1).all()
    _figure(workbook, "06_ablation")
    assert set(_table(workbook, "06_per_source")["name"]) == set(table["name"])


def test_07_gradcam(workbook):
    workbook.ran("07")
    _figure(workbook, "07_gradcam")
    _figure(workbook, "07_methods")
    energy = _table(workbook, "07_lung_energy")  # the smoke split holds a few masked COVID-19 images
    assert "densenet121_cbam" in set(energy["model"]) and energy["energy_mean"].between(0, 1).all()
    assert {"grid", "pointing_rate", "blank_maps"} <= set(energy.columns)
    check = _table(workbook, "07_randomisation_check")
    assert "densenet121_cbam" in set(check["model"]) and check["passed"].isin([True, False]).all()
    stages = _table(workbook, "07_randomisation_stages")
    assert set(stages["mode"]) == {"cascading", "independent"}
    stats = json.loads((workbook.run_dir / "cam_summary.json").read_text())
    assert stats["images"] >= 1 and 0.0 <= stats["mean_cam"] <= 1.0


def test_08_shortcut_audit(workbook):
    workbook.ran("08")
    per_source = _table(workbook, "08_per_source")
    assert {"nih", "ieee8023"} <= set(per_source["source"]) and per_source["accuracy"].between(0, 1).all()
    probe = _table(workbook, "08_source_probe").iloc[0]
    assert probe["label"] == "normal+pneumonia" and 0 <= probe["balanced_accuracy"] <= 1 and probe["chance"] == 0.5
    assert probe["low"] <= probe["balanced_accuracy"] <= probe["high"]
    by_variant = _table(workbook, "08_probe_by_mitigation").set_index("variant")
    assert list(by_variant.index) == ["none", "all"]
    assert by_variant.loc["none", "balanced_accuracy"] == probe["balanced_accuracy"]
    assert by_variant["balanced_accuracy"].between(0, 1).all()
    per_view = _table(workbook, "08_per_view")
    assert "view" in per_view.columns and (per_view["n"] > 0).all()
    markers = _table(workbook, "08_marker_attention")
    assert len(markers) >= 1 and (markers["marker_area"] > 0).all() and markers["marker_energy"].between(0, 1).all()
    assert markers["padding_area"].between(0, 1).all() and markers["padding_energy"].between(0, 1).all()
    blackout = _table(workbook, "08_blackout").set_index("name")
    assert list(blackout.index) == ["whole_image", "lungs_blacked"] and blackout["accuracy"].between(0, 1).all()
    for figure in ("08_marker_cams", "08_mitigations"):
        assert (workbook.run_dir / "figures" / f"{figure}.png").stat().st_size > 10_000


def test_a_student_meets_no_error_warning_stray_path_or_missing_takeaway(workbook):
    from nbhelpers.tools import notebook, outputs

    workbook.ran("08")
    executed = [workbook.done[key] for key in sorted(workbook.done)]
    assert outputs.run_problems(executed, injected=False) == {}  # the injected parameters name this machine's folders
    for path in executed:  # the smoke profile says at the top of every notebook that its numbers mean nothing
        first = next(c for c in nbformat.read(path, as_version=4).cells if "= start(" in c.source)
        text = json.dumps(first.get("outputs", []))
        assert notebook.SMOKE_NOTE in text, f"{path.name}: no smoke banner"


def test_every_notebook_ends_with_one_to_three_exercises_on_its_own_parameters():
    for key, path in NOTEBOOKS.items():
        mine = [(name, value) for k, name, value in EXERCISES if k == key]
        assert 1 <= len(mine) <= outputs.MAX_EXERCISES, path.name
        declared = papermill.inspect_notebook(str(path))
        assert all(name in declared for name, _ in mine), (path.name, mine)
        assert outputs.output_problems(nbformat.read(path, as_version=4)) == [], path.name  # unexecuted: the ending's shape


@pytest.mark.parametrize("key, name, value", EXERCISES, ids=[f"{k}-{n}" for k, n, _ in EXERCISES])
def test_each_exercise_runs_in_the_smoke_profile(workbook, tmp_path, key, name, value):
    """A student's variant, on a copy of the smoke run so the others' outputs stay as they were.

    The copy (caches and checkpoints: hundreds of MB) is removed as soon as the notebook ends, pass
    or fail; only the executed notebook stays to read."""
    workbook.ran(key)
    run_dir = tmp_path / "run"
    shutil.copytree(workbook.run_dir, run_dir, symlinks=True)
    out = tmp_path / f"exercise_{NOTEBOOKS[key].name}"
    params = {"profile": "smoke", "data_dir": str(workbook.data_dir), "run_dir": str(run_dir), name: value}
    try:
        run.run_notebook(NOTEBOOKS[key], out, params, cell_timeout=900)
    finally:
        shutil.rmtree(run_dir)
    assert outputs.run_problems([out], injected=False) == {}
