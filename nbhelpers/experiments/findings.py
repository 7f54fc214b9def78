"""What the shortcut tests' tables say, one sentence per row, for notebook 08 and the closing
lines of ``workbook shortcut``.

Each sentence is read off the table's numbers and intervals (never written by hand), says what
passed or failed and what it means for the reader, and names a cell too thin to conclude.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: What each blackout mode of ``PreprocessConfig.blackout`` leaves the model.
BLACKOUT_WORDS = {
    "center": "a fixed central box is blacked out",
    "lungs": "the lung box is blacked out",
    "lungs_only": "only the lung box is kept",
}
#: The balanced accuracy of a two-group probe that has learnt nothing.
CHANCE = 0.5


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def _interval(value: float, low: float, high: float, percent: bool = False) -> str:
    if percent:
        return f"{_pct(value)} [{_pct(low)}, {_pct(high)}]"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _share(row) -> str:
    """A surviving share with its interval; a capped one (its interval reached all of the accuracy)
    as "at least" its lower bound, since a share above everything means nothing more."""
    if bool(getattr(row, "surviving_capped", False)) or row.surviving_high >= 1.0:
        return f"at least {_pct(row.surviving_low)} (point {_pct(row.surviving_share)}; the interval reaches all of it)"
    return _interval(row.surviving_share, row.surviving_low, row.surviving_high, percent=True)


def blackout_sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per row of the blackout table (``shortcut_blackout``) but the whole-image
    baseline: the accuracy kept and the share of above-chance accuracy that survives, with
    intervals over patients, and what the films allow: most of the accuracy without the part
    blacked out when the share's interval lies above one half, less than half below it, otherwise
    undecided.  Each row is a model trained on blacked-out films, so a closing sentence says what
    the rows together show (what the data allow) and what they cannot (what the whole-image model
    uses)."""
    base = table[table["blackout"] == "none"]
    base_acc = float(base["accuracy"].iloc[0]) if len(base) else np.nan
    lines, most = [], {}
    for row in table[table["blackout"] != "none"].itertuples(index=False):
        words = BLACKOUT_WORDS.get(row.blackout, f"blackout={row.blackout}")
        seeds = f"{row.seeds} seed" + ("s" if row.seeds != 1 else "")
        if (np.isfinite(base_acc) and base_acc <= row.chance) or not np.isfinite(row.surviving_share):
            lines.append(f"{row.name}: when {words}, accuracy is {_interval(row.accuracy, row.accuracy_low, row.accuracy_high)}"
                         f" against {base_acc:.2f} on the whole image (chance {row.chance:.2f}) over {row.test_images} "
                         f"test images and {seeds}: the whole-image model is not above chance, so there is no "
                         "above-chance accuracy to lose and the test says nothing.")
            continue
        part = "the lung box alone" if row.blackout == "lungs_only" else "the film without " + (
            "its centre" if row.blackout == "center" else "the lung box")
        if row.surviving_low > 0.5:
            most[row.blackout] = True
            reading = f"{part} allows most of the whole-image accuracy"
        elif row.surviving_high < 0.5:
            most[row.blackout] = False
            reading = f"{part} allows less than half of it"
        else:
            reading = "the interval straddles one half: undecided at this size"
        lines.append(f"{row.name}: when {words}, accuracy is {_interval(row.accuracy, row.accuracy_low, row.accuracy_high)}"
                     f" against {base_acc:.2f} on the whole image (chance {row.chance:.2f}); {_share(row)} of the "
                     f"above-chance accuracy survives over {row.test_images} test images of {row.test_patients} "
                     f"patients and {seeds}: {reading}.")
    outside = most.get("lungs") or most.get("center")
    if outside and most.get("lungs_only"):
        lines.append("Together: the films allow most of the accuracy both without the lung box and with the lung box "
                     "alone, so the class signal is in both places. Each row is its own model trained on blacked-out "
                     "films: this shows what the data allow, not what the whole-image model reads.")
    elif outside:
        lines.append("Together: the films allow most of the accuracy without the lungs, a shortcut the data offer, as "
                     "Maguolo & Nanni (2021) found. Each row is its own model: whether the whole-image model takes "
                     "it is for its maps and the other tests to say.")
    elif most:
        lines.append("Each row is its own model trained on blacked-out films: the rows show what the data allow, not "
                     "what the whole-image model reads.")
    return lines


def external_sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per class of the external-source table (``shortcut_external``): internal
    against external sensitivity with intervals over patients, the drop with its interval, the
    external specificity and AUROC beside them (a high sensitivity from a model that calls most
    films this class is no transfer), or that the cell is too thin to conclude."""
    lines = []
    for row in (pd.Series(r) for r in table.to_dict("records")):
        sides = (f"sensitivity {row.internal_accuracy:.2f} [{row.internal_low:.2f}, {row.internal_high:.2f}] on "
                 f"{row.internal_n} internal {row.internal_sources} images against {row.external_accuracy:.2f} "
                 f"[{row.external_low:.2f}, {row.external_high:.2f}] on {row.external_n} external images of "
                 f"{row.external_patients} patients ({row.external_sources or 'none'})")
        if not row.conclusive:
            lines.append(f"{row['class']}: {sides}; too few images or patients to conclude.")
            continue
        drop = (f"drop {row['drop']:+.2f} [{row.drop_low:+.2f}, {row.drop_high:+.2f}]" if "drop_low" in row
                and np.isfinite(row.drop_low) else f"drop {row['drop']:+.2f}")
        spec = ""
        if "external_specificity" in row and np.isfinite(row.external_specificity):
            spec = (f"; external specificity {_interval(row.external_specificity, row.external_spec_low, row.external_spec_high)}"
                    f" against {row.internal_specificity:.2f} internal")
        auc_ok = "external_auc" in row and np.isfinite(row.external_auc)
        if auc_ok:
            spec += f", external AUROC {_interval(row.external_auc, row.external_auc_low, row.external_auc_high)}"
        if "drop_low" in row and np.isfinite(row.drop_low) and row.drop_low > 0:
            reading = "sensitivity falls on another archive's films: the model learnt the archive along with the disease"
        elif "drop_high" in row and np.isfinite(row.drop_high) and row.drop_high < 0:
            reading = "sensitivity rises on another archive's films"
        else:
            reading = "no drop in sensitivity shown at this size"
        if auc_ok and row.external_auc_high < 0.7 or ("external_spec_high" in row and row.external_spec_high < 0.5):
            reading += ("; but the external films are barely told apart from the other classes (low specificity or "
                        "AUROC), so the sensitivity alone shows no transfer")
        lines.append(f"{row['class']}: {sides}, {drop}{spec}; {reading}.")
    return lines


def view_sentences(view_probe: pd.DataFrame | None, per_view: pd.DataFrame | None) -> list[str]:
    """What the view probe (``shortcut_view_probe``: can the model tell AP from PA COVID-19 films?)
    and the per-view accuracy (``shortcut_per_view``) say: the probe's pooled balanced accuracy
    against chance, and per row the accuracy of each view with its interval."""
    lines = []
    if view_probe is not None and len(view_probe):
        row = view_probe.iloc[0]
        ba = _interval(row["probe_ba_pooled"], row["probe_ba_low"], row["probe_ba_high"])
        verdict = ("above chance: the films carry their view, a cue a classifier can use where the classes "
                   "differ in their AP/PA mix" if row["probe_ba_low"] > CHANCE else
                   "not above chance: no view signal shown at this size")
        lines.append(f"View probe: balanced accuracy {ba} over {row['probe_images']} COVID-19 test images of "
                     f"{row['probe_patients']} patients, {verdict}.")
    if per_view is not None and len(per_view):
        overall = per_view[per_view["class"] == "all"] if "class" in per_view else per_view
        for name, part in overall.groupby("name", sort=False):
            cells = ", ".join(f"{r.view} {r.accuracy:.2f} [{r.low:.2f}, {r.high:.2f}] (n={r.n})"
                              for r in part.itertuples(index=False))
            lines.append(f"{name}: accuracy per view: {cells}.")
    return lines


def paired_sentences(tests: pd.DataFrame) -> list[str]:
    """One sentence per row of the ablation's paired tests (``paired_tests``): the accuracy
    difference of the variant against its baseline on the same test images with its intervals,
    and the verdict; a test of one seed says that the seed interval is undefined."""
    lines = []
    for row in tests.itertuples(index=False):
        seeds = int(row.seeds)
        seed_part = (f"seed interval {row.seed_ci_low:+.2f} to {row.seed_ci_high:+.2f}" if seeds > 1 and
                     not np.isnan(row.seed_ci_low) else "one seed, so no interval over seeds")
        if bool(row.distinguishable):
            verdict = "distinguishable: " + ("the variant is better" if row.accuracy_diff > 0 else "the variant is worse")
        else:
            verdict = "not distinguishable from its baseline on these images"
        lines.append(f"{row.variant} vs {row.baseline}: accuracy {row.accuracy_diff:+.2f} on {int(row.test_images)} test "
                     f"images of {int(row.test_patients)} patients (patient bootstrap {row.bootstrap_ci_low:+.2f} to "
                     f"{row.bootstrap_ci_high:+.2f}; {seed_part}; Holm p {row.p_holm:.2g}): {verdict}.")
    return lines


def probe_sentence(test: dict, what: str = "the archive") -> str:
    """What a source probe's test result (``probe.json``'s ``test``: balanced_accuracy, low, high,
    n, patients) says: above chance means the images carry ``what``'s signature."""
    ba = _interval(test["balanced_accuracy"], test["low"], test["high"])
    if test["low"] > CHANCE:
        verdict = f"above chance: the images carry {what}'s signature, a cue the diagnosis model can use"
    elif test["high"] < CHANCE:
        verdict = "below chance: a probe that learnt something wrong, or a split too small to trust"
    else:
        verdict = f"not distinguishable from chance: no signature of {what} shown at this size"
    return (f"Probe: balanced accuracy {ba} over {test['n']} test images of {test.get('patients', '?')} patients "
            f"(chance {CHANCE}): {verdict}.")
