"""Minimal image decoding for curation: is the file readable, and what is its perceptual hash?

Full-quality decoding (bit depth, windowing, CLAHE) belongs to preprocessing; here an image is
decoded just far enough to prove it is readable and to compute a perceptual hash of a small
greyscale copy, which survives the re-encoding, resizing and re-saving that republished copies
of one X-ray go through (a file hash does not).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from data_prep.progress import tqdm

from data_prep.images import ImageReadError
from data_prep.images import load_gray as decode_gray

#: Side of the square hash grid: 16 gives a 256-bit perceptual hash.  64 bits (8) is too coarse
#: for chest X-rays, which all look alike at that scale: on the mirror, different patients' films
#: came within 2 bits of each other, while at 256 bits re-saved copies stay within ~22 bits and
#: different films of different patients are 54+ bits apart.
PHASH_SIZE = 16
#: Perceptual hashes kept in memory per process (a 256-bit hash is 256 bytes as a bool array).
PHASH_CACHE_SIZE = 200_000
#: Rows per matrix product when comparing all hashes with each other.
NEAR_PAIRS_CHUNK = 1024


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


@functools.lru_cache(maxsize=PHASH_CACHE_SIZE)
def _phash_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    # Keyed on modification time and size too, so a replaced file is hashed again.
    import imagehash  # here, not at import: only curation hashes, and a GPU machine may lack it

    bits = imagehash.phash(load_gray(Path(path)), hash_size=PHASH_SIZE).hash.flatten()
    bits.setflags(write=False)  # shared by every caller of the cache
    return bits


def phash(path: Path) -> np.ndarray:
    """Return the perceptual hash of ``path`` as a flat bool array of ``PHASH_SIZE**2`` bits.

    Results are cached per file (path, modification time, size) for the process, so curating the
    same sources again with other parameters does not decode every image again.  Raises like
    :func:`load_gray`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    stat = path.stat()
    return _phash_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def phash_many(paths: Sequence[Path]) -> tuple[list[np.ndarray | None], dict[int, str]]:
    """Hash every path with a progress bar; return the hashes (None where unreadable) and the errors by index."""
    hashes: list[np.ndarray | None] = []
    errors: dict[int, str] = {}
    for i, path in enumerate(tqdm(paths, desc="decoding + perceptual hash", unit="image")):
        try:
            hashes.append(phash(path))
        except UnreadableImageError as err:
            hashes.append(None)
            errors[i] = str(err)
    return hashes, errors


def near_pairs(bits: np.ndarray, max_distance: int, chunk: int = NEAR_PAIRS_CHUNK) -> list[tuple[int, int, int]]:
    """Return ``(i, j, distance)`` for every pair ``i < j`` of rows of ``bits`` (n x hash bits, bool)
    whose Hamming distance is at most ``max_distance``, in row order.

    Works in chunks of rows (a matrix product per chunk), so tens of thousands of images fit in memory.
    """
    if len(bits) == 0:
        return []
    ones = np.asarray(bits, dtype=np.float32)
    zeros = 1.0 - ones
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, len(ones), chunk):
        block = slice(start, start + chunk)
        # Hamming distance = bits set in a but not b + bits set in b but not a.
        dist = ones[block] @ zeros.T + zeros[block] @ ones.T
        rows, cols = np.nonzero(dist <= max_distance + 0.5)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if start + r < c:
                pairs.append((start + r, c, int(round(float(dist[r, c])))))
    return pairs
