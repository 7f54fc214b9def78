from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from nbhelpers.evaluation import metrics as M
from nbhelpers.evaluation.stats import holm, mcnemar_exact, sign_flip_test, wilson


def test_mcnemar_matches_the_binomial_test():
    assert mcnemar_exact(8, 2) == pytest.approx(sps.binomtest(2, 10, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0


def test_duplicated_seeds_do_not_shrink_the_p_value():
    # One seed: 8 images only the variant gets right, 2 only the baseline.  Pooling the
    # discordant pairs of three identical seeds (24 vs 6) makes it look far stronger.
    diffs = np.r_[np.ones(8), -np.ones(2), np.zeros(20)]
    pooled = mcnemar_exact(24, 6)
    one_seed = mcnemar_exact(8, 2)
    assert pooled < 0.01 < one_seed
    seed_averaged = np.mean([diffs, diffs, diffs], axis=0)  # identical seeds: the same per-image values
    assert sign_flip_test(seed_averaged) == pytest.approx(one_seed)


def test_sign_flips_count_patients_not_images():
    diffs = np.r_[np.ones(6), np.zeros(4)]
    many = sign_flip_test(diffs)                      # six independent images all favour the variant
    assert many == pytest.approx(2 / 64)
    one_patient = sign_flip_test(diffs, groups=["a"] * 6 + list("wxyz"))
    assert one_patient == 1.0                         # ... but they are one patient's films


def test_monte_carlo_sign_flips_agree_with_a_normal_approximation():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.3, 1.0, 60)
    p = sign_flip_test(diffs, n_perm=20000)
    t = sps.ttest_1samp(diffs, 0.0).pvalue
    assert p == pytest.approx(t, abs=0.01)


def test_holm_adjusts_and_keeps_the_order():
    adjusted = holm([0.01, 0.04, 0.03, np.nan])
    assert np.allclose(adjusted[:3], [0.03, 0.06, 0.06]) and np.isnan(adjusted[3])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0] and holm([0.02, 0.9]).tolist() == [0.04, 0.9]


def test_wilson_interval():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


def test_patient_bootstrap_is_wider_than_the_image_bootstrap_with_repeated_patients():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(20), 5)            # 20 patients with 5 films each
    right = rng.random(20) < 0.6                      # a patient's films are all right or all wrong
    y = rng.integers(0, 3, 100)
    pred = np.where(right[patients], y, (y + 1) % 3)
    probs = np.eye(3)[pred]
    by_image = M.summary_with_ci(y, probs, n=400, seed=0).set_index("metric").loc["accuracy"]
    by_patient = M.summary_with_ci(y, probs, n=400, seed=0, groups=patients).set_index("metric").loc["accuracy"]
    assert by_patient["unit"] == "patient" and by_patient["clusters"] == 20
    assert (by_patient["high"] - by_patient["low"]) > 1.8 * (by_image["high"] - by_image["low"])


def test_without_repeated_patients_both_bootstraps_agree():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probs = np.eye(3)[np.where(rng.random(200) < 0.7, y, (y + 1) % 3)]
    a = M.summary_with_ci(y, probs, n=400, seed=0).set_index("metric").loc["accuracy"]
    b = M.summary_with_ci(y, probs, n=400, seed=0, groups=np.arange(200)).set_index("metric").loc["accuracy"]
    assert (b["high"] - b["low"]) == pytest.approx(a["high"] - a["low"], rel=0.25)


def test_seed_averaging_counts_each_image_once():
    import pandas as pd

    from nbhelpers.evaluation.stats import per_image, proportion_ci

    seed0 = pd.DataFrame({"image_id": ["a", "b", "c"], "patient_id": ["p", "p", "q"], "correct": [1, 0, 1]})
    seed1 = seed0.assign(correct=[1, 1, 1])
    table = per_image([seed0, seed1])
    assert table.set_index("image_id")["correct"].to_dict() == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert (table["seeds"] == 2).all()
    one = proportion_ci(table["correct"], table["patient_id"])
    assert (one["n"], one["patients"]) == (3, 2)
    # The same images pooled over 10 identical seeds would claim n = 30; here n stays 3.
    many = per_image([seed0] * 10)
    assert len(many) == 3
    narrow = wilson(20, 30)
    honest = proportion_ci(many["correct"], many["patient_id"])
    assert honest["high"] - honest["low"] > narrow[1] - narrow[0]


def test_patient_intervals_are_wider_on_the_mirrors_repeated_patients(data_dir):
    # ieee8023 has many patients with several films; a model that is right or wrong per patient
    # (as real models largely are: one patient's films look alike) shows what the unit changes.
    from data_prep.table import load_table

    table, _ = load_table(data_dir, sources=["ieee8023"], hash_images=False)
    films = table[(table["modality"] == "X-ray") & (table["label"] != "")].reset_index(drop=True)
    per_patient = films.groupby("patient_id").size()
    assert (per_patient > 1).sum() > 50  # the structure the test is about
    rng = np.random.default_rng(0)
    right = dict(zip(per_patient.index, rng.random(len(per_patient)) < 0.7))
    y = films["label"].map({"covid": 0, "pneumonia": 1, "normal": 2}).to_numpy()
    pred = np.where(films["patient_id"].map(right), y, (y + 1) % 3)
    probs = np.eye(3)[pred]
    image = M.summary_with_ci(y, probs, n=500, seed=0).set_index("metric").loc["accuracy"]
    patient = M.summary_with_ci(y, probs, n=500, seed=0, groups=films["patient_id"]).set_index("metric").loc["accuracy"]
    assert (patient["high"] - patient["low"]) > 1.2 * (image["high"] - image["low"])
