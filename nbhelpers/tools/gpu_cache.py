"""The GPU check's cache: the curated paper set, preprocessed once, packed to travel.

``workbook gpu-check build-cache --data-dir D --out gpu_cache`` curates the paper set (seed 001's
recipe, 475 per class; where a mirror holds fewer COVID-19 films, ``--balance down`` evens the
classes to the smallest), preprocesses it once at 224 px (:mod:`nbhelpers.pipeline.cache`) and
packs the uint8 grey images, labels and ids of every split into ``images.npz`` (compressed)
beside ``manifest.csv`` (patients, for the intervals) and ``meta.json`` (counts, curation note,
cache key, SHA-256).  ``--manifest`` packs a manifest made elsewhere instead of curating.
:func:`read_packed` opens it on the GPU machine without the sources
(:mod:`nbhelpers.tools.gpu_check`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from data_prep.errors import WorkbookError

if TYPE_CHECKING:
    import pandas as pd

    from nbhelpers.pipeline.cache import ImageCache

DEFAULT_CACHE = Path("gpu_cache")
META_NAME, IMAGES_NAME, MANIFEST_NAME = "meta.json", "images.npz", "manifest.csv"
FORMAT = 1


class GpuCacheError(WorkbookError, RuntimeError):
    """The GPU check's cache is missing or damaged; the message names the command that builds it."""


@dataclass
class Packed:
    """The packed cache: one :class:`~nbhelpers.pipeline.cache.CachedSplit` per split, the
    manifest (or None) and ``meta.json``."""

    splits: dict[str, Any]  # name -> CachedSplit
    manifest: pd.DataFrame | None
    meta: dict[str, Any]

    def patients(self, image_ids: Sequence[str]) -> list[str] | None:
        """Each image's patient (from the manifest), or None without a ``patient_id`` column."""
        if self.manifest is None or "patient_id" not in self.manifest.columns:
            return None
        of = dict(zip(self.manifest["image_id"].astype(str), self.manifest["patient_id"].astype(str)))
        return [of.get(str(i), str(i)) for i in image_ids]


def pack(cache: ImageCache, manifest: pd.DataFrame, out: Path, command: str,
         curation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every split of the preprocessing ``cache`` to ``out/images.npz`` (compressed), the
    manifest's columns the check uses to ``out/manifest.csv`` and ``out/meta.json``; returns the meta."""
    import numpy as np

    from data_prep import atomic
    from data_prep.fingerprint import sha256_file

    arrays = {}
    for name in cache.splits:
        split = cache.split(name)
        arrays.update({f"{name}_images": np.asarray(split.images), f"{name}_labels": split.labels.astype(np.int64),
                       f"{name}_ids": np.array(split.image_ids, dtype=str)})

    def savez(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    out.mkdir(parents=True, exist_ok=True)
    atomic.write_with(out / IMAGES_NAME, savez)
    columns = [c for c in ("image_id", "path", "label", "split", "patient_id", "source", "view") if c in manifest]
    atomic.write_with(out / MANIFEST_NAME, lambda tmp: manifest[columns].to_csv(tmp, index=False))
    meta = {"format": FORMAT, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cache_key": cache.key, "preprocess": cache.meta["config"], "manifest_hash": cache.meta["manifest_hash"],
            "counts": {s: int(n) for s, n in cache.meta["counts"].items()},
            "class_counts": {s: cache.split(s).class_counts() for s in cache.splits},
            "curation": curation, "images_sha256": sha256_file(out / IMAGES_NAME)}
    atomic.write_text(out / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


def _shrink(images, size: int):
    """uint8 (N, H, W) images resized to ``size`` px by area averaging (for the dry run)."""
    import torch
    import torch.nn.functional as F

    x = F.interpolate(torch.from_numpy(images).unsqueeze(1).float(), size=(size, size), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()


def read_packed(folder: Path, size: int | None = None, per_split: int | None = None) -> Packed:
    """Read a :func:`pack` folder (checking its SHA-256), optionally resized to ``size`` px and cut
    to ``per_split`` evenly spaced images of each split (its rows run class by class).  Raises
    :class:`GpuCacheError` naming the folder and the command that builds it when it is missing or
    damaged."""
    import numpy as np
    import pandas as pd

    from data_prep.fingerprint import sha256_file
    from nbhelpers.pipeline.cache import CachedSplit

    build = f"`workbook gpu-check build-cache --data-dir D --out {folder}` where the sources are"
    if not (folder / META_NAME).is_file() or not (folder / IMAGES_NAME).is_file():
        raise GpuCacheError(f"{folder} holds no GPU-check cache ({META_NAME} and {IMAGES_NAME}); "
                            f"build it with {build}")
    meta = json.loads((folder / META_NAME).read_text())
    if sha256_file(folder / IMAGES_NAME) != meta.get("images_sha256"):
        raise GpuCacheError(f"{folder / IMAGES_NAME} does not match its SHA-256 in {META_NAME}; "
                            f"build it again with {build}")
    splits = {}
    with np.load(folder / IMAGES_NAME) as z:
        for name in meta["counts"]:
            images, labels, ids = (z[f"{name}_{part}"] for part in ("images", "labels", "ids"))
            if per_split is not None and len(labels) > per_split:
                pick = np.linspace(0, len(labels) - 1, per_split).round().astype(int)
                images, labels, ids = images[pick], labels[pick], ids[pick]
            if size is not None and images.shape[-1] != size:
                images = _shrink(images, size)
            splits[name] = CachedSplit(name, images, labels, [str(i) for i in ids], folder)
    manifest = (pd.read_csv(folder / MANIFEST_NAME, keep_default_na=False)
                if (folder / MANIFEST_NAME).is_file() else None)
    return Packed(splits=splits, manifest=manifest, meta=meta)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook gpu-check build-cache``."""
    from data_prep.options import add_data_dir
    from data_prep.recipe import BALANCE_MODES, PAPER_PER_CLASS

    add_data_dir(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE, metavar="FOLDER",
                        help="folder of the packed cache (default: gpu_cache)")
    parser.add_argument("--manifest", type=Path, default=None, help="pack this manifest instead of curating")
    parser.add_argument("--per-class", type=int, default=PAPER_PER_CLASS, help="images per class (the paper's 475)")
    parser.add_argument("--balance", choices=BALANCE_MODES, default="down",
                        help="down: even the classes to the smallest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the curation's balancing and split")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2, help="threads decoding images")


def run_build_command(args: argparse.Namespace) -> int:
    """``workbook gpu-check build-cache``: curate (or read ``--manifest``), preprocess, pack; returns 0."""
    import tempfile

    import pandas as pd

    from data_prep.curate import build
    from data_prep.datadir import data_dir as resolve_data_dir
    from data_prep.recipe import CurationParams
    from nbhelpers.pipeline.cache import build_cache
    from nbhelpers.pipeline.preprocess import PreprocessConfig
    from nbhelpers.training.runs import read_manifest

    source = resolve_data_dir(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="cxr-gpu-cache-") as tmp:
        curation = None
        if args.manifest is not None:
            manifest = read_manifest(args.manifest)
        else:
            result = build(source, Path(tmp) / "data", CurationParams(per_class=args.per_class, balance=args.balance,
                                                                       seed=args.seed))
            manifest = result.manifest
            curation = {k: result.summary.get(k) for k in ("per_class", "balance_note", "available_per_class",
                                                           "split_sizes", "class_split", "seed")}
        cache = build_cache(manifest, source, Path(tmp) / "cache", PreprocessConfig(size=args.size),
                            workers=args.workers)
        meta = pack(cache, pd.DataFrame(manifest), args.out, getattr(args, "command_line", ""), curation)
    size = (args.out / IMAGES_NAME).stat().st_size / 2**20
    print(f"packed {sum(meta['counts'].values())} images {meta['counts']} at {args.size} px into "
          f"{args.out / IMAGES_NAME} ({size:.1f} MiB)")
    if curation:
        print(curation["balance_note"])
    return 0
