"""``workbook curate --data-dir D --out O [--per-class N --balance down --seed S ...]``: the curation command.

Loads the sources (and ``--image-folder`` folders of your own images, :mod:`data_prep.folders`),
curates the balanced set and writes ``manifest.csv``, ``dropped.csv``,
``duplicates.csv`` and ``summary.json`` together to ``--out``, then prints the summary; warnings
(a truncated or unpinned metadata file, a split without every class) go to stderr, one line each,
and into the summary.  A data problem (missing or misnamed folder, short class, empty, non-UTF-8
or malformed metadata, a curation setting out of range) and outputs that cannot be written (the
previous set is left whole) stop it with one line naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from data_prep.curate import build
from data_prep.datadir import data_dir as resolve_data_dir
from data_prep.options import add_data_dir, add_out
from data_prep.recipe import (
    BALANCE_MODES,
    DEFAULT_PHASH_DISTANCE,
    PAPER_MIN_AGE,
    PAPER_PER_CLASS,
    CurationParams,
    CurationSettingError,
    every_class_from,
)
from data_prep.schema import CLASSES
from data_prep.split import DEFAULT_RATIOS
from data_prep.sources import SOURCES


def add_curate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook curate``."""
    add_data_dir(parser)
    add_out(parser, "manifest.csv, dropped.csv, summary.json and duplicates.csv", required=True)
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=None, help="sources to use (default: all present)")
    parser.add_argument("--per-class", type=int, default=PAPER_PER_CLASS, help="images per class")
    parser.add_argument("--balance", choices=BALANCE_MODES, default="strict", help="strict: stop when a class is short; down: balance to the smallest")
    parser.add_argument("--seed", type=int, default=0, help="seed for balancing and splitting")
    parser.add_argument("--split", type=float, nargs=3, default=DEFAULT_RATIOS, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--views", nargs="+", default=None, help="views kept for ieee8023 (default: PA)")
    parser.add_argument("--allow-ap", action="store_true", help="also keep AP views where the paper keeps PA only")
    parser.add_argument("--min-age", type=float, default=PAPER_MIN_AGE, help="drop patients younger than this (negative: keep all)")
    parser.add_argument("--keep-ct", action="store_true", help="do not drop non-X-ray rows")
    parser.add_argument("--no-dedup", action="store_true", help="skip exact and near-duplicate removal")
    parser.add_argument("--no-keypoints", action="store_true",
                        help="decide grey-band pairs by the hash alone (faster on very large sets; misses captioned copies)")
    parser.add_argument("--all-classes-from", nargs="+", choices=list(SOURCES), default=[], metavar="SOURCE",
                        help="take every class these sources hold (the paper takes only COVID-19 from ieee8023); "
                        "gives the within-source test of the shortcut audit more images")
    parser.add_argument("--phash-distance", type=int, default=DEFAULT_PHASH_DISTANCE, help="near-duplicate threshold (bits of 256)")
    parser.add_argument("--image-folder", type=Path, action="append", default=[], metavar="FOLDER",
                        help="your own images, one subfolder per class (COVID/, Normal/, Viral Pneumonia/, ...) and an "
                        "optional metadata.csv (filename, patient_id, view, age, sex); repeatable")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes that decode and fingerprint images (default: every core; any number gives the "
                        "same outputs).  Fingerprints are kept in $CXR_FINGERPRINTS (default "
                        "~/.cache/cxr-workbook/fingerprints.sqlite; off: keep none), so a second curation decodes nothing")
    parser.add_argument("--map-folder", action="append", default=[], metavar="NAME=CLASS",
                        help=f"take the image-folder subfolder NAME as CLASS ({', '.join(CLASSES)}), e.g. "
                        "Lung_Opacity=pneumonia; repeatable")


def folder_classes(pairs: Sequence[str]) -> dict[str, str]:
    """``--map-folder NAME=CLASS`` values as a dict; raises :class:`CurationSettingError` for one
    without ``=`` or with an unknown class."""
    out = {}
    for pair in pairs:
        name, sep, cls = pair.partition("=")
        if not sep or not name.strip() or cls.strip().lower() not in CLASSES:
            raise CurationSettingError(
                f"--map-folder {pair!r}: expected NAME=CLASS with CLASS one of {', '.join(CLASSES)}, "
                "e.g. --map-folder Lung_Opacity=pneumonia")
        out[name.strip()] = cls.strip().lower()
    return out


def run_curate_command(args: argparse.Namespace) -> int:
    """``workbook curate``: curate and write the set, print its summary; returns 0."""
    kwargs = {"views": args.views} if args.views else {}
    if args.all_classes_from:
        kwargs["source_classes"] = every_class_from(args.all_classes_from)
    params = CurationParams(
        per_class=args.per_class, balance=args.balance, seed=args.seed, split=tuple(args.split),
        allow_ap=args.allow_ap, min_age=args.min_age if args.min_age >= 0 else None, xray_only=not args.keep_ct,
        dedup=not args.no_dedup, keypoints=not args.no_keypoints, phash_distance=args.phash_distance,
        image_folders=tuple(str(f) for f in args.image_folder), folder_classes=folder_classes(args.map_folder),
        **kwargs,
    )
    if args.workers is not None and args.workers < 1:
        raise CurationSettingError(f"--workers {args.workers}: give 1 or more processes (or leave it out: every core)")
    result = build(resolve_data_dir(args.data_dir), args.out, params, sources=args.sources, workers=args.workers)
    print(json.dumps(result.summary, indent=2))
    print(f"wrote manifest.csv, dropped.csv, summary.json and duplicates.csv to {args.out}", file=sys.stderr)
    return 0
