"""Fingerprints of image files for curation: their bytes' SHA-256 and two perceptual hashes.

An image is decoded just far enough to prove it is readable and to hash a small greyscale copy.
Two perceptual hashes survive the re-encoding, resizing and re-saving that republished copies of
one X-ray go through (a file hash does not): the 256-bit DCT hash (``phash``) decides copies and
the grey band (:mod:`data_prep.copies`); the 256-bit gradient hash (``dhash``), built another
way, prunes the grey band before keypoint matching (:data:`data_prep.copies.DHASH_BAND`).

Fingerprinting scales to the archives' size:

* **On all cores.**  Files are decoded and hashed by ``workers`` processes (default: every core
  this process may use), in chunks, and the results come back in input order, so the outcome
  does not depend on the worker count.
* **Never twice.**  Every fingerprint is kept in a :class:`FingerprintStore`, an SQLite file
  (:func:`store_path`: ``$CXR_FINGERPRINTS``, default ``~/.cache/cxr-workbook/fingerprints.sqlite``),
  keyed by the file's resolved path, size and modification time, so curating the same sources
  again with other parameters decodes nothing, and a replaced file is fingerprinted again.
  Results are committed in batches, each a transaction: a run killed part-way keeps what it
  finished and leaves a readable store.  ``CXR_FINGERPRINTS=off`` keeps nothing on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.images import ImageReadError
from data_prep.images import load_gray as decode_gray
from data_prep.progress import timed, tqdm

#: Side of the square hash grid: 16 gives a 256-bit perceptual hash.  64 bits (8) is too coarse
#: for chest X-rays, which all look alike at that scale: on the mirror, different patients' films
#: came within 2 bits of each other, while at 256 bits re-saved copies stay within ~22 bits and
#: different films of different patients are 54+ bits apart.
PHASH_SIZE = 16
HASH_BITS = PHASH_SIZE * PHASH_SIZE
#: Rows per matrix product when comparing all hashes with each other, at most, and the distances
#: one product may hold (2^26 float32: 256 MB), so memory stays bounded at any number of images.
NEAR_PAIRS_CHUNK = 2048
NEAR_PAIRS_CELLS = 1 << 26
#: Bytes read at a time when hashing a file.
HASH_CHUNK_BYTES = 1 << 20
#: What a stored perceptual fingerprint means; a row of another version is computed again.
FINGERPRINT_VERSION = 2
#: The environment variable naming the store file (``off``: no store).
STORE_ENV = "CXR_FINGERPRINTS"
#: Files per task sent to a worker, and results committed to the store per transaction.
CHUNK = 16
COMMIT_EVERY = 256
#: Below this many files to decode, one process does it (starting workers costs more).
MIN_PARALLEL = 64


class UnreadableImageError(ImageReadError):
    """An image file exists but cannot be decoded."""


def load_gray(path: Path) -> Image.Image:
    """Decode ``path`` (any format :func:`data_prep.images.load_gray` reads) to a greyscale PIL image.

    Curation and training decode with the same function, so a film the hash saw is the film the
    model sees.  Raises FileNotFoundError when the file does not exist and
    :class:`UnreadableImageError` naming the file when it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        return Image.fromarray(decode_gray(path))
    except ImageReadError as err:
        raise UnreadableImageError(str(err)) from err


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """The two perceptual hashes of one image, each a flat bool array of :data:`HASH_BITS` bits."""

    phash: np.ndarray
    dhash: np.ndarray


def perceptual(image: Image.Image) -> Fingerprint:
    """The :class:`Fingerprint` of a decoded greyscale image."""
    import imagehash  # here, not at import: only curation hashes, and a GPU machine may lack it

    return Fingerprint(imagehash.phash(image, hash_size=PHASH_SIZE).hash.flatten(),
                       imagehash.dhash(image, hash_size=PHASH_SIZE).hash.flatten())


def _fingerprint_file(path: str) -> tuple[bytes, bytes, str]:
    """Worker task: the packed hashes of one file, or ``(b"", b"", error)`` when it cannot be decoded."""
    try:
        fp = perceptual(load_gray(Path(path)))
    except UnreadableImageError as err:
        return b"", b"", str(err)
    return np.packbits(fp.phash).tobytes(), np.packbits(fp.dhash).tobytes(), ""


def _fingerprint_chunk(paths: Sequence[str]) -> list[tuple[bytes, bytes, str]]:
    return [_fingerprint_file(p) for p in paths]


def _digest_chunk(paths: Sequence[str]) -> list[str]:
    return [sha256_file(Path(p)) for p in paths]


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """``workers`` processes for decoding and matching, forked where the system can (a worker
    starts at once and imports nothing again), else spawned.  OpenCV runs on one thread while
    the pool lives: a child forked while OpenCV's own thread pool is set up waits on it forever."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
            yield pool
    finally:
        cv2.setNumThreads(before)


def default_workers() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def store_path() -> Path | None:
    """Where fingerprints are kept: ``$CXR_FINGERPRINTS`` (``off``: nowhere), else
    ``fingerprints.sqlite`` in ``$XDG_CACHE_HOME/cxr-workbook`` (default ``~/.cache``)."""
    raw = os.environ.get(STORE_ENV, "").strip()
    if raw.lower() == "off":
        return None
    if raw:
        return Path(raw).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cxr-workbook" / "fingerprints.sqlite"


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)",
    "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, version INTEGER, "
    "phash BLOB, dhash BLOB, error TEXT)",
    # Keypoint matches of a pair of files, each named by its key (path, size, modification time).
    "CREATE TABLE IF NOT EXISTS matches (a TEXT, b TEXT, version INTEGER, matches INTEGER, inliers INTEGER, "
    "PRIMARY KEY (a, b))",
)


class FingerprintStore:
    """Fingerprints on disk, keyed by (resolved path, size, modification time): an SQLite file in
    write-ahead-log mode, so a killed writer loses at most its open batch and readers never see
    half a row.  ``FingerprintStore(None)`` stores nothing.  A store that cannot be opened (a
    read-only cache folder, a damaged file) is set aside with one warning and nothing stored."""

    def __init__(self, path: Path | None) -> None:
        self.path, self._db = path, None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            for statement in _SCHEMA:
                db.execute(statement)
            db.commit()
            self._db = db
        except (OSError, sqlite3.Error) as err:
            print(f"warning: fingerprint store {path} cannot be used ({err}); every image is decoded this run. "
                  f"Set {STORE_ENV} to a writable file, or {STORE_ENV}=off", file=sys.stderr)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _lookup(self, table: str, columns: str, keys: Sequence[tuple[str, int, int]], extra: str = "") -> dict:
        if self._db is None:
            return {}
        found = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            rows = self._db.execute(f"SELECT path, size, mtime_ns, {columns} FROM {table} WHERE path IN "
                                    f"({','.join('?' * len(part))}){extra}", [k[0] for k in part]).fetchall()
            wanted = {k[0]: k for k in part}
            found.update({r[0]: r[3:] for r in rows if wanted[r[0]] == tuple(r[:3])})
        return found

    def digests(self, keys: Sequence[tuple[str, int, int]]) -> dict[str, str]:
        return {path: row[0] for path, row in self._lookup("digests", "sha256", keys).items()}

    def hashes(self, keys: Sequence[tuple[str, int, int]]) -> dict[str, tuple[bytes, bytes, str]]:
        return self._lookup("hashes", "phash, dhash, error", keys, f" AND version = {FINGERPRINT_VERSION}")

    def put_digests(self, rows: Sequence[tuple[tuple[str, int, int], str]]) -> None:
        self._put("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", [(*k, v) for k, v in rows])

    def put_hashes(self, rows: Sequence[tuple[tuple[str, int, int], tuple[bytes, bytes, str]]]) -> None:
        self._put("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)",
                  [(*k, FINGERPRINT_VERSION, *v) for k, v in rows])

    def matches(self, pairs: Sequence[tuple[str, str]], version: int) -> dict[tuple[str, str], tuple[int, int]]:
        """Stored ``(matches, inliers)`` of file pairs named by :func:`file_key` (this ``version`` only)."""
        if self._db is None or not pairs:
            return {}
        wanted, found = set(pairs), {}
        firsts = sorted({a for a, _ in pairs})
        for start in range(0, len(firsts), 400):
            part = firsts[start:start + 400]
            rows = self._db.execute(
                f"SELECT a, b, matches, inliers FROM matches WHERE version = ? AND a IN ({','.join('?' * len(part))})",
                [version, *part]).fetchall()
            found.update({(a, b): (m, n) for a, b, m, n in rows if (a, b) in wanted})
        return found

    def put_matches(self, rows: Sequence[tuple[tuple[str, str], tuple[int, int]]], version: int) -> None:
        self._put("INSERT OR REPLACE INTO matches VALUES (?, ?, ?, ?, ?)", [(*k, version, *v) for k, v in rows])

    def _put(self, statement: str, rows: list[tuple]) -> None:
        if self._db is None or not rows:
            return
        with self._db:  # one transaction: all of the batch or none of it
            self._db.executemany(statement, rows)


def _key(path: Path) -> tuple[str, int, int]:
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def file_key(path: Path) -> str:
    """One string naming a file's content as the store does (resolved path, size, modification time)."""
    return "|".join(map(str, _key(Path(path))))


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _computed(task: Callable[[Sequence[str]], list], todo: Sequence[str], workers: int, threads: bool,
              desc: str) -> Iterator[tuple[str, object]]:
    """Yield ``(path, result)`` for every path of ``todo`` in order, ``task`` run on chunks of
    them by ``workers`` processes (threads for I/O-bound work), with a progress bar."""
    chunks = _chunks(todo, CHUNK)
    with tqdm(total=len(todo), desc=desc, unit="image") as bar, contextlib.ExitStack() as stack:
        if workers <= 1 or len(todo) < MIN_PARALLEL:
            results = map(task, chunks)
        elif threads:
            results = stack.enter_context(ThreadPoolExecutor(workers)).map(task, chunks)
        else:
            results = stack.enter_context(worker_pool(workers)).map(task, chunks)
        for chunk, result in zip(chunks, results):
            yield from zip(chunk, result)
            bar.update(len(chunk))


def _known(paths: Sequence[Path], workers: int | None, store: FingerprintStore | None, digests: bool
           ) -> tuple[list[tuple[str, int, int]], dict[str, object]]:
    """Every path's key and its stored or newly computed value (SHA-256, or packed hashes and error),
    the new ones computed by ``workers`` (threads for digests, processes for decoding) and
    committed to the store in batches as they finish."""
    keys = [_key(Path(p)) for p in paths]
    own = store is None
    store = FingerprintStore(store_path()) if own else store
    workers = default_workers() if workers is None else max(1, int(workers))
    lookup, put = (store.digests, store.put_digests) if digests else (store.hashes, store.put_hashes)
    task, stage, desc = ((_digest_chunk, "SHA-256 of files", "hashing files (SHA-256)") if digests else
                         (_fingerprint_chunk, "decode + perceptual hashes", "decoding + perceptual hash"))
    try:
        known = lookup(keys)
        todo = sorted({k[0] for k in keys} - set(known))
        by_path = {k[0]: k for k in keys}
        batch: list = []
        with timed(stage, len(todo)):
            for path, value in _computed(task, todo, workers, digests, desc):
                known[path] = value
                batch.append((by_path[path], value))
                if len(batch) >= COMMIT_EVERY:
                    put(batch)
                    batch = []
            put(batch)
    finally:
        if own:
            store.close()
    return keys, known


def file_digests(paths: Sequence[Path], workers: int | None = None,
                 store: FingerprintStore | None = None) -> list[str]:
    """The SHA-256 of every file (FileNotFoundError for a missing one), from the store where a
    file is unchanged, else read by ``workers`` threads and stored."""
    keys, known = _known(paths, workers, store, digests=True)
    return [known[k[0]] for k in keys]


def fingerprints(paths: Sequence[Path], workers: int | None = None, store: FingerprintStore | None = None
                 ) -> tuple[list[Fingerprint | None], dict[int, str]]:
    """Fingerprint every path: the :class:`Fingerprint` (None where unreadable) and the errors by index.

    Unchanged files come from the store; the others are decoded by ``workers`` processes
    (default: every core) and stored in batches as they finish.  The result is the same whatever
    the worker count.  Raises FileNotFoundError for a missing file.
    """
    keys, known = _known(paths, workers, store, digests=False)
    out: list[Fingerprint | None] = []
    errors: dict[int, str] = {}
    for i, key in enumerate(keys):
        packed_p, packed_d, error = known[key[0]]
        if error:
            out.append(None)
            errors[i] = error
        else:
            out.append(Fingerprint(_unpack(packed_p), _unpack(packed_d)))
    return out, errors


def _unpack(packed: bytes) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:HASH_BITS].astype(bool)
    bits.setflags(write=False)
    return bits


def phash(path: Path) -> np.ndarray:
    """The perceptual hash of one file as a flat bool array of :data:`HASH_BITS` bits (through the
    store).  Raises FileNotFoundError or :class:`UnreadableImageError`."""
    found, errors = fingerprints([Path(path)], workers=1)
    if errors:
        raise UnreadableImageError(errors[0])
    return found[0].phash


def near_pairs(bits: np.ndarray, max_distance: int, chunk: int = NEAR_PAIRS_CHUNK) -> list[tuple[int, int, int]]:
    """Return ``(i, j, distance)`` for every pair ``i < j`` of rows of ``bits`` (n x hash bits, bool)
    whose Hamming distance is at most ``max_distance``, in row order.

    Hamming distance is ``|a| + |b| - 2 a·b``: one matrix product per chunk of rows against the
    rows after it, so tens of thousands of images fit in memory (the time grows with n², a
    matrix product's n²: about a minute for 64,000 images on two cores).
    """
    if len(bits) == 0:
        return []
    ones = np.asarray(bits, dtype=np.float32)
    weight = ones.sum(axis=1)
    chunk = max(64, min(chunk, NEAR_PAIRS_CELLS // len(ones)))
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, len(ones), chunk):
        stop = min(start + chunk, len(ones))
        dist = weight[start:stop, None] + weight[None, start:] - 2.0 * (ones[start:stop] @ ones[start:].T)
        rows, cols = np.nonzero(dist <= max_distance + 0.5)
        keep = cols > rows  # columns count from ``start``: only pairs i < j
        for r, c in zip(rows[keep].tolist(), cols[keep].tolist()):
            pairs.append((start + r, start + c, int(round(float(dist[r, c])))))
    return pairs


def distances(bits: np.ndarray, pairs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """The Hamming distance of ``bits``' rows ``i`` and ``j`` for each pair ``(i, j, ...)``."""
    if not pairs:
        return np.zeros(0, dtype=np.int64)
    idx = np.asarray([(p[0], p[1]) for p in pairs], dtype=np.int64)
    out = np.empty(len(idx), dtype=np.int64)
    for start in range(0, len(idx), 100_000):
        part = idx[start:start + 100_000]
        out[start:start + len(part)] = np.count_nonzero(bits[part[:, 0]] != bits[part[:, 1]], axis=1)
    return out
