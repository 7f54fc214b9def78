"""The shortcut tests' sentences follow the numbers: each reading appears on a table built for it."""

from __future__ import annotations

import pandas as pd

from nbhelpers.experiments.findings import blackout_sentences, external_sentences, view_sentences


def blackout_row(name, mode, acc, share, low, high):
    return {"name": name, "blackout": mode, "seeds": 3, "test_images": 120, "test_patients": 110, "chance": 1 / 3,
            "accuracy": acc, "accuracy_low": acc - 0.05, "accuracy_high": acc + 0.05,
            "surviving_share": share, "surviving_low": low, "surviving_high": high}


def test_blackout_sentences_read_shortcut_lungs_and_undecided():
    table = pd.DataFrame([blackout_row("whole_image", "none", 0.9, 1.0, 1.0, 1.0),
                          blackout_row("lungs_blacked", "lungs", 0.8, 0.8, 0.6, 0.95),
                          blackout_row("center_blacked", "center", 0.4, 0.1, 0.0, 0.3),
                          blackout_row("lungs_only", "lungs_only", 0.6, 0.5, 0.3, 0.7)])
    lines = blackout_sentences(table)
    assert len(lines) == 4  # the baseline gets no sentence; a closing sentence reads the rows together
    assert "the lung box is blacked out" in lines[0] and "allows most of the whole-image accuracy" in lines[0]
    assert "against 0.90" in lines[0]
    assert "less than half" in lines[1] and "shortcut" not in lines[1]
    assert "undecided" in lines[2] and "only the lung box is kept" in lines[2]
    assert "shortcut the data offer" in lines[3] and "Each row is its own model" in lines[3]
    kept = blackout_sentences(pd.DataFrame([blackout_row("lungs_only", "lungs_only", 0.8, 0.8, 0.6, 0.95),
                                            blackout_row("lungs_only", "lungs_only", 0.4, 0.1, 0.0, 0.3)]))
    assert "the lung box alone allows most" in kept[0] and "shortcut" not in kept[0]
    assert "allows less than half" in kept[1]


def test_both_blackouts_keeping_most_is_read_as_signal_in_both_places_not_a_contradiction():
    table = pd.DataFrame([blackout_row("whole_image", "none", 0.9, 1.0, 1.0, 1.0),
                          blackout_row("lungs_blacked", "lungs", 0.8, 0.8, 0.6, 0.95),
                          blackout_row("lungs_only", "lungs_only", 0.85, 0.9, 0.7, 1.0)])
    lines = blackout_sentences(table.assign(surviving_capped=[False, False, True]))
    assert "at least 70 %" in lines[1] and "123" not in lines[1]  # a capped share reads "at least"
    assert "in both places" in lines[-1] and "not what the whole-image model reads" in lines[-1]
    assert not any("outside the lungs" in line for line in lines)


def external_row(cls, internal, external, conclusive, spread=0.05):
    return {"class": cls, "internal_accuracy": internal, "internal_low": internal - spread,
            "internal_high": internal + spread, "internal_n": 40, "internal_sources": "nih",
            "external_accuracy": external, "external_low": external - spread, "external_high": external + spread,
            "external_n": 30 if conclusive else 4, "external_patients": 20 if conclusive else 2,
            "external_sources": "ieee8023", "conclusive": conclusive,
            "drop": internal - external, "drop_low": internal - external - 2 * spread,
            "drop_high": internal - external + 2 * spread,
            "internal_specificity": 0.9, "external_specificity": 0.9, "external_spec_low": 0.8, "external_spec_high": 0.95,
            "external_auc": 0.9, "external_auc_low": 0.8, "external_auc_high": 0.95}


def test_external_sentences_name_a_drop_an_overlap_and_a_thin_cell():
    lines = external_sentences(pd.DataFrame([external_row("covid", 0.9, 0.4, True), external_row("normal", 0.8, 0.78, True),
                                             external_row("pneumonia", 0.9, 0.1, False)]))
    assert "learnt the archive" in lines[0] and "drop +0.50 [+0.40, +0.60]" in lines[0]
    assert "no drop in sensitivity shown" in lines[1]
    assert "too few images or patients to conclude" in lines[2] and "learnt the archive" not in lines[2]


def test_a_high_external_sensitivity_with_low_specificity_is_no_transfer():
    """COVID 0.93 vs 0.93 from a model that calls most external films COVID (AUROC 0.59)."""
    row = external_row("covid", 0.93, 0.93, True) | {"external_specificity": 0.1, "external_spec_low": 0.05,
                                                     "external_spec_high": 0.2, "external_auc": 0.59,
                                                     "external_auc_low": 0.48, "external_auc_high": 0.70}
    (line,) = external_sentences(pd.DataFrame([row]))
    assert "no drop in sensitivity" in line and "shows no transfer" in line and "specificity 0.10" in line
    (fine,) = external_sentences(pd.DataFrame([external_row("covid", 0.93, 0.93, True)]))
    assert "shows no transfer" not in fine


def test_view_sentences_say_whether_the_probe_beats_chance():
    above = pd.DataFrame([{"probe_ba_pooled": 0.8, "probe_ba_low": 0.7, "probe_ba_high": 0.9, "probe_images": 50,
                           "probe_patients": 40}])
    chance = above.assign(probe_ba_pooled=0.52, probe_ba_low=0.4, probe_ba_high=0.64)
    per_view = pd.DataFrame([{"name": "base", "view": "AP", "class": "all", "accuracy": 0.6, "low": 0.5, "high": 0.7, "n": 30},
                             {"name": "base", "view": "PA", "class": "all", "accuracy": 0.8, "low": 0.7, "high": 0.9, "n": 60},
                             {"name": "base", "view": "PA", "class": "covid", "accuracy": 0.1, "low": 0.0, "high": 0.2, "n": 5}])
    lines = view_sentences(above, per_view)
    assert "above chance" in lines[0] and lines[1] == "base: accuracy per view: AP 0.60 [0.50, 0.70] (n=30), PA 0.80 [0.70, 0.90] (n=60)."
    assert "not above chance" in view_sentences(chance, None)[0]


def test_a_blackout_against_a_baseline_at_chance_says_nothing():
    at_chance = pd.DataFrame([blackout_row("whole_image", "none", 1 / 3, 1.0, 1.0, 1.0),
                              blackout_row("lungs_blacked", "lungs", 1 / 3, float("nan"), 1.0, 1.0)])
    (line,) = blackout_sentences(at_chance.assign(seeds=1))
    assert "not above chance" in line and "says nothing" in line and "1 seed:" in line
    assert "nan" not in line and "shortcut" not in line
