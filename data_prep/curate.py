"""Curation of the balanced COVID-19 / pneumonia / normal set from the common source table.

The seed paper (section 4.1) takes every PA COVID-19 X-ray of ieee8023, "all the data" of Figure1
and Actualmed (that those all count as COVID-19 is our reading: the paper does not say how it
labelled them), and random RSNA pneumonia and normal films: 475 per class, split 7:1:2 per image.  We
keep its choices as defaults where they are clear and correct them where they mislabel or leak
(:mod:`data_prep.recipe`): an explicit finding -> class mapping (Actualmed/Figure1 normals are
normal, inconclusive rows are dropped), X-ray only, frontal views only, adults only, exact and
near-duplicate removal, and a split grouped by patient.  The patients of a film and its copies
are joined before anything is sampled or split (:mod:`data_prep.dedup`), and every pair examined
goes to ``duplicates.csv``.  Every removed image is listed with its reason (:data:`DROP_REASONS`,
including the metadata problems :func:`data_prep.table.load_table` found), and a split left
without an image of some class is named in the summary's ``warnings``.  The three outputs are
written together with ``duplicates.csv``, so an interrupted run leaves the previous set whole.
The user's own image folders (``CurationParams.image_folders``, :mod:`data_prep.folders`) join
the table here and go through every step; the summary's ``image_folders`` says how each was read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.atomic import replace_together
from data_prep.dedup import PAIR_COLUMNS, DuplicateScan, find_duplicates, merge_summary
from data_prep.fingerprint import fingerprints
from data_prep.folders import load_image_folders
from data_prep.recipe import PAPER_PER_CLASS, PAPER_SPLIT_SIZES, CurationParams, filter_reasons, paper_labels
from data_prep.schema import CLASSES, MANIFEST_COLUMNS, SPLITS, TABLE_COLUMNS
from data_prep.sources import SOURCES
from data_prep.table import DROP_COLUMNS, Report, load_table
from data_prep.split import check_no_leak, split_by_patient
from data_prep.errors import WorkbookError

#: Every reason an image leaves the set, in the order the steps run.
DROP_REASONS: tuple[str, ...] = (
    "malformed_row",  # a metadata row with the wrong number of fields or cut off (from load_table)
    "duplicate_row",  # a metadata row repeating another row's image (from load_table)
    "conflicting_rows",  # rows listing one image with different labels or patients (from load_table)
    "unsafe_path",  # a metadata path leaving its source folder: '..', absolute, a symlink out (from load_table)
    "missing_image",  # metadata row whose image file is absent (from load_table)
    "unmapped_folder",  # an image in a subfolder of an image folder that names no class (data_prep.folders)
    "not_xray",
    "view",
    "unmapped_finding",
    "class_not_taken",
    "age",
    "unreadable",
    "duplicate_exact",
    "duplicate_near",
    "duplicate_keypoints",  # a copy the hash missed (grey band) that keypoint matching found
    "duplicate_conflict",
    "balance",
)
VERSIONED_PACKAGES = ("cxr-workbook", "numpy", "pandas", "pillow", "imagehash", "pydicom")
#: What each split is for, said when a split lacks a class.
SPLIT_PURPOSE = {"train": "train on every class", "val": "select a checkpoint", "test": "evaluate every class"}
OUTPUT_FILES = ("manifest.csv", "dropped.csv", "summary.json", "duplicates.csv")


class ClassShortageError(WorkbookError, ValueError):
    """A class has fewer images than ``per_class`` under ``balance="strict"``."""


@dataclass
class CurationResult:
    """The curated set (``manifest``), every removed image (``dropped``), the JSON-able
    ``summary`` and every pair examined as a possible copy (``duplicates``, :data:`PAIR_COLUMNS`)."""

    manifest: pd.DataFrame
    dropped: pd.DataFrame
    summary: dict[str, object]
    duplicates: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(PAIR_COLUMNS)))


def _balance(kept: pd.DataFrame, params: CurationParams) -> tuple[pd.DataFrame, list[tuple[str, str, str]], int, str]:
    """Sample ``per_class`` images per class (or the smallest class under ``"down"``); return kept, drops, n, note."""
    available = {c: int((kept["label"] == c).sum()) for c in CLASSES}
    shown = ", ".join(f"{c}={n}" for c, n in available.items())
    smallest = min(available.values())
    if smallest >= params.per_class:
        n, note = params.per_class, f"every class reached per_class={params.per_class} (available: {shown})"
    elif params.balance == "strict":
        raise ClassShortageError(
            f"per_class={params.per_class} but after filtering and de-duplication the sources supply only "
            f"{shown}. Lower per_class, add sources (e.g. rsna), relax filters (allow_ap=True), "
            "or pass balance='down' to balance every class to the smallest."
        )
    elif smallest == 0:
        raise ClassShortageError(f"a class has no images at all ({shown}); nothing can be balanced")
    else:
        n = smallest
        note = f"balanced down to {n} per class, the smallest class (per_class={params.per_class}; available: {shown})"
    rng = np.random.default_rng(params.seed)
    take: list[int] = []
    drops = []
    for cls in CLASSES:
        rows = kept.index[kept["label"] == cls].to_numpy()
        rows = rows[np.argsort(kept.loc[rows, "image_id"].to_numpy(), kind="stable")]
        chosen = np.sort(rng.permutation(len(rows))[:n])
        take += rows[chosen].tolist()
        left = np.setdiff1d(np.arange(len(rows)), chosen)
        drops += [(kept.at[r, "image_id"], "balance", f"{cls}: {available[cls]} available, {n} drawn") for r in rows[left]]
    return kept.loc[sorted(take)], drops, n, note


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _nested_counts(df: pd.DataFrame, keys: Sequence[str]) -> dict:
    """Counts of ``df`` rows nested by ``keys`` (e.g. source -> label -> split), sorted, JSON-able."""
    out: dict = {}
    for combo, n in df.groupby(list(keys), sort=True).size().items():
        combo = combo if isinstance(combo, tuple) else (combo,)
        node = out
        for key in combo[:-1]:
            node = node.setdefault(str(key), {})
        node[str(combo[-1])] = int(n)
    return out


def _resolve_data_dir(table: pd.DataFrame, data_dir: Path | None) -> Path:
    raw = data_dir if data_dir is not None else table.attrs.get("data_dir")
    if raw is None:
        raise ValueError(
            "curate needs the data directory to decode images (check_images / dedup): pass data_dir=..., "
            "use the table from load_table (it records it), or set check_images=False and dedup=False"
        )
    return Path(raw)


def _readable(kept: pd.DataFrame, root: Path, workers: int | None
              ) -> tuple[pd.DataFrame, tuple[np.ndarray, np.ndarray] | None, list[tuple[str, str, str]]]:
    """The rows of ``kept`` whose image decodes, their two perceptual hashes (``phash``, ``dhash``:
    rows x bits each; None when no image decodes), and an ``unreadable`` drop for each of the others."""
    found, errors = fingerprints([root / p for p in kept["path"]], workers)
    drops = [(kept.at[i, "image_id"], "unreadable", message) for i, message in sorted(errors.items())]
    readable = [i for i in range(len(kept)) if i not in errors]
    kept = kept.loc[readable].reset_index(drop=True)
    if not readable:
        return kept, None, drops
    return kept, (np.array([found[i].phash for i in readable]), np.array([found[i].dhash for i in readable])), drops


def _deduplicate(
    kept: pd.DataFrame, hashes: tuple[np.ndarray, np.ndarray] | None, root: Path | None, params: CurationParams,
    workers: int | None,
) -> tuple[pd.DataFrame, DuplicateScan]:
    """``kept`` without its copies and with the patients of each film's copies joined, and the
    :class:`DuplicateScan` that decided it (empty when ``params.dedup`` is off)."""
    if not params.dedup:
        return kept, DuplicateScan([], pd.DataFrame(columns=list(PAIR_COLUMNS)), {}, [])
    paths = [root / p for p in kept["path"]] if params.keypoints else None
    bits, second = hashes if hashes is not None else (None, None)
    scan = find_duplicates(kept, bits, params.phash_distance, paths, second=second, workers=workers)
    gone = {d[0] for d in scan.drops}
    # Patients are joined before anything is sampled or split, so one person's films stay together.
    kept = kept.assign(patient_id=kept["patient_id"].map(lambda p: scan.patient_of.get(p, p)))
    return kept[~kept["image_id"].isin(gone)].reset_index(drop=True), scan


def _dropped_frame(drops: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Every drop as a :data:`DROP_COLUMNS` frame, in :data:`DROP_REASONS` order, then by image_id."""
    dropped = pd.DataFrame(drops, columns=list(DROP_COLUMNS))
    dropped["_order"] = dropped["reason"].map({r: i for i, r in enumerate(DROP_REASONS)})
    return dropped.sort_values(["_order", "image_id"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _with_folders(
    table: pd.DataFrame, params: CurationParams, data_dir: Path | None, drops: list[tuple[str, str, str]]
) -> tuple[pd.DataFrame, dict[str, dict[str, object]], list[str]]:
    """``table`` with the rows of ``params.image_folders`` added (their skipped images appended to
    ``drops``), each folder's summary entry, and their warnings (also printed to stderr)."""
    if not params.image_folders:
        return table, {}, []
    raw = data_dir if data_dir is not None else table.attrs.get("data_dir")
    rows, skipped, info, warnings = load_image_folders(params.image_folders, params.folder_classes,
                                                       Path(raw) if raw is not None else None)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    drops += list(skipped.itertuples(index=False, name=None))
    attrs = dict(table.attrs)
    parts = [part for part in (table, rows) if len(part)]
    table = pd.concat(parts, ignore_index=True) if parts else table
    table = table.sort_values("image_id", ignore_index=True).astype({"age": float})
    table.attrs.update(attrs)
    return table, info, warnings


def curate(
    table: pd.DataFrame,
    params: CurationParams | None = None,
    *,
    data_dir: Path | None = None,
    report: Report | None = None,
    workers: int | None = None,
) -> CurationResult:
    """Filter, de-duplicate, balance and split ``table`` (from :func:`load_table`) by ``params``.

    Images are fingerprinted (to find unreadable files and perceptual hashes;
    :func:`data_prep.fingerprint.fingerprints`, by ``workers`` processes, from the fingerprint
    store where already done) from ``data_dir``, which
    defaults to the folder ``load_table`` recorded in ``table.attrs``.  ``params.image_folders``
    are read here (:func:`data_prep.folders.load_image_folders`) and join the table; the summary's
    ``image_folders`` holds each one's entry (its ``patient_warning`` says when files have no
    patient id) and ``warnings`` their warnings.  Rows ``load_table`` skipped
    (``report.skipped``) are carried into ``dropped``.  Returns the manifest (``MANIFEST_COLUMNS``,
    sorted by split, class, image_id), every dropped image with its reason, and a summary whose
    ``warnings`` list the report's warnings and every split too small for its job
    (:func:`split_warnings`; also printed to stderr).
    Raises :class:`ClassShortageError` under ``balance="strict"`` when a class is short, what
    :func:`data_prep.folders.load_image_folders` raises for an unusable image folder, KeyError
    when ``table`` lacks schema columns, ValueError when images must be decoded but no data
    directory is known.
    """
    params = params or CurationParams()
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise KeyError(f"curate: table lacks column(s) {missing}; build it with data_prep.table.load_table")
    table = table.reset_index(drop=True)
    drops: list[tuple[str, str, str]] = []
    if report is not None:
        drops += list(report.skipped[list(DROP_COLUMNS)].itertuples(index=False, name=None))
    table, folder_info, folder_warnings = _with_folders(table, params, data_dir, drops)

    reasons = filter_reasons(table, params)
    drops += [(iid, r, d) for iid, (r, d) in zip(table["image_id"], reasons) if r]
    kept = table[[r == "" for r, _ in reasons]].reset_index(drop=True)

    hashes, root = None, None
    if params.check_images or params.dedup:
        root = _resolve_data_dir(table, data_dir)
        kept, hashes, unreadable = _readable(kept, root, workers)
        drops += unreadable
    kept, scan = _deduplicate(kept, hashes, root, params, workers)
    drops += scan.drops
    available = kept

    kept, balance_drops, n, note = _balance(kept, params)
    drops += balance_drops
    manifest = kept.copy()
    manifest["split"] = split_by_patient(manifest, params.split, params.seed)
    # The near pairs de-duplication found cover the manifest: the leak check reads them, not all pairs again.
    near = scan.pairs[scan.pairs["evidence"] == "hash"] if params.dedup and hashes is not None else None
    check_no_leak(manifest, data_dir=root, max_distance=params.phash_distance, near=near)
    manifest = _sort_manifest(manifest)

    warnings = split_warnings(manifest, params, n)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)

    dropped = _dropped_frame(drops)
    warnings = (list(report.warnings) if report is not None else []) + folder_warnings + warnings
    summary = _summary(table, available, manifest, dropped, params, n, note, report, warnings)
    summary["sources"].update({s: {"images_found": info["images"], "folder": info["path"]}
                               for s, info in folder_info.items()})
    summary["image_folders"] = folder_info
    summary["patient_merges"] = merge_summary(scan)
    pairs = scan.pairs.sort_values(["evidence", "image_a", "image_b"], kind="stable").reset_index(drop=True)
    return CurationResult(manifest=manifest, dropped=dropped, summary=summary, duplicates=pairs)


#: Fewest images of each class a split needs: with one, a checkpoint is chosen (or a class scored)
#: on a single film.
MIN_SPLIT_PER_CLASS = 2


def split_warnings(manifest: pd.DataFrame, params: CurationParams, per_class: int) -> list[str]:
    """One line per split of ``manifest`` with fewer than :data:`MIN_SPLIT_PER_CLASS` images of
    some class (or none at all), naming its size and the fix.

    Such a split cannot do its job: an empty test set evaluates nothing, and a validation set
    without an image of every class cannot select a checkpoint by per-class scores.  The fix is
    more images per class or a larger share for that split (``params.split``).
    """
    out = []
    for k, split in enumerate(SPLITS):
        rows = manifest[manifest["split"] == split]
        counts = {c: int((rows["label"] == c).sum()) for c in CLASSES}
        if min(counts.values()) >= MIN_SPLIT_PER_CLASS:
            continue
        shown = ", ".join(f"{c}={v}" for c, v in counts.items())
        out.append(
            f"split {split!r} has {len(rows)} image(s) ({shown}): too few to {SPLIT_PURPOSE[split]}; "
            f"raise per_class (now {per_class}) or give {split} a larger share than {params.split[k]:g} "
            f"(split={tuple(params.split)})"
        )
    return out


def _sort_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    keys = manifest.assign(
        _s=manifest["split"].map({s: i for i, s in enumerate(SPLITS)}),
        _c=manifest["label"].map({c: i for i, c in enumerate(CLASSES)}),
    )
    keys = keys.sort_values(["_s", "_c", "image_id"], kind="stable")
    return keys[list(MANIFEST_COLUMNS)].reset_index(drop=True)


def _summary(
    table: pd.DataFrame,
    available: pd.DataFrame,
    manifest: pd.DataFrame,
    dropped: pd.DataFrame,
    params: CurationParams,
    n: int,
    note: str,
    report: Report | None,
    warnings: list[str],
) -> dict[str, object]:
    source_of = dropped["image_id"].str.split(":", n=1).str[0]
    paper = paper_labels(table)
    taken = paper != ""
    return {
        "recipe": "seed paper 001, section 4.1, with explicit labels, X-ray/frontal/adult filters, "
        "de-duplication and a patient-grouped split",
        "params": params.as_dict(),
        "seed": params.seed,
        "sources": (
            {s: {"metadata_rows": report.rows[s], "images_found": report.images[s]} for s in report.loaded}
            if report is not None else {}
        ),
        "sources_absent": list(report.absent) if report is not None else [],
        "warnings": warnings,
        "table_rows": int(len(table)),
        "dropped": {r: int((dropped["reason"] == r).sum()) for r in DROP_REASONS if (dropped["reason"] == r).any()},
        "dropped_by_source": _nested_counts(dropped.assign(source=source_of), ["reason", "source"]),
        "available_per_class": {c: int((available["label"] == c).sum()) for c in CLASSES},
        "available_by_source": _nested_counts(available, ["source", "label"]),
        "per_class": n,
        "balance_note": note,
        "split_sizes": {s: int((manifest["split"] == s).sum()) for s in SPLITS},
        "patients_per_split": {s: int(manifest.loc[manifest["split"] == s, "patient_id"].nunique()) for s in SPLITS},
        "class_split": {c: {s: int(((manifest["label"] == c) & (manifest["split"] == s)).sum()) for s in SPLITS}
                        for c in CLASSES},
        "counts": _nested_counts(manifest, ["source", "label", "split"]),
        "paper_recipe": {
            "taken_per_class": {c: int((paper == c).sum()) for c in CLASSES},
            "relabelled_here": int((taken & (paper != table["label"])).sum()),
            "per_class": PAPER_PER_CLASS,
            "split_sizes": PAPER_SPLIT_SIZES,
        },
        "versions": _versions(),
    }


def write_outputs(result: CurationResult, out_dir: Path) -> dict[str, Path]:
    """Write ``manifest.csv``, ``dropped.csv``, ``summary.json`` and ``duplicates.csv`` to
    ``out_dir``; return their paths.

    Byte-identical for equal results.  The four files are written together
    (:func:`data_prep.atomic.replace_together`): a failure or a kill while writing leaves the
    previous set as it was, never a new manifest beside an old summary.  Raises
    :class:`data_prep.atomic.WriteError` naming the file when the disk is full or the folder not
    writable.
    """
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in OUTPUT_FILES}
    summary = json.dumps(result.summary, indent=2, sort_keys=False) + "\n"  # fails before any file is touched
    writers = {
        paths["manifest.csv"]: lambda tmp: result.manifest.to_csv(tmp, index=False, lineterminator="\n", float_format="%g"),
        paths["dropped.csv"]: lambda tmp: result.dropped.to_csv(tmp, index=False, lineterminator="\n"),
        paths["summary.json"]: lambda tmp: tmp.write_bytes(summary.encode("utf-8")),
        paths["duplicates.csv"]: lambda tmp: result.duplicates.to_csv(tmp, index=False, lineterminator="\n"),
    }
    replace_together(writers)
    return paths


def _load_sources(data_dir: Path, sources: Sequence[str] | None, folders: bool, workers: int | None
                  ) -> tuple[pd.DataFrame, Report]:
    """:func:`load_table` of ``data_dir``; with image ``folders`` and no source named or present,
    an empty table (the folders are curated alone)."""
    if folders and sources is None and data_dir.is_dir() and not any(s.find(data_dir) for s in SOURCES.values()):
        table = pd.DataFrame(columns=list(TABLE_COLUMNS)).astype({"age": float})
        table.attrs["data_dir"] = str(data_dir)
        return table, Report(data_dir=data_dir, absent=list(SOURCES))
    return load_table(data_dir, sources=sources, hash_images=True, workers=workers)


def build(
    data_dir: Path,
    out_dir: Path,
    params: CurationParams | None = None,
    sources: Sequence[str] | None = None,
    workers: int | None = None,
) -> CurationResult:
    """Load the sources under ``data_dir``, curate them with ``params``, and write the outputs to ``out_dir``.

    Writes ``manifest.csv``, ``dropped.csv``, ``summary.json`` and ``duplicates.csv`` (byte-identical on re-run with
    the same inputs).  With ``params.image_folders`` a ``data_dir`` holding no source is allowed: the
    folders are curated alone.  ``workers`` processes fingerprint the images (default: every core;
    the outputs are the same for any number).  Raises what :func:`load_table` and :func:`curate` raise.
    """
    params = params or CurationParams()
    table, report = _load_sources(Path(data_dir), sources, bool(params.image_folders), workers)
    result = curate(table, params, data_dir=Path(data_dir), report=report, workers=workers)
    write_outputs(result, out_dir)
    return result
