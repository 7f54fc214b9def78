"""How curation scales: synthetic sets of thousands of films built from the mirror's real ones.

``workbook bench curate --data-dir D --sizes 1000 4000 16000 64000 --workers 1 2 --work FOLDER [--out FOLDER]``
(the report goes to ``curate_scaling.txt``).

Each synthetic film blends three distinct real X-rays of the data folder (weights drawn from a
Dirichlet), warps the blend (rotation, scale, shift), changes its window and adds noise, and is
saved as a 512-px JPEG in a class folder; the report shows that their perceptual-hash distances
look like those of different real films.  A known share of the films are *planted copies*: an
earlier film of the set with one of the edits a re-post goes through (:data:`data_prep.copies.EDITS`).
Sets are nested (the 4,000 hold the 1,000), so every size is curated as an image folder
(``workbook curate --image-folder``) by a fresh process with a fresh fingerprint store:
per stage images/s (:data:`data_prep.progress.STAGES`), grey-band pairs before and after
pruning, peak memory, the recall of the planted copies (copy and original linked as one film),
and then a second curation with other parameters (``--per-class``, ``--seed``) over the same
store, against the first.  The real films' own decoding rate is measured too: the time to curate
RSNA's 26,684 and NIH's 112,120 films is extrapolated from it and said to be an extrapolation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.copies import BAND_HIGH
from data_prep.options import add_data_dir, add_out
from nbhelpers.tools.bench import emit, header

REPORT = "curate_scaling.txt"
SIDE = 512
CLASS_FOLDERS = ("COVID", "Normal", "Pneumonia")
#: Share of films that are planted copies of an earlier film.
PLANTED = 0.02
POOL_NAME = "pool.npy"
#: The archives the extrapolation is for, with their film counts.
ARCHIVES = {"RSNA (26,684 films)": 26_684, "RSNA + NIH ChestX-ray14 (138,804 films)": 26_684 + 112_120}


def _film_path(root: Path, k: int) -> Path:
    return root / "films" / CLASS_FOLDERS[k % 3] / f"f{k:06d}.jpg"


def build_pool(data_dir: Path, work: Path) -> tuple[Path, float, int]:
    """The data folder's X-rays at SIDE x SIDE in one array file; the real films' decode rate
    (images/s, one process, as curation decodes them) and their count."""
    from PIL import Image

    from data_prep.fingerprint import load_gray, perceptual
    from data_prep.table import load_table

    table, _ = load_table(data_dir, hash_images=False)
    table = table[table["modality"].str.lower() == "x-ray"].reset_index(drop=True)
    pool = np.lib.format.open_memmap(work / POOL_NAME, mode="w+", dtype=np.uint8, shape=(len(table), SIDE, SIDE))
    started = time.perf_counter()
    for k, rel in enumerate(table["path"]):
        image = load_gray(data_dir / rel)
        perceptual(image)
        pool[k] = np.asarray(image.resize((SIDE, SIDE), Image.BILINEAR))
    rate = len(table) / (time.perf_counter() - started)
    pool.flush()
    return work / POOL_NAME, rate, len(table)


_POOL: np.ndarray | None = None


def _make(args: tuple[str, int, int, int]) -> str:
    """Worker task: write film ``k`` (a planted copy of film ``original`` with ``edit``, when given)."""
    import cv2

    from data_prep.copies import EDITS, edited_copy

    global _POOL
    pool_path, k, original, edit = args
    if _POOL is None:
        _POOL = np.load(pool_path, mmap_mode="r")
    root = Path(pool_path).parent
    rng = np.random.default_rng(k)
    if original >= 0:
        base = cv2.imread(str(_film_path(root, original)), cv2.IMREAD_GRAYSCALE)
        img = edited_copy(base, EDITS[edit], rng)
    else:
        parents = rng.choice(len(_POOL), 3, replace=False)
        weights = rng.dirichlet([4.0, 2.0, 1.0])
        blend = sum(w * _POOL[p].astype(np.float32) for w, p in zip(weights, parents))
        matrix = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), rng.uniform(-10, 10), rng.uniform(0.85, 1.15))
        matrix[:, 2] += rng.uniform(-0.06, 0.06, 2) * SIDE
        img = cv2.warpAffine(blend, matrix, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT)
        img = 255 * (np.clip(img / 255, 0, 1) ** rng.uniform(0.7, 1.4)) + rng.normal(0, 3, img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
    path = _film_path(root, k)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path.name


def build_films(pool_path: Path, n: int, workers: int) -> pd.DataFrame:
    """Films 0..n-1 beside the pool (kept when already there); the planted copies: copy, original, edit."""
    root = pool_path.parent
    for name in CLASS_FOLDERS:
        (root / "films" / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    planted = []
    tasks: list[tuple[str, int, int, int]] = []
    for k in range(n):
        # A copy keeps its original's class: the original is 3, 6, ... films back.
        if k >= 30 and rng.random() < PLANTED:
            original = k - 3 * int(rng.integers(1, k // 3))
            edit = int(rng.integers(0, 5))
            planted.append((k, original, edit))
        else:
            original, edit = -1, 0
        tasks.append((str(pool_path), k, original, edit))
    from data_prep.fingerprint import worker_pool

    copies = {c for c, _, _ in planted}
    todo = [t for t in tasks if not _film_path(root, t[1]).is_file()]
    # Originals first, then copies (a copy reads its original's file).
    for part in ([t for t in todo if t[1] not in copies], [t for t in todo if t[1] in copies]):
        with worker_pool(workers) as ex:
            list(ex.map(_make, part, chunksize=64))
    from data_prep.copies import EDITS

    return pd.DataFrame([(k, o, EDITS[e]) for k, o, e in planted], columns=["copy", "original", "edit"])


def _folder(root: Path, n: int) -> Path:
    """A folder of the first ``n`` films (links), one class subfolder each."""
    folder = root / f"set{n}"
    for name in CLASS_FOLDERS:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        link = folder / CLASS_FOLDERS[k % 3] / f"f{k:06d}.jpg"
        if not link.is_symlink():
            link.symlink_to(_film_path(root, k))
    return folder


def _curate_once(folder: Path, out: Path, workers: int, per_class: int, seed: int) -> dict:
    """One curation of ``folder`` in this process: stage times, band counts, peak memory (MB)."""
    from data_prep import progress
    from data_prep.curate import build
    from data_prep.recipe import CurationParams

    progress.STAGES = []
    at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    result = build(folder.parent, out, CurationParams(per_class=per_class, balance="down", seed=seed, min_age=None,
                                                      image_folders=(str(folder),)), workers=workers)
    wall = time.perf_counter() - started
    merges = result.summary["patient_merges"]
    return {"wall": wall, "stages": progress.STAGES, "band_matched": merges["band_pairs"],
            "band_pruned": merges["band_pruned"], "images": len(result.manifest),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "start_mb": at_start,
            "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _recall(out: Path, planted: pd.DataFrame, n: int) -> tuple[int, int]:
    """Planted copies within the first ``n`` films whose copy and original were linked as one film."""
    import re

    from data_prep.dedup import _components

    inside = planted[planted["copy"] < n]
    pairs = pd.read_csv(out / "duplicates.csv")
    linked = pairs[pairs["same_film"].astype(bool)]

    def film(image_id: str) -> int:
        return int(re.search(r"f(\d+)\.jpg$", image_id).group(1))

    edges = [(film(a), film(b)) for a, b in zip(linked["image_a"], linked["image_b"])]
    group_of = {k: g for g, members in enumerate(_components(n, edges)) for k in members}
    found = sum(group_of.get(c, -1) == group_of.get(o, -2) for c, o in zip(inside["copy"], inside["original"]))
    return int(found), len(inside)


def _pruning_loss(folder: Path, n: int, planted: pd.DataFrame) -> dict:
    """The planted copies whose pair lies in the grey band, how many the pruning set aside, and
    how many of those keypoints would have called one film (what the old, unpruned rule finds
    that the new one does not)."""
    from data_prep.copies import BAND_HIGH, BAND_LOW, Matcher
    from data_prep.dedup import prune_band
    from data_prep.fingerprint import fingerprints, near_pairs

    order = sorted(range(n), key=lambda k: f"{CLASS_FOLDERS[k % 3]}/f{k:06d}.jpg")  # curation's image_id order
    found, _ = fingerprints([folder / CLASS_FOLDERS[k % 3] / f"f{k:06d}.jpg" for k in order])
    bits, second = np.array([f.phash for f in found]), np.array([f.dhash for f in found])
    band = [p for p in near_pairs(bits, BAND_HIGH) if p[2] >= BAND_LOW]
    kept, _ = prune_band(band, second)
    position = {k: i for i, k in enumerate(order)}
    pairs = {(min(position[c], position[o]), max(position[c], position[o])) for c, o in
             zip(planted.loc[planted["copy"] < n, "copy"], planted.loc[planted["copy"] < n, "original"])}
    in_band = pairs & {(i, j) for i, j, _ in band}
    dropped = in_band - {(i, j) for i, j, _ in kept}
    matcher = Matcher()
    lost = sum(matcher.match(str(i), _film_path(folder.parent, order[i]), str(j), _film_path(folder.parent, order[j]))
               .same_film for i, j in dropped)
    return {"in_band": len(in_band), "dropped": len(dropped), "lost": int(lost)}


def hash_distances(root: Path, n: int, pairs: int = 2000) -> np.ndarray:
    """pHash distances of random pairs of (non-copy) films among the first ``n``."""
    from data_prep.fingerprint import FingerprintStore, fingerprints

    rng = np.random.default_rng(1)
    picks = rng.choice(n, size=min(n, 200), replace=False)
    found, _ = fingerprints([_film_path(root, int(k)) for k in picks], store=FingerprintStore(None))
    bits = np.array([f.phash for f in found])
    a, b = rng.integers(0, len(bits), (2, pairs))
    keep = a != b
    return np.count_nonzero(bits[a[keep]] != bits[b[keep]], axis=1)


def run_one(args: argparse.Namespace) -> int:
    """The child process: curate one set twice (fresh store, then other parameters); print JSON."""
    folder, n = Path(args.one), int(args.n)
    out = folder.parent / f"out{n}-w{args.workers[0]}"
    first = _curate_once(folder, out / "first", args.workers[0], n // 3, 0)
    planted = pd.read_csv(folder.parent / "planted.csv")
    first["recall"] = _recall(out / "first", planted, n)
    first["pruning"] = _pruning_loss(folder, n, planted)
    second = _curate_once(folder, out / "second", args.workers[0], n // 6, 1)
    print(json.dumps({"first": first, "second": second}))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook bench curate``."""
    add_data_dir(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 64000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--max-one-worker", type=int, default=16000,
                        help="largest size also curated with one worker (the largest take long)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the synthetic films (GBs at 64k)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--n", help=argparse.SUPPRESS)
    add_out(parser, f"the report, {REPORT}")


def _row(n: int, workers: int, run: dict) -> str:
    first, second = run["first"], run["second"]
    stages: dict[str, tuple[float, int]] = {}
    for name, sec, items in first["stages"]:  # a stage may run more than once (the leak check's hashes)
        before = stages.get(name, (0.0, 0))
        stages[name] = (before[0] + sec, before[1] + items)

    def rate(name: str) -> str:
        sec, items = stages.get(name, (0.0, 0))
        return f"{items / sec:,.0f}" if sec > 0 and items else "—"

    near = stages.get("near pairs (pHash, all pairs)", (0.0, 0))[0] + stages.get("leak check (pHash, across splits)", (0.0, 0))[0]
    found, planted = first["recall"]
    loss = first["pruning"]
    return (f"| {n:,} | {workers} | {first['wall']:.0f} | {1000 * first['wall'] / n:.1f} | "
            f"{rate('SHA-256 of files')} | {rate('decode + perceptual hashes')} | {near:.1f} | "
            f"{first['band_matched'] + first['band_pruned']:,} | {first['band_matched']:,} | "
            f"{rate('grey band keypoint matching')} | {found} of {planted} | {loss['in_band']} / {loss['dropped']} / "
            f"{loss['lost']} | "
            f"{max(first['peak_mb'], first['workers_peak_mb']):,.0f} ({first['start_mb']:,.0f}) | {second['wall']:.1f} "
            f"({100 * second['wall'] / first['wall']:.0f} %) |")


def run_command(args: argparse.Namespace) -> int:
    """``workbook bench curate``: build the sets, curate each in a child process; print the report."""
    from data_prep.datadir import data_dir as resolve_data_dir
    from data_prep.fingerprint import default_workers

    if args.one:
        return run_one(args)
    data_dir = resolve_data_dir(args.data_dir)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    pool, real_rate, real_n = build_pool(data_dir, work)
    sizes = sorted(args.sizes)
    planted = build_films(pool, sizes[-1], default_workers())
    planted.to_csv(work / "planted.csv", index=False)
    synthetic = hash_distances(work, sizes[-1])
    lines = ["Synthetic films: blends of three distinct real X-rays, warped, re-windowed, with noise, 512-px JPEG; "
             f"{PLANTED:.0%} planted copies (an earlier film with a re-post's edit).  pHash distance of random "
             f"synthetic pairs: median {np.median(synthetic):.0f}, 1st percentile {np.percentile(synthetic, 1):.0f} "
             "(real different patients' films in copies.txt: median 122, min 78).",
             f"Real films of the data folder: {real_n} decoded + hashed at {real_rate:.0f} images/s in one process.",
             "Each row: a fresh process, a fresh fingerprint store; then a second curation with other parameters "
             "(--per-class halved, another seed) over that store.  All-pairs pHash: the near-pair search and the "
             "leak check's, the two costs that grow with the square of the films.  Planted in band / pruned / "
             "lost: planted copies whose pair lies in the grey band, those the pruning set aside before "
             "keypoint matching, and those of them keypoints would have called one film (the copies the "
             "unpruned rule finds and this one misses).  Planted copies outside the band (beyond "
             f"{BAND_HIGH} bits: most crops, captions on a taller canvas) neither rule finds.  Peak MB: the "
             "largest resident memory of the curating process or any worker; at start: the process before "
             "curating (the `workbook` command's own imports, torch among them).", "",
             "| films | workers | first run s | ms/film | SHA-256 img/s | decode+hash img/s | all-pairs pHash s | "
             "band pairs | matched after pruning | matching pairs/s | planted copies found | planted in band / "
             "pruned / lost | peak MB (at start) | second run s (of first) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = {}
    for n in sizes:
        folder = _folder(work, n)
        for workers in sorted(args.workers):
            if workers == 1 and n > args.max_one_worker and len(args.workers) > 1:
                continue
            child = subprocess.run([sys.executable, "-m", "nbhelpers", "bench", "curate", "--work", str(work),
                                    "--one", str(folder), "--n", str(n), "--workers", str(workers)],
                                   capture_output=True, text=True, env={**os.environ, "CXR_PROGRESS": "quiet",
                                                                        "CXR_FINGERPRINTS": str(work / f"store{n}-w{workers}.sqlite")})
            if child.returncode != 0:
                raise RuntimeError(f"curating {n} films with {workers} workers failed:\n{child.stderr[-3000:]}")
            runs[n, workers] = json.loads(child.stdout.strip().splitlines()[-1])
            lines.append(_row(n, workers, runs[n, workers]))
            print(lines[-1], flush=True)
    lines += ["", *_extrapolate(runs, real_rate)]
    emit(header(args.command_line) + lines, args.out / REPORT if args.out else None)
    return 0


def _extrapolate(runs: dict, real_rate: float) -> list[str]:
    """Minutes to curate the archives, extrapolated (and said to be) from the largest measured run."""
    n, workers = max(runs, key=lambda k: (k[0], k[1]))
    first = runs[n, workers]["first"]
    stages: dict[str, float] = {}
    for name, sec, _ in first["stages"]:
        stages[name] = stages.get(name, 0.0) + sec
    decode = stages.get("decode + perceptual hashes", 0.0)
    near = stages.get("near pairs (pHash, all pairs)", 0.0) + stages.get("leak check (pHash, across splits)", 0.0)
    rest = first["wall"] - decode - near
    lines = [f"Extrapolated, not measured: from the {n:,}-film run with {workers} workers, decoding at the real films' "
             f"rate ({real_rate:.0f} images/s per process; 1024-px DICOMs decode slower still), the all-pairs pHash "
             "comparison growing with the square of the films, everything else with their number:"]
    for name, films in ARCHIVES.items():
        minutes = (films / (real_rate * workers) + near * (films / n) ** 2 + rest * films / n) / 60
        on16 = (films / (real_rate * 16) + near * (films / n) ** 2 / 8 + rest * films / n / 8) / 60
        lines.append(f"- {name}: about {minutes:.0f} min on this machine's {workers} workers; about {on16:.0f} min "
                     "on 16 cores (decoding and matching 16 ways, the matrix products 8 times faster)")
    return lines
