"""De-duplication of the filtered table: linking the copies of one film and joining their patients.

A copy is found by its bytes, its perceptual hash, or, for pairs in the hash's grey band, by
keypoint matching (:mod:`data_prep.copies`).  In each group of linked images one is kept (the
earliest source of :data:`data_prep.sources.SOURCES`; the user's image folders come after every
public source, so a re-saved copy of a public film in them is the one dropped); the patients of a
film and its copies (within and across sources, RSNA's re-encoded NIH films too) are joined
before anything is sampled or split, and every pair examined is recorded (:data:`PAIR_COLUMNS`, ``duplicates.csv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.copies import BAND_HIGH, BAND_LOW, BAND_PER_IMAGE, DHASH_BAND, band_decisions
from data_prep.fingerprint import distances, near_pairs
from data_prep.progress import timed
from data_prep.sources import SOURCES

#: The evidence values of grey-band pairs decided by keypoints in ``duplicates.csv``.
BAND_EVIDENCE = ("keypoints", "keypoints_same_patient", "different_film")
#: Columns of ``duplicates.csv``: every pair linked as one film, and every grey-band pair decided.
#: ``path_a``/``path_b`` are the images' manifest paths (an image folder's ids do not hold them).
PAIR_COLUMNS = ("image_a", "image_b", "patient_a", "patient_b", "evidence", "distance", "inliers", "same_film",
                "path_a", "path_b")


def _components(n: int, edges: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components with more than one node (sorted lists of node indices, ordered by their
    first node) of an undirected graph of ``n`` nodes (scipy's ``connected_components``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not edges:
        return []
    a, b = np.asarray(edges, dtype=np.int64).T
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


@dataclass
class DuplicateScan:
    """What :func:`find_duplicates` found: the images to ``drop``, every examined ``pairs`` row
    (:data:`PAIR_COLUMNS`), each patient's merged id (``patient_of``, only those that change),
    one record per merged patient group (``merges``: the ids, the one kept, the evidence), and the
    grey-band pairs the second hash set aside before keypoint matching (``band_pruned``, counted)."""

    drops: list[tuple[str, str, str]]
    pairs: pd.DataFrame
    patient_of: dict[str, str]
    merges: list[dict[str, object]]
    band_pruned: int = 0


def _source_rank(kept: pd.DataFrame, i: int) -> tuple[int, str]:
    order = {name: k for k, name in enumerate(SOURCES)}
    return order.get(kept.at[i, "source"], len(order)), kept.at[i, "image_id"]


#: One link between rows ``i`` and ``j`` of the table: ``(i, j, evidence, distance, inliers)``.
Link = tuple[int, int, str, int, int]


def _links(
    kept: pd.DataFrame, bits: np.ndarray | None, max_distance: int, paths: Sequence[Path] | None,
    band: tuple[int, int], second: np.ndarray | None = None, workers: int | None = None,
) -> tuple[list[Link], list[Link], int]:
    """The links that make two rows one film (``exact``, ``hash``, ``keypoints``), the other
    grey-band pairs keypoint matching decided (``keypoints_same_patient``, ``different_film``), and
    how many band pairs the ``second`` hash pruned (their dhash more than :data:`DHASH_BAND` apart)."""
    edges: list[Link] = []
    hashed = kept[kept["sha256"] != ""]
    for _, group in hashed.groupby("sha256", sort=False):
        idx = group.index.tolist()
        edges += [(idx[0], j, "exact", 0, -1) for j in idx[1:]]
    band_rows: list[Link] = []
    if bits is None:
        return edges, band_rows, 0
    wide = max(max_distance, band[1]) if paths is not None else max_distance
    with timed("near pairs (pHash, all pairs)", len(bits)):
        close = near_pairs(bits, wide)
    edges += [(i, j, "hash", d, -1) for i, j, d in close if d <= max_distance]
    if paths is None:
        return edges, band_rows, 0
    low = max(band[0], max_distance + 1)
    candidates = [p for p in close if low <= p[2] <= band[1]]
    pruned = 0
    if second is not None:
        with timed("grey band pruned (dhash, per-image bound)", len(candidates)):
            candidates, pruned = prune_band(candidates, second)
    with timed("grey band keypoint matching", len(candidates)):
        decided = band_decisions(candidates, list(kept["image_id"]), list(paths), low, band[1], workers=workers)
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
    return edges, band_rows, pruned


def prune_band(candidates: Sequence[tuple[int, int, int]], second: np.ndarray,
               max_second: int | None = None, per_image: int | None = None) -> tuple[list[tuple[int, int, int]], int]:
    """The grey-band pairs ``(i, j, pHash distance)`` worth keypoint matching, in their order, and
    how many were set aside: a copy stays close on both hashes, so a pair whose gradient hashes
    (rows of ``second``) are more than ``max_second`` (:data:`DHASH_BAND`) apart goes; of the rest a
    pair stays only when it is among the ``per_image`` (:data:`BAND_PER_IMAGE`) closest of one of
    its images (by the sum of both distances; ties by position), which bounds the band by
    ``per_image`` pairs per image whatever the number of images."""
    max_second = DHASH_BAND if max_second is None else max_second
    per_image = BAND_PER_IMAGE if per_image is None else per_image
    if not candidates:
        return [], 0
    second_d = distances(second, candidates)
    near = np.flatnonzero(second_d <= max_second)
    pairs = np.asarray(candidates, dtype=np.int64)[near]
    score = pairs[:, 2] + second_d[near]
    # Rank each image's pairs (both ends) by score, ties by position; keep each image's first per_image.
    node = np.r_[pairs[:, 0], pairs[:, 1]]
    which = np.r_[np.arange(len(pairs)), np.arange(len(pairs))]
    order = np.lexsort((which, np.r_[score, score], node))
    first = np.r_[0, np.flatnonzero(np.diff(node[order])) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    keep = np.zeros(len(pairs), dtype=bool)
    keep[which[order[rank < per_image]]] = True
    kept = [tuple(int(v) for v in pair) for pair in pairs[keep]]
    return kept, len(candidates) - len(kept)


def _copy_drops(
    kept: pd.DataFrame, bits: np.ndarray | None, max_distance: int, edges: Sequence[Link]
) -> list[tuple[str, str, str]]:
    """``(image_id, reason, detail)`` for every image of a linked group but the one kept, and for
    every image of a group whose labels disagree."""
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
    return drops


def find_duplicates(
    kept: pd.DataFrame, bits: np.ndarray | None, max_distance: int, paths: Sequence[Path] | None = None,
    band: tuple[int, int] = (BAND_LOW, BAND_HIGH), second: np.ndarray | None = None, workers: int | None = None,
) -> DuplicateScan:
    """Find every copy among ``kept``'s rows, choose the image to keep, and join their patients.

    Rows are linked when their ``sha256`` is equal (``exact``), when, given ``bits`` (rows x hash
    bits), their perceptual hashes differ by at most ``max_distance`` bits (``hash``), or, given
    ``paths`` (each row's image file), when their distance lies in the grey ``band`` above
    ``max_distance`` and keypoint matching finds one film (``keypoints``,
    :mod:`data_prep.copies`; given ``second``, the rows' gradient hashes, only band pairs whose
    gradient hashes are at most :data:`DHASH_BAND` apart are matched, by ``workers`` processes).
    In each linked group the image of the earliest source in
    :data:`SOURCES` (then the smallest ``image_id``) is kept; a group whose images carry
    different labels is dropped whole (``duplicate_conflict``).  The patients of linked images,
    within and across sources, are joined as connected components over every link: one film
    under two patient ids means one person, so their other films must share a split too.  The
    merged id is the group's earliest patient id (same order).
    """
    kept = kept.reset_index(drop=True)
    edges, band_rows, pruned = _links(kept, bits, max_distance, paths, band, second, workers)
    drops = _copy_drops(kept, bits, max_distance, edges)
    pairs = pd.DataFrame(
        [(kept.at[i, "image_id"], kept.at[j, "image_id"], kept.at[i, "patient_id"], kept.at[j, "patient_id"],
          evidence, distance, inliers, evidence in ("exact", "hash", "keypoints"), kept.at[i, "path"], kept.at[j, "path"])
         for i, j, evidence, distance, inliers in edges + band_rows],
        columns=list(PAIR_COLUMNS))
    patient_of, merges = _merge_patients(kept, edges)
    return DuplicateScan(drops=drops, pairs=pairs, patient_of=patient_of, merges=merges, band_pruned=pruned)


def _merge_patients(kept: pd.DataFrame, edges: Sequence[Link]) -> tuple[dict[str, str], list[dict[str, object]]]:
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


def merge_table(summary: dict[str, object]) -> pd.DataFrame:
    """The patient merges of a curation ``summary`` as a table: one row per joined group with
    the id kept, the ids joined into it, their sources and the evidence that linked them."""
    rows = [{"patient": m["into"], "joined": ", ".join(p for p in m["patients"] if p != m["into"]),
             "sources": "+".join(m["sources"]),
             "evidence": ", ".join(sorted({link["evidence"] for link in m["links"]})),
             "links": len(m["links"])} for m in summary.get("patient_merges", {}).get("merges", [])]
    return pd.DataFrame(rows, columns=["patient", "joined", "sources", "evidence", "links"])


def merge_summary(scan: DuplicateScan) -> dict[str, object]:
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
        "band_pruned": scan.band_pruned,
        "band_same_film": int((scan.pairs["evidence"] == "keypoints").sum()),
        "band_same_patient": int((scan.pairs["evidence"] == "keypoints_same_patient").sum()),
        "merges": scan.merges,
    }
