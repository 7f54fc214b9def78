"""The on-disk cache of preprocessed images: one uint8 array per split, checked before it is trusted.

:func:`build_cache` stores each split as one uint8 ``.npy`` array (N, size, size), memory-mapped
on reading, in a folder named by :func:`cache_key` — a hash of the manifest rows and of every
:class:`~nbhelpers.pipeline.preprocess.PreprocessConfig` field — so a changed parameter or
manifest builds a new cache and an unchanged one is reused.  Superseded cache folders are left
in place (switching a parameter back reuses them); delete the cache root to reclaim the space.
With ``lung_crop`` the cache records the images for which no lung box was found (kept
uncropped), and with ``hist_match`` the reference histogram, in ``meta.json``.

A cache is trusted only after a check: ``meta.json`` records, per split, the shape, dtype and
SHA-256 of each array file and the SHA-256 of the id list, and opening a cache compares every
file against it (once per process while the files keep their size and modification time, so
training does not re-hash on every open).  :func:`build_cache` rebuilds a broken or incomplete
folder (saying why, in one line); :meth:`ImageCache.open` raises :class:`CacheError` naming the
folder and how to delete it.  A cache is built under a temporary name, ``meta.json`` last, and
renamed when complete, so an interrupted build is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from data_prep.progress import tqdm

from data_prep.atomic import write_text
from data_prep.errors import WorkbookError
from data_prep.images import ImageReadError, load_gray
from data_prep.schema import CLASSES, SPLITS, label_index
from data_prep.fingerprint import sha256_file
from nbhelpers.settings.config import display_path
from nbhelpers.pipeline.preprocess import (
    PIPELINE_VERSION,
    PreprocessConfig,
    _hash_text,
    check_gray,
    finish,
    source_content,
    training_reference,
)

#: Manifest columns that decide the cache contents; ``sha256`` joins them when present.
MANIFEST_KEY_COLUMNS = ("image_id", "path", "label", "split")
META_FILE = "meta.json"

# Cache folders verified in this process: resolved path -> (name, size, mtime, inode) of its files
# at that moment.  A file rewritten since then has another signature and is checked again.
_VERIFIED: dict[str, tuple[tuple[str, int, int, int], ...]] = {}


class CacheError(WorkbookError, RuntimeError):
    """A preprocessing cache is missing, incomplete, broken, or was asked for a split it does not hold."""


def manifest_hash(manifest: pd.DataFrame) -> str:
    """Hash the manifest rows that decide the cache contents, in their order.

    Uses :data:`MANIFEST_KEY_COLUMNS` plus ``sha256`` when the column exists, so a re-downloaded
    file with new bytes (and a new recorded hash) also invalidates the cache.  Raises KeyError
    naming missing columns.
    """
    missing = [c for c in MANIFEST_KEY_COLUMNS if c not in manifest.columns]
    if missing:
        raise KeyError(f"manifest lacks column(s) {missing}; it needs {list(MANIFEST_KEY_COLUMNS)}")
    columns = list(MANIFEST_KEY_COLUMNS) + (["sha256"] if "sha256" in manifest.columns else [])
    rows = manifest[columns].astype(str).to_numpy().tolist()
    return _hash_text(json.dumps([columns, rows]))


def cache_key(manifest: pd.DataFrame, cfg: PreprocessConfig) -> str:
    """The cache folder name for ``manifest`` preprocessed with ``cfg``."""
    return _hash_text(f"{manifest_hash(manifest)}:{cfg.key()}")


def _split_files(split: str) -> dict[str, str]:
    """The file names of one split in a cache folder, by part."""
    return {"images": f"{split}_images.npy", "labels": f"{split}_labels.npy", "ids": f"{split}_ids.json"}


def _npy_layout(path: Path) -> tuple[list[int], str, int]:
    """Shape, dtype and expected file size from a .npy header; ValueError when it is not one."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f".npy format version {version} is not one this cache writes")
        shape, _, dtype = readers[version](f)
        offset = f.tell()
    return list(shape), dtype.str, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _describe_files(folder: Path, splits: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """What ``meta.json`` records to check a cache by: per split and file, shape, dtype and SHA-256."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in splits:
        files = _split_files(split)
        entry: dict[str, dict[str, Any]] = {}
        for part in ("images", "labels"):
            shape, dtype, _ = _npy_layout(folder / files[part])
            entry[part] = {"file": files[part], "shape": shape, "dtype": dtype, "sha256": sha256_file(folder / files[part])}
        ids = json.loads((folder / files["ids"]).read_text(encoding="utf-8"))
        entry["ids"] = {"file": files["ids"], "count": len(ids), "sha256": sha256_file(folder / files["ids"])}
        out[split] = entry
    return out


def _signature(folder: Path, meta: dict[str, Any]) -> tuple[tuple[str, int, int, int], ...]:
    """Size, modification time and inode of meta.json and every file it lists (FileNotFoundError if one is gone)."""
    names = [META_FILE] + [f["file"] for split in meta.get("files", {}).values() for f in split.values()]
    out = []
    for name in names:
        st = (folder / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _problem(folder: Path, meta: dict[str, Any]) -> str:
    """Why the files of cache ``folder`` do not match ``meta`` (shapes, dtypes, sizes, SHA-256), or ""."""
    recorded = meta.get("files")
    if not isinstance(recorded, dict) or set(recorded) != set(meta.get("splits", [])):
        return f"{META_FILE} records no file checksums (built by an older version)"
    size = meta.get("config", {}).get("size")
    for split, entry in recorded.items():
        n = meta.get("counts", {}).get(split)
        expected = {"images": [n, size, size], "labels": [n]}
        for part in ("images", "labels", "ids"):
            info = entry.get(part, {})
            path = folder / str(info.get("file", _split_files(split)[part]))
            if not path.is_file():
                return f"{path.name} is missing"
            if part != "ids":
                try:
                    shape, dtype, length = _npy_layout(path)
                except (ValueError, OSError, EOFError) as err:
                    return f"{path.name} is not a readable .npy array ({err})"
                if shape != info.get("shape") or dtype != info.get("dtype"):
                    return (f"{path.name} holds {dtype} {shape}, {META_FILE} says "
                            f"{info.get('dtype')} {info.get('shape')}")
                if shape != expected[part]:
                    return f"{path.name} holds shape {shape}, but {n} images of {size} px make {expected[part]}"
                if path.stat().st_size != length:
                    return f"{path.name} is truncated or padded ({path.stat().st_size} bytes, its header needs {length})"
            if sha256_file(path) != info.get("sha256"):
                return f"{path.name} does not match its SHA-256 in {META_FILE} (its bytes changed)"
        if entry["ids"].get("count") != n:
            return f"{_split_files(split)['ids']} lists {entry['ids'].get('count')} ids, counts say {n}"
    return ""


def _read_meta(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """``meta.json`` of cache ``folder`` once its files are verified, with "" ; or None and why not."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return None, f"no {META_FILE} (an interrupted or foreign folder)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        PreprocessConfig(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{META_FILE} is unreadable ({type(err).__name__}: {err})"
    key = str(folder.resolve())
    try:
        signature = _signature(folder, meta)
    except (FileNotFoundError, TypeError, AttributeError):
        signature = None
    if signature is not None and _VERIFIED.get(key) == signature:
        return meta, ""  # checked earlier in this process and not touched since
    problem = _problem(folder, meta)
    if problem:
        _VERIFIED.pop(key, None)
        return None, problem
    _VERIFIED[key] = _signature(folder, meta)
    return meta, ""


def _discard(folder: Path) -> None:
    """Move a broken cache folder aside (one rename, so no reader sees it half-deleted), then delete it."""
    aside = folder.with_name(f".{folder.name}.broken-{os.getpid()}-{time.time_ns()}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return  # another process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


@dataclass
class CachedSplit:
    """One split of a cache: ``images`` uint8 (N, H, W) memory-mapped, ``labels`` int64 (N,), ``image_ids``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    path: Path

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name, in :data:`CLASSES` order."""
        counts = np.bincount(self.labels, minlength=len(CLASSES))
        return {name: int(n) for name, n in zip(CLASSES, counts)}


@dataclass
class ImageCache:
    """A built cache folder: its ``path``, ``key``, ``cfg``, and the splits it holds."""

    path: Path
    key: str
    cfg: PreprocessConfig
    meta: dict[str, Any]
    reused: bool = False

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.meta["splits"])

    def split(self, name: str) -> CachedSplit:
        """Open split ``name`` (images memory-mapped); raise :class:`CacheError` listing the splits held."""
        if name not in self.meta["splits"]:
            raise CacheError(f"cache {self.path} holds splits {list(self.splits)}, not {name!r}")
        images = np.load(self.path / f"{name}_images.npy", mmap_mode="r")
        labels = np.load(self.path / f"{name}_labels.npy")
        ids = json.loads((self.path / f"{name}_ids.json").read_text(encoding="utf-8"))
        return CachedSplit(name=name, images=images, labels=labels, image_ids=ids, path=self.path)

    @classmethod
    def open(cls, path: Path | str) -> "ImageCache":
        """Open a complete cache folder after checking every file against ``meta.json``.

        Checks shapes, dtypes, sizes and SHA-256 of the arrays and id lists (hashing once per
        process while the files are unchanged).  Raises :class:`CacheError` naming the folder,
        what is wrong and the command that deletes it when it is incomplete or broken.
        """
        path = Path(path)
        meta, problem = _read_meta(path)
        if meta is None:
            raise CacheError(
                f"{path} is not a complete preprocessing cache: {problem}; delete it with "
                f"`rm -rf {shlex.quote(str(path))}` and build_cache() builds it again"
            )
        return cls(path=path, key=path.name, cfg=PreprocessConfig(**meta["config"]), meta=meta)


def _reusable(final: Path, key: str) -> ImageCache | None:
    """The cache folder ``final`` when its files match its ``meta.json``; else None, after moving
    a broken folder aside (one printed line says why)."""
    if not final.exists():
        return None
    meta, problem = _read_meta(final)
    if meta is not None:
        return ImageCache(path=final, key=key, cfg=PreprocessConfig(**meta["config"]), meta=meta, reused=True)
    print(f"rebuilding preprocessing cache {final}: {problem}")
    _discard(final)
    return None


def _write_splits(
    manifest: pd.DataFrame, splits: list[str], data_dir: Path, tmp: Path, cfg: PreprocessConfig, workers: int,
    progress: bool, reference: np.ndarray | None,
) -> list[str]:
    """Write every split's arrays into ``tmp`` (deleted on any failure); return the ids of images
    for which ``lung_crop`` found no box."""
    bar = tqdm(total=len(manifest), desc=f"preprocessing {cfg.size}px", unit="img", disable=not progress)
    no_box: list[str] = []
    try:
        for split in splits:
            rows = manifest[manifest["split"] == split]
            no_box += _write_split(rows, split, data_dir, tmp, cfg, bar, workers, reference)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an incomplete cache must not be left to be mistaken
        raise
    finally:
        bar.close()
    return no_box


def _meta(manifest: pd.DataFrame, data_dir: Path, cfg: PreprocessConfig, splits: list[str]) -> dict[str, Any]:
    """What ``meta.json`` records about the build besides the file checksums."""
    return {
        "config": asdict(cfg),
        "config_key": cfg.key(),
        "manifest_hash": manifest_hash(manifest),
        "pipeline_version": PIPELINE_VERSION,
        "splits": splits,
        "counts": {s: int((manifest["split"] == s).sum()) for s in splits},
        "data_dir": str(data_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished build ``tmp`` to ``final``, or keep the folder another process put
    there first when it checks out."""
    for attempt in range(2):
        try:
            tmp.rename(final)
            return
        except OSError:
            # Another process finished the same cache first: keep theirs (identical by construction)
            # when it checks out; a broken folder in the way is moved aside and the rename retried.
            if _read_meta(final)[0] is not None or attempt:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            _discard(final)


class SourceChangedError(WorkbookError, ValueError):
    """Source images whose bytes no longer match the SHA-256 the manifest recorded at curation."""


def check_sources_unchanged(manifest: pd.DataFrame, data_dir: Path) -> None:
    """Raise :class:`SourceChangedError` when an image's bytes differ from the ``sha256`` the
    manifest recorded at curation (counted; the first few named): a replaced or edited source file
    has not been through the copy search and the split, so it is not trained on in silence.  Rows
    without a recorded hash are not checked."""
    if "sha256" not in manifest.columns:
        return
    recorded = manifest[manifest["sha256"].astype(str) != ""]
    changed = [rel for rel, digest in zip(recorded["path"], recorded["sha256"])
               if (data_dir / rel).is_file() and sha256_file(data_dir / rel) != digest]
    if changed:
        shown = ", ".join(map(str, changed[:3])) + (" ..." if len(changed) > 3 else "")
        raise SourceChangedError(
            f"{len(changed)} of {len(recorded)} source image(s) changed since curation (SHA-256 differs from the "
            f"manifest's): {shown}; curate again (notebook 01 or workbook curate) so copies and the split see them")


def build_cache(
    manifest: pd.DataFrame,
    data_dir: Path | str,
    cache_root: Path | str,
    cfg: PreprocessConfig,
    *,
    workers: int = 1,
    progress: bool = True,
) -> ImageCache:
    """Preprocess every manifest image once into ``cache_root/<cache_key>/``, or reuse it.

    For each split present in ``manifest`` (in :data:`SPLITS` order) writes
    ``<split>_images.npy`` uint8 (N, size, size), ``<split>_labels.npy`` int64 (class indices of
    :data:`CLASSES`) and ``<split>_ids.json``, then ``meta.json`` (config, manifest hash, counts,
    date, and each file's shape, dtype and SHA-256 under ``files``).  Rows keep manifest order
    within a split.  The folder is built under a temporary name and renamed when complete, so an
    interrupted build is never reused; an existing folder is reused only when its files match
    ``meta.json``, else it is moved aside and rebuilt (one printed line says why).  Returns the
    :class:`ImageCache` (``reused`` says which happened).  ``workers`` > 1 decodes in that many
    threads (OpenCV and Pillow release the GIL); the result does not depend on it.  Raises :class:`ImageReadError` naming
    the file and its ``image_id`` for an unreadable image, ValueError for unknown labels/splits.
    """
    data_dir, cache_root = Path(data_dir), Path(cache_root)
    key = cache_key(manifest, cfg)
    final = cache_root / key
    reused = _reusable(final, key)
    if reused is not None:
        return reused
    unknown = sorted(set(manifest["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"manifest has unknown split(s) {unknown}; expected {SPLITS}")
    check_sources_unchanged(manifest, data_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    splits = [s for s in SPLITS if (manifest["split"] == s).any()]
    reference = training_reference(manifest, data_dir, cfg, progress) if cfg.hist_match else None
    no_box = _write_splits(manifest, splits, data_dir, tmp, cfg, workers, progress, reference)
    meta = _meta(manifest, data_dir, cfg, splits)
    if cfg.lung_crop:
        meta["lung_box_missing"] = no_box
        print(f"lung crop: no lung box found for {len(no_box)} of {len(manifest)} images; they are kept uncropped "
              f"(listed under lung_box_missing in {display_path(final / META_FILE)})")
    if reference is not None:
        meta["reference_histogram"] = [round(float(v), 8) for v in reference]
    try:
        meta["files"] = _describe_files(tmp, splits)
        write_text(tmp / META_FILE, json.dumps(meta, indent=2))  # last: its presence marks a finished build
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return ImageCache.open(final)


def _reserve(path: Path) -> None:
    """Give the memory-mapped ``path`` its disk blocks now: writing into a sparse map on a full
    disk kills the process with SIGBUS, while reserving fails here with one line."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)
    except OSError as error:
        raise CacheError(f"no room for the image cache in {display_path(path.parent.parent)}: its {size / 2**20:.0f} MB "
                         f"could not be reserved ({error.strerror}); free disk space or pass another cache folder") from None


def _write_split(
    rows: pd.DataFrame, split: str, data_dir: Path, out: Path, cfg: PreprocessConfig, bar: tqdm, workers: int,
    reference: np.ndarray | None = None,
) -> list[str]:
    """Write one split's arrays; return the ids of images for which ``lung_crop`` found no box."""
    labels = np.array([label_index(label) for label in rows["label"]], dtype=np.int64)
    images = np.lib.format.open_memmap(out / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(rows), cfg.size, cfg.size))
    _reserve(out / f"{split}_images.npy")

    no_box: list[str] = []

    def one(job: tuple[str, str]) -> np.ndarray:
        image_id, rel = job
        try:
            img = load_gray(data_dir / rel)
        except ImageReadError as err:
            raise ImageReadError(f"{err} (manifest image_id {image_id!r}, split {split!r})") from err
        check_gray(img, "build_cache()")
        content, box = source_content(img, cfg)
        if cfg.lung_crop and box is None:
            no_box.append(str(image_id))
        return finish(content, cfg, reference)

    jobs = list(zip(rows["image_id"], rows["path"]))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # map() yields in manifest order, so row i of the array is row i of the split.
        for i, img in enumerate(pool.map(one, jobs) if workers > 1 else map(one, jobs)):
            images[i] = img
            bar.update(1)
    images.flush()
    del images
    np.save(out / f"{split}_labels.npy", labels)
    (out / f"{split}_ids.json").write_text(json.dumps([str(i) for i in rows["image_id"]]), encoding="utf-8")
    order = {str(i): k for k, i in enumerate(rows["image_id"])}
    return sorted(no_box, key=order.get)
