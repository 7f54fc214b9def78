"""The "In this run" bullets: each reads its numbers off the run, and each reading has the case
where it must say the opposite (still improving or not, within noise or not, one model twice or
two models, bars favoured or not)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep.progress import plural
from nbhelpers.experiments import takeaways


def _manifest() -> pd.DataFrame:
    rows = []
    for i in range(30):  # normals: 28 of 30 from nih; covid from three sources; two AP films of actualmed
        rows.append({"image_id": f"n{i}", "patient_id": f"pn{i // 2}", "label": "normal", "split": "train" if i < 20 else "test",
                     "source": "nih" if i < 28 else "actualmed", "view": "AP" if i >= 28 else "PA"})
        rows.append({"image_id": f"c{i}", "patient_id": f"pc{i}", "label": "covid", "split": "train" if i < 20 else "test",
                     "source": ("ieee8023", "figure1", "actualmed")[i % 3], "view": "PA"})
    return pd.DataFrame(rows)


def test_curation_reads_size_patients_joins_views_and_sources():
    summary = {"patient_merges": {"patients_merged": 4, "groups": 2, "across_sources": 1},
               "paper_recipe": {"relabelled_here": 7}}
    lines = takeaways.curation(_manifest(), summary, ["PA"])
    assert lines[0].startswith("60 images of 45 patients, 15 of them with several films; train 40 images of 30 patients")
    assert "joined 4 patient ids into 2 patients" in lines[1] and "7 of the sources' images" in lines[2]
    assert "filters ieee8023 only: 2 films of other views from other sources are in the set (actualmed 2)" in lines[3]
    assert "normal: 93 % of its films come from nih (28 of 30)." in lines
    none = takeaways.curation(_manifest().assign(view="PA"), {"patient_merges": {"patients_merged": 0}}, ["PA"])
    assert "No copy of a film carried two patient ids." in none and not any("other views" in line for line in none)


def test_preprocessing_names_a_class_that_is_one_archive_only_when_it_is():
    lines = takeaways.preprocessing(_manifest())
    assert any(line.startswith("normal comes almost all from one archive") for line in lines)
    mixed = _manifest().assign(source=lambda t: np.where(t["image_id"].str[1:].astype(int) % 2, "nih", "actualmed"))
    assert not any("almost all" in line for line in takeaways.preprocessing(mixed))


def test_training_says_still_improving_only_when_the_best_epoch_is_the_last():
    last = takeaways.training(pd.DataFrame(), {"best_epoch": 8, "epochs_run": 8, "best_val_acc": 0.6},
                              {"densenet121": {"best_val_acc": 0.7}}, "densenet121_cbam", val_images=36)
    assert "at the last epoch (8 of 8): the model was still improving" in last[0]
    assert last[1].startswith("densenet121 beat densenet121_cbam on validation (0.70 against 0.60) (one of 36")
    peaked = takeaways.training(pd.DataFrame(), {"best_epoch": 3, "epochs_run": 8, "best_val_acc": 0.6}, {}, "m")
    assert peaked == ["The validation accuracy peaked at epoch 3 of 8; the later epochs did not beat it."]


def test_evaluation_names_the_weakest_class_and_where_its_films_went():
    test = {"accuracy": 0.7, "n": 10, "n_patients": 10, "confusion": [[4, 0, 0], [1, 2, 1], [0, 0, 2]],
            "ci": [{"metric": "accuracy", "low": 0.4, "high": 0.9, "unit": "patient"}],
            "per_class": [{"class": "covid", "sensitivity": 1.0}, {"class": "pneumonia", "sensitivity": 0.5},
                          {"class": "normal", "sensitivity": 1.0}]}
    manifest = _manifest()
    errors = pd.DataFrame({"image_id": ["n28", "n29", "c1"]})
    lines = takeaways.evaluation(test, pd.DataFrame(), manifest, errors)
    assert lines[0].startswith("Accuracy 0.70 (95 % interval over patients 0.40-0.90)") and "above chance" in lines[0]
    assert lines[1] == "Weakest class: pneumonia, sensitivity 0.50 (2 of 4 right); the rest were called covid 1, normal 1."
    assert "sources actualmed 2, figure1 1; views AP 2, PA 1" in lines[2]


def _tests(diff: float, low: float, high: float, seeds: int, verdict: str) -> pd.DataFrame:
    return pd.DataFrame([{"variant": "cbam_clahe", "baseline": "cbam_noclahe", "accuracy_diff": diff, "seeds": seeds,
                          "bootstrap_ci_low": low, "bootstrap_ci_high": high, "test_images": 72, "verdict": verdict}])


def test_ablations_say_within_noise_when_the_interval_holds_zero_and_which_grid_to_believe():
    run = _tests(0.15, -0.02, 0.31, 2, "undetermined (2 seeds)")
    committed = _tests(-0.01, -0.08, 0.06, 3, "not distinguishable").assign(test_images=60)
    line = takeaways.ablations(run, committed)[0]
    assert "+0.15 [-0.02, +0.31] over 72 test images, 2 seeds: undetermined (2 seeds); within test-set noise" in line
    assert "committed grid (3 seeds, 60 images) says -0.01" in line and "here that is the committed grid." in line
    clear = takeaways.ablations(_tests(0.2, 0.05, 0.35, 3, "better"), None)[0]
    assert "the patient interval excludes 0" in clear and "committed" not in clear


def test_same_weights_finds_one_model_trained_twice_and_not_two_models():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(a.state_dict())
    assert takeaways.same_weights({"cbam": a, "other": b, "cbam_clahe": twin}) == [("cbam", "cbam_clahe")]
    assert takeaways.same_weights({"cbam": a, "other": b}) == []


def test_gradcam_reads_maps_on_the_letterbox_bars_against_their_area():
    bars = np.zeros((2, 4, 4), bool)
    bars[:, 0, :] = True  # the top row: a quarter of each image
    on_bars = np.zeros((4, 4))
    on_bars[0, :] = 1.0
    on_bars[2, 2] = 1.0  # 80 % of the map on bars covering 25 %
    elsewhere = np.ones((4, 4))
    elsewhere[0, :] = 0.0
    lines = takeaways.gradcam("m", [("a", "b")], bars, np.stack([on_bars, elsewhere]), ["covid · actualmed", "normal · nih"])
    assert lines[0].startswith("b has exactly the weights of a")
    assert "favour the letterbox bars on 1 of 2 films shown: covid · actualmed: 80 % of the map on bars covering 25 %" in lines[1]
    assert takeaways.gradcam("m", [], bars[1:], elsewhere[None], ["x"]) == [
        "No map of m on the films shown favours the letterbox bars over their area."]


def test_models_reads_the_size_table_and_what_cbam_adds():
    table = pd.DataFrame({"model": ["densenet121", "densenet121_cbam", "mobilenetv2"], "params_m": [7.0, 7.3, 2.2],
                          "gmacs_ptflops": [0.24, 0.24, 0.03]})
    lines = takeaways.models(table, 64)
    assert lines[0].startswith("At 64 px the smallest model is mobilenetv2 (2.2 M") and "largest densenet121_cbam" in lines[0]
    assert lines[1] == "CBAM adds 4 % parameters and 0 % MACs to DenseNet121."


def test_shortcut_reads_the_probe_before_and_after_each_mitigation():
    probe = {"balanced_accuracy": 0.95, "low": 0.9, "high": 0.99, "n": 40, "patients": 38}
    after = {"variant": "all", "balanced_accuracy": 0.55, "low": 0.4, "high": 0.7, "n": 40, "patients": 38}
    lines = takeaways.shortcut(probe, [after], None)
    assert "above chance" in lines[0] and lines[1].startswith("After the all mitigation") and "not distinguishable" in lines[1]


@pytest.mark.parametrize("unit, n, shown", [("image", 1, "image"), ("image", 1815, "images"), ("epoch", 8, "epochs"),
                                            ("batch", 3, "batches"), ("B", 10, "B"), ("files", 2, "files")])
def test_progress_units_agree_with_their_count(unit, n, shown):
    assert plural(unit, n) == shown
