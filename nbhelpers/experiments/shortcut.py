"""Do the shortcut mitigations work?  The ``shortcut`` ablation group, measured three ways.

For each row of a group of ``ablations.toml`` (by default ``shortcut``: no mitigation, marker
filling, lung crop, histogram matching, all three), trained for several seeds by
:mod:`nbhelpers.experiments.ablation`, this module puts side by side:

* the diagnosis accuracy over all test images (mean over seeds, t-interval);
* the **within-source** accuracy: test images of sources that mix classes
  (:data:`nbhelpers.experiments.audit.COVID_MIXED_SOURCES`), pooled over seeds, with a Wilson interval —
  where the archive gives no hint, so a mitigation should not lower it;
* the **source probe** (:func:`nbhelpers.experiments.probes.source_probe`) trained *with the row's
  preprocessing*, one per seed, on a pool of images (curated, not balanced) — a mitigation that
  removes the archive's cues brings its balanced accuracy towards chance (0.5);
* CAM lung energy, when a table from ``workbook explain --groups shortcut`` is given.

``workbook shortcut --grid-root R --manifest M --pool-manifest P --out T`` trains the
missing probes (a finished one, with its ``probe.json``, is reused only when the record it stored
matches the probe that would be trained now: model, preprocessing, settings, probe manifest and
cache key) and writes
``shortcut_probe``, ``shortcut_within_source`` and ``shortcut_mitigations`` tables (csv + md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from data_prep.errors import InputNotFoundError
from data_prep.options import add_data_dir, add_out
from nbhelpers.evaluation import metrics as M
from nbhelpers.evaluation import stats
from nbhelpers.experiments import ablation, audit, engines, external_source, probes
from nbhelpers.settings.options import add_device, add_set

GROUP = "shortcut"
#: What every table ``workbook shortcut`` writes says about its statistics (in its header).
STATISTICS_NOTE = (
    "Unit: the test image, counted once (correctness averaged over the seeds); `n`/`*_images` and `patients` count "
    "distinct images and patients. Every interval (`*_low`/`*_high`) is a 95 % percentile bootstrap over patients "
    "(proportions: the wider of it and Wilson's); paired differences are on the same images, Holm-adjusted within "
    "the group, and their `*_verdict` needs 3 seeds (\"undetermined (n seeds)\" below). `conclusive` is false for a "
    "cell under 10 images or 5 patients, which no sentence reads. `surviving_share` is capped at 1. External "
    "`*_accuracy` is the class's sensitivity; `*_specificity` and AUROC say whether the classes are still told apart."
)
#: The probe's classes by default: every non-COVID image, NIH against the other archives.
PROBE_LABELS = ("normal", "pneumonia")
PROBE_ROOT = "probes"
#: Where the view probes live, and the classes and view they probe within (COVID-19 films come
#: in both AP and PA views; the other classes of the curated set mostly in one).
VIEW_PROBE_ROOT = "view_probes"
VIEW_PROBE_LABELS = ("covid",)
VIEW_GROUP0 = ("PA",)


def probe_dir(grid_root: Path, row: ablation.Row, seed: int, root: str = PROBE_ROOT) -> Path:
    """Where the source probe of ``row`` with ``seed`` lives (beside the grid's runs; the view
    probes under ``root="view_probes"``)."""
    return Path(grid_root) / root / row.group / row.name / f"seed{seed}"


def run_probes(rows: Sequence[ablation.Row], grid_root: Path, pool: pd.DataFrame | Path | str,
               data_dir: Path | str | None, seeds: Sequence[int], labels: Sequence[str] = PROBE_LABELS,
               model: str = "densenet121", preset: str = "smoke", device: str = "cpu", by: str = "source",
               group0: Sequence[str] | None = None, root: str = PROBE_ROOT, engine: engines.Engine | None = None,
               **overrides: Any) -> pd.DataFrame:
    """Train the source probe of every row and seed with the row's preprocessing and return one
    line per probe: group, name, seed, n, balanced_accuracy with its interval (low, high),
    accuracy, auc.  ``by="view"`` with ``group0=["PA"]`` and ``root=VIEW_PROBE_ROOT`` trains the
    view probe instead (AP against PA within ``labels``).

    A finished probe (its ``probe.json``) is reused only when the record it stored matches
    :func:`nbhelpers.experiments.probes.probe_provenance` for this row and seed (model, preprocessing,
    effective settings, probe manifest, cache key); otherwise what differs is printed and the
    probe is trained afresh.  Every probe's settings are checked before the first one trains.
    ``engine`` says where the probes train, as for the grid (:mod:`nbhelpers.experiments.engines`).
    Raises what :func:`nbhelpers.experiments.probes.source_probe` and ``engines.run_jobs`` raise.
    """
    (engine or engines.LOCAL).check(device)
    pool = audit._read_table(pool, "pool manifest")  # read once, hashed per probe
    todo = []
    for row in rows:
        for seed in seeds:
            folder = probe_dir(grid_root, row, seed, root)
            expected = probes.probe_provenance(pool, label=list(labels), sources=group0, model=model, preset=preset,
                                              seed=seed, preprocess=dict(row.preprocess), by=by, **overrides)
            reasons = ablation.stale_reasons(folder, expected, probes.PROBE_JSON)
            if reasons:
                print(f"{folder}: retraining, the finished probe differs from what would be trained now: "
                      f"{'; '.join(reasons)}")
            if reasons is None or reasons:
                todo.append((row, seed))
    print(f"{len(rows) * len(seeds) - len(todo)} of {len(rows) * len(seeds)} probes already finished with these "
          f"settings; {len(todo)} to train")
    jobs = [engines.Job(probe_dir(grid_root, row, seed, root), (pool, data_dir, probe_dir(grid_root, row, seed, root)),
                        dict(label=list(labels), sources=group0, model=model, preset=preset, seed=seed, device=device,
                             progress=False, preprocess=dict(row.preprocess), by=by, **overrides)) for row, seed in todo]
    engines.run_jobs(probes.source_probe, jobs, engine, grid_root, desc=f"{by} probes")
    return collect_probes(rows, grid_root, seeds, root)


def collect_probes(rows: Sequence[ablation.Row], grid_root: Path, seeds: Sequence[int],
                   root: str = PROBE_ROOT) -> pd.DataFrame:
    """The finished probes' test results, one line per (row, seed);
    :class:`~data_prep.errors.InputNotFoundError` (a FileNotFoundError) names a missing one."""
    lines = []
    for row in rows:
        for seed in seeds:
            path = probe_dir(grid_root, row, seed, root) / probes.PROBE_JSON
            if not path.is_file():
                raise InputNotFoundError(f"no source probe at {path}; run workbook shortcut to train it")
            test = json.loads(path.read_text())["test"]
            lines.append({"group": row.group, "name": row.name, "seed": seed,
                          **{k: test[k] for k in ("n", "balanced_accuracy", "low", "high", "accuracy", "auc")}})
    return pd.DataFrame(lines)


def _probe_images(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The probes' test predictions of several seeds as one row per distinct image: group,
    patient and correctness averaged over the seeds that tested it."""
    from nbhelpers.evaluation.stats import per_image

    parts = [f.assign(correct=(f["group"] == f["pred"]).astype(float))[
        ["image_id", "group", "correct", *(["patient_id"] if "patient_id" in f.columns else [])]] for f in frames]
    return per_image(parts)


def pooled_probe(rows: Sequence[ablation.Row], grid_root: Path, seeds: Sequence[int], n_boot: int = M.N_BOOTSTRAP,
                 level: float = audit.CI_LEVEL, root: str = PROBE_ROOT) -> pd.DataFrame:
    """Per row: the probes' balanced accuracy over their test images, each image counted once
    (each seed splits the pool anew, so an image tested under several seeds has its correctness
    averaged over them), with a bootstrap interval over patients, the mean over seeds, and the
    paired difference from the group's baseline row (``probe_diff``) on the same images.

    For one seed every row's probe is split alike (the split depends on the pool and the seed
    only), so the rows are compared on the same test images.  ``probe_images`` /
    ``probe_patients`` count distinct images and patients.  Raises ValueError when two probes
    of a seed were tested on different images.
    """
    parts = {row.name: [pd.read_csv(probe_dir(grid_root, row, s, root) / probes.PROBE_PREDICTIONS, keep_default_na=False)
                        for s in seeds] for row in rows}
    base = next((r.name for r in rows if r.baseline), None)
    images = {name: _probe_images(frames) for name, frames in parts.items()}
    out = []
    for row in rows:
        per_seed = [stats.balanced_accuracy(p["group"].to_numpy(), p["pred"].to_numpy()) for p in parts[row.name]]
        mine = images[row.name]
        y, correct, patients = mine["group"].to_numpy(), mine["correct"].to_numpy(), mine["patient_id"].to_numpy()
        value, low, high = stats.balanced_accuracy_ci(y, correct, patients, n_boot, 0, level)
        line = {"name": row.name, "probe_images": len(mine), "probe_patients": len(set(patients)),
                "probe_ba_mean": float(np.mean(per_seed)), "probe_ba_pooled": value,
                "probe_ba_low": low, "probe_ba_high": high,
                "probe_diff": np.nan, "probe_diff_low": np.nan, "probe_diff_high": np.nan}
        if base is not None and row.name != base:
            for frame, theirs, seed in zip(parts[row.name], parts[base], seeds):
                if list(frame["image_id"].astype(str)) != list(theirs["image_id"].astype(str)):
                    raise ValueError(f"the probes of {row.name} and {base} (seed {seed}) were tested on different images")
            reference = images[base].set_index("image_id").loc[mine["image_id"], "correct"].to_numpy()
            diff, d_low, d_high = stats.balanced_accuracy_ci(y, correct, patients, n_boot, 0, level, reference=reference)
            line.update(probe_diff=diff, probe_diff_low=d_low, probe_diff_high=d_high)
        out.append(line)
    return pd.DataFrame(out)


def within_source(rows: Sequence[ablation.Row], grid_root: Path, seeds: Sequence[int],
                  manifest: pd.DataFrame | Path | str, sources: Sequence[str] = audit.COVID_MIXED_SOURCES,
                  n_boot: int = M.N_BOOTSTRAP) -> pd.DataFrame:
    """Per row and mixed source: the diagnosis accuracy on that source's test images over the
    seeds, each image counted once (its correctness averaged over seeds), with an interval over
    patients (:func:`nbhelpers.evaluation.stats.proportion_ci`), plus an ``all`` line per row pooling the
    sources.  ``n`` / ``patients`` count distinct images and patients."""
    from nbhelpers.evaluation.stats import per_image, proportion_ci

    table = audit._read_table(manifest, "manifest")
    out = []
    for row in rows:
        joined = audit._joined(table, [ablation.run_dir(grid_root, row, s) / "test_predictions.csv" for s in seeds])
        joined = joined[joined["source"].isin(list(sources))]
        mixed = [s for s, part in joined.groupby("source", sort=True) if part["y"].nunique() > 1]
        joined = joined[joined["source"].isin(mixed)]
        images = per_image([joined[["image_id", "patient_id", "source", "y", "correct"]]]) if len(joined) else joined
        for source, part in [*images.groupby("source", sort=True), (audit.ALL_CLASSES, images)]:
            cell = proportion_ci(part["correct"].to_numpy(), part["patient_id"].to_numpy(), n_boot)
            out.append({"name": row.name, "source": source, "seeds": len(seeds), "n": cell["n"],
                        "patients": cell["patients"], "accuracy": cell["accuracy"], "low": cell["low"],
                        "high": cell["high"], "conclusive": stats.conclusive(cell["n"], cell["patients"]),
                        "balanced_accuracy": stats.soft_balanced_accuracy(part["y"].to_numpy(), part["correct"].to_numpy())
                        if len(part) else np.nan})
    return pd.DataFrame(out)


def mixed_source_ids(manifest: pd.DataFrame | Path | str, sources: Sequence[str] = audit.COVID_MIXED_SOURCES) -> list[str]:
    """Ids of the test images of those ``sources`` whose test images hold more than one class."""
    table = audit._read_table(manifest, "manifest")
    test = table[(table["split"] == "test") & table["source"].isin(list(sources))]
    mixed = test.groupby("source")["label"].transform("nunique") > 1
    return test.loc[mixed, "image_id"].astype(str).tolist()


def mitigation_table(rows: Sequence[ablation.Row], grid_root: Path, seeds: Sequence[int],
                     manifest: pd.DataFrame | Path | str, cam_table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One line per row: overall accuracy (each test image once, averaged over seeds; interval
    over patients) and its paired difference from the baseline row on all test images
    (``overall_diff`` with its patient bootstrap interval, Holm p and verdict,
    :func:`nbhelpers.experiments.ablation.paired_tests`); within-source accuracy (each image once,
    interval over patients, ``within_conclusive``) and its paired difference on the same images
    (interval, Holm p, seed interval and verdict); pooled probe balanced accuracy (patient
    bootstrap interval) and, with ``cam_table`` (the ``cam_lung_energy`` table of
    :mod:`nbhelpers.experiments.explain`), the CAM lung-energy excess with its interval and verdict."""
    summary = ablation.summarise(ablation.collect(rows, grid_root, seeds), rows, grid_root, seeds).set_index("name")
    within = within_source(rows, grid_root, seeds, manifest)
    within = within[within["source"] == audit.ALL_CLASSES].set_index("name")
    overall = ablation.paired_tests(rows, grid_root, seeds).set_index("variant")
    paired = ablation.paired_tests(rows, grid_root, seeds, image_ids=mixed_source_ids(manifest)).set_index("variant")
    probe = pooled_probe(rows, grid_root, seeds).set_index("name")
    index = [r.name for r in rows]
    out = pd.DataFrame({
        "accuracy": summary["accuracy_mean"], "accuracy_low": summary["accuracy_boot_low"],
        "accuracy_high": summary["accuracy_boot_high"],
        "overall_diff": overall["accuracy_diff"], "overall_diff_low": overall["bootstrap_ci_low"],
        "overall_diff_high": overall["bootstrap_ci_high"], "overall_p_holm": overall["p_holm"],
        "overall_verdict": overall["verdict"],
        "within_source_n": within["n"], "within_source_patients": within["patients"],
        "within_conclusive": within["conclusive"], "within_source_accuracy": within["accuracy"],
        "within_low": within["low"], "within_high": within["high"],
        "within_source_balanced": within["balanced_accuracy"],
        "within_diff": paired["accuracy_diff"], "within_diff_low": paired["bootstrap_ci_low"],
        "within_diff_high": paired["bootstrap_ci_high"], "within_diff_seed_low": paired["seed_ci_low"],
        "within_diff_seed_high": paired["seed_ci_high"], "within_diff_p_holm": paired["p_holm"],
        "within_verdict": paired["verdict"],
        **{c: probe[c] for c in probe.columns},
    }, index=index)
    if cam_table is not None:
        cams = cam_table.assign(name=cam_table["model"].astype(str).str.split("/").str[-1]).set_index("name")
        for column in ("energy_mean", "area_mean", "excess_mean", "excess_ci_low", "excess_ci_high", "looks_outside",
                       "lung_verdict"):
            if column in cams:
                out[f"cam_{column}"] = cams[column].reindex(out.index)
    return out.rename_axis("name").reset_index()


#: The blackout group of ``ablations.toml`` (Maguolo & Nanni 2021) and the external-source group
#: (DeGrave et al. 2021).
BLACKOUT_GROUP = "blackout"
#: The blackout modes that hide the lungs (or the centre of the film, where they lie).
LUNG_BLACKOUTS = ("center", "lungs")
EXTERNAL_GROUP = "external"


def blackout_table(rows: Sequence[ablation.Row], grid_root: Path, seeds: Sequence[int],
                   n_boot: int = M.N_BOOTSTRAP, level: float = audit.CI_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Per row of the blackout group: test accuracy over the seeds (each image once, its
    correctness averaged over seeds), the accuracy **retained** against the whole-image baseline
    (row / baseline) and the **share of above-chance accuracy that survives** without the lungs,
    (row - chance) / (baseline - chance), each with a percentile bootstrap interval that
    resamples patients with all their images, both rows together (chance: one over the classes
    in the test set).  The share is capped at 1 (``surviving_capped``: its interval reached it).
    ``shortcut`` says, for a row that blacks out the lungs or the centre (:data:`LUNG_BLACKOUTS`),
    whether the interval of the surviving share lies above one half: the films then allow most of
    the accuracy without that part.  Each row is its own model, trained on blacked-out films, so
    this shows what the data allow, not what the whole-image model uses.  For the lungs-only row
    the same share is what the lung box alone allows."""
    baseline = next(r for r in rows if r.baseline)
    frames = {row.name: [ablation._correct(grid_root, row, s) for s in seeds] for row in rows}

    def per_image(name: str) -> pd.Series:
        return pd.concat([f["correct"] for f in frames[name]], axis=1).mean(axis=1)

    base = per_image(baseline.name)
    patients = frames[baseline.name][0]["patient_id"].reindex(base.index).to_numpy()
    labels = pd.read_csv(ablation.run_dir(grid_root, baseline, seeds[0]) / "test_predictions.csv")["label"]
    chance = 1.0 / labels.nunique()
    rng = np.random.default_rng(seed)
    draws = list(M.resample_indices(len(base), n_boot, rng, patients))
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    out = []
    for row in rows:
        mine = per_image(row.name).reindex(base.index).to_numpy()
        ref = base.to_numpy()
        retained = [mine[d].mean() / ref[d].mean() if ref[d].mean() > 0 else np.nan for d in draws]
        surviving = [(mine[d].mean() - chance) / (ref[d].mean() - chance) if ref[d].mean() > chance else np.nan
                     for d in draws]
        acc = [mine[d].mean() for d in draws]
        point_surv = (mine.mean() - chance) / (ref.mean() - chance) if ref.mean() > chance else np.nan
        s_low, s_high = np.nanquantile(surviving, [lo_q, hi_q]) if np.isfinite(surviving).any() else (np.nan, np.nan)
        # A share above 1 (the row beat the whole image) reads as "all of it": capped, so no
        # interval claims more than everything; ``surviving_capped`` says the cap was reached.
        capped = bool(np.isfinite(s_high) and s_high > 1.0)
        point_surv, s_low, s_high = (min(v, 1.0) if np.isfinite(v) else v for v in (point_surv, s_low, s_high))
        out.append({
            "name": row.name, "blackout": row.preprocess.get("blackout", "none"), "seeds": len(seeds),
            "test_images": len(base), "test_patients": len(set(patients)), "chance": chance,
            "accuracy": mine.mean(), "accuracy_low": np.quantile(acc, lo_q), "accuracy_high": np.quantile(acc, hi_q),
            "retained": mine.mean() / ref.mean() if ref.mean() > 0 else np.nan,
            "retained_low": np.nanquantile(retained, lo_q), "retained_high": np.nanquantile(retained, hi_q),
            "surviving_share": point_surv, "surviving_low": s_low, "surviving_high": s_high,
            "surviving_capped": capped,
            "shortcut": bool(row.preprocess.get("blackout") in LUNG_BLACKOUTS and np.isfinite(s_low) and s_low > 0.5),
        })
    return pd.DataFrame(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook shortcut``."""
    parser.add_argument("--grid-root", type=Path, required=True, help="the --out folder of workbook grid")
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest the grid was trained on")
    parser.add_argument("--pool-manifest", type=Path, required=True,
                        help="curated images for the probes (e.g. workbook curate --per-class 1000 --balance down)")
    add_data_dir(parser)
    parser.add_argument("--group", default=GROUP, help="the ablation group to report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe-labels", nargs="+", default=list(PROBE_LABELS))
    parser.add_argument("--probe-model", default="densenet121")
    parser.add_argument("--preset", default="smoke")
    add_device(parser, "the probes")
    add_set(parser, "preset settings of the probes")
    engines.add_engine(parser, "the probes")
    parser.add_argument("--cam-table", type=Path, help="cam_lung_energy.csv of workbook explain for this group")
    add_out(parser, "the tables", required=True)
    parser.add_argument("--external", action="store_true",
                        help=f"also report the {EXTERNAL_GROUP!r} group's runs under --grid-root (train them with "
                             f"workbook grid --groups {EXTERNAL_GROUP} --manifest POOL)")
    parser.add_argument("--view-probe", action="store_true",
                        help="also train the view probe (AP against PA COVID-19 films of the pool) with the baseline "
                             "row's preprocessing, and report accuracy per view")
    parser.add_argument("--blackout", action="store_true",
                        help=f"also report the {BLACKOUT_GROUP!r} group's runs under --grid-root (train them with "
                             f"workbook grid --groups {BLACKOUT_GROUP})")


def _optional_tables(args: argparse.Namespace, rows: Sequence[ablation.Row],
                     overrides: dict[str, Any]) -> list[tuple[str, pd.DataFrame]]:
    """The tables the ``--blackout``, ``--external`` and ``--view-probe`` flags ask for (the view
    probes are trained here, with the baseline row's preprocessing)."""
    tables = []
    if args.blackout:
        rows_blackout = ablation.load_grid(groups=[BLACKOUT_GROUP])
        tables.append(("shortcut_blackout", blackout_table(rows_blackout, args.grid_root, args.seeds)))
    if args.external:
        row = ablation.load_grid(groups=[EXTERNAL_GROUP])[0]
        runs = [ablation.run_dir(args.grid_root, row, s) for s in args.seeds]
        tables.append(("shortcut_external", external_source.external_table(runs)))
    if args.view_probe:
        base = [r for r in rows if r.baseline]
        run_probes(base, args.grid_root, args.pool_manifest, args.data_dir, args.seeds, VIEW_PROBE_LABELS,
                   args.probe_model, args.preset, args.device, by="view", group0=VIEW_GROUP0,
                   root=VIEW_PROBE_ROOT, engine=engines.from_args(args), **overrides)
        views = pooled_probe(base, args.grid_root, args.seeds, root=VIEW_PROBE_ROOT)
        per_view = pd.concat([audit.per_source_table(
            args.manifest, [ablation.run_dir(args.grid_root, r, s) / "test_predictions.csv" for s in args.seeds],
            by="view").assign(name=r.name) for r in rows], ignore_index=True)
        tables += [("shortcut_view_probe", views), ("shortcut_per_view", per_view)]
    return tables


def run_command(args: argparse.Namespace) -> int:
    """``workbook shortcut``: train the missing or stale probes and write the tables to ``--out``;
    returns 0.  ``--set`` values are typed by the setting they change (``pretrained=false`` is
    False)."""
    from nbhelpers.settings.device import describe, pick_device
    from nbhelpers.settings.tables import describe_manifest, provenance_header, write_table
    from nbhelpers.training.config import parse_set

    overrides = parse_set(args.set)
    if args.cam_table and not args.cam_table.is_file():
        raise InputNotFoundError(f"CAM table {args.cam_table} not found; workbook explain --groups {args.group} writes it")
    rows = ablation.load_grid(groups=[args.group])
    optional = _optional_tables(args, rows, overrides)
    probe_table = run_probes(rows, args.grid_root, args.pool_manifest, args.data_dir, args.seeds, args.probe_labels,
                             args.probe_model, args.preset, args.device, engine=engines.from_args(args), **overrides)
    within = within_source(rows, args.grid_root, args.seeds, args.manifest)
    cams = pd.read_csv(args.cam_table) if args.cam_table else None
    table = mitigation_table(rows, args.grid_root, args.seeds, args.manifest, cams)
    header = provenance_header(
        args.command_line, manifest=args.manifest, seeds=args.seeds, device=describe(pick_device(args.device, verbose=False)),
        notes=f"Group {args.group}; probes: {args.probe_model}, classes {args.probe_labels}, preset {args.preset} "
              f"{args.set}, pool {describe_manifest(args.pool_manifest)}. {STATISTICS_NOTE}")
    tables = [("shortcut_probe", probe_table), ("shortcut_within_source", within), ("shortcut_mitigations", table), *optional]
    for name, frame in tables:
        write_table(frame, args.out, name, header, digits=3)
        with pd.option_context("display.width", 220, "display.max_columns", 30):
            print(f"{name}:\n{frame.round(3).to_string(index=False)}\n")
    return 0
