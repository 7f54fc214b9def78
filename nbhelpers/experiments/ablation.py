"""The ablation grid: declared rows, run for several seeds, summarised with honest uncertainty.

Rows live in ``ablations.toml`` (model + options + preprocessing + preset overrides, grouped, one
baseline per group).  :func:`run_grid` trains every row for every seed through
:func:`nbhelpers.training.runs.train_run`, reusing a finished run (its ``metrics.json``) only when the
record it stored (:func:`nbhelpers.training.runs.run_provenance`: model, options, preprocessing,
effective TrainConfig, manifest hash, cache key) matches what would be trained now, so an
interrupted grid resumes and a changed setting or manifest retrains the runs it touches.
:func:`summarise` gives mean ± std over seeds with a 95 % interval of the mean;
:func:`paired_tests` compares each variant with its group's baseline *on the same test images*,
each image counted once (its correctness averaged over seeds): a t-interval over seeds (seed
noise), a bootstrap over patients (test-set noise), a sign-flip permutation test over patients
and McNemar's exact test per seed.  p-values are Holm-adjusted within each group; a difference
counts as distinguishable only when the adjusted p is below 0.05 and the seed interval excludes
zero.

``workbook grid --manifest M --data-dir D --preset smoke --seeds 0 1 2`` runs it.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from data_prep.errors import WorkbookError
from data_prep.options import add_data_dir, add_out
from nbhelpers.evaluation import stats
from nbhelpers.evaluation.stats import t_interval
from nbhelpers.experiments.engines import LOCAL, Engine, Job, add_engine, from_args, run_jobs
from nbhelpers.settings.options import add_device, add_set

GRID_FILE = Path(__file__).parents[1] / "settings" / "ablations.toml"
ROW_KEYS = {"group", "name", "model", "options", "preprocess", "overrides", "baseline", "paper_accuracy",
            "paper_metric", "train_sources"}
#: Metrics summarised per row.  ``macro_ovr_accuracy`` is paper 000's ACC (its eq. 12: the mean
#: over classes of one-vs-rest accuracy), not the overall accuracy that paper 001 reports.
METRICS = ("accuracy", "macro_ovr_accuracy", "macro_sensitivity", "macro_specificity", "macro_f1")
N_BOOT = 2000
CONFIDENCE = 0.95
#: What every table the grid writes says about its statistics (in its header).
STATISTICS_NOTE = (
    "Unit: the test image, counted once (its correctness averaged over the seeds); `test_images` / "
    "`test_patients` and per-source `n` / `patients` count distinct images and patients. Bootstrap intervals "
    "and the sign-flip test (`p_value`) resample or flip patients with all their films; `mcnemar_p_seeds` is "
    "McNemar's exact test of each seed alone. `p_holm`: Holm-adjusted within each group; `verdict` "
    "is better/worse only when p_holm < 0.05 and the seed interval excludes 0, \"undetermined (n seeds)\" under "
    "3 seeds. Two intervals per summary row: `accuracy_seed_*`, a t-interval over seeds on this one test set (seed "
    "noise; \"—\" under 3 seeds), and `accuracy_boot_*`, a bootstrap over test patients of the seed-averaged "
    "correctness (test-set noise). Every accuracy is a fraction; `paper_accuracy` (the paper's own figure on its "
    "own data) is paper 000's ACC (eq. 12) where `paper_metric` is `macro_ovr_accuracy` (mean "
    "one-vs-rest accuracy), shown as `ours_on_paper_metric` beside it; overall `accuracy` is paper 001's. These "
    "are reduced 64 px CPU runs from scratch: they check the pipeline, not the papers' claims."
)


class GridError(WorkbookError, ValueError):
    """The ablation grid file or a requested group is malformed."""


@dataclass(frozen=True)
class Row:
    """One variant of the grid."""

    group: str
    name: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    #: The paper's reported figure on its own data, as a fraction (0.861, not 86.1 %), like ours.
    paper_accuracy: float | None = None
    #: What ``paper_accuracy`` measures, one of :data:`METRICS` (paper 000's ACC is macro_ovr_accuracy).
    paper_metric: str = "accuracy"
    #: The external-source test (DeGrave et al. 2021): per class, the archives the row trains and is
    #: tested on (internal); every other image of the class is scored as external
    #: (:func:`nbhelpers.experiments.external_source.external_split`).  Empty: the grid's manifest as it is.
    train_sources: dict[str, list[str]] = field(default_factory=dict)


def load_grid(path: Path = GRID_FILE, groups: Sequence[str] | None = None) -> list[Row]:
    """Read the grid rows (only those of ``groups`` when given).

    Raises :class:`GridError` for unknown keys, duplicate names, a group without exactly one
    baseline, or an unknown group (naming the known ones).
    """
    with open(path, "rb") as f:
        raw = tomllib.load(f).get("row", [])
    rows = []
    for i, entry in enumerate(raw):
        unknown = set(entry) - ROW_KEYS
        if unknown:
            raise GridError(f"{path}: row {i} has unknown key(s) {sorted(unknown)}; allowed: {sorted(ROW_KEYS)}")
        row = Row(**entry)
        if row.paper_metric not in METRICS:
            raise GridError(f"{path}: row {row.name!r} has paper_metric {row.paper_metric!r}; use one of {METRICS}")
        if row.paper_accuracy is not None and not 0 <= row.paper_accuracy <= 1:
            raise GridError(f"{path}: row {row.name!r} has paper_accuracy {row.paper_accuracy}; give it as a fraction "
                            f"(0.861, not 86.1), like every accuracy here")
        rows.append(row)
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise GridError(f"{path}: row names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    known = list(dict.fromkeys(r.group for r in rows))
    for group in known:
        if sum(r.baseline for r in rows if r.group == group) != 1:
            raise GridError(f"{path}: group {group!r} needs exactly one row with baseline = true")
    if groups:
        missing = [g for g in groups if g not in known]
        if missing:
            raise GridError(f"unknown ablation group(s) {missing}; known groups: {', '.join(known)}")
        rows = [r for r in rows if r.group in groups]
    return rows


def run_dir(out_root: Path, row: Row, seed: int) -> Path:
    """Where the run of ``row`` with ``seed`` lives."""
    return Path(out_root) / row.group / row.name / f"seed{seed}"


def stale_reasons(folder: Path, expected: dict[str, Any], record_file: str) -> list[str] | None:
    """Why the finished run in ``folder`` (its ``record_file``: ``metrics.json`` or ``probe.json``)
    is not the run ``expected`` (a :func:`nbhelpers.training.runs.run_provenance` record) describes: a
    list of differences, empty when it can be reused, ``None`` when nothing finished there."""
    from nbhelpers.training.provenance import provenance_differences

    path = Path(folder) / record_file
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return [f"{path} is unreadable ({error})"]
    if not isinstance(saved, dict) or saved.get("provenance") is None:
        return [f"{path} records no provenance (written before runs recorded what they trained)"]
    return [text for _, text in provenance_differences(saved["provenance"], expected)]


#: The files of a finished run that a row with the same record can take over instead of training.
RUN_FILES = ("metrics.json", "test_predictions.csv", "log.csv", "best.pt", "train_config.json", "curves.png")


def _twin_run(out_root: Path, expected: dict[str, Any], folder: Path, also: Sequence[Path] = ()) -> Path | None:
    """A finished run elsewhere under ``out_root``, or in one of the run folders ``also`` (the same
    model, options, preprocessing, settings, manifest and cache key), whose record matches ``expected``."""
    for path in [*sorted(Path(out_root).glob("*/*/seed*/metrics.json")), *(Path(a) / "metrics.json" for a in also)]:
        if path.parent != folder and stale_reasons(path.parent, expected, "metrics.json") == []:
            return path.parent
    return None


def _take_over(twin: Path, folder: Path) -> None:
    """Copy a twin run's result files into ``folder`` (atomically, the record last)."""
    from data_prep.atomic import write_bytes

    for name in sorted(RUN_FILES, key=lambda n: n == "metrics.json"):
        if (twin / name).is_file():
            write_bytes(folder / name, (twin / name).read_bytes())


def run_grid(rows: Sequence[Row], manifest: pd.DataFrame | Path | str, data_dir: Path | str | None,
             out_root: Path, seeds: Sequence[int], preset: str, device: str = "auto", engine: Engine | None = None,
             twins_from: Sequence[Path] = (), **overrides: Any) -> pd.DataFrame:
    """Train every row for every seed (reusing finished runs that match) and return :func:`collect`'s table.

    ``overrides`` change preset settings for every row (a row's own ``overrides`` win).  All rows
    share one preprocessing cache under ``out_root/cache``.  A finished run is reused only when
    the :func:`nbhelpers.training.runs.run_provenance` record in its ``metrics.json`` matches this
    row's model, options, preprocessing, effective settings, manifest and cache key; otherwise
    what differs is printed and the run is trained afresh, unless another row's finished run
    under ``out_root`` (or one of the run folders ``twins_from``, e.g. notebook 04's) has the very
    same record: its results are then copied.  Every row's settings are checked before the first
    run.  ``engine`` says where the runs train (:mod:`nbhelpers.experiments.engines`; default: one
    after another here), checked before anything is written.  Raises what
    :func:`nbhelpers.training.runs.train_run` and :func:`nbhelpers.experiments.engines.run_jobs` raise.
    """
    from nbhelpers.experiments.external_source import EXTERNAL_PREDICTIONS, external_split, score_external
    from nbhelpers.experiments.audit import _read_table
    from nbhelpers.settings.config import display_path as shown  # folders as a notebook shows them
    from nbhelpers.training.config import METRICS_NAME
    from nbhelpers.training.runs import run_provenance, train_run

    (engine or LOCAL).check(device)
    out_root = Path(out_root)
    table = _read_table(manifest, "manifest") if any(row.train_sources for row in rows) else None
    # A row with train_sources trains on its internal archives only, split anew by patient.
    manifests = {row.name: external_split(table, row.train_sources, seed=0) if row.train_sources else (manifest, None)
                 for row in rows}
    todo = []
    for row, seed in product(rows, seeds):
        folder = run_dir(out_root, row, seed)
        expected = run_provenance(row.model, manifests[row.name][0], preset, seed, row.options, row.preprocess,
                                  **{**overrides, **row.overrides})
        reasons = stale_reasons(folder, expected, METRICS_NAME)
        if reasons:
            print(f"{shown(folder)}: retraining, the finished run differs from what would be trained now: "
                  f"{'; '.join(reasons)}")
        if reasons is None or reasons:
            twin = _twin_run(out_root, expected, folder, twins_from)
            if twin is not None:  # e.g. the blackout group's whole-image row is the shortcut group's baseline
                print(f"{shown(folder)}: the same run finished in {shown(twin)}; its results are copied, not trained "
                      "again")
                _take_over(twin, folder)
                continue
            todo.append((row, seed))
    print(f"{len(rows) * len(seeds) - len(todo)} of {len(rows) * len(seeds)} runs already finished with these "
          f"settings; {len(todo)} to train")
    # resume=False: a stale run's files are replaced, never continued.
    jobs = [Job(run_dir(out_root, row, seed), (row.model, manifests[row.name][0], data_dir, run_dir(out_root, row, seed)),
                dict(preset=preset, seed=seed, device=device, model_options=row.options, cache_root=out_root / "cache",
                     preprocess=row.preprocess, progress=False, **{**overrides, **row.overrides}))
            for row, seed in todo]
    run_jobs(train_run, jobs, engine, out_root, desc="ablation runs")
    for row, seed in product(rows, seeds):  # external images scored once per finished run
        external = manifests[row.name][1]
        if external is not None and not (run_dir(out_root, row, seed) / EXTERNAL_PREDICTIONS).is_file():
            score_external(run_dir(out_root, row, seed), external, data_dir, out_root / "cache")
    return collect(rows, out_root, seeds)


def collect(rows: Sequence[Row], out_root: Path, seeds: Sequence[int]) -> pd.DataFrame:
    """One line per finished (row, seed): group, name, seed and the test metrics; raises
    FileNotFoundError naming the first run that has not finished."""
    from nbhelpers.training.runs import load_run

    lines = []
    for row, seed in product(rows, seeds):
        test = load_run(run_dir(out_root, row, seed)).metrics.get("test") or {}
        lines.append({"group": row.group, "name": row.name, "baseline": row.baseline, "seed": seed,
                      **{m: test.get(m, np.nan) for m in METRICS}})
    return pd.DataFrame(lines)


def summarise(runs: pd.DataFrame, rows: Sequence[Row], out_root: Path | None = None,
              seeds: Sequence[int] | None = None, n_boot: int = N_BOOT, boot_seed: int = 0) -> pd.DataFrame:
    """Per row: number of seeds, mean and std of each metric, two 95 % intervals of the test
    accuracy, the figure the paper reports (where it does, on its own data, as a fraction like
    ours), what that figure measures (``paper_metric``) and ours on the same metric
    (``ours_on_paper_metric``), so paper 000's ACC is compared with its own definition.

    The intervals answer two questions: ``accuracy_seed_low/high``, the t-interval over seeds,
    how much another seed would move the mean on *this* test set (NaN, shown "—", under
    :data:`~nbhelpers.evaluation.stats.MIN_SEEDS` seeds); ``accuracy_boot_low/high`` (given
    ``out_root`` and ``seeds``), a percentile bootstrap over test **patients** of the seed-averaged
    correctness (each image once), how much another test set of patients would move it."""
    paper = {r.name: r.paper_accuracy for r in rows}
    paper_metric = {r.name: r.paper_metric for r in rows}
    by_name = {r.name: r for r in rows}
    out = []
    for (group, name), part in runs.groupby(["group", "name"], sort=False):
        line = {"group": group, "name": name, "seeds": len(part)}
        for m in METRICS:  # a metric older runs did not record is NaN
            values = part[m] if m in part else pd.Series(np.nan, index=part.index)
            line[f"{m}_mean"], line[f"{m}_std"] = values.mean(), values.std(ddof=1)
        line["accuracy_seed_low"], line["accuracy_seed_high"] = t_interval(part["accuracy"].to_numpy(), (0.0, 1.0))
        line["accuracy_boot_low"] = line["accuracy_boot_high"] = np.nan
        if out_root is not None and seeds is not None:
            images = seed_averaged_correct(out_root, by_name[name], seeds)
            _, line["accuracy_boot_low"], line["accuracy_boot_high"] = stats.mean_ci(
                images["correct"].to_numpy(), images["patient_id"].to_numpy(), n_boot, boot_seed, CONFIDENCE)
            line["test_images"], line["test_patients"] = len(images), images["patient_id"].nunique()
        line["paper_accuracy"] = paper.get(name)
        line["paper_metric"] = paper_metric.get(name, "accuracy")
        line["ours_on_paper_metric"] = line[f"{line['paper_metric']}_mean"]
        out.append(line)
    return pd.DataFrame(out)


def _correct(out_root: Path, row: Row, seed: int, image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Per test image (indexed by image id): ``correct`` (1 if the run classified it correctly)
    and ``patient_id`` (the image itself for runs that did not record patients); only
    ``image_ids`` when given."""
    table = pd.read_csv(run_dir(out_root, row, seed) / "test_predictions.csv", keep_default_na=False)
    table["image_id"] = table["image_id"].astype(str)
    table = table.set_index("image_id")
    if image_ids is not None:
        table = table[table.index.isin(set(map(str, image_ids)))]
    patients = table["patient_id"].astype(str) if "patient_id" in table.columns else pd.Series(table.index, table.index)
    return pd.DataFrame({"correct": (table["pred"] == table["label"]).astype(int), "patient_id": patients})


def _aligned(frames: Sequence[pd.DataFrame], what: str) -> list[pd.DataFrame]:
    """``frames`` (one per seed, indexed by image id) in the first one's image order; ValueError
    when a seed scored other images, so no image is paired with another."""
    first = frames[0].index
    for i, frame in enumerate(frames[1:], 1):
        if set(frame.index) != set(first) or len(frame.index) != len(first):
            raise ValueError(f"{what}: seed {i} was scored on other test images than seed 0")
    return [frame.loc[first] for frame in frames]


def seed_averaged_correct(out_root: Path, row: Row, seeds: Sequence[int],
                          image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One line per test image of ``row`` (indexed by image id): ``correct`` averaged over the
    seeds and ``patient_id``; ValueError when the seeds were scored on different images."""
    frames = _aligned([_correct(out_root, row, s, image_ids) for s in seeds], row.name)
    return pd.DataFrame({"correct": pd.concat([f["correct"] for f in frames], axis=1).mean(axis=1),
                         "patient_id": frames[0]["patient_id"]})


def paired_tests(rows: Sequence[Row], out_root: Path, seeds: Sequence[int], n_boot: int = N_BOOT,
                 boot_seed: int = 0, image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Compare each non-baseline row with its group's baseline on the same test images (only
    ``image_ids`` when given, e.g. one source's).

    The unit is the test image, each counted once: its correctness is averaged over the seeds,
    and the difference (variant − baseline) taken per image.  Per row: the mean difference, its
    95 % t-interval over seeds (seed noise), a 95 % bootstrap interval resampling **patients**
    with all their images (test-set noise), the images on which the variant is right more often
    or less often than the baseline (``variant_better`` / ``variant_worse``, distinct images), a
    paired sign-flip permutation p-value over patients (:func:`nbhelpers.evaluation.stats.sign_flip_test`;
    with one seed and one image per patient it is McNemar's exact test), McNemar's exact p-value
    of each seed on its own (``mcnemar_p_seeds``), and the p-value adjusted by Holm within the
    group (``p_holm``, the family being the group's comparisons with its baseline).
    ``verdict`` (:func:`nbhelpers.evaluation.stats.verdict`) and ``distinguishable`` (the verdict is better or worse).
    Images are matched by id across rows and seeds; raises ValueError when two runs were scored
    on different images.
    """
    rng = np.random.default_rng(boot_seed)
    baselines = {r.group: r for r in rows if r.baseline}
    out = []
    for row in rows:
        if row.baseline:
            continue
        base = baselines[row.group]
        variants = _aligned([_correct(out_root, row, s, image_ids) for s in seeds], row.name)
        references = _aligned([_correct(out_root, base, s, image_ids) for s in seeds], base.name)
        for variant, reference in zip(variants, references):
            if set(variant.index) != set(reference.index):
                raise ValueError(f"{row.name} and {base.name} were not scored on the same test images")
        pairs = [(v, r.loc[v.index]) for v, r in zip(variants, references)]
        diff = np.stack([(v["correct"] - r["correct"]).to_numpy() for v, r in pairs])  # seeds x images, in {-1, 0, 1}
        out.append({"group": row.group, "variant": row.name, "baseline": base.name,
                    **stats.paired_comparison(diff, pairs[0][0]["patient_id"].to_numpy(), rng, n_boot, boot_seed,
                                                CONFIDENCE)})
    return stats.judge_families(pd.DataFrame(out), "group")


def per_source(rows: Sequence[Row], out_root: Path, seeds: Sequence[int], manifest: pd.DataFrame | Path | str) -> pd.DataFrame:
    """Test accuracy per (row, source, true class) over the seeds, each test image counted once
    (its correctness averaged over seeds), with patient-level intervals
    (:func:`nbhelpers.experiments.audit.per_source_table`): a variant that gains only on one archive's images
    is learning the archive."""
    from nbhelpers.experiments.audit import _read_table, per_source_table

    table = _read_table(manifest, "manifest")
    out = []
    for row in rows:
        preds = [pd.read_csv(run_dir(out_root, row, s) / "test_predictions.csv", keep_default_na=False) for s in seeds]
        out.append(per_source_table(table, preds).assign(group=row.group, name=row.name))
    return pd.concat(out, ignore_index=True)[["group", "name", "seeds", "source", "class", "n", "patients", "correct",
                                              "accuracy", "low", "high"]]


def write_tables(folder: Path, header: str, prefix: str = "ablation", **tables: pd.DataFrame) -> list[Path]:
    """Write each table as ``<prefix>_<name>.csv`` and ``.md`` (with ``header`` on top) in ``folder``
    (:func:`nbhelpers.settings.tables.write_table`)."""
    from nbhelpers.settings.tables import write_table

    written: list[Path] = []
    for name, table in tables.items():
        written += write_table(table, folder, f"{prefix}_{name}", header, digits=4)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook grid``."""
    parser.add_argument("--manifest", required=True, type=Path, help="curated manifest.csv (notebook 01 / workbook curate)")
    add_data_dir(parser)
    add_out(parser, "the grid's runs (the --grid-root of workbook explain and workbook shortcut)",
            default="results/runs/ablation")
    parser.add_argument("--tables", type=Path, help="also write the summary tables to this folder")
    parser.add_argument("--figures", type=Path, help="also draw the summary as PREFIX_summary.png in this folder")
    parser.add_argument("--prefix", default="ablation", help="file name prefix of the tables and the figure")
    parser.add_argument("--preset", default="seed001", help="training protocol from nbhelpers/settings/presets.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--groups", nargs="+", help="only these groups of ablations.toml")
    add_device(parser, "training")
    add_set(parser, "a preset setting for every run")
    add_engine(parser, "the grid's runs")


def run_command(args: argparse.Namespace) -> int:
    """``workbook grid``: train the grid and print (and with ``--tables`` / ``--figures`` also
    write) its summary and paired tests; returns 0.

    ``--set`` values are typed by the setting they change (``pretrained=false`` is False).  An
    unknown group, preset or setting, a value of the wrong type, a missing manifest, a run folder
    in use or a full disk raise a :class:`~data_prep.errors.WorkbookError` before or while training.
    """
    from nbhelpers.training.config import parse_set

    rows = load_grid(groups=args.groups)
    runs = run_grid(rows, args.manifest, args.data_dir, args.out, args.seeds, args.preset, args.device,
                    from_args(args), **parse_set(args.set))
    summary, tests = summarise(runs, rows, args.out, args.seeds), paired_tests(rows, args.out, args.seeds)
    sources = per_source(rows, args.out, args.seeds, args.manifest)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(summary.round(4).to_string(index=False))
        print(tests.round(4).to_string(index=False))
    if args.tables:
        from nbhelpers.settings.tables import provenance_header
        from nbhelpers.training.runs import load_run

        first = load_run(run_dir(args.out, rows[0], args.seeds[0])).metrics
        header = provenance_header(args.command_line, manifest=args.manifest, seeds=args.seeds, device=first["device"],
                                   notes=f"Preset {args.preset}. {STATISTICS_NOTE}")
        for path in write_tables(args.tables, header, args.prefix, runs=runs, summary=summary, tests=tests,
                                 per_source=sources):
            print(f"wrote {path}")
    if args.figures:
        from data_prep.atomic import write_with
        from nbhelpers.evaluation.plots import ablation_bars

        figure = args.figures / f"{args.prefix}_summary.png"
        fig = ablation_bars(summary)
        write_with(figure, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        print(f"wrote {figure}")
    return 0
