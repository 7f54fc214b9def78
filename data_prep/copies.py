"""Copies that a global perceptual hash misses: keypoint matching for the grey band.

Re-posted films carry burnt-in captions, arrows, crops or another window.  Their 256-bit
perceptual hashes can sit 40-50 bits apart, where films of different patients also begin (the
mirror's closest different-patient pair of different films is 54 bits apart).  For every pair in
that *grey band* this module asks a second, local question: do the two images share many
keypoints that one rigid motion explains?  OpenCV ORB keypoints (on copies scaled to
:data:`MATCH_SIDE` px) are matched with Lowe's ratio test, and RANSAC fits a similarity
transform (rotation, uniform scale, shift: what cropping, rescaling and re-posting do; a full
homography overfits a handful of chance matches).  A pair is one film when at least
:data:`MIN_INLIERS` matches agree.

Measured on the mirror (``workbook copies``, ``results/benchmarks/copies.txt``):
synthetic copies of real films (caption, arrow, crop, window, re-encode) against different
patients' films, so the thresholds below are chosen from data rather than guessed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from data_prep.fingerprint import load_gray
from data_prep.options import add_data_dir, add_out
from data_prep.progress import tqdm

#: At most this many bits (of 256) apart, two images are one film on the hash alone: re-saved
#: and re-encoded copies and copies in another window stay within it (the measurement below).
HASH_COPY = 32
#: The grey band of distances in which keypoints decide; above it, a different film.  Captioned
#: copies, arrows and crops reach into it; in the measurement no different patients' films do.
BAND_LOW = HASH_COPY + 1
BAND_HIGH = 80
#: A band pair goes to keypoint matching only when its 256-bit gradient hashes (dhash) are at most
#: this many bits apart too: every copy keypoints found in the measurement (cropped copies reach
#: 59 bits), and the captioned ieee8023 re-post (20 bits), is within it, while many different
#: films the DCT hash puts in the band are not (``copies.txt`` counts both rules).
DHASH_BAND = 64
#: And only when it is among the closest pairs (by pHash + dhash distance) of one of its two images:
#: the band's pairs then grow with the number of images, not with its square.  A copy is its
#: original's closest film: on 16,000 synthetic films with 309 planted copies, keeping 1, 2, 4 or
#: 8 per image dropped the same two planted band pairs as the dhash test, neither of which keypoints
#: would have called one film (26 and 8 inliers); ``curate_scaling.txt`` measures it at every size.
BAND_PER_IMAGE = 2
#: Band pairs per task when keypoint matching runs on several processes, and the images whose
#: keypoints one matcher keeps (least recently used dropped): memory stays bounded at any size.
MATCH_BLOCK = 256
FEATURE_CACHE = 512
#: What a stored keypoint decision means (bump when the matching below changes); decisions of
#: unchanged files are kept in the fingerprint store, so curating again matches nothing twice.
MATCH_VERSION = 1
#: Matches one similarity transform must explain for a band pair to be one film.
MIN_INLIERS = 40
#: Long side (px) of the copies keypoints are found on, and the keypoints kept per image.
MATCH_SIDE = 512
N_FEATURES = 1000
RATIO = 0.75
RANSAC_PX = 5.0
#: The similarity transforms a copy can have between the two scaled images.
SCALE_RANGE = (0.6, 1.7)
MAX_ROTATION = 10.0


@dataclass(frozen=True)
class Match:
    """Keypoint evidence for one pair: ratio-test ``matches`` and the RANSAC ``inliers``."""

    matches: int
    inliers: int

    @property
    def same_film(self) -> bool:
        return self.inliers >= MIN_INLIERS


def _gray(path_or_image: Path | np.ndarray) -> np.ndarray:
    img = path_or_image if isinstance(path_or_image, np.ndarray) else np.asarray(load_gray(Path(path_or_image)))
    scale = MATCH_SIDE / max(img.shape)
    return cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class Matcher:
    """ORB keypoints per image (the last :data:`FEATURE_CACHE` images' kept) and pairwise
    similarity-transform matching."""

    def __init__(self, cache: int = FEATURE_CACHE) -> None:
        self._orb = cv2.ORB_create(nfeatures=N_FEATURES)
        self._bf = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._features: OrderedDict[str, tuple] = OrderedDict()
        self._cache = cache

    def features(self, key: str, image: Path | np.ndarray) -> tuple:
        if key in self._features:
            self._features.move_to_end(key)
        else:
            self._features[key] = self._orb.detectAndCompute(_gray(image), None)
            if len(self._features) > self._cache:
                self._features.popitem(last=False)
        return self._features[key]

    def match(self, key_a: str, image_a: Path | np.ndarray, key_b: str, image_b: Path | np.ndarray) -> Match:
        """Match two images (``key_*`` name them for the feature cache)."""
        (ka, da), (kb, db) = self.features(key_a, image_a), self.features(key_b, image_b)
        if da is None or db is None or len(ka) < 2 or len(kb) < 2:
            return Match(0, 0)
        pairs = self._bf.knnMatch(da, db, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
        if len(good) < 3:
            return Match(len(good), 0)
        src = np.float32([ka[g.queryIdx].pt for g in good])
        dst = np.float32([kb[g.trainIdx].pt for g in good])
        transform, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX)
        if transform is None or mask is None:
            return Match(len(good), 0)
        # A re-post is the film rescaled, cropped and shifted, barely rotated: a fit that shrinks,
        # grows or turns the image a lot has matched noise or text, not anatomy.
        scale = float(np.hypot(transform[0, 0], transform[1, 0]))
        angle = float(np.degrees(np.arctan2(transform[1, 0], transform[0, 0])))
        if not (SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]) or abs(angle) > MAX_ROTATION:
            return Match(len(good), 0)
        return Match(len(good), int(mask.sum()))


def _match_block(block: Sequence[tuple[str, str, str, str]]) -> list[tuple[int, int]]:
    """Worker task: ``(matches, inliers)`` of each ``(id_a, path_a, id_b, path_b)`` pair."""
    matcher = Matcher()
    return [tuple(dataclasses.astuple(matcher.match(a, Path(pa), b, Path(pb)))) for a, pa, b, pb in block]


#: Band pairs matched between two commits to the store.
COMMIT_PAIRS = 4096


def _match(tasks: Sequence[tuple[str, str, str, str]], matcher: Matcher | None, workers: int | None
           ) -> list[tuple[int, int]]:
    """``(matches, inliers)`` of each ``(id_a, path_a, id_b, path_b)``: in this process, or in
    blocks of :data:`MATCH_BLOCK` on ``workers`` processes (None: every core)."""
    from data_prep.fingerprint import default_workers, worker_pool

    workers = default_workers() if workers is None else workers
    if matcher is not None or workers <= 1 or len(tasks) <= MATCH_BLOCK:
        matcher = matcher or Matcher()
        return [dataclasses.astuple(matcher.match(a, Path(pa), b, Path(pb))) for a, pa, b, pb in
                tqdm(tasks, desc="grey band: keypoint matching", unit="pair")]
    blocks = [tasks[k:k + MATCH_BLOCK] for k in range(0, len(tasks), MATCH_BLOCK)]
    results: list[tuple[int, int]] = []
    with worker_pool(workers) as pool, tqdm(total=len(tasks), desc="grey band: keypoint matching", unit="pair") as bar:
        for block, found in zip(blocks, pool.map(_match_block, blocks)):
            results += found
            bar.update(len(block))
    return results


def band_decisions(pairs: Sequence[tuple[int, int, int]], image_ids: Sequence[str], paths: Sequence[Path],
                   low: int = BAND_LOW, high: int = BAND_HIGH, matcher: Matcher | None = None,
                   workers: int | None = 1) -> pd.DataFrame:
    """Decide every pair ``(i, j, distance)`` whose hash distance lies in ``[low, high]`` by keypoints.

    With ``workers`` above 1 (None: every core) blocks of :data:`MATCH_BLOCK` pairs are matched
    by that many processes, each block with its own bounded feature cache; the decisions are the
    same for any number.  Without a ``matcher``, decisions of unchanged files come from the
    fingerprint store and new ones go into it.  Returns one row per band pair: image_a, image_b,
    distance, matches, inliers, same_film.
    """
    from data_prep.fingerprint import FingerprintStore, file_key, store_path

    band = [(i, j, d) for i, j, d in pairs if low <= d <= high]
    keys = [(file_key(paths[i]), file_key(paths[j])) for i, j, _ in band]
    store = FingerprintStore(store_path()) if matcher is None else FingerprintStore(None)
    try:
        known = store.matches(keys, MATCH_VERSION)
        todo = [k for k, key in enumerate(keys) if key not in known]
        tasks = [(image_ids[band[k][0]], str(paths[band[k][0]]), image_ids[band[k][1]], str(paths[band[k][1]]))
                 for k in todo]
        for start in range(0, len(tasks), COMMIT_PAIRS):  # stored as they finish: a killed run keeps them
            found = _match(tasks[start:start + COMMIT_PAIRS], matcher, workers)
            done = [(keys[k], tuple(int(v) for v in r)) for k, r in zip(todo[start:start + COMMIT_PAIRS], found)]
            known.update(done)
            store.put_matches(done, MATCH_VERSION)
    finally:
        store.close()
    results = [known[key] for key in keys]
    rows = [{"image_a": image_ids[i], "image_b": image_ids[j], "distance": int(d), "matches": int(m),
             "inliers": int(n), "same_film": Match(m, n).same_film} for (i, j, d), (m, n) in zip(band, results)]
    return pd.DataFrame(rows, columns=["image_a", "image_b", "distance", "matches", "inliers", "same_film"])


def band_review(duplicates: pd.DataFrame, n_different: int = 6) -> pd.DataFrame:
    """The grey-band pairs of a curation's ``duplicates`` table for a reader to check: every pair
    called one film, the look-alike pairs of one patient (kept), then the ``n_different``
    different-film pairs with the most keypoint matches (the closest calls), with a ``decision``
    column in words."""
    band = duplicates[duplicates["evidence"].isin(["keypoints", "keypoints_same_patient", "different_film"])]
    same = band[band["evidence"] == "keypoints"].sort_values("inliers", ascending=False)
    patient = band[band["evidence"] == "keypoints_same_patient"].sort_values("inliers", ascending=False)
    other = band[band["evidence"] == "different_film"].sort_values(["inliers", "distance"], ascending=[False, True])
    out = pd.concat([same, patient, other.head(n_different)], ignore_index=True)
    words = {"keypoints": "one film: copy dropped, patients joined",
             "keypoints_same_patient": "alike, one patient: both kept (one split anyway)",
             "different_film": "different films: both kept"}
    out["decision"] = out["evidence"].map(words)
    paths = [c for c in ("path_a", "path_b") if c in out.columns]
    return out[["image_a", "image_b", "patient_a", "patient_b", "distance", "inliers", "decision", *paths]]


def pair_thumbnails(pairs: pd.DataFrame, data_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """Both images of each pair (``image_a``, ``image_b``: ``source:relative path`` ids) as grey
    arrays, a pair side by side, with short titles: source, patient, and the decision for the
    second image of each pair.  The files are ``path_a``/``path_b`` under ``data_dir`` where the
    pairs have them (an image folder's images), else the path part of the ids."""
    images, titles = [], []
    for r in pairs.itertuples(index=False):
        for key, patient, path in ((r.image_a, r.patient_a, getattr(r, "path_a", None)),
                                   (r.image_b, r.patient_b, getattr(r, "path_b", None))):
            rel = path if isinstance(path, str) and path else key.split(":", 1)[1]
            images.append(np.asarray(load_gray(Path(data_dir) / rel)))
            source, name = key.split(":", 1)[0], Path(key).name
            titles.append(f"{source} {patient.split(':', 1)[-1]}: {name[:18]}")
        titles[-1] += f"\n{r.distance} bits, {r.inliers} matches: {r.decision.split(':')[0]}"
    return images, titles


# --------------------------------------------------------------------------- measurement

#: The edits a re-posted film goes through, for the measurement.
EDITS = ("caption", "arrow", "crop", "window", "reencode")


def edited_copy(img: np.ndarray, edit: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of grey image ``img`` as a re-post might show it: a burnt-in ``caption`` band, an
    ``arrow``, a ``crop`` (3-8 % off each side), another ``window`` (contrast and gamma) or a
    ``reencode`` (smaller, JPEG quality 60)."""
    h, w = img.shape
    out = img.copy()
    if edit == "caption":
        band = int(h * 0.12)
        out = np.vstack([out, np.full((band, w), 255, np.uint8)]) if rng.random() < 0.5 else out
        cv2.putText(out, "day 3 portable", (int(w * 0.05), out.shape[0] - int(h * 0.04)), cv2.FONT_HERSHEY_SIMPLEX,
                    w / 400, 0 if out.shape[0] > h else 255, max(1, w // 200), cv2.LINE_AA)
        return out
    if edit == "arrow":
        a = (int(w * rng.uniform(0.2, 0.4)), int(h * rng.uniform(0.2, 0.4)))
        b = (int(w * rng.uniform(0.45, 0.6)), int(h * rng.uniform(0.45, 0.6)))
        cv2.arrowedLine(out, a, b, 255, max(2, w // 100), tipLength=0.2)
        cv2.putText(out, "R", (int(w * 0.85), int(h * 0.1)), cv2.FONT_HERSHEY_SIMPLEX, w / 250, 255, max(1, w // 150))
        return out
    if edit == "crop":
        t, b, l, r = (rng.uniform(0.03, 0.08, 4) * [h, h, w, w]).astype(int)
        return np.ascontiguousarray(out[t:h - b, l:w - r])
    if edit == "window":
        gamma, lo, hi = rng.uniform(0.6, 1.6), rng.uniform(0, 40), rng.uniform(200, 255)
        x = np.clip((out.astype(np.float32) - lo) / (hi - lo), 0, 1) ** gamma
        return (x * 255).astype(np.uint8)
    if edit == "reencode":
        small = cv2.resize(out, (w * 2 // 3, h * 2 // 3), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 60])
        return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    raise ValueError(f"unknown edit {edit!r}; use one of {EDITS}")


def measure(data_dir: Path, n_films: int = 40, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hash distance and keypoint inliers of (a) ``n_films`` real X-ray films against each of
    their :data:`EDITS` and (b) pairs of films of different patients.  Returns the two tables.

    Films are drawn with ``seed`` from every source's X-rays under ``data_dir``; the different-
    patient pairs are each drawn film against another drawn film of another patient.
    """
    from PIL import Image

    from data_prep.fingerprint import Fingerprint, perceptual
    from data_prep.table import load_table

    table, _ = load_table(Path(data_dir), hash_images=False)
    table = table[table["modality"].str.lower() == "x-ray"].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    picks = table.loc[np.sort(rng.choice(len(table), size=min(n_films, len(table)), replace=False))]

    def bits(img: np.ndarray) -> Fingerprint:
        return perceptual(Image.fromarray(img))

    def apart(a: Fingerprint, b: Fingerprint) -> dict[str, int]:
        return {"distance": int((a.phash != b.phash).sum()), "dhash_distance": int((a.dhash != b.dhash).sum())}

    images = {r.image_id: np.asarray(load_gray(Path(data_dir) / r.path)) for r in picks.itertuples()}
    hashes = {k: bits(v) for k, v in images.items()}
    matcher = Matcher()
    same = []
    for image_id, img in images.items():
        for edit in EDITS:
            copy = edited_copy(img, edit, rng)
            m = matcher.match(image_id, img, f"{image_id}#{edit}", copy)
            same.append({"image_id": image_id, "edit": edit, **apart(bits(copy), hashes[image_id]), "inliers": m.inliers})
    ids = list(images)
    patient = dict(zip(picks["image_id"], picks["patient_id"]))
    different = []
    for a_index, a in enumerate(ids):
        for b in ids[a_index + 1:]:
            if patient[a] == patient[b]:
                continue
            m = matcher.match(a, images[a], b, images[b])
            different.append({"image_a": a, "image_b": b, **apart(hashes[a], hashes[b]), "inliers": m.inliers})
    return pd.DataFrame(same), pd.DataFrame(different)


def report(same: pd.DataFrame, different: pd.DataFrame, command: str) -> list[str]:
    """The measurement as text lines: distance and inlier quantiles per edit and for different
    patients, and how the band and inlier threshold sort them."""
    q = [0.0, 0.5, 0.9, 1.0]

    def row(name: str, frame: pd.DataFrame) -> str:
        d, n = frame["distance"].quantile(q).to_numpy(), frame["inliers"].quantile(q).to_numpy()
        return (f"{name:<22} {len(frame):>6}  distance min/median/p90/max {d[0]:>4.0f} {d[1]:>5.0f} {d[2]:>5.0f} {d[3]:>4.0f}"
                f"   inliers min/median/p90/max {n[0]:>4.0f} {n[1]:>5.0f} {n[2]:>5.0f} {n[3]:>4.0f}")

    def in_band(frame: pd.DataFrame, pruned: bool) -> pd.Series:
        band = frame["distance"].between(BAND_LOW, BAND_HIGH)
        return band & (frame["dhash_distance"] <= DHASH_BAND) if pruned else band

    def decide(frame: pd.DataFrame, pruned: bool) -> pd.Series:
        return (frame["distance"] <= HASH_COPY) | (in_band(frame, pruned) & (frame["inliers"] >= MIN_INLIERS))

    lines = [f"Made by `{command}`; 256-bit pHash and dhash distances and ORB/RANSAC similarity inliers.", "",
             f"{'pairs':<22} {'n':>6}"]
    for edit, part in same.groupby("edit", sort=False):
        lines.append(row(f"copy: {edit}", part))
    lines.append(row("different patients", different))
    band_different = different["distance"].between(BAND_LOW, BAND_HIGH)
    lines += ["", f"rule: distance <= {HASH_COPY} -> copy; {BAND_LOW}..{BAND_HIGH} -> copy when inliers >= {MIN_INLIERS}; "
              f"> {BAND_HIGH} -> different",
              f"different-patient pairs in the band: {int(band_different.sum())}, max inliers among them "
              f"{int(different.loc[band_different, 'inliers'].max()) if band_different.any() else 0}",
              "", f"{'band rule':<44} {'copies found':>14} {'band pairs matched':>20} {'different-patient copies':>26}"]
    for name, pruned in ((f"pHash {BAND_LOW}..{BAND_HIGH} (before)", False),
                         (f"pHash {BAND_LOW}..{BAND_HIGH} and dhash <= {DHASH_BAND} (now)", True)):
        found = decide(same, pruned)
        matched = int(in_band(same, pruned).sum() + in_band(different, pruned).sum())
        lines.append(f"{name:<44} {int(found.sum()):>5} of {len(same):<6} {matched:>20} "
                     f"{int(decide(different, pruned).sum()):>19} of {len(different)}")
    lines.append(f"(the bound of {BAND_PER_IMAGE} band pairs per image acts on whole sets: curate_scaling.txt)")
    lost = decide(same, False) & ~decide(same, True)
    lines.append(f"copies the pruned band loses: {int(lost.sum())}"
                 + (f" ({', '.join(sorted(set(same.loc[lost, 'edit'])))})" if lost.any() else "")
                 + f"; hash alone (distance <= {HASH_COPY}): {int((same['distance'] <= HASH_COPY).sum())}")
    return lines


#: The file ``workbook copies --out FOLDER`` writes its report to.
REPORT_NAME = "copies.txt"


def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook copies``."""
    add_data_dir(parser)
    parser.add_argument("--films", type=int, default=40, help="films edited and compared pairwise")
    parser.add_argument("--seed", type=int, default=0)
    add_out(parser, f"the report, {REPORT_NAME}")


def run_measure_command(args: argparse.Namespace) -> int:
    """``workbook copies``: measure hash distances and keypoint inliers of edited copies against
    different patients' films, print the report (and write it to ``--out``); returns 0."""
    from data_prep.atomic import write_text
    from data_prep.datadir import data_dir as resolve_data_dir

    same, different = measure(resolve_data_dir(args.data_dir), args.films, args.seed)
    text = "\n".join(report(same, different, args.command_line)) + "\n"
    print(text, end="")
    if args.out:
        write_text(args.out / REPORT_NAME, text)
    return 0
