from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import real_manifest

from data_prep.errors import WorkbookError
from nbhelpers.evaluation import stats
from nbhelpers.experiments import ablation
from nbhelpers.tools import cli
from nbhelpers.experiments.ablation import GridError, Row


def test_the_grid_declares_the_papers_rows():
    rows = ablation.load_grid()
    groups = {r.group for r in rows}
    assert {"cbam", "lgfnet", "clahe", "fpn"} <= groups
    cbam = {r.name: r for r in ablation.load_grid(groups=["cbam"])}
    assert cbam["densenet121"].baseline and cbam["densenet121"].options == {"attention": "none"}
    assert cbam["densenet121_cbam"].paper_accuracy == 0.861  # a fraction, like ours
    assert len([r for r in rows if r.group == "lgfnet"]) == 5  # seed 000's five ablation rows
    with pytest.raises(GridError, match="known groups"):
        ablation.load_grid(groups=["cbm"])


def test_every_grid_row_names_a_registered_model_and_its_options():
    from nbhelpers import models

    for row in ablation.load_grid():
        assert models.model_spec(row.model)  # the registry knows the model ...
        if row.options:  # ... and accepts its options (checked without building heavy nets twice)
            assert set(row.options) <= set(models.model_spec(row.model).options)


def test_a_paper_figure_in_percent_is_refused(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[[row]]\ngroup = "g"\nname = "a"\nmodel = "densenet121"\nbaseline = true\npaper_accuracy = 86.1\n')
    with pytest.raises(GridError, match="as a fraction"):
        ablation.load_grid(path)


def test_a_grid_without_baseline_is_refused(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[[row]]\ngroup = "g"\nname = "a"\nmodel = "densenet121"\n')
    with pytest.raises(GridError, match="baseline"):
        ablation.load_grid(path)


def _fake_run(root, row, seed, correct):
    folder = ablation.run_dir(root, row, seed)
    folder.mkdir(parents=True)
    labels = np.zeros(len(correct), int)
    pd.DataFrame({"image_id": [f"img{i}" for i in range(len(correct))], "label": labels,
                  "pred": np.where(correct, 0, 1)}).to_csv(folder / "test_predictions.csv", index=False)


def test_paired_tests_see_a_real_difference_and_not_a_null_one(tmp_path):
    base, good, same = Row("g", "base", "m", baseline=True), Row("g", "good", "m"), Row("g", "same", "m")
    rng = np.random.default_rng(0)
    for seed in (0, 1, 2):
        reference = rng.random(200) < 0.6
        _fake_run(tmp_path, base, seed, reference)
        _fake_run(tmp_path, good, seed, reference | (rng.random(200) < 0.5))  # fixes about half the errors
        _fake_run(tmp_path, same, seed, reference)
    tests = ablation.paired_tests([base, good, same], tmp_path, [0, 1, 2]).set_index("variant")
    assert tests.loc["good", "accuracy_diff"] > 0.1 and tests.loc["good", "distinguishable"]
    assert tests.loc["good", "variant_worse"] == 0 and tests.loc["good", "p_value"] < 1e-3
    assert tests.loc["good", "test_images"] == 200  # distinct images, not images x seeds
    assert tests.loc["same", "accuracy_diff"] == 0 and not tests.loc["same", "distinguishable"]
    assert tests.loc["same", "p_value"] == 1.0


def test_duplicated_seeds_give_the_single_seed_p_value(tmp_path):
    # Before: McNemar pooled the discordant images of every seed, so three copies of one run
    # looked three times as convincing as the run itself.
    from scipy import stats as sps

    base, variant = Row("g", "base", "m", baseline=True), Row("g", "variant", "m")
    reference = np.r_[np.zeros(10, bool), np.ones(30, bool)]
    better = reference.copy()
    better[:7] = True                # right on 7 images the baseline gets wrong ...
    better[10:12] = False            # ... wrong on 2 it gets right
    for seed in (0, 1, 2):
        _fake_run(tmp_path, base, seed, reference)
        _fake_run(tmp_path, variant, seed, better)
    single = sps.binomtest(2, 9, 0.5).pvalue
    one = ablation.paired_tests([base, variant], tmp_path, [0]).iloc[0]
    three = ablation.paired_tests([base, variant], tmp_path, [0, 1, 2]).iloc[0]
    assert one["p_value"] == pytest.approx(single) and three["p_value"] == pytest.approx(single)
    assert three["mcnemar_p_seeds"] == " ".join([f"{single:.3g}"] * 3)
    assert three["test_images"] == 40


def test_p_values_are_holm_adjusted_within_a_group(tmp_path):
    base = Row("g", "base", "m", baseline=True)
    variants = [Row("g", f"v{k}", "m") for k in range(3)]
    rng = np.random.default_rng(3)
    reference = rng.random(120) < 0.5
    _fake_run(tmp_path, base, 0, reference)
    for k, row in enumerate(variants):
        _fake_run(tmp_path, row, 0, reference | (rng.random(120) < 0.1 * k))
    tests = ablation.paired_tests([base, *variants], tmp_path, [0])
    from nbhelpers.evaluation.stats import holm

    assert np.allclose(tests["p_holm"], holm(tests["p_value"].to_numpy()))
    assert (tests["p_holm"] >= tests["p_value"]).all()
    # one seed: no seed interval, so no verdict either way, however small p is
    assert (tests["verdict"] == "undetermined (1 seed)").all() and not tests["distinguishable"].any()


@pytest.mark.parametrize("n_seeds", [1, 2, 3])
def test_a_verdict_needs_three_seeds_and_is_monotone_in_evidence(tmp_path, n_seeds):
    """The same clear gain: undetermined with 1 or 2 seeds (where the earlier rule said
    "distinguishable" for 1 and "not" for 2), better with 3."""
    base, good = Row("g", "base", "m", baseline=True), Row("g", "good", "m")
    rng = np.random.default_rng(0)
    for seed in range(n_seeds):
        reference = rng.random(200) < 0.6
        _fake_run(tmp_path, base, seed, reference)
        _fake_run(tmp_path, good, seed, reference | (rng.random(200) < 0.5))
    row = ablation.paired_tests([base, good], tmp_path, list(range(n_seeds))).iloc[0]
    assert row["p_holm"] < 1e-3
    if n_seeds < 3:
        assert row["verdict"] == f"undetermined ({n_seeds} seed{'s' if n_seeds > 1 else ''})"
        assert np.isnan(row["seed_ci_low"]) and np.isnan(row["seed_ci_high"])  # shown "—", never ±1.00
    else:
        assert row["verdict"] == "better" and row["seed_ci_low"] > 0


def test_verdict_rule_both_sides():
    assert stats.verdict(3, 0.01, 0.02, 0.1, 0.05) == "better"
    assert stats.verdict(3, 0.01, -0.1, -0.02, -0.05) == "worse"
    assert stats.verdict(3, 0.01, -0.01, 0.1, 0.05) == "not distinguishable"  # seed interval holds 0
    assert stats.verdict(3, 0.2, 0.02, 0.1, 0.05) == "not distinguishable"  # p too large
    assert stats.verdict(2, 0.001, float("nan"), float("nan"), 0.05) == "undetermined (2 seeds)"


def test_paired_tests_match_images_by_id_across_seeds(tmp_path):
    """A seed whose predictions list the images in another order is matched by id, not by row;
    a seed scored on other images is refused."""
    base, variant = Row("g", "base", "m", baseline=True), Row("g", "v", "m")
    reference = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    for seed in (0, 1, 2):
        _fake_run(tmp_path, base, seed, reference)
        _fake_run(tmp_path, variant, seed, reference)
    shuffled = ablation.run_dir(tmp_path, variant, 1) / "test_predictions.csv"
    table = pd.read_csv(shuffled)
    table.iloc[::-1].to_csv(shuffled, index=False)  # same calls, reversed rows
    row = ablation.paired_tests([base, variant], tmp_path, [0, 1, 2]).iloc[0]
    assert row["accuracy_diff"] == 0 and row["variant_better"] == 0 and row["variant_worse"] == 0
    table.assign(image_id=table["image_id"] + "x").to_csv(shuffled, index=False)
    with pytest.raises(ValueError, match="seed 1 was scored on other test images"):
        ablation.paired_tests([base, variant], tmp_path, [0, 1, 2])


def test_summary_gives_mean_std_and_both_intervals(tmp_path):
    runs = pd.DataFrame({"group": "g", "name": "a", "baseline": True, "seed": [0, 1, 2],
                         "accuracy": [0.8, 0.82, 0.84], "macro_sensitivity": 0.8, "macro_specificity": 0.9,
                         "macro_f1": 0.8})
    row = Row("g", "a", "m", baseline=True, paper_accuracy=0.861)
    table = ablation.summarise(runs, [row]).iloc[0]
    assert table["accuracy_mean"] == pytest.approx(0.82) and table["accuracy_std"] == pytest.approx(0.02)
    assert table["accuracy_seed_low"] < 0.82 < table["accuracy_seed_high"]
    assert table["paper_accuracy"] == pytest.approx(0.861)  # a fraction, like ours
    # the patient bootstrap of the seed-averaged accuracy, from the runs' predictions
    rng = np.random.default_rng(1)
    for seed in (0, 1, 2):
        _fake_run(tmp_path, row, seed, rng.random(100) < 0.8)
    table = ablation.summarise(runs, [row], tmp_path, [0, 1, 2]).iloc[0]
    assert table["accuracy_boot_low"] < table["accuracy_boot_high"] and table["test_images"] == 100
    two = ablation.summarise(runs.head(2), [row]).iloc[0]
    assert np.isnan(two["accuracy_seed_low"])  # two seeds: no t-interval of [0, 1]


def test_per_source_pools_seeds_and_splits_by_archive(tmp_path):
    base = Row("g", "base", "m", baseline=True)
    manifest = pd.DataFrame({"image_id": [f"img{i}" for i in range(4)], "source": ["nih", "nih", "ieee8023", "ieee8023"],
                             "label": ["covid"] * 4, "split": "test", "path": "x", "patient_id": ["a", "b", "c", "d"]})
    _fake_run(tmp_path, base, 0, np.array([True, True, False, False]))
    _fake_run(tmp_path, base, 1, np.array([True, False, False, False]))
    table = ablation.per_source(manifest=manifest, rows=[base], out_root=tmp_path, seeds=[0, 1])
    cells = table[table["class"] == "covid"].set_index("source")
    # two distinct images scored by two seeds: n counts images once, correct is seed-averaged
    assert cells.loc["nih", "n"] == 2 and cells.loc["nih", "correct"] == 1.5 and cells.loc["nih", "seeds"] == 2
    assert cells.loc["nih", "patients"] == 2
    assert cells.loc["ieee8023", "accuracy"] == 0.0


# --------------------------------------------------------------------------- command line and reuse of finished runs


def _stop_with(seen):
    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise WorkbookError("stop here")
    return fake


def test_cli_types_set_values_and_exits_2_for_a_setup_error(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(ablation, "run_grid", _stop_with(seen))
    argv = ["grid", "--manifest", str(tmp_path / "m.csv"), "--groups", "cbam", "--out", str(tmp_path)]
    assert cli.main(argv + ["--set", "pretrained=false", "--set", "epochs=2"]) == 2
    assert seen["pretrained"] is False and seen["epochs"] == 2  # bool("false") would have been True
    assert capsys.readouterr().err == "error: stop here\n"
    assert cli.main(argv + ["--set", "epochs=two"]) == 2
    assert capsys.readouterr().err == "error: epochs must be an integer, got 'two'\n"
    assert cli.main(["grid", "--manifest", "m.csv", "--groups", "cbm"]) == 2
    assert "known groups" in capsys.readouterr().err


def _real_manifest(data_dir, per_class: int = 3) -> pd.DataFrame:
    """``per_class`` real mirror images per class: train, val, test, then train."""
    return real_manifest(data_dir, per_class, ["train", "val", "test"] + ["train"] * (per_class - 3))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_finished_run_is_reused_only_while_it_is_what_would_be_trained(data_dir, tmp_path, capsys):
    from nbhelpers.training.runs import load_run

    rows = [Row("g", "base", "mobilenetv2", baseline=True)]
    grid = dict(data_dir=data_dir, out_root=tmp_path, seeds=[0], preset="smoke", device="cpu", image_size=32)
    metrics = ablation.run_dir(tmp_path, rows[0], 0) / "metrics.json"
    first = ablation.run_grid(rows, _real_manifest(data_dir), **grid)
    assert "0 of 1 runs already finished" in capsys.readouterr().out
    written = metrics.stat().st_mtime_ns
    again = ablation.run_grid(rows, _real_manifest(data_dir), **grid)
    assert "1 of 1 runs already finished" in capsys.readouterr().out
    assert metrics.stat().st_mtime_ns == written  # unchanged inputs: reused, not retrained
    pd.testing.assert_frame_equal(first, again)
    ablation.run_grid(rows, _real_manifest(data_dir), epochs=2, **grid)
    out = capsys.readouterr().out
    assert "retraining" in out and "epochs 1, not 2" in out and "0 of 1 runs already finished" in out
    assert len(load_run(metrics.parent).log) == 2
    ablation.run_grid(rows, _real_manifest(data_dir, per_class=4), epochs=2, **grid)
    out = capsys.readouterr().out
    assert "retraining" in out and "manifest_hash" in out
    assert load_run(metrics.parent).metrics["data"]["counts"]["train"] == 6


def test_an_external_row_trains_on_its_archives_and_scores_the_others(monkeypatch, tmp_path):
    row = ablation.load_grid(groups=["external"])[0]
    assert row.train_sources == {"covid": ["ieee8023"], "pneumonia": ["nih"], "normal": ["nih"]}
    manifest = pd.DataFrame([{"image_id": f"{src}:{lab}{k}", "source": src, "label": lab, "path": f"{src}/{lab}{k}.png",
                              "split": "train",
                              "patient_id": f"{src}:{lab}{k}"}
                             for src, lab in (("ieee8023", "covid"), ("figure1", "covid"), ("nih", "normal"),
                                              ("ieee8023", "normal"), ("nih", "pneumonia")) for k in range(20)])
    seen = {}

    def fake_train(model, table, *args, **kwargs):
        seen["internal"] = table
        raise RuntimeError("stop after planning")

    monkeypatch.setattr("nbhelpers.training.runs.train_run", fake_train)
    with pytest.raises(RuntimeError, match="stop after planning"):
        ablation.run_grid([row], manifest, None, tmp_path, [0], "smoke", device="cpu")
    internal = seen["internal"]
    assert set(zip(internal["source"], internal["label"])) == {("ieee8023", "covid"), ("nih", "normal"), ("nih", "pneumonia")}
    assert set(internal["split"]) == {"train", "val", "test"}


def test_a_row_with_the_record_of_a_finished_run_takes_it_over(monkeypatch, tmp_path, capsys):
    import json

    row_a, row_b = Row("a", "base", "m", baseline=True), Row("b", "same", "m", baseline=True)
    record = {"model": "m"}
    monkeypatch.setattr("nbhelpers.training.runs.run_provenance", lambda *a, **k: record)
    folder = ablation.run_dir(tmp_path, row_a, 0)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"provenance": record, "config": {}, "test": {"accuracy": 0.5}}))
    (folder / "test_predictions.csv").write_text("image_id,label,pred\nx,0,0\n")
    monkeypatch.setattr("nbhelpers.training.runs.train_run", lambda *a, **k: pytest.fail("must not train"))
    ablation.run_grid([row_a, row_b], pd.DataFrame(), None, tmp_path, [0], "smoke", device="cpu")
    copied = ablation.run_dir(tmp_path, row_b, 0)
    assert (copied / "test_predictions.csv").read_text() == (folder / "test_predictions.csv").read_text()
    assert "copied, not trained again" in capsys.readouterr().out


def test_a_row_that_is_a_finished_run_outside_the_grid_takes_it_over_and_another_record_trains(monkeypatch, tmp_path):
    import json

    row = Row("clahe", "cbam_clahe", "m", baseline=True)
    outside = tmp_path / "train" / "m"  # notebook 04's run of the same model, settings and data
    outside.mkdir(parents=True)
    (outside / "metrics.json").write_text(json.dumps({"provenance": {"model": "m"}, "config": {}, "test": {}}))
    (outside / "test_predictions.csv").write_text("image_id,label,pred\nx,0,0\n")
    record = {"model": "m"}
    monkeypatch.setattr("nbhelpers.training.runs.run_provenance", lambda *a, **k: record)
    monkeypatch.setattr("nbhelpers.training.runs.train_run", lambda *a, **k: pytest.fail("must not train"))
    ablation.run_grid([row], pd.DataFrame(), None, tmp_path / "grid", [0], "smoke", device="cpu", twins_from=[outside])
    assert (ablation.run_dir(tmp_path / "grid", row, 0) / "test_predictions.csv").is_file()
    record = {"model": "m", "epochs": 9}  # another record: the outside run is not this row's
    monkeypatch.setattr("nbhelpers.training.runs.train_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("trains")))
    with pytest.raises(RuntimeError, match="trains"):
        ablation.run_grid([row], pd.DataFrame(), None, tmp_path / "grid2", [0], "smoke", device="cpu",
                          twins_from=[outside])
