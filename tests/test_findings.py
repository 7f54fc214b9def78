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
    cell = {"name": "base", "conclusive": True, "low": 0.5, "high": 0.7, "n": 30}
    per_view = pd.DataFrame([cell | {"view": "AP", "class": "all", "accuracy": 0.6},
                             cell | {"view": "AP", "class": "covid", "accuracy": 0.6},
                             cell | {"view": "PA", "class": "covid", "accuracy": 0.9, "low": 0.8, "high": 0.95, "n": 60},
                             cell | {"view": "AP", "class": "normal", "accuracy": 0.6},
                             cell | {"view": "PA", "class": "normal", "accuracy": 0.65},
                             cell | {"view": "(blank)", "class": "normal", "accuracy": 0.0, "low": 0.0, "high": 0.7,
                                     "n": 3, "patients": 3, "conclusive": False}])
    lines = view_sentences(above, per_view)
    assert "above chance" in lines[0]
    assert lines[1] == ("base, accuracy per view within each class: covid: AP 0.60 [0.50, 0.70] (n=30), PA 0.90 "
                        "[0.80, 0.95] (n=60), the intervals part: accuracy differs by view within the class; normal: "
                        "AP 0.60 [0.50, 0.70] (n=30), PA 0.65 [0.50, 0.70] (n=30), the intervals overlap: no "
                        "difference by view shown.")
    assert lines[2] == "base: too few images or patients to read: normal (blank) (n=3)."
    assert "0.00" not in " ".join(lines)  # the thin cell's accuracy is never read
    assert "not above chance" in view_sentences(chance, None)[0]


def test_a_blackout_against_a_baseline_at_chance_says_nothing():
    at_chance = pd.DataFrame([blackout_row("whole_image", "none", 1 / 3, 1.0, 1.0, 1.0),
                              blackout_row("lungs_blacked", "lungs", 1 / 3, float("nan"), 1.0, 1.0)])
    (line,) = blackout_sentences(at_chance.assign(seeds=1))
    assert "not above chance" in line and "says nothing" in line and "1 seed:" in line
    assert "nan" not in line and "shortcut" not in line


def mitigation_row(name, **changes):
    row = {"name": name, "accuracy": 0.71, "accuracy_low": 0.6, "accuracy_high": 0.8,
           "overall_diff": float("nan"), "overall_diff_low": float("nan"), "overall_diff_high": float("nan"),
           "overall_p_holm": float("nan"), "overall_verdict": "", "within_source_n": 42, "within_source_patients": 40,
           "within_conclusive": True, "within_source_accuracy": 0.56, "within_low": 0.41, "within_high": 0.7,
           "within_source_balanced": 0.32, "within_diff": float("nan"), "within_diff_low": float("nan"),
           "within_diff_high": float("nan"), "within_diff_p_holm": float("nan"), "within_verdict": "",
           "probe_images": 104, "probe_patients": 102, "probe_ba_pooled": 0.87, "probe_ba_low": 0.8,
           "probe_ba_high": 0.92, "probe_diff": float("nan"), "probe_diff_low": float("nan"),
           "probe_diff_high": float("nan")}
    return row | changes


def test_mitigation_sentences_follow_the_verdicts_not_the_points():
    from nbhelpers.experiments.findings import mitigation_sentences

    table = pd.DataFrame([
        mitigation_row("no_mitigation"),
        # overall 0.71 -> 0.65 with Holm p 0.44: not distinguishable, so no "probably archive recognition"
        mitigation_row("all_mitigations", accuracy=0.65, overall_diff=-0.06, overall_diff_low=-0.15,
                       overall_diff_high=0.03, overall_p_holm=0.44, overall_verdict="not distinguishable",
                       within_source_balanced=0.536, within_diff=-0.02, within_diff_low=-0.15, within_diff_high=0.11,
                       within_diff_p_holm=1.0, within_verdict="not distinguishable",
                       probe_ba_pooled=0.69, probe_ba_low=0.6, probe_ba_high=0.77, probe_diff=-0.17,
                       probe_diff_low=-0.28, probe_diff_high=-0.08),
        # +0.11 with a patient interval above 0 but a seed interval holding 0: not "stands out"
        mitigation_row("hist_match", within_diff=0.11, within_diff_low=0.05, within_diff_high=0.18,
                       within_diff_p_holm=0.02, within_verdict="not distinguishable", overall_diff=-0.03,
                       overall_diff_low=-0.1, overall_diff_high=0.05, overall_p_holm=1.0,
                       overall_verdict="not distinguishable", probe_diff=0.03, probe_diff_low=-0.04,
                       probe_diff_high=0.09)])
    text = "\n".join(mitigation_sentences(table))
    assert "probably" not in text and "stands out" not in text
    assert "Overall accuracy, all_mitigations: 0.65 against 0.71" in text and "no change shown" in text
    assert "Within-source, hist_match" in text and "the seed interval or the adjusted p does not" in text
    assert "Within-source balanced accuracy ranges 0.32-0.54" in text  # read from the table, all rows
    assert "Source probe, all_mitigations: 0.69 [0.60, 0.77], paired change -0.17 [-0.28, -0.08]: lower and still above chance" in text
    assert "Source probe, hist_match" in text and "no change shown" in text
    thin = mitigation_sentences(table.assign(within_conclusive=False, within_source_n=3))
    assert "3 images, too few to read" in "\n".join(thin) and "Within-source, hist_match" not in "\n".join(thin)


def test_ablation_sentences_say_the_rows_check_the_pipeline_and_show_paper_figures_as_fractions():
    from nbhelpers.experiments.findings import ablation_sentences

    summary = pd.DataFrame([{"group": "lgfnet", "name": "mobilenetv2", "seeds": 3, "test_images": 60,
                             "accuracy_boot_low": 0.3, "accuracy_boot_high": 0.52, "paper_accuracy": 0.9365,
                             "paper_metric": "macro_ovr_accuracy", "ours_on_paper_metric": 0.61}])
    tests = pd.DataFrame([{"variant": "dual", "baseline": "mobilenetv2", "seeds": 2, "test_images": 60,
                           "test_patients": 58, "accuracy_diff": 0.28, "bootstrap_ci_low": 0.1,
                           "bootstrap_ci_high": 0.4, "seed_ci_low": float("nan"), "seed_ci_high": float("nan"),
                           "p_holm": 0.001, "verdict": "undetermined (2 seeds)", "distinguishable": False}])
    lines = ablation_sentences(summary, tests)
    assert "check that every model" in lines[0] and "not the papers' claimed gains" in lines[0]
    assert "mobilenetv2 0.61 against the paper's 0.94 (ACC (eq. 12), its own data)" in lines[1]
    assert "seed interval — (2 seeds)" in lines[2] and lines[2].endswith("undetermined (2 seeds).")
    assert "1.00" not in lines[2]


def test_cam_sentences_count_verdicts_from_the_interval():
    from nbhelpers.experiments.findings import cam_sentences

    energy = pd.DataFrame({"model": ["g/a", "g/b", "g/c"], "images": 14, "patients": 14, "energy_mean": [0.2, 0.33, 0.5],
                           "area_mean": 0.35, "excess_ci_low": [-0.2, -0.1, 0.05], "excess_ci_high": [-0.05, 0.02, 0.2]})
    lines = cam_sentences(energy)
    assert lines[0] == "CAM lung energy on 14 held-out COVID-19 films of 14 patients, 3 rows:"
    assert lines[1].startswith("1 of 3 favour the lungs") and "c 0.50 vs 0.35" in lines[1]
    assert lines[2].startswith("1 of 3 put less") and lines[3].startswith("1 of 3 cannot be told")


def test_the_committed_findings_block_is_current():
    """Every sentence of results/README.md's findings block is what the committed tables say now:
    a table regenerated without rewriting the block fails here (``workbook findings`` fixes it)."""
    from nbhelpers.experiments.findings import BEGIN, END, readme_block
    from nbhelpers.settings.config import RESULTS_DIR

    text = (RESULTS_DIR / "README.md").read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    committed = text[text.index(BEGIN): text.index(END) + len(END)]
    assert committed == readme_block(RESULTS_DIR / "tables")


def test_a_stale_findings_block_is_found(tmp_path, capsys):
    from nbhelpers.experiments.findings import BEGIN, END
    from nbhelpers.tools import cli

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\n- accuracy 0.99\n{END}\nrest\n")
    tables = tmp_path / "tables"
    tables.mkdir()
    pd.DataFrame([blackout_row("whole_image", "none", 0.9, 1.0, 1.0, 1.0),
                  blackout_row("lungs_blacked", "lungs", 0.8, 0.8, 0.6, 0.95)]).assign(
        surviving_capped=False).to_csv(tables / "shortcut_blackout.csv")
    args = ["findings", "--tables", str(tables), "--readme", str(readme)]
    assert cli.main(args + ["--check"]) == 1 and "stale" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert cli.main(args + ["--check"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "0.99" not in text and "lungs_blacked" in text
    readme.write_text("no block here\n")
    assert cli.main(args) == 2 and "findings block" in capsys.readouterr().err


def test_a_table_made_under_earlier_rules_is_named_stale_not_read(tmp_path):
    from nbhelpers.experiments.findings import readme_block

    old = pd.DataFrame([blackout_row("whole_image", "none", 0.9, 1.0, 1.0, 1.0),
                        blackout_row("lungs_blacked", "lungs", 0.8, 0.8, 0.6, 1.2)])  # no surviving_capped column
    old.to_csv(tmp_path / "shortcut_blackout.csv", index=False)
    (tmp_path / "shortcut_blackout.md").write_text("Made by `workbook shortcut` on 2026-12-01; data: x\n\n| a |\n")
    block = readme_block(tmp_path)
    assert "lungs_blacked" not in block and "120 %" not in block
    assert "`tables/shortcut_blackout.md` (made 2026-12-01) predates the current split and statistics" in block
    old.assign(surviving_capped=False).to_csv(tmp_path / "shortcut_blackout.csv", index=False)
    assert "lungs_blacked" in readme_block(tmp_path) and "predates" not in readme_block(tmp_path)
