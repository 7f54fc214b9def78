"""Curation of the balanced COVID-19 / pneumonia / normal set from the common source table.

The seed paper (section 4.1) takes every PA COVID-19 X-ray of ieee8023, "all the data" of Figure1
and Actualmed (that those all count as COVID-19 is our reading: the paper does not say how it
labelled them), and random RSNA pneumonia and normal films: 475 per class, split 7:1:2 per image.  We
keep its choices as defaults where they are clear and correct them where they mislabel or leak:
an explicit finding -> class mapping (Actualmed/Figure1 normals are normal, inconclusive rows are
dropped), X-ray only, frontal views only, adults only, exact and near-duplicate removal, and a
split grouped by patient.  A copy is found by its bytes, its perceptual hash, or, for pairs in
the hash's grey band, by keypoint matching (:mod:`data_prep.copies`); the patients of a film
and its copies (within and across sources, RSNA's re-encoded NIH films too) are joined before
anything is sampled or split, and every pair examined goes to ``duplicates.csv``.  Every removed image is listed with its reason (:data:`DROP_REASONS`,
including the metadata problems :func:`data_prep.sources.load_table` found), and a split left
without an image of some class is named in the summary's ``warnings``.  The three outputs are
written together with ``duplicates.csv``, so an interrupted run leaves the previous set whole.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.atomic import replace_together
from data_prep.copies import BAND_HIGH, BAND_LOW, HASH_COPY, band_decisions
from data_prep.fingerprint import near_pairs, phash_many
from data_prep.schema import CLASSES, MANIFEST_COLUMNS, SPLITS, TABLE_COLUMNS
from data_prep.sources import DROP_COLUMNS, SOURCES, Report, load_table
from data_prep.split import check_no_leak, split_by_patient

#: Frontal chest X-ray views as the sources spell them (compared case-insensitively).
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine", "AP erect", "AP semi erect")
AP_VIEWS: tuple[str, ...] = tuple(v for v in FRONTAL_VIEWS if v != "PA")
#: Views per source in the paper: PA only for ieee8023; "all data" (any frontal view) elsewhere.
PAPER_VIEWS: dict[str, tuple[str, ...]] = {"ieee8023": ("PA",)}
#: Which classes the paper takes from each source: only COVID-19 from ieee8023, pneumonia and
#: normal from RSNA (and its parent archive NIH); Figure1 and Actualmed gave "all data", which we
#: keep but label by their findings.
PAPER_SOURCE_CLASSES: dict[str, tuple[str, ...]] = {
    "ieee8023": ("covid",),
    "figure1": CLASSES,
    "actualmed": CLASSES,
    "rsna": ("pneumonia", "normal"),
    "nih": ("pneumonia", "normal"),
}


def every_class_from(sources: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The paper's ``source_classes``, except that ``sources`` supply every class they hold (e.g.
    ieee8023's pneumonias and 'No Finding' films, for tests within one source)."""
    return {**PAPER_SOURCE_CLASSES, **{source: CLASSES for source in sources}}


PAPER_PER_CLASS = 475
PAPER_SPLIT_SIZES = {"train": 993, "val": 144, "test": 288}
#: Near-duplicate threshold in bits of the 256-bit perceptual hash.  On the mirror, re-saved and
#: re-encoded copies differ by at most 22 bits; distinct films of different patients by 54+.
DEFAULT_PHASH_DISTANCE = HASH_COPY
BALANCE_MODES = ("strict", "down")

#: Every reason an image leaves the set, in the order the steps run.
DROP_REASONS: tuple[str, ...] = (
    "malformed_row",  # a metadata row with the wrong number of fields or cut off (from load_table)
    "duplicate_row",  # a metadata row repeating another row's image (from load_table)
    "conflicting_rows",  # rows listing one image with different labels or patients (from load_table)
    "unsafe_path",  # a metadata path leaving its source folder: '..', absolute, a symlink out (from load_table)
    "missing_image",  # metadata row whose image file is absent (from load_table)
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


class ClassShortageError(ValueError):
    """A class has fewer images than ``per_class`` under ``balance="strict"``."""


@dataclass
class CurationParams:
    """Every curation choice; the defaults are the seed paper's where it is clear.

    ``views`` maps a source to the views kept for it; sources not named keep any frontal view
    (and a blank view when ``keep_unknown_view``).  A plain list (as in the run profiles) is the
    view list of ieee8023, the only source the paper restricts.  ``allow_ap`` adds the AP views
    to every restricted source.  ``source_classes`` says which classes each source may supply.
    ``phash_distance`` is in bits of a 256-bit perceptual hash.  ``balance="strict"`` stops when a
    class is short of ``per_class``; ``"down"`` balances every class to the smallest one.
    """

    per_class: int = PAPER_PER_CLASS
    views: dict[str, tuple[str, ...]] | Sequence[str] = field(default_factory=lambda: dict(PAPER_VIEWS))
    allow_ap: bool = False
    keep_unknown_view: bool = True
    min_age: float | None = 18
    xray_only: bool = True
    source_classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(PAPER_SOURCE_CLASSES))
    check_images: bool = True
    dedup: bool = True
    keypoints: bool = True
    phash_distance: int = DEFAULT_PHASH_DISTANCE
    balance: str = "strict"
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)

    def __post_init__(self) -> None:
        if not isinstance(self.views, dict):
            self.views = {source: tuple(self.views) for source in PAPER_VIEWS}
        self.views = {s: tuple(v) for s, v in sorted(self.views.items())}
        self.source_classes = {s: tuple(c) for s, c in sorted(self.source_classes.items())}
        self.split = tuple(float(x) for x in self.split)  # type: ignore[assignment]
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance={self.balance!r}; expected one of {BALANCE_MODES}")
        if self.per_class < 1:
            raise ValueError(f"per_class={self.per_class} must be at least 1")
        for source, classes in self.source_classes.items():
            bad = set(classes) - set(CLASSES)
            if bad:
                raise ValueError(f"source_classes[{source!r}] has unknown class(es) {sorted(bad)}; use {CLASSES}")

    def allowed_views(self, source: str) -> tuple[str, ...] | None:
        """The views kept for ``source`` (None: any frontal view), with AP added when ``allow_ap``."""
        views = self.views.get(source)
        if views is None:
            return None
        return tuple(dict.fromkeys(views + AP_VIEWS)) if self.allow_ap else views

    def as_dict(self) -> dict[str, object]:
        """JSON-able form (tuples become lists) for the summary."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class CurationResult:
    """The curated set (``manifest``), every removed image (``dropped``), the JSON-able
    ``summary`` and every pair examined as a possible copy (``duplicates``, :data:`PAIR_COLUMNS`)."""

    manifest: pd.DataFrame
    dropped: pd.DataFrame
    summary: dict[str, object]
    duplicates: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(PAIR_COLUMNS)))


def _view_problem(source: str, view: str, params: CurationParams) -> str:
    """Why ``view`` is not kept for ``source`` ("" when it is kept)."""
    allowed = params.allowed_views(source)
    key = view.strip().lower()
    if not key:
        if allowed is None and params.keep_unknown_view:
            return ""
        return f"view is blank upstream ({source} keeps {allowed or 'known views only'})"
    if key not in {v.lower() for v in FRONTAL_VIEWS}:
        return f"view {view!r} is not frontal"
    if allowed is not None and key not in {v.lower() for v in allowed}:
        return f"view {view!r} not in {source} views {list(allowed)} (allow_ap={params.allow_ap})"
    return ""


def _filter_reasons(table: pd.DataFrame, params: CurationParams) -> list[tuple[str, str]]:
    """The first filter each row fails, as (reason, detail), or ("", "") when it passes them all."""
    out = []
    for row in table.itertuples(index=False):
        if params.xray_only and row.modality.strip().lower() != "x-ray":
            out.append(("not_xray", f"modality {row.modality!r}"))
        elif problem := _view_problem(row.source, row.view, params):
            out.append(("view", problem))
        elif row.label == "":
            out.append(("unmapped_finding", f"finding {row.finding!r} maps to no class"))
        elif row.label not in params.source_classes.get(row.source, CLASSES):
            out.append(("class_not_taken", f"{row.label} is not taken from {row.source}"))
        elif params.min_age is not None and row.age < params.min_age:  # NaN (unknown) compares False
            out.append(("age", f"age {row.age:g} < min_age {params.min_age:g}"))
        else:
            out.append(("", ""))
    return out


def _components(n: int, edges: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components (sorted lists of node indices) of an undirected graph, via union-find."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


#: Columns of ``duplicates.csv``: every pair linked as one film, and every grey-band pair decided.
#: The evidence values of grey-band pairs decided by keypoints in ``duplicates.csv``.
BAND_EVIDENCE = ("keypoints", "keypoints_same_patient", "different_film")
PAIR_COLUMNS = ("image_a", "image_b", "patient_a", "patient_b", "evidence", "distance", "inliers", "same_film")


@dataclass
class DuplicateScan:
    """What :func:`find_duplicates` found: the images to ``drop``, every examined ``pairs`` row
    (:data:`PAIR_COLUMNS`), each patient's merged id (``patient_of``, only those that change) and
    one record per merged patient group (``merges``: the ids, the one kept, the evidence)."""

    drops: list[tuple[str, str, str]]
    pairs: pd.DataFrame
    patient_of: dict[str, str]
    merges: list[dict[str, object]]


def _source_rank(kept: pd.DataFrame, i: int) -> tuple[int, str]:
    order = {name: k for k, name in enumerate(SOURCES)}
    return order.get(kept.at[i, "source"], len(order)), kept.at[i, "image_id"]


def find_duplicates(
    kept: pd.DataFrame, bits: np.ndarray | None, max_distance: int, paths: Sequence[Path] | None = None,
    band: tuple[int, int] = (BAND_LOW, BAND_HIGH),
) -> DuplicateScan:
    """Find every copy among ``kept``'s rows, choose the image to keep, and join their patients.

    Rows are linked when their ``sha256`` is equal (``exact``), when, given ``bits`` (rows x hash
    bits), their perceptual hashes differ by at most ``max_distance`` bits (``hash``), or, given
    ``paths`` (each row's image file), when their distance lies in the grey ``band`` above
    ``max_distance`` and keypoint matching finds one film (``keypoints``,
    :mod:`data_prep.copies`).  In each linked group the image of the earliest source in
    :data:`SOURCES` (then the smallest ``image_id``) is kept; a group whose images carry
    different labels is dropped whole (``duplicate_conflict``).  The patients of linked images,
    within and across sources, are joined as connected components over every link: one film
    under two patient ids means one person, so their other films must share a split too.  The
    merged id is the group's earliest patient id (same order).
    """
    kept = kept.reset_index(drop=True)
    edges: list[tuple[int, int, str, int, int]] = []  # i, j, evidence, distance, inliers
    hashed = kept[kept["sha256"] != ""]
    for _, group in hashed.groupby("sha256", sort=False):
        idx = group.index.tolist()
        edges += [(idx[0], j, "exact", 0, -1) for j in idx[1:]]
    band_rows: list[tuple[int, int, str, int, int]] = []
    if bits is not None:
        wide = max(max_distance, band[1]) if paths is not None else max_distance
        close = near_pairs(bits, wide)
        edges += [(i, j, "hash", d, -1) for i, j, d in close if d <= max_distance]
        if paths is not None:
            low = max(band[0], max_distance + 1)
            decided = band_decisions(close, list(kept["image_id"]), list(paths), low, band[1])
            index = {image_id: k for k, image_id in enumerate(kept["image_id"])}
            patient = kept["patient_id"].to_numpy()
            for r in decided.itertuples(index=False):
                i, j = index[r.image_a], index[r.image_b]
                # Within one patient keypoints cannot tell a re-post from a repeat film of the same
                # day, and both share a split anyway: such a pair is recorded and both are kept.
                evidence = ("different_film" if not r.same_film else
                            "keypoints_same_patient" if patient[i] == patient[j] else "keypoints")
                row = (i, j, evidence, int(r.distance), int(r.inliers))
                (edges if evidence == "keypoints" else band_rows).append(row)
    drops = []
    for members in _components(len(kept), [(i, j) for i, j, *_ in edges]):
        members.sort(key=lambda i: _source_rank(kept, i))
        labels = sorted(set(kept.loc[members, "label"]))
        keeper = members[0]
        if len(labels) > 1:
            ids = ", ".join(f"{kept.at[i, 'image_id']} ({kept.at[i, 'label']})" for i in members)
            drops += [(kept.at[i, "image_id"], "duplicate_conflict", f"one image, labels {labels}: {ids}") for i in members]
            continue
        for i in members[1:]:
            same_bytes = kept.at[i, "sha256"] != "" and kept.at[i, "sha256"] == kept.at[keeper, "sha256"]
            distance = int(np.count_nonzero(bits[i] != bits[keeper])) if bits is not None else -1
            if same_bytes:
                drops.append((kept.at[i, "image_id"], "duplicate_exact", f"same bytes as {kept.at[keeper, 'image_id']}"))
            elif distance <= max_distance:
                drops.append((kept.at[i, "image_id"], "duplicate_near",
                              f"copy of {kept.at[keeper, 'image_id']} (perceptual hash distance {distance})"))
            else:
                link = next((e for e in edges if {e[0], e[1]} & {i} and e[2] == "keypoints"), None)
                drops.append((kept.at[i, "image_id"], "duplicate_keypoints",
                              f"copy of {kept.at[keeper, 'image_id']} (hash distance {distance}; "
                              f"{link[4] if link else '?'} keypoint matches agree on one rigid motion)"))
    pairs = pd.DataFrame(
        [(kept.at[i, "image_id"], kept.at[j, "image_id"], kept.at[i, "patient_id"], kept.at[j, "patient_id"],
          evidence, distance, inliers, evidence in ("exact", "hash", "keypoints"))
         for i, j, evidence, distance, inliers in edges + band_rows],
        columns=list(PAIR_COLUMNS))
    patient_of, merges = _merge_patients(kept, edges)
    return DuplicateScan(drops=drops, pairs=pairs, patient_of=patient_of, merges=merges)


def _merge_patients(kept: pd.DataFrame, edges: Sequence[tuple[int, int, str, int, int]]
                    ) -> tuple[dict[str, str], list[dict[str, object]]]:
    """Join patients along duplicate links (connected components over patient ids)."""
    patients = sorted(set(kept["patient_id"]))
    index = {p: k for k, p in enumerate(patients)}
    links = [(index[kept.at[i, "patient_id"]], index[kept.at[j, "patient_id"]], i, j, evidence)
             for i, j, evidence, *_ in edges if kept.at[i, "patient_id"] != kept.at[j, "patient_id"]]
    first_image = kept.reset_index().sort_values("image_id").groupby("patient_id")["index"].first()
    patient_of: dict[str, str] = {}
    merges: list[dict[str, object]] = []
    for group in _components(len(patients), [(a, b) for a, b, *_ in links]):
        ids = sorted((patients[k] for k in group), key=lambda p: _source_rank(kept, int(first_image[p]))[0:1] + (p,))
        into = ids[0]
        patient_of.update({p: into for p in ids[1:]})
        members = set(group)
        evidence = [{"image_a": kept.at[i, "image_id"], "image_b": kept.at[j, "image_id"], "evidence": ev}
                    for a, b, i, j, ev in links if a in members]
        merges.append({"patients": ids, "into": into,
                       "sources": sorted({p.split(":", 1)[0] for p in ids}), "links": evidence})
    return patient_of, merges


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


def paper_labels(table: pd.DataFrame) -> pd.Series:
    """The class the seed paper's literal recipe gives each row, or "" when it does not take the row.

    ieee8023: COVID-19 PA X-rays -> covid; Figure1 and Actualmed: every row -> covid ("all data");
    RSNA/NIH: pneumonia and normal as labelled.  Compare with ``table.label`` to count mislabels.
    """
    def one(row: pd.Series) -> str:
        if row["source"] == "ieee8023":
            pa_xray = row["view"] == "PA" and row["modality"] == "X-ray"
            return "covid" if row["label"] == "covid" and pa_xray else ""
        if row["source"] in ("figure1", "actualmed"):
            return "covid"
        return row["label"]

    return table.apply(one, axis=1).rename("paper_label") if len(table) else pd.Series(dtype=str, name="paper_label")


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


def curate(
    table: pd.DataFrame,
    params: CurationParams | None = None,
    *,
    data_dir: Path | None = None,
    report: Report | None = None,
) -> CurationResult:
    """Filter, de-duplicate, balance and split ``table`` (from :func:`load_table`) by ``params``.

    Images are decoded (to find unreadable files and perceptual hashes) from ``data_dir``, which
    defaults to the folder ``load_table`` recorded in ``table.attrs``.  Rows ``load_table`` skipped
    (``report.skipped``) are carried into ``dropped``.  Returns the manifest (``MANIFEST_COLUMNS``,
    sorted by split, class, image_id), every dropped image with its reason, and a summary whose
    ``warnings`` list the report's warnings and every split too small for its job
    (:func:`split_warnings`; also printed to stderr).
    Raises :class:`ClassShortageError` under ``balance="strict"`` when a class is short, KeyError
    when ``table`` lacks schema columns, ValueError when images must be decoded but no data
    directory is known.
    """
    params = params or CurationParams()
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise KeyError(f"curate: table lacks column(s) {missing}; build it with data_prep.sources.load_table")
    table = table.reset_index(drop=True)
    drops: list[tuple[str, str, str]] = []
    if report is not None:
        drops += list(report.skipped[list(DROP_COLUMNS)].itertuples(index=False, name=None))

    reasons = _filter_reasons(table, params)
    drops += [(iid, r, d) for iid, (r, d) in zip(table["image_id"], reasons) if r]
    kept = table[[r == "" for r, _ in reasons]].reset_index(drop=True)

    bits = None
    if params.check_images or params.dedup:
        root = _resolve_data_dir(table, data_dir)
        hashes, errors = phash_many([root / p for p in kept["path"]])
        drops += [(kept.at[i, "image_id"], "unreadable", message) for i, message in sorted(errors.items())]
        readable = [i for i in range(len(kept)) if i not in errors]
        kept = kept.loc[readable].reset_index(drop=True)
        bits = np.array([hashes[i] for i in readable], dtype=bool) if readable else None
    scan = DuplicateScan([], pd.DataFrame(columns=list(PAIR_COLUMNS)), {}, [])
    if params.dedup:
        paths = [root / p for p in kept["path"]] if params.keypoints else None
        scan = find_duplicates(kept, bits, params.phash_distance, paths)
        drops += scan.drops
        gone = {d[0] for d in scan.drops}
        # Patients are joined before anything is sampled or split, so one person's films stay together.
        kept = kept.assign(patient_id=kept["patient_id"].map(lambda p: scan.patient_of.get(p, p)))
        kept = kept[~kept["image_id"].isin(gone)].reset_index(drop=True)
    available = kept

    kept, balance_drops, n, note = _balance(kept, params)
    drops += balance_drops
    manifest = kept.copy()
    manifest["split"] = split_by_patient(manifest, params.split, params.seed)
    check_no_leak(manifest, data_dir=root if (params.check_images or params.dedup) else None,
                  max_distance=params.phash_distance)
    manifest = _sort_manifest(manifest)

    warnings = split_warnings(manifest, params, n)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)

    dropped = pd.DataFrame(drops, columns=list(DROP_COLUMNS))
    dropped["_order"] = dropped["reason"].map({r: i for i, r in enumerate(DROP_REASONS)})
    dropped = dropped.sort_values(["_order", "image_id"], kind="stable").drop(columns="_order").reset_index(drop=True)
    warnings = (list(report.warnings) if report is not None else []) + warnings
    summary = _summary(table, available, manifest, dropped, params, n, note, report, warnings)
    summary["patient_merges"] = _merge_summary(scan, table)
    pairs = scan.pairs.sort_values(["evidence", "image_a", "image_b"], kind="stable").reset_index(drop=True)
    return CurationResult(manifest=manifest, dropped=dropped, summary=summary, duplicates=pairs)


def merge_table(summary: dict[str, object]) -> pd.DataFrame:
    """The patient merges of a curation ``summary`` as a table: one row per joined group with
    the id kept, the ids joined into it, their sources and the evidence that linked them."""
    rows = [{"patient": m["into"], "joined": ", ".join(p for p in m["patients"] if p != m["into"]),
             "sources": "+".join(m["sources"]),
             "evidence": ", ".join(sorted({link["evidence"] for link in m["links"]})),
             "links": len(m["links"])} for m in summary.get("patient_merges", {}).get("merges", [])]
    return pd.DataFrame(rows, columns=["patient", "joined", "sources", "evidence", "links"])


def _merge_summary(scan: DuplicateScan, table: pd.DataFrame) -> dict[str, object]:
    """Counts of the patient merges, by evidence and source pair, with every group listed."""
    links = [link for m in scan.merges for link in m["links"]]
    evidence = pd.Series([link["evidence"] for link in links], dtype=object)
    return {
        "groups": len(scan.merges),
        "patients_merged": sum(len(m["patients"]) for m in scan.merges),
        "by_evidence": {str(k): int(v) for k, v in evidence.value_counts().sort_index().items()},
        "across_sources": sum(len(m["sources"]) > 1 for m in scan.merges),
        "nih_rsna": sum({"nih", "rsna"} <= set(m["sources"]) for m in scan.merges),
        "band_pairs": int((scan.pairs["evidence"].isin(BAND_EVIDENCE)).sum()),
        "band_same_film": int((scan.pairs["evidence"] == "keypoints").sum()),
        "band_same_patient": int((scan.pairs["evidence"] == "keypoints_same_patient").sum()),
        "merges": scan.merges,
    }


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


def build(
    data_dir: Path,
    out_dir: Path,
    params: CurationParams | None = None,
    sources: Sequence[str] | None = None,
) -> CurationResult:
    """Load the sources under ``data_dir``, curate them with ``params``, and write the outputs to ``out_dir``.

    Writes ``manifest.csv``, ``dropped.csv``, ``summary.json`` and ``duplicates.csv`` (byte-identical on re-run with
    the same inputs).  Raises what :func:`load_table` and :func:`curate` raise.
    """
    table, report = load_table(Path(data_dir), sources=sources, hash_images=True)
    result = curate(table, params, data_dir=Path(data_dir), report=report)
    write_outputs(result, out_dir)
    return result
