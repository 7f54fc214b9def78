"""Patient-grouped, class-stratified splits: one train/val/test split, or k folds.

Every image of a patient lands in the same split, so follow-up films of one patient can never
be in train and test at once (the per-image split of the seed paper allows that).  Within each
class, patients are drawn at random, stratified by film count: each stratum of patients with
several films is shuffled and cut in the ratios (so a patient's chance of each split does not
depend on how many films it has, and serial films of the sicker, hospitalised patients reach
test as often as train), and the one-film patients fill what each split still lacks of the class's
target.  Each split's image count then hits its target exactly whenever the one-film patients can
make up the difference, and otherwise misses it by less than the class's largest patients
(:data:`FILM_STRATA` strata, each off by under its largest patient).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.schema import CLASSES, SPLITS
from data_prep.errors import WorkbookError

#: The seed paper's split: 7:1:2 (993/144/288 of 1425 images).
DEFAULT_RATIOS: tuple[float, float, float] = (0.7, 0.1, 0.2)
#: How far the ratios may sum from 1 before they are rejected as a typo.
RATIO_TOLERANCE = 1e-6
#: Lower edges of the film-count strata: patients of 1, 2, 3-4 and 5 or more films are shared out
#: separately, so every split gets its share of each.
FILM_STRATA: tuple[int, ...] = (1, 2, 3, 5)
#: How many offending patients a leak error names.
LEAKS_SHOWN = 10


class LeakError(WorkbookError, ValueError):
    """A patient (or one image's bytes) occurs in more than one split."""


class SplitRatioError(WorkbookError, ValueError):
    """Split shares that are not non-negative numbers summing to one (one per split)."""


def _check_frame(df: pd.DataFrame, where: str) -> None:
    missing = [c for c in ("patient_id", "label") if c not in df.columns]
    if missing:
        raise KeyError(f"{where}: the table lacks column(s) {missing}; pass the table from data_prep.table.load_table")


def allocate(total: int, ratios: Sequence[float]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``ratios`` by largest remainder.

    Ties go to the smaller share, so val and test are not starved: 475 at 7:1:2 gives 332/48/95.
    """
    exact = [total * r for r in ratios]
    parts = [int(np.floor(x)) for x in exact]
    # Remainders are rounded so that float noise (332.49999...) cannot break a tie.
    order = sorted(range(len(ratios)), key=lambda i: (-round(exact[i] - parts[i], 9), ratios[i], i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _patient_classes(df: pd.DataFrame) -> pd.Series:
    """Each patient's class: its most frequent label (ties to the earlier class in CLASSES)."""
    rank = {c: i for i, c in enumerate(CLASSES)}
    counts = df.groupby(["patient_id", "label"], sort=True).size().reset_index(name="n")
    counts["rank"] = counts["label"].map(lambda c: rank.get(c, len(rank)))
    counts = counts.sort_values(["patient_id", "n", "rank"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"]


def _film_stratum(size: int) -> int:
    """The film-count stratum of a patient of ``size`` films: its index in :data:`FILM_STRATA`."""
    return max(i for i, low in enumerate(FILM_STRATA) if size >= low)


def _circular_cut(sizes: np.ndarray, ratios: Sequence[float], offset: float) -> np.ndarray:
    """Each patient's group index when patients of ``sizes`` (in their shuffled order) are laid end to
    end on a circle of their total length, turned by ``offset`` (a share of the circle), and cut at
    the cumulative ``ratios``: a patient goes where its middle falls.  Every patient, whatever its
    size, lands in group k with probability ratios[k] over the offset, and each group's total misses
    its share by less than the largest patient."""
    total = float(sizes.sum())
    middles = (np.cumsum(sizes) - sizes / 2.0 + offset * total) % total
    edges = np.cumsum(ratios)[:-1] * total
    return np.searchsorted(edges, middles, side="right")


def _assign_class(sizes: pd.Series, ratios: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Group indices for the patients of one class (``sizes``: films per patient, in sorted order).

    Patients of several films are cut stratum by stratum (:data:`FILM_STRATA`) in random order
    (:func:`_circular_cut`), so each stratum is shared out in ``ratios`` and a patient's film count
    does not decide where it goes.  The one-film patients come last, shuffled, and fill what each
    group still lacks of the class's target (:func:`allocate`), so the class total hits the target
    exactly unless the larger patients overshoot a group by more than the one-film patients can
    make up."""
    counts = sizes.to_numpy()
    strata = np.array([_film_stratum(int(s)) for s in counts])
    out = np.zeros(len(counts), dtype=int)
    filled = np.zeros(len(ratios))
    for stratum in range(len(FILM_STRATA) - 1, 0, -1):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        if len(members) == 0:
            continue
        out[members] = _circular_cut(counts[members], ratios, rng.random())
        np.add.at(filled, out[members], counts[members])
    singles = rng.permutation(np.flatnonzero(strata == 0))
    need = np.clip(np.array(allocate(int(counts.sum()), ratios)) - filled, 0, None)
    if len(singles):
        share = allocate(len(singles), need / need.sum()) if need.sum() > 0 else allocate(len(singles), ratios)
        out[singles] = np.repeat(np.arange(len(ratios)), share)
    return out


def _assign_groups(df: pd.DataFrame, ratios: Sequence[float], names: Sequence[Hashable], seed: int) -> pd.Series:
    """Assign every patient, class by class, to one of ``names`` in proportion to ``ratios``."""
    rng = np.random.default_rng(seed)
    sizes = df.groupby("patient_id", sort=True).size()
    patient_class = _patient_classes(df)
    classes = [c for c in CLASSES if c in set(patient_class)] + sorted(set(patient_class) - set(CLASSES))
    assignment: dict[str, Hashable] = {}
    for cls in classes:
        patients = sorted(patient_class.index[patient_class == cls])
        groups = _assign_class(sizes[patients], ratios, rng)
        assignment.update({p: names[g] for p, g in zip(patients, groups)})
    return df["patient_id"].map(assignment)


def _check_ratios(ratios: Sequence[float], n: int, name: str) -> None:
    if len(ratios) != n or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > RATIO_TOLERANCE:
        raise SplitRatioError(f"{name}={tuple(ratios)} must be {n} non-negative shares summing to 1, e.g. {DEFAULT_RATIOS}")


def split_by_patient(df: pd.DataFrame, ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0) -> pd.Series:
    """Return a Series (same index as ``df``) of split names from :data:`SPLITS`, grouped by patient.

    ``df`` needs ``patient_id`` and ``label``; each class's images are shared out in ``ratios``
    (train, val, test) as closely as whole patients allow.  Deterministic for ``seed``.  Raises
    ValueError for ratios that are not three non-negative shares summing to 1, KeyError for
    missing columns.
    """
    _check_ratios(ratios, len(SPLITS), "ratios")
    _check_frame(df, "split_by_patient")
    return _assign_groups(df, ratios, SPLITS, seed).rename("split")


def kfold_by_patient(df: pd.DataFrame, k: int = 5, seed: int = 0) -> pd.Series:
    """Return a Series of fold numbers ``0..k-1`` (same index as ``df``), grouped by patient, stratified by class.

    For mean +- std experiments: fold ``i`` is the test set of run ``i``.  Raises ValueError when
    ``k`` < 2 or exceeds the number of patients.
    """
    _check_frame(df, "kfold_by_patient")
    n_patients = df["patient_id"].nunique()
    if k < 2 or k > n_patients:
        raise ValueError(f"k={k} folds need 2 <= k <= the number of patients ({n_patients})")
    return _assign_groups(df, [1.0 / k] * k, list(range(k)), seed).astype(int).rename("fold")


def check_no_leak(manifest: pd.DataFrame, column: str = "split", data_dir: Path | str | None = None,
                  max_distance: int = 32, near: pd.DataFrame | None = None) -> None:
    """Raise :class:`LeakError` when a patient, an image id, a file (``path``: one file under two
    ids), an image's bytes (``sha256``) or, given
    ``data_dir``, a near copy (perceptual hashes at most ``max_distance`` bits apart) occurs in
    two splits.

    Patient ids are compared after stripping whitespace, so ``"nih:12 "`` and ``"nih:12"`` are one
    patient.  The copy check compares the perceptual hashes of every manifest image under
    ``data_dir`` (from the fingerprint store), so a re-saved copy that slipped past
    de-duplication fails loudly instead of sitting in train and test; given ``near`` (image_a,
    image_b, distance: every pair at most ``max_distance`` apart among a superset of the
    manifest, as curation's de-duplication found them) it reads the pairs from there instead of
    comparing all pairs again.  The message names up to :data:`LEAKS_SHOWN` offenders
    and their splits.
    """
    if column not in manifest.columns:
        raise KeyError(f"check_no_leak: the manifest has no {column!r} column")
    keys = [(what, manifest[name].astype(str).str.strip()) for what, name in
            (("patient", "patient_id"), ("image id", "image_id"), ("file", "path")) if name in manifest.columns]
    if "sha256" in manifest.columns:
        keys.append(("image sha256", manifest["sha256"].where(manifest["sha256"] != "")))
    for what, key in keys:
        spread = manifest[column].groupby(key).agg(lambda s: sorted(set(map(str, s))))
        leaks = spread[spread.map(len) > 1]
        if len(leaks):
            shown = "; ".join(f"{k} in {'+'.join(v)}" for k, v in leaks.head(LEAKS_SHOWN).items())
            raise LeakError(
                f"{len(leaks)} {what}(s) occur in more than one {column}: {shown}. "
                "Split with data_prep.split.split_by_patient instead of per image."
            )
    if data_dir is not None and len(manifest):
        from data_prep.progress import timed

        with timed("leak check (pHash, across splits)", len(manifest)):
            _check_no_near_copy(manifest, column, Path(data_dir), max_distance, near)


def _check_no_near_copy(manifest: pd.DataFrame, column: str, data_dir: Path, max_distance: int,
                        near: pd.DataFrame | None) -> None:
    from data_prep.fingerprint import UnreadableImageError, fingerprints, near_pairs  # only this check decodes

    rows = manifest.reset_index(drop=True)
    split = rows[column].astype(str).to_numpy()
    if near is not None:
        index = {image_id: i for i, image_id in enumerate(rows["image_id"])}
        close = [(index[a], index[b], int(d)) for a, b, d in zip(near["image_a"], near["image_b"], near["distance"])
                 if a in index and b in index and d <= max_distance]
    else:
        found, errors = fingerprints([data_dir / p for p in rows["path"]])  # from the store after curation
        if errors:
            raise UnreadableImageError(errors[min(errors)])
        close = near_pairs(np.array([f.phash for f in found], dtype=bool), max_distance)
    crossing = [(i, j, d) for i, j, d in close if split[i] != split[j]]
    if crossing:
        shown = "; ".join(f"{rows.at[i, 'image_id']} ({split[i]}) ~ {rows.at[j, 'image_id']} ({split[j]}), {d} bits"
                          for i, j, d in crossing[:LEAKS_SHOWN])
        raise LeakError(
            f"{len(crossing)} pair(s) of near-identical images sit in different {column}s: {shown}. "
            "They are one film: curate with de-duplication on (workbook curate without --no-dedup), "
            "which joins their patients before splitting."
        )


def split_patients_table(manifest: pd.DataFrame, column: str = "split") -> pd.DataFrame:
    """Per split (and ``all``): images, patients, patients with several films, the images of those
    patients and their share of the split's images.  A test split without serial films is a
    sample of one-film patients only, and its patient bootstrap cannot differ from an image one."""
    _check_frame(manifest, "split_patients_table")
    films = manifest.groupby("patient_id")["patient_id"].transform("size")
    rows = []
    for name, part in [*((s, manifest[manifest[column] == s]) for s in SPLITS), ("all", manifest)]:
        multi = films.loc[part.index] > 1
        rows.append({column: name, "images": len(part), "patients": part["patient_id"].nunique(),
                     "patients_with_several_films": part.loc[multi, "patient_id"].nunique(),
                     "images_of_those_patients": int(multi.sum()),
                     "share_of_images": float(multi.mean()) if len(part) else float("nan")})
    return pd.DataFrame(rows)
