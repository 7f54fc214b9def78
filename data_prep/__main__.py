"""Command line: ``python -m data_prep --data-dir D --out O [--per-class N --balance down --seed S ...]``.

Loads the sources, curates the balanced set and writes ``manifest.csv``, ``dropped.csv``, ``duplicates.csv`` and
``summary.json`` together to ``--out``, then prints the summary; warnings (a truncated or unpinned
metadata file, a split without every class) go to stderr, one line each, and into the summary.
Exit status 2 with a one-line message on a data problem (missing or misnamed folder, short class,
empty, non-UTF-8 or malformed metadata); 1 when the outputs cannot be written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from data_prep.datadir import DataNotFoundError, data_dir as resolve_data_dir
from data_prep.atomic import WriteError
from data_prep.curate import (
    BALANCE_MODES,
    DEFAULT_PHASH_DISTANCE,
    PAPER_PER_CLASS,
    ClassShortageError,
    CurationParams,
    build,
    every_class_from,
)
from data_prep.sources import SOURCES, SourceFormatError

EXIT_DATA_ERROR = 2
EXIT_WRITE_ERROR = 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="folder of upstream sources (default: $CXR_DATA_DIR)")
    p.add_argument("--out", type=Path, required=True, help="output folder for manifest.csv, dropped.csv, summary.json, duplicates.csv")
    p.add_argument("--sources", nargs="+", choices=list(SOURCES), default=None, help="sources to use (default: all present)")
    p.add_argument("--per-class", type=int, default=PAPER_PER_CLASS, help="images per class")
    p.add_argument("--balance", choices=BALANCE_MODES, default="strict", help="strict: stop when a class is short; down: balance to the smallest")
    p.add_argument("--seed", type=int, default=0, help="seed for balancing and splitting")
    p.add_argument("--split", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--views", nargs="+", default=None, help="views kept for ieee8023 (default: PA)")
    p.add_argument("--allow-ap", action="store_true", help="also keep AP views where the paper keeps PA only")
    p.add_argument("--min-age", type=float, default=18, help="drop patients younger than this (negative: keep all)")
    p.add_argument("--keep-ct", action="store_true", help="do not drop non-X-ray rows")
    p.add_argument("--no-dedup", action="store_true", help="skip exact and near-duplicate removal")
    p.add_argument("--no-keypoints", action="store_true",
                   help="decide grey-band pairs by the hash alone (faster on very large sets; misses captioned copies)")
    p.add_argument("--all-classes-from", nargs="+", choices=list(SOURCES), default=[], metavar="SOURCE",
                   help="take every class these sources hold (the paper takes only COVID-19 from ieee8023); "
                   "gives the within-source test of the shortcut audit more images")
    p.add_argument("--phash-distance", type=int, default=DEFAULT_PHASH_DISTANCE, help="near-duplicate threshold (bits of 256)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the curation from the command line; return the exit status."""
    args = parse_args(argv)
    kwargs = {"views": args.views} if args.views else {}
    if args.all_classes_from:
        kwargs["source_classes"] = every_class_from(args.all_classes_from)
    try:
        params = CurationParams(
            per_class=args.per_class, balance=args.balance, seed=args.seed, split=tuple(args.split),
            allow_ap=args.allow_ap, min_age=args.min_age if args.min_age >= 0 else None,
            xray_only=not args.keep_ct, dedup=not args.no_dedup, keypoints=not args.no_keypoints, phash_distance=args.phash_distance, **kwargs,
        )
        result = build(resolve_data_dir(args.data_dir), args.out, params, sources=args.sources)
    except (DataNotFoundError, ClassShortageError, SourceFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except WriteError as err:  # disk full, read-only folder: the previous outputs are left whole
        print(f"error: {err}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    print(json.dumps(result.summary, indent=2))
    print(f"wrote manifest.csv, dropped.csv, summary.json and duplicates.csv to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
