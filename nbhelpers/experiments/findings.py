"""What the committed tables say, one sentence per row, for the notebooks, the closing lines of
``workbook shortcut`` and the findings block of ``results/README.md`` (``workbook findings``).

Each sentence is read off the table's numbers and intervals (never written by hand), says what
passed or failed and what it means for the reader, and names a cell too thin to conclude.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
    against chance, and per row the views compared *within each class* (across classes the view
    mix differs, so a pooled comparison would read the class mix), thin cells named and not read."""
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
        view = "view" if "view" in per_view.columns else "source"
        cells = per_view[per_view["class"] != "all"] if "class" in per_view else per_view
        for name, part in cells.groupby("name", sort=False):
            read, thin = [], []
            for cls, views in part.groupby("class", sort=False):
                good = views["conclusive"].astype(bool) if "conclusive" in views else pd.Series(True, views.index)
                ok = views[good]
                thin += [f"{cls} {v} (n={n})" for v, n in zip(views.loc[~good, view], views.loc[~good, "n"])]
                if len(ok) < 2:
                    continue
                shown = ", ".join(f"{v} {a:.2f} [{lo:.2f}, {hi:.2f}] (n={n})"
                                  for v, a, lo, hi, n in zip(ok[view], ok["accuracy"], ok["low"], ok["high"], ok["n"]))
                apart = ok["low"].max() > ok["high"].min()
                read.append(f"{cls}: {shown}, " + ("the intervals part: accuracy differs by view within the class"
                                                   if apart else "the intervals overlap: no difference by view shown"))
            if read:
                lines.append(f"{name}, accuracy per view within each class: " + "; ".join(read) + ".")
            if thin:
                lines.append(f"{name}: too few images or patients to read: " + ", ".join(thin) + ".")
    return lines


def _seed_part(row) -> str:
    seeds = int(row.seeds)
    if np.isfinite(row.seed_ci_low) and np.isfinite(row.seed_ci_high):
        return f"seed interval {row.seed_ci_low:+.2f} to {row.seed_ci_high:+.2f}"
    return f"seed interval — ({seeds} seed{'s' if seeds != 1 else ''})"


def paired_sentences(tests: pd.DataFrame) -> list[str]:
    """One sentence per row of the ablation's paired tests (``paired_tests``): the accuracy
    difference of the variant against its baseline on the same test images with its intervals,
    and the table's ``verdict`` (better, worse, not distinguishable, or undetermined under three
    seeds, where the seed interval is shown as "—")."""
    lines = []
    for row in tests.itertuples(index=False):
        verdict = getattr(row, "verdict", None) or ("distinguishable" if row.distinguishable else "not distinguishable")
        if verdict in ("better", "worse"):
            verdict = f"the variant is {verdict}"
        elif verdict == "not distinguishable":
            verdict = "not distinguishable from its baseline on these images"
        lines.append(f"{row.variant} vs {row.baseline}: accuracy {row.accuracy_diff:+.2f} on {int(row.test_images)} test "
                     f"images of {int(row.test_patients)} patients (patient bootstrap {row.bootstrap_ci_low:+.2f} to "
                     f"{row.bootstrap_ci_high:+.2f}; {_seed_part(row)}; Holm p {row.p_holm:.2g}): {verdict}.")
    return lines


def ablation_sentences(summary: pd.DataFrame, tests: pd.DataFrame, chance: float = 1 / 3) -> list[str]:
    """What the reduced ablation grid says: a framing sentence (small from-scratch runs check the
    pipeline; they cannot speak to the papers' gains), each row with a paper figure set beside it
    on the same metric, and one sentence per paired test (:func:`paired_sentences`)."""
    n_images = int(summary["test_images"].iloc[0]) if "test_images" in summary and len(summary) else None
    lines = ["These rows are small from-scratch CPU runs (64 px, 6 epochs): they check that every model, option "
             "and statistic runs end to end, not the papers' claimed gains"
             + (f" ({n_images} test images; chance {chance:.2f})." if n_images else ".")]
    with_paper = summary[summary["paper_accuracy"].notna()] if "paper_accuracy" in summary else summary.iloc[0:0]
    cells = []
    for row in with_paper.itertuples(index=False):
        low, high = getattr(row, "accuracy_boot_low", np.nan), getattr(row, "accuracy_boot_high", np.nan)
        interval = f" [{low:.2f}, {high:.2f}]" if np.isfinite(low) else ""
        metric = "ACC (eq. 12)" if row.paper_metric == "macro_ovr_accuracy" else "accuracy"
        ours = row.ours_on_paper_metric
        cells.append(f"{row.name} {ours:.2f}" + (interval if row.paper_metric == "accuracy" else "")
                     + f" against the paper's {row.paper_accuracy:.2f} ({metric}, its own data)")
    if cells:
        lines.append("Beside the papers' figures: " + "; ".join(cells) + ". The gap is the protocol (size, epochs, "
                     "weights, data), so it says nothing about the papers.")
    return lines + paired_sentences(tests)


def cam_sentences(energy: pd.DataFrame) -> list[str]:
    """How many rows' CAMs favour the lungs, avoid them, or cannot be told from a uniform map
    (``lung_verdict`` of :func:`nbhelpers.evaluation.lungs.summarise_lung_energy`, read from the
    interval of the excess), with the numbers of each group."""
    from nbhelpers.evaluation.lungs import AVOIDS_LUNGS, FAVOURS_LUNGS, UNDETERMINED, lung_verdict

    table = energy.reset_index() if "model" not in energy.columns else energy
    verdicts = table["lung_verdict"] if "lung_verdict" in table else pd.Series(
        [lung_verdict(lo, hi) for lo, hi in zip(table["excess_ci_low"], table["excess_ci_high"])], index=table.index)
    n, images, patients = len(table), int(table["images"].max()), int(table["patients"].max())
    lines = [f"CAM lung energy on {images} held-out COVID-19 films of {patients} patients, {n} rows:"]
    for verdict, words in ((FAVOURS_LUNGS, "favour the lungs (the excess interval above 0)"),
                           (AVOIDS_LUNGS, "put less of their map on the lungs than a uniform map (interval below 0)"),
                           (UNDETERMINED, "cannot be told from a uniform map (interval holds 0)")):
        names = table.loc[verdicts == verdict, "model"].astype(str).tolist()
        if names:
            shown = ", ".join(f"{m.split('/')[-1]} {e:.2f} vs {a:.2f}" for m, e, a in
                              zip(names, table.loc[verdicts == verdict, "energy_mean"], table.loc[verdicts == verdict, "area_mean"]))
            lines.append(f"{len(names)} of {n} {words}: {shown}.")
    return lines


def randomisation_sentence(table: pd.DataFrame) -> str:
    """How many runs pass the weight-randomisation check (``cam_randomisation``: one line per model
    and seed with ``passed`` and ``spearman_full``): maps that do not change when the weights are
    re-drawn explain nothing about the weights."""
    passed = table["passed"].astype(str).str.lower().isin(["true", "1"])
    return (f"The randomisation check passes in {int(passed.sum())} of {len(table)} runs (Spearman after full "
            f"re-initialisation {table['spearman_full'].min():.2f} to {table['spearman_full'].max():.2f} over the runs): "
            + ("the maps depend on the weights." if passed.all() else "where it fails, the map explains nothing."))


def _verdict_words(verdict: str, low: float, high: float) -> str:
    if verdict in ("better", "worse"):
        return f"{'higher' if verdict == 'better' else 'lower'}, and the seed interval agrees"
    if verdict.startswith("undetermined"):
        return verdict
    if np.isfinite(low) and (low > 0 or high < 0):
        return "the patient interval excludes 0 but the seed interval or the adjusted p does not: not distinguishable"
    return "no change shown (not distinguishable)"


def mitigation_sentences(table: pd.DataFrame) -> list[str]:
    """What the shortcut mitigations did (``shortcut_mitigations``), one sentence per measure: the
    source probe (lower only where the paired interval lies below 0), within-source accuracy (read
    only where the cell is conclusive; a change only where the paired verdict says so), the
    within-source balanced accuracy range, overall accuracy against the baseline (its paired
    verdict) and, where present, the CAM lung verdict."""
    base = table.iloc[0]
    rest = table.iloc[1:]
    lines = [f"Source probe, no mitigation: balanced accuracy "
             f"{_interval(base.probe_ba_pooled, base.probe_ba_low, base.probe_ba_high)} over {int(base.probe_images)} "
             f"images of {int(base.probe_patients)} patients (chance {CHANCE}): "
             + ("the archives are told apart within a diagnosis." if base.probe_ba_low > CHANCE else
                "not shown above chance.")]
    for row in rest.itertuples(index=False):
        change = (f"{row.probe_diff:+.2f} [{row.probe_diff_low:+.2f}, {row.probe_diff_high:+.2f}]")
        reading = ("lower" if row.probe_diff_high < 0 else "higher" if row.probe_diff_low > 0 else "no change shown")
        still = " and still above chance" if row.probe_ba_low > CHANCE else ""
        lines.append(f"Source probe, {row.name}: {_interval(row.probe_ba_pooled, row.probe_ba_low, row.probe_ba_high)}, "
                     f"paired change {change}: {reading}{still}.")
    if "within_conclusive" in table and not bool(base.within_conclusive):
        lines.append(f"Within-source accuracy: {int(base.within_source_n)} images, too few to read.")
    else:
        lines.append(f"Within-source accuracy (test images of archives that mix classes, {int(base.within_source_n)} "
                     f"images), no mitigation: {_interval(base.within_source_accuracy, base.within_low, base.within_high)}.")
        for row in rest.itertuples(index=False):
            lines.append(f"Within-source, {row.name}: {_interval(row.within_source_accuracy, row.within_low, row.within_high)}"
                         f", paired {row.within_diff:+.2f} [{row.within_diff_low:+.2f}, {row.within_diff_high:+.2f}], "
                         f"Holm p {row.within_diff_p_holm:.2g}: "
                         f"{_verdict_words(row.within_verdict, row.within_diff_low, row.within_diff_high)}.")
        low, high = table["within_source_balanced"].min(), table["within_source_balanced"].max()
        lines.append(f"Within-source balanced accuracy ranges {low:.2f}-{high:.2f} over the rows (three-class chance "
                     f"{1 / 3:.2f}).")
    for row in rest.itertuples(index=False):
        lines.append(f"Overall accuracy, {row.name}: {row.accuracy:.2f} against {base.accuracy:.2f} without mitigation, "
                     f"paired {row.overall_diff:+.2f} [{row.overall_diff_low:+.2f}, {row.overall_diff_high:+.2f}], Holm p "
                     f"{row.overall_p_holm:.2g}: {_verdict_words(row.overall_verdict, row.overall_diff_low, row.overall_diff_high)}.")
    if "cam_lung_verdict" in table:
        for row in table.itertuples(index=False):
            lines.append(f"CAM lung energy, {row.name}: {row.cam_energy_mean:.2f} against {row.cam_area_mean:.2f} for a "
                         f"uniform map, excess interval [{row.cam_excess_ci_low:+.2f}, {row.cam_excess_ci_high:+.2f}]: "
                         f"{row.cam_lung_verdict}.")
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


# --------------------------------------------------------------------------- the committed tables in prose

#: The lines around the block of ``results/README.md`` that :func:`readme_block` writes.
BEGIN = "<!-- findings: begin; written by `workbook findings` from the committed tables, do not edit -->"
END = "<!-- findings: end -->"


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"### {title}", "", *[f"- {line}" for line in lines], ""] if lines else []


#: Per committed table, the columns the current readings need: a table made before them is named
#: as stale and not read (its numbers were computed under earlier rules).
CURRENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "ablation_summary": ("accuracy_boot_low", "accuracy_seed_low"), "ablation_tests": ("verdict",),
    "cam_lung_energy": ("lung_verdict",), "shortcut_cam_lung_energy": ("lung_verdict",),
    "shortcut_mitigations": ("overall_verdict", "within_verdict", "within_conclusive"),
    "shortcut_blackout": ("surviving_capped",), "shortcut_external": ("drop_low", "external_specificity"),
    "shortcut_per_view": ("conclusive",), "shortcut_summary": ("accuracy_boot_low",), "shortcut_tests": ("verdict",),
    "shortcut_within_source": ("conclusive",),
}


def readme_block(folder: Path | str) -> str:
    """Every reading of the committed tables in ``folder`` as markdown: the ablation grid, its
    CAMs, the shortcut mitigations and the field's shortcut tests, each sentence written by the
    functions above from the table's numbers.  A table not made yet is left out; one made before
    the columns its reading needs (:data:`CURRENT_COLUMNS`) is named as stale, with its date, and
    not read."""
    import re

    from nbhelpers.settings.tables import committed_header, committed_table

    stale: list[str] = []

    def table(name: str) -> pd.DataFrame | None:
        frame = committed_table(name, folder)
        if frame is not None and not set(CURRENT_COLUMNS.get(name, ())) <= set(frame.columns):
            made = re.search(r" on (\d{4}-\d{2}-\d{2})", committed_header(name, folder) or "")
            stale.append(f"`tables/{name}.md` (made {made.group(1) if made else 'earlier'}) predates the current "
                         "split and statistics: no sentence is read from it until `bash results/reduced_cpu_runs.sh` "
                         "remakes it.")
            return None
        return frame

    out: list[str] = []
    summary, tests = table("ablation_summary"), table("ablation_tests")
    if summary is not None and tests is not None:
        out += _section("What the reduced ablation grid says (`tables/ablation_summary.md`, `tables/ablation_tests.md`)",
                        ablation_sentences(summary, tests))
    for name, title in (("cam", "Grad-CAM of the grid (`tables/cam_lung_energy.md`, `tables/cam_randomisation.md`)"),
                        ("shortcut_cam", "Grad-CAM of the shortcut group (`tables/shortcut_cam_lung_energy.md`, "
                                         "`tables/shortcut_cam_randomisation.md`)")):
        energy = table(f"{name}_lung_energy")
        randomised = table(f"{name}_randomisation") if energy is not None else None
        lines = cam_sentences(energy) if energy is not None else []
        if randomised is not None:
            lines.append(randomisation_sentence(randomised))
        out += _section(title, lines)
    mitigations = table("shortcut_mitigations")
    if mitigations is not None:
        out += _section("What the reduced shortcut run says (`tables/shortcut_mitigations.md`)",
                        mitigation_sentences(mitigations))
    field: list[str] = []
    if (blackout := table("shortcut_blackout")) is not None:
        field += blackout_sentences(blackout)
    if (external := table("shortcut_external")) is not None:
        field += external_sentences(external)
    per_view = table("shortcut_per_view")
    field += view_sentences(table("shortcut_view_probe") if per_view is not None else None, per_view)
    out += _section("What the field's shortcut tests say (`tables/shortcut_{blackout,external,view_probe,per_view}.md`)",
                    field)
    for name in ("shortcut_summary", "shortcut_tests", "shortcut_within_source"):
        table(name)  # read in no sentence here, but a stale one is named
    out += _section("Not read: made under earlier rules", stale)
    return "\n".join([BEGIN, "", *out, END])


def replace_block(text: str, block: str) -> str:
    """``text`` with its findings block (from :data:`BEGIN` to :data:`END`) replaced by ``block``;
    ValueError when ``text`` has no such block."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no findings block ({BEGIN} ... {END}) to replace")
    return text[:start] + block + text[end + len(END):]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook findings``."""
    parser.add_argument("--tables", type=Path, default=Path("results/tables"), help="the committed tables")
    parser.add_argument("--readme", type=Path, default=Path("results/README.md"),
                        help="the file whose findings block is rewritten")
    parser.add_argument("--check", action="store_true", help="only say whether the block is current (exit 1 if not)")


def run_command(args: argparse.Namespace) -> int:
    """``workbook findings``: rewrite the findings block of ``--readme`` from ``--tables``; with
    ``--check``, exit 1 when it is stale.  A missing file or block is a :class:`InputNotFoundError`."""
    from data_prep.atomic import write_with
    from data_prep.errors import InputNotFoundError

    if not args.readme.is_file():
        raise InputNotFoundError(f"{args.readme} not found; pass --readme FILE holding a findings block")
    text = args.readme.read_text(encoding="utf-8")
    try:
        new = replace_block(text, readme_block(args.tables))
    except ValueError as error:
        raise InputNotFoundError(f"{args.readme}: {error}; add the two marker lines where the findings belong") from None
    if args.check:
        print(f"{args.readme}: findings block {'current' if new == text else 'stale: run workbook findings'}")
        return 0 if new == text else 1
    write_with(args.readme, lambda tmp: tmp.write_text(new, encoding="utf-8"))
    print(f"wrote the findings block of {args.readme}")
    return 0
