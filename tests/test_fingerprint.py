"""Fingerprints at scale: the store that keeps them, workers that compute them, the pruned grey band.

Each guard is shown failing on a case built to fail beside the case where it passes.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import copies
from data_prep.curate import build
from data_prep import fingerprint as fpm
from data_prep.dedup import find_duplicates, prune_band
from data_prep.recipe import CurationParams
from data_prep.table import load_table

IEEE = "covid-chestxray-dataset/images/"


def _films(data_dir: Path, n: int) -> list[Path]:
    return sorted((data_dir / IEEE).glob("*.jp*g"))[:n]


@pytest.fixture
def counted(monkeypatch):
    """Count the files decoded in this process (one worker: no pool)."""
    decoded: list[str] = []
    real = fpm._fingerprint_file
    monkeypatch.setattr(fpm, "_fingerprint_file", lambda path: decoded.append(path) or real(path))
    return decoded


def test_a_second_run_decodes_nothing_and_a_replaced_file_is_decoded_again(tmp_path, data_dir, counted):
    films = [shutil.copy(p, tmp_path / p.name) for p in _films(data_dir, 6)]
    films = [Path(f) for f in films]
    store = fpm.FingerprintStore(tmp_path / "store.sqlite")
    first, errors = fpm.fingerprints(films, workers=1, store=store)
    assert len(counted) == 6 and errors == {}
    again, _ = fpm.fingerprints(films, workers=1, store=store)
    assert len(counted) == 6  # all from the store
    assert all((a.phash == b.phash).all() and (a.dhash == b.dhash).all() for a, b in zip(first, again))
    # Replace one film by another's bytes: its size and modification time change, so it is decoded again.
    shutil.copy(films[1], films[0])
    os.utime(films[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    replaced, _ = fpm.fingerprints(films, workers=1, store=store)
    assert counted[6:] == [str(films[0].resolve())]
    assert (replaced[0].phash == first[1].phash).all()
    # A store that ignored the change would hand back the old film's hash: the case built to fail.
    stale = dict(store.hashes([fpm._key(films[0])]))
    assert stale and (fpm._unpack(stale[str(films[0].resolve())][0]) == first[1].phash).all()
    store.close()


def test_a_stored_fingerprint_of_another_version_is_not_used(tmp_path, data_dir, counted, monkeypatch):
    film = Path(shutil.copy(_films(data_dir, 1)[0], tmp_path / "a.jpg"))
    store = fpm.FingerprintStore(tmp_path / "store.sqlite")
    fpm.fingerprints([film], workers=1, store=store)
    monkeypatch.setattr(fpm, "FINGERPRINT_VERSION", fpm.FINGERPRINT_VERSION + 1)
    fpm.fingerprints([film], workers=1, store=store)
    assert len(counted) == 2


def test_a_killed_run_leaves_a_readable_store_that_the_next_run_completes(tmp_path, data_dir):
    films = [Path(shutil.copy(p, tmp_path / p.name)) for p in _films(data_dir, 120)]
    store_file = tmp_path / "store.sqlite"
    script = textwrap.dedent(f"""
        import sys; from pathlib import Path
        from data_prep import fingerprint as fpm
        fpm.COMMIT_EVERY = 8
        paths = [Path(p) for p in sys.argv[1:]]
        fpm.fingerprints(paths, workers=1, store=fpm.FingerprintStore(Path({str(store_file)!r})))
    """)
    child = subprocess.Popen([sys.executable, "-c", script, *map(str, films)], env={**os.environ, "CXR_PROGRESS": "quiet"})
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once some batches are in, long before the end
        time.sleep(0.2)
        if store_file.exists():
            with sqlite3.connect(store_file, timeout=30) as db:
                if db.execute("SELECT count(*) FROM hashes").fetchone()[0] >= 16:
                    break
    child.send_signal(signal.SIGKILL)
    child.wait()
    with sqlite3.connect(store_file, timeout=30) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        done = db.execute("SELECT count(*) FROM hashes").fetchone()[0]
    assert 16 <= done < len(films), done  # killed part-way, its finished batches kept
    store = fpm.FingerprintStore(store_file)
    resumed, errors = fpm.fingerprints(films, workers=1, store=store)
    fresh, _ = fpm.fingerprints(films, workers=1, store=fpm.FingerprintStore(None))
    assert errors == {} and all((a.phash == b.phash).all() for a, b in zip(resumed, fresh))


def test_an_unusable_store_is_named_once_and_the_run_goes_on(tmp_path, data_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = fpm.FingerprintStore(blocker / "store.sqlite")
    found, errors = fpm.fingerprints(_films(data_dir, 2), workers=1, store=store)
    assert errors == {} and len(found) == 2
    err = capsys.readouterr().err
    assert err.count("fingerprint store") == 1 and fpm.STORE_ENV in err


def test_workers_give_the_same_curation_byte_for_byte(tmp_path, data_dir, monkeypatch):
    """One process and two: the same manifest, drops and pair table (the store off, so both decode)."""
    monkeypatch.setenv(fpm.STORE_ENV, "off")
    monkeypatch.setattr(copies, "MATCH_BLOCK", 4)  # the band's few pairs go to the pool in blocks too
    params = CurationParams(per_class=60, balance="down", allow_ap=True)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        build(data_dir, out, params, sources=["ieee8023", "figure1"], workers=workers)
        outputs[workers] = {name: (out / name).read_bytes() for name in ("manifest.csv", "dropped.csv", "duplicates.csv")}
    assert outputs[1] == outputs[2]
    pairs = pd.read_csv(tmp_path / "w2" / "duplicates.csv")
    assert (pairs["evidence"] == "keypoints").any()  # the band was matched, in the pool


def _repost_scan(data_dir: Path):
    table, _ = load_table(data_dir, sources=["ieee8023"], hash_images=False)
    both = table[table["image_id"].str.endswith(("/AR-1.jpg", "/extubation-1.jpg"))].reset_index(drop=True)
    found, _ = fpm.fingerprints([data_dir / p for p in both["path"]], workers=1)
    bits, second = np.array([f.phash for f in found]), np.array([f.dhash for f in found])
    return find_duplicates(both, bits, 32, [data_dir / p for p in both["path"]], second=second, workers=1)


def test_the_pruned_band_keeps_the_captioned_repost(data_dir):
    scan = _repost_scan(data_dir)
    assert [d[0].rsplit("/", 1)[-1] for d in scan.drops] == ["extubation-1.jpg"] and scan.band_pruned == 0


def test_a_pruning_rule_that_drops_the_captioned_repost_fails_the_recall_check(data_dir, monkeypatch):
    monkeypatch.setattr("data_prep.dedup.DHASH_BAND", 10)  # tighter than the re-post's 20 bits
    scan = _repost_scan(data_dir)
    assert scan.drops == [] and scan.band_pruned == 1


def test_near_pairs_match_a_direct_count(tmp_path):
    rng = np.random.default_rng(0)
    bits = rng.random((300, 256)) < 0.5
    bits[7] = bits[3]
    bits[9, :40] = ~bits[2, :40]
    bits[9, 40:] = bits[2, 40:]
    found = fpm.near_pairs(bits, 100, chunk=64)
    direct = [(i, j, int((bits[i] != bits[j]).sum())) for i in range(300) for j in range(i + 1, 300)
              if (bits[i] != bits[j]).sum() <= 100]
    assert found == direct and (3, 7, 0) in found and (2, 9, 40) in found
    assert list(fpm.distances(bits, found)) == [d for *_, d in found]


def test_the_band_is_bounded_per_image_and_keeps_each_images_closest_pair():
    rng = np.random.default_rng(1)
    n = 30
    second = rng.random((n, 256)) < 0.5
    second[1:] = second[0]  # every pair passes the gradient-hash test: only the bound prunes
    candidates = [(i, j, int(rng.integers(33, 81))) for i in range(n) for j in range(i + 1, n)]
    kept, pruned = prune_band(candidates, second, per_image=3)
    assert len(kept) + pruned == len(candidates) and len(kept) <= 3 * n
    for node in range(n):  # each image's closest pair survives
        mine = [c for c in candidates if node in c[:2]]
        assert min(mine, key=lambda c: (c[2], candidates.index(c))) in kept
    loose, none = prune_band(candidates, second, per_image=n)
    assert none == 0 and loose == candidates


def test_keypoint_decisions_are_stored_so_a_second_curation_matches_nothing(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv(fpm.STORE_ENV, str(tmp_path / "store.sqlite"))
    matched: list[int] = []
    real = copies._match
    monkeypatch.setattr(copies, "_match", lambda tasks, *a: matched.append(len(tasks)) or real(tasks, *a))
    first, second = _repost_scan(data_dir), _repost_scan(data_dir)
    assert matched == [1]  # the pair matched once, then read back
    assert first.drops == second.drops and first.pairs.equals(second.pairs)
    # Another matching rule must not reuse the old decisions: the case built to fail.
    monkeypatch.setattr(copies, "MATCH_VERSION", copies.MATCH_VERSION + 1)
    _repost_scan(data_dir)
    assert matched == [1, 1]
