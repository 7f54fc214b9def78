from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_prep.errors import WorkbookError
from nbhelpers.evaluation import markers
from nbhelpers.experiments import ablation, shortcut
from nbhelpers.experiments import probes
from nbhelpers.experiments.ablation import Row
from nbhelpers.tools import cli
from nbhelpers.pipeline.preprocess import MITIGATIONS, PreprocessConfig


def test_the_shortcut_group_switches_one_mitigation_per_row_and_all_at_once():
    rows = {r.name: r for r in ablation.load_grid(groups=["shortcut"])}
    assert rows["no_mitigation"].baseline and not rows["no_mitigation"].preprocess
    for name in MITIGATIONS:
        assert rows[name].preprocess == {name: True}
        PreprocessConfig(**rows[name].preprocess)  # valid fields
    assert rows["all_mitigations"].preprocess == {name: True for name in MITIGATIONS}
    assert len({(r.model, tuple(sorted(r.options.items()))) for r in rows.values()}) == 1  # one architecture


ROWS = [Row("shortcut", "base", "m", baseline=True), Row("shortcut", "cut", "m", preprocess={"lung_crop": True})]
# test images: ieee8023 mixes covid (0) and pneumonia (1); nih holds normal (2) and pneumonia
MANIFEST = pd.DataFrame({
    "image_id": [f"img{i}" for i in range(6)], "label": ["covid", "covid", "pneumonia", "normal", "pneumonia", "normal"],
    "source": ["ieee8023", "ieee8023", "ieee8023", "nih", "nih", "nih"], "split": "test", "path": "x",
    "patient_id": [f"p{i}" for i in range(6)]})


def _fake_grid(root, row, seed, pred):
    folder = ablation.run_dir(root, row, seed)
    folder.mkdir(parents=True)
    labels = [0, 0, 1, 2, 1, 2]
    pd.DataFrame({"image_id": MANIFEST["image_id"], "label": labels, "pred": pred}).to_csv(
        folder / "test_predictions.csv", index=False)
    accuracy = float(np.mean(np.equal(labels, pred)))
    (folder / "metrics.json").write_text(json.dumps({"config": {}, "test": {
        "accuracy": accuracy, "macro_sensitivity": accuracy, "macro_specificity": accuracy, "macro_f1": accuracy}}))


def _fake_probe(root, row, seed, correct):
    folder = shortcut.probe_dir(root, row, seed)
    folder.mkdir(parents=True)
    group = np.arange(len(correct)) % 2
    pd.DataFrame({"image_id": range(len(correct)), "source": "x", "group": group,
                  "pred": np.where(correct, group, 1 - group), "p_group1": 0.5}).to_csv(
        folder / probes.PROBE_PREDICTIONS, index=False)
    (folder / probes.PROBE_JSON).write_text(json.dumps({"test": {
        "n": len(correct), "balanced_accuracy": float(np.mean(correct)), "low": 0.0, "high": 1.0,
        "accuracy": float(np.mean(correct)), "auc": 0.5}}))


def test_mitigation_table_puts_accuracy_within_source_and_probe_side_by_side(tmp_path):
    for seed in (0, 1):
        _fake_grid(tmp_path, ROWS[0], seed, [0, 0, 1, 2, 1, 2])  # all right
        _fake_grid(tmp_path, ROWS[1], seed, [0, 1, 0, 2, 1, 2])  # wrong on two ieee8023 images
        _fake_probe(tmp_path, ROWS[0], seed, np.ones(40, bool))  # tells the archives apart
        _fake_probe(tmp_path, ROWS[1], seed, np.arange(40) % 4 < 2)  # chance
    within = shortcut.within_source(ROWS, tmp_path, [0, 1], MANIFEST)
    assert set(within["source"]) == {"ieee8023", "all"}  # nih holds no COVID: not a mixed COVID source
    cut = within.set_index(["name", "source"]).loc[("cut", "ieee8023")]
    assert cut["n"] == 3 and cut["accuracy"] == pytest.approx(1 / 3)  # three distinct images, not 3 x 2 seeds
    table = shortcut.mitigation_table(ROWS, tmp_path, [0, 1], MANIFEST).set_index("name")
    assert table.loc["base", "within_source_accuracy"] == 1.0
    assert table.loc["base", "probe_ba_pooled"] == 1.0 and table.loc["cut", "probe_ba_pooled"] == 0.5
    assert table.loc["cut", "probe_ba_low"] < 0.5 < table.loc["cut", "probe_ba_high"]
    assert table.loc["cut", "probe_diff"] == pytest.approx(-0.5) and table.loc["cut", "probe_diff_high"] < 0
    assert np.isnan(table.loc["base", "probe_diff"])
    assert table.loc["cut", "accuracy"] == pytest.approx(4 / 6)
    assert table.loc["cut", "within_diff"] == pytest.approx(-2 / 3)  # paired on the three ieee8023 images
    assert np.isnan(table.loc["base", "within_diff"])
    assert shortcut.mixed_source_ids(MANIFEST) == ["img0", "img1", "img2"]
    cams = pd.DataFrame({"model": ["shortcut/base", "shortcut/cut"], "energy_mean": [0.3, 0.6], "area_mean": 0.4,
                         "excess_mean": [-0.1, 0.2], "looks_outside": [True, False]})
    with_cams = shortcut.mitigation_table(ROWS, tmp_path, [0, 1], MANIFEST, cams).set_index("name")
    assert with_cams.loc["cut", "cam_excess_mean"] == 0.2 and with_cams.loc["base", "cam_looks_outside"]


def test_missing_probe_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no source probe"):
        shortcut.collect_probes(ROWS, tmp_path, [0])


def test_cli_names_a_missing_pool_manifest(tmp_path, capsys):
    code = cli.main(["shortcut", "--grid-root", str(tmp_path), "--manifest", str(tmp_path / "m.csv"),
                     "--pool-manifest", str(tmp_path / "pool.csv"), "--seeds", "0", "--out", str(tmp_path)])
    assert code == 2 and "pool.csv" in capsys.readouterr().err


def test_marker_and_padding_masks_follow_the_training_geometry(data_dir):
    from nbhelpers.pipeline.preprocess import PreprocessConfig

    wide = sorted((data_dir / "Actualmed-COVID-chestxray-dataset/images").glob("*.png"))[0]
    manifest = pd.DataFrame({"image_id": ["w"], "path": [wide.relative_to(data_dir).as_posix()]})
    found, padding = markers.marker_masks(manifest, data_dir, PreprocessConfig(size=64), ["w"])
    assert found.shape == padding.shape == (1, 64, 64)
    assert padding[0, :3].all() and not padding[0, 32].any()  # letterbox bars above and below, none mid-image
    _, cropped = markers.marker_masks(manifest, data_dir, PreprocessConfig(size=64, lung_crop=True), ["w"])
    assert not cropped.any()  # a lung crop fills the square


def test_probes_tested_on_other_images_are_not_compared(tmp_path):
    _fake_probe(tmp_path, ROWS[0], 0, np.ones(8, bool))
    _fake_probe(tmp_path, ROWS[1], 0, np.ones(10, bool))
    with pytest.raises(ValueError, match="different images"):
        shortcut.pooled_probe(ROWS, tmp_path, [0])


def test_cli_reads_pretrained_false_as_false(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run_probes(*args, **kwargs):
        seen.update(kwargs)
        raise WorkbookError("stop here")

    monkeypatch.setattr(shortcut, "run_probes", fake_run_probes)
    code = cli.main(["shortcut", "--grid-root", str(tmp_path), "--manifest", str(tmp_path / "m.csv"), "--pool-manifest",
                     str(tmp_path / "pool.csv"), "--seeds", "0", "--out", str(tmp_path),
                     "--set", "pretrained=false", "--set", "epochs=2"])
    engine = seen.pop("engine")
    assert code == 2 and seen == {"pretrained": False, "epochs": 2}  # bool("false") would have been True
    assert engine.name == "local"
    assert capsys.readouterr().err == "error: stop here\n"


@pytest.mark.usefixtures("one_torch_thread")
def test_a_finished_probe_is_reused_only_while_it_is_what_would_be_trained(data_dir, tmp_path, capsys):
    from data_prep.table import load_table
    from data_prep.split import split_by_patient

    table, _ = load_table(data_dir, hash_images=False)
    pool = table[table["label"] == "normal"].reset_index(drop=True)
    pool = pool.assign(split=split_by_patient(pool, seed=0).to_numpy())
    rows = [ROWS[0]]
    probe_args = dict(grid_root=tmp_path, pool=pool, data_dir=data_dir, seeds=[0], labels=["normal"],
                  model="mobilenetv2", preset="smoke", device="cpu", image_size=32, max_per_group=16)
    probe_json = shortcut.probe_dir(tmp_path, rows[0], 0) / probes.PROBE_JSON
    first = shortcut.run_probes(rows, **probe_args)
    assert "0 of 1 probes already finished" in capsys.readouterr().out
    written = probe_json.stat().st_mtime_ns
    again = shortcut.run_probes(rows, **probe_args)
    assert "1 of 1 probes already finished" in capsys.readouterr().out and probe_json.stat().st_mtime_ns == written
    pd.testing.assert_frame_equal(first, again)
    shortcut.run_probes(rows, **{**probe_args, "epochs": 2})
    out = capsys.readouterr().out
    assert "retraining" in out and "epochs 1, not 2" in out
    assert json.loads(probe_json.read_text())["config"]["epochs"] == 2
    shortcut.run_probes([Row("shortcut", "base", "m", baseline=True, preprocess={"lung_crop": True})],
                        **{**probe_args, "epochs": 2})
    out = capsys.readouterr().out
    assert "retraining" in out and "preprocess.lung_crop false, not true" in out


def test_the_blackout_group_blacks_out_the_lungs_and_keeps_only_them():
    rows = {r.name: r for r in ablation.load_grid(groups=["blackout"])}
    assert rows["whole_image"].baseline
    assert {r.preprocess.get("blackout") for r in rows.values()} == {None, "center", "lungs", "lungs_only"}
    for row in rows.values():
        PreprocessConfig(**row.preprocess)


def _corner_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise films whose label is written in the top-left corner (a bright square for class 1)."""
    y = rng.integers(0, 2, n)
    images = rng.integers(40, 200, (n, 64, 64)).astype(np.uint8)
    images[y == 1, 2:8, 2:8] = 255
    return images, y


def test_a_label_written_in_a_corner_survives_the_central_blackout():
    # The case built to fail: a model that reads the corner keeps its accuracy without the centre,
    # so the blackout test calls it a shortcut.
    from sklearn.linear_model import LogisticRegression

    from nbhelpers.pipeline.mitigate import blackout

    rng = np.random.default_rng(0)
    train, y_train = _corner_images(200, rng)
    test, y_test = _corner_images(100, rng)
    blacked = lambda imgs: np.stack([blackout(i, "center") for i in imgs]).reshape(len(imgs), -1)  # noqa: E731
    assert (blackout(test[0], "center")[20:40, 20:40] == 0).all()
    clf = LogisticRegression(max_iter=500).fit(blacked(train), y_train)
    assert (clf.predict(blacked(test)) == y_test).mean() > 0.95


def _fake_blackout_run(root, row, seed, correct):
    folder = ablation.run_dir(root, row, seed)
    folder.mkdir(parents=True)
    labels = np.arange(len(correct)) % 3
    pd.DataFrame({"image_id": [f"i{k}" for k in range(len(correct))], "patient_id": [f"p{k // 2}" for k in range(len(correct))],
                  "label": labels, "pred": np.where(correct, labels, (labels + 1) % 3)}).to_csv(
        folder / "test_predictions.csv", index=False)


def test_blackout_table_flags_accuracy_that_survives_without_the_lungs(tmp_path):
    rows = [Row("blackout", "whole_image", "m", baseline=True), Row("blackout", "center_blacked", "m",
            preprocess={"blackout": "center"}), Row("blackout", "lungs_only", "m", preprocess={"blackout": "lungs_only"})]
    rng = np.random.default_rng(0)
    for seed in (0, 1, 2):
        whole = rng.random(120) < 0.9
        _fake_blackout_run(tmp_path, rows[0], seed, whole)
        _fake_blackout_run(tmp_path, rows[1], seed, whole)               # nothing lost without the centre
        _fake_blackout_run(tmp_path, rows[2], seed, rng.random(120) < 1 / 3)  # chance with the lungs alone
    table = shortcut.blackout_table(rows, tmp_path, [0, 1, 2]).set_index("name")
    assert table.loc["center_blacked", "shortcut"] and table.loc["center_blacked", "surviving_low"] > 0.9
    assert not table.loc["lungs_only", "shortcut"] and table.loc["lungs_only", "surviving_share"] < 0.3
    assert table.loc["whole_image", "retained"] == 1.0 and not table.loc["whole_image", "shortcut"]
    assert table.loc["center_blacked", "test_images"] == 120 and table.loc["center_blacked", "test_patients"] == 60


def test_the_probes_take_the_grids_engine_options(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    code = cli.main(["shortcut", "--grid-root", str(tmp_path / "grid"), "--manifest", str(tmp_path / "m.csv"),
                     "--pool-manifest", str(tmp_path / "pool.csv"), "--seeds", "0", "--out", str(tmp_path / "out"),
                     "--engine", "slurm"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "sbatch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "grid").exists() and not (tmp_path / "out").exists()
