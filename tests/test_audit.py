from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep.schema import CLASSES
from data_prep.table import load_table
from data_prep.split import check_no_leak, split_by_patient
from data_prep.errors import WorkbookError
from nbhelpers.experiments.probes import CHANCE, PROBE_CARRIERS, ProbeError, probe_manifest, source_probe
from nbhelpers.evaluation.stats import balanced_accuracy, wilson
from nbhelpers.experiments.audit import per_source_table, within_source_table
from nbhelpers.tools.cli import main

#: A small registered model that trains in seconds at 32 px on one CPU thread.
TINY = "mobilenetv2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- synthetic run


def _synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest and test predictions with known answers.

    Source ``a``: 4 covid (3 right), 2 normal (1 right).  Source ``b``: 3 normal (3 right).
    Source ``c``: 2 pneumonia (0 right), 2 normal (2 right).
    """
    spec = [("a", "covid", [0, 0, 0, 2]), ("a", "normal", [2, 0]), ("b", "normal", [2, 2, 2]),
            ("c", "pneumonia", [0, 2]), ("c", "normal", [2, 2])]
    rows, preds = [], []
    for source, label, predicted in spec:
        for p in predicted:
            image_id = f"{source}:{label}{len(rows)}"
            rows.append({"image_id": image_id, "source": source, "label": label, "split": "test"})
            preds.append({"image_id": image_id, "label": CLASSES.index(label), "pred": p})
    return pd.DataFrame(rows), pd.DataFrame(preds)


def test_wilson_interval_matches_published_values():
    # Reference values: Newcombe (1998), Table I, and the closed form at the edges.
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 3)[0] == 0.0 and wilson(3, 3)[1] == 1.0  # exact at the edges
    assert np.isnan(wilson(0, 0)).all()
    with pytest.raises(ValueError, match="between 0 and n=3"):
        wilson(4, 3)


def test_balanced_accuracy_is_the_mean_recall_of_the_classes_present():
    from sklearn.metrics import balanced_accuracy_score

    y, p = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 1, 0, 1, 0, 2])
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))


def test_per_source_table_counts_and_accuracies():
    manifest, preds = _synthetic()
    table = per_source_table(manifest, preds).set_index(["source", "class"])
    expected = {("a", "covid"): (4, 3), ("a", "normal"): (2, 1), ("a", "all"): (6, 4), ("b", "normal"): (3, 3),
                ("b", "all"): (3, 3), ("c", "pneumonia"): (2, 0), ("c", "normal"): (2, 2), ("c", "all"): (4, 2)}
    assert set(table.index) == set(expected)
    for key, (n, correct) in expected.items():
        row = table.loc[key]
        assert (row["n"], row["correct"]) == (n, correct)
        assert row["accuracy"] == pytest.approx(correct / n)
        w_low, w_high = wilson(correct, n)  # the interval is never narrower than Wilson's
        assert row["low"] <= w_low + 1e-12 and row["high"] >= w_high - 1e-12
        assert row["low"] <= row["accuracy"] <= row["high"]


def test_labels_given_as_class_names_give_the_same_table(tmp_path):
    manifest, preds = _synthetic()
    named = preds.assign(label=[CLASSES[i] for i in preds["label"]], pred=[CLASSES[i] for i in preds["pred"]])
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    pd.testing.assert_frame_equal(per_source_table(tmp_path / "manifest.csv", named), per_source_table(manifest, preds))


def test_predictions_from_another_manifest_are_refused():
    manifest, preds = _synthetic()
    with pytest.raises(ValueError, match="not in the manifest.*trained on"):
        per_source_table(manifest.iloc[1:], preds)
    with pytest.raises(KeyError, match="source"):
        per_source_table(manifest.drop(columns="source"), preds)


def test_within_source_table_keeps_mixed_sources_only():
    manifest, preds = _synthetic()
    table = within_source_table(manifest, preds, n_boot=200).set_index("source")
    assert list(table.index) == ["a", "c"]  # b holds normals only
    a, c = table.loc["a"], table.loc["c"]
    assert (a["n"], a["n_covid"], a["n_normal"], a["n_pneumonia"], a["correct"]) == (6, 4, 2, 0, 4)
    assert a["accuracy"] == pytest.approx(4 / 6)
    assert a["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert c["balanced_accuracy"] == pytest.approx(0.5)
    for row in (a, c):
        assert row["low"] <= row["accuracy"] <= row["high"]
        assert row["ba_low"] <= row["balanced_accuracy"] <= row["ba_high"]
    assert list(within_source_table(manifest, preds, sources=["c", "b"], n_boot=10)["source"]) == ["c"]


def test_tables_command_writes_both_tables(tmp_path, capsys):
    manifest, preds = _synthetic()
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "run").mkdir()
    preds.to_csv(tmp_path / "run" / "test_predictions.csv", index=False)
    assert main(["audit", "tables", "--manifest", str(tmp_path / "manifest.csv"), "--run", str(tmp_path / "run"),
                 "--out", str(tmp_path / "audit")]) == 0
    assert len(pd.read_csv(tmp_path / "audit" / "per_source.csv")) == 8
    assert list(pd.read_csv(tmp_path / "audit" / "within_source.csv")["source"]) == ["a", "c"]
    assert main(["audit", "tables", "--manifest", str(tmp_path / "missing.csv"), "--run", str(tmp_path / "run"),
                 "--out", str(tmp_path / "audit")]) == 2
    assert "missing.csv not found" in capsys.readouterr().err
    manifest.iloc[3:].to_csv(tmp_path / "other.csv", index=False)  # another run's manifest
    assert main(["audit", "tables", "--manifest", str(tmp_path / "other.csv"), "--run", str(tmp_path / "run"),
                 "--out", str(tmp_path / "audit")]) == 2
    err = capsys.readouterr().err
    assert "not in the manifest" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the probe on real images


@pytest.fixture(scope="module")
def real_manifest(data_dir) -> pd.DataFrame:
    """Every labelled image of the real mirror with a patient-grouped split (no hashing: fast)."""
    table, _ = load_table(data_dir, hash_images=False)
    table = table[table["label"] != ""].reset_index(drop=True)
    return table.assign(split=split_by_patient(table, seed=0).to_numpy())


def test_probe_manifest_relabels_one_class_by_source(real_manifest):
    table, groups = probe_manifest(real_manifest, label="normal", seed=0)
    assert list(groups) == ["nih", "actualmed+figure1+ieee8023"]  # NIH holds most normals in the mirror
    assert set(table["image_id"]) <= set(real_manifest.loc[real_manifest["label"] == "normal", "image_id"])
    assert (table.loc[table["group"] == 0, "source"] == "nih").all()
    assert (table.loc[table["group"] == 1, "source"] != "nih").all()
    assert table["label"].tolist() == [PROBE_CARRIERS[g] for g in table["group"]]
    n_other = int(((real_manifest["label"] == "normal") & (real_manifest["source"] != "nih")).sum())
    assert table["group"].value_counts().to_dict() == {0: n_other, 1: n_other}  # balanced by cutting NIH
    check_no_leak(table)
    for split in ("train", "val", "test"):
        assert set(table.loc[table["split"] == split, "group"]) == {0, 1}


def test_probe_manifest_named_sources_cap_and_errors(real_manifest):
    table, groups = probe_manifest(real_manifest, label="normal", sources=["ieee8023"], balance=False,
                                   max_per_group=20, seed=1)
    assert list(groups) == ["ieee8023", "actualmed+figure1+nih"]
    assert table["group"].value_counts().to_dict() == {0: 20, 1: 20}
    again, _ = probe_manifest(real_manifest, label="normal", sources=["ieee8023"], balance=False, max_per_group=20,
                              seed=1)
    pd.testing.assert_frame_equal(table, again)  # one seed, one probe set
    with pytest.raises(ProbeError, match="source\\(s\\) \\['rsna'\\] hold no 'normal' images"):
        probe_manifest(real_manifest, label="normal", sources=["rsna"])
    only_nih = real_manifest[real_manifest["source"] == "nih"]
    with pytest.raises(ProbeError, match="needs at least two"):
        probe_manifest(only_nih, label="normal")
    with pytest.raises(ProbeError, match="use more images"):
        probe_manifest(real_manifest, label="normal", max_per_group=2)


def test_probe_over_several_classes_balances_the_groups_within_each(real_manifest):
    table, groups = probe_manifest(real_manifest, label=["normal", "pneumonia"], seed=0)
    assert list(groups) == ["nih", "actualmed+figure1+ieee8023"]
    counts = pd.crosstab(table["image_id"].map(real_manifest.set_index("image_id")["label"]), table["group"])
    assert set(counts.index) == {"normal", "pneumonia"}
    assert (counts[0] == counts[1]).all()  # the diagnosis cannot stand in for the source
    check_no_leak(table)
    again, _ = probe_manifest(real_manifest, label=["normal", "pneumonia"], seed=0)
    pd.testing.assert_frame_equal(table, again)
    with pytest.raises(ProbeError, match="unknown class"):
        probe_manifest(real_manifest, label=["normal", "flu"])


def test_source_probe_trains_and_reports_balanced_accuracy(real_manifest, data_dir, tmp_path):
    result = source_probe(real_manifest, data_dir, tmp_path, label="normal", model=TINY, preset="smoke",
                          image_size=32, epochs=1, max_per_group=16, n_boot=200, progress=False)
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written == result
    test = result["test"]
    assert test["chance"] == CHANCE
    assert test["n"] == sum(result["counts"]["test"].values()) > 0
    assert 0.0 <= test["low"] <= test["balanced_accuracy"] <= test["high"] <= 1.0
    preds = pd.read_csv(tmp_path / "probe_predictions.csv")
    assert len(preds) == test["n"]
    assert ((preds["group"] == 0) == (preds["source"] == "nih")).all()
    assert balanced_accuracy(preds["group"], preds["pred"]) == pytest.approx(test["balanced_accuracy"])
    assert (tmp_path / "run" / "best.pt").is_file()


def test_probe_command_names_a_setup_mistake(real_manifest, data_dir, tmp_path, capsys):
    real_manifest[real_manifest["source"] == "nih"].to_csv(tmp_path / "manifest.csv", index=False)
    status = main(["audit", "probe", "--manifest", str(tmp_path / "manifest.csv"), "--data-dir", str(data_dir),
                   "--out", str(tmp_path / "probe"), "--model", TINY])
    assert status == 2
    assert "needs at least two" in capsys.readouterr().err
    assert not (tmp_path / "probe" / "run").exists()  # nothing was trained


def test_probe_command_types_set_and_preprocess_values(monkeypatch, tmp_path, capsys):
    import nbhelpers.experiments.probes as probes

    seen = {}

    def fake_probe(*args, **kwargs):
        seen.update(kwargs)
        raise WorkbookError("stop here")

    monkeypatch.setattr(probes, "source_probe", fake_probe)
    argv = ["audit", "probe", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "probe")]
    assert main(argv + ["--set", "pretrained=false", "scheduler=none", "--preprocess", "lung_crop=TRUE"]) == 2
    assert seen["pretrained"] is False and seen["scheduler"] == "none"  # bool("false") would have been True
    assert seen["preprocess"] == {"lung_crop": True}
    assert capsys.readouterr().err == "error: stop here\n"
    assert main(argv + ["--set", "pretrained=maybe"]) == 2
    assert capsys.readouterr().err == "error: pretrained must be true or false, got 'maybe'\n"
    assert main(argv + ["--preprocess", "lung_cropp=true"]) == 2
    assert "did you mean lung_crop" in capsys.readouterr().err


def test_probe_record_matches_the_probe_that_trains(real_manifest, data_dir, tmp_path):
    from nbhelpers.experiments.probes import probe_provenance

    result = source_probe(real_manifest, data_dir, tmp_path, label="normal", model=TINY, preset="smoke",
                          image_size=32, epochs=1, max_per_group=16, n_boot=50, progress=False)
    expected = probe_provenance(real_manifest, label="normal", model=TINY, preset="smoke", image_size=32, epochs=1,
                                max_per_group=16)
    assert result["provenance"] == expected and expected["task"] == "source probe"
    assert probe_provenance(real_manifest, label="normal", model=TINY, preset="smoke", image_size=32, epochs=1,
                            max_per_group=12)["manifest_hash"] != expected["manifest_hash"]
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["provenance"] == expected


# --------------------------------------------------------------------------- external sources


def _external_manifest() -> pd.DataFrame:
    rows = []
    for source, label, n in (("ieee8023", "covid", 30), ("figure1", "covid", 12), ("nih", "normal", 30),
                             ("actualmed", "normal", 4), ("nih", "pneumonia", 30), ("ieee8023", "pneumonia", 12)):
        rows += [{"image_id": f"{source}:{label}{k}", "source": source, "label": label, "path": f"{source}/{label}{k}.png",
                  "patient_id": f"{source}:{label}{k // 2}"} for k in range(n)]
    table = pd.DataFrame(rows)
    # one COVID film of figure1 is a copy of an ieee8023 patient's: that patient stays internal only
    table.loc[table["image_id"] == "figure1:covid0", "patient_id"] = "ieee8023:covid0"
    return table


def test_external_split_keeps_each_archive_on_one_side():
    from nbhelpers.experiments.external_source import external_split

    internal, external = external_split(_external_manifest(),
                                        {"covid": ["ieee8023"], "pneumonia": ["nih"], "normal": ["nih"]})
    assert set(internal["source"]) == {"ieee8023", "nih"} and set(internal["split"]) == {"train", "val", "test"}
    assert not ((internal["source"] == "ieee8023") & (internal["label"] == "pneumonia")).any()
    assert set(external["split"]) == {"test"} and set(external["source"]) == {"figure1", "actualmed", "ieee8023"}
    assert "figure1:covid0" not in set(external["image_id"])  # its patient is internal
    assert not set(internal["patient_id"]) & set(external["patient_id"])
    with pytest.raises(ProbeError, match="no 'covid' images"):
        external_split(_external_manifest(), {"covid": ["rsna"]})


def _external_runs(root, n_external: int, seeds=(0, 1)) -> list:
    from nbhelpers.experiments.external_source import EXTERNAL_PREDICTIONS

    rng = np.random.default_rng(0)
    folders = []
    for seed in seeds:
        folder = root / f"seed{seed}"
        folder.mkdir()
        for name, n, right in (("test_predictions.csv", 60, 0.95), (EXTERNAL_PREDICTIONS, n_external, 0.2)):
            labels = np.repeat([0, 1, 2], n // 3)
            pred = np.where(rng.random(len(labels)) < right, labels, (labels + 1) % 3)
            frame = pd.DataFrame({"image_id": [f"{name}{k}" for k in range(len(labels))],
                                  "patient_id": [f"p{name}{k // 2}" for k in range(len(labels))],
                                  "source": "s", "label": labels, "pred": pred})
            for c, cls in enumerate(CLASSES):
                frame[f"p_{cls}"] = (pred == c).astype(float)
            frame.to_csv(folder / name, index=False)
        folders.append(folder)
    return folders


def test_external_table_shows_a_model_that_learnt_the_archive(tmp_path):
    from nbhelpers.experiments.external_source import external_table

    table = external_table(_external_runs(tmp_path, 60)).set_index("class")
    assert (table["internal_accuracy"] > 0.85).all() and (table["external_accuracy"] < 0.4).all()
    assert (table["drop"] > 0.4).all() and table.loc["covid", "internal_n"] == 20  # distinct images, not x seeds
    assert table.loc["covid", "external_high"] < table.loc["covid", "internal_low"]
    assert table["conclusive"].all()


def test_external_table_reads_the_internal_sources_from_the_image_ids(tmp_path):
    # A training run's test_predictions.csv has no source column: the ids carry it.
    from nbhelpers.experiments.external_source import external_table
    from nbhelpers.training.config import PREDICTIONS_NAME

    folders = _external_runs(tmp_path, 60)
    for folder in folders:
        frame = pd.read_csv(folder / PREDICTIONS_NAME).drop(columns="source")
        frame.assign(image_id="nih:" + frame["image_id"].astype(str)).to_csv(folder / PREDICTIONS_NAME, index=False)
    table = external_table(folders).set_index("class")
    assert (table["internal_sources"] == "nih").all() and table.loc["covid", "internal_n"] == 20


def test_a_thin_external_cell_is_called_inconclusive(tmp_path):
    from nbhelpers.experiments.external_source import external_table

    table = external_table(_external_runs(tmp_path, 12))  # four external images per class
    assert not table["conclusive"].any() and (table["external_n"] == 4).all()


def test_accuracy_by_view_and_the_view_probe_manifest():
    from nbhelpers.experiments.probes import probe_manifest

    manifest, preds = _synthetic()
    manifest = manifest.assign(view=["PA", "AP"] * (len(manifest) // 2) + ["PA"] * (len(manifest) % 2))
    by_view = per_source_table(manifest, preds, by="view")
    assert "view" in by_view.columns and set(by_view["view"]) == {"AP", "PA"}
    assert by_view.loc[by_view["class"] == "all", "n"].sum() == len(preds)
    rows = [{"image_id": f"i{k}", "source": "ieee8023", "path": f"i{k}.png", "patient_id": f"p{k}", "label": "covid",
             "view": "PA" if k % 2 else ("AP" if k % 4 else "AP Supine")} for k in range(40)]
    table, groups = probe_manifest(pd.DataFrame(rows), "covid", ["PA"], by="view")
    assert groups == {"PA": ["PA"], "AP+AP Supine": ["AP", "AP Supine"]}
    assert table.groupby("group").size().tolist() == [20, 20]


def test_a_thin_cell_is_marked_inconclusive_and_a_full_one_is_not():
    """Cells under 10 images or 5 patients are not to be read (a 2-image Actualmed cell)."""
    rows, preds = [], []
    for k in range(14):
        source = "actualmed" if k < 2 else "nih"
        rows.append({"image_id": f"i{k}", "source": source, "label": "normal", "split": "test", "patient_id": f"p{k}"})
        preds.append({"image_id": f"i{k}", "label": CLASSES.index("normal"), "pred": CLASSES.index("normal")})
    table = per_source_table(pd.DataFrame(rows), pd.DataFrame(preds)).set_index(["source", "class"])
    assert not table.loc[("actualmed", "normal"), "conclusive"]
    assert table.loc[("nih", "normal"), "conclusive"]
    few_patients = pd.DataFrame(rows).assign(patient_id=lambda t: "p" + (t.index % 3).astype(str))
    table = per_source_table(few_patients, pd.DataFrame(preds)).set_index(["source", "class"])
    assert not table.loc[("nih", "normal"), "conclusive"]  # 12 images but 3 patients
