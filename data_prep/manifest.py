"""The one reader of a curated manifest, for every command and notebook that takes one.

A manifest is read once here and checked before any work: the file exists and is not empty, the
columns the caller needs are there, every label is one of :data:`data_prep.schema.CLASSES`
(``covid19``, ``Covid`` or a blank label are refused, not guessed), every split one of
:data:`data_prep.schema.SPLITS`, and no image id, file or patient sits in two splits
(:func:`data_prep.split.check_no_leak`).  Each problem is one line naming the manifest, the rows
and the fix (:class:`ManifestError`, exit status 2 on the command line).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data_prep.errors import InputNotFoundError, WorkbookError
from data_prep.schema import CLASSES, SPLITS

#: What every manifest must hold (training also needs ``path``, scoring ``patient_id`` where known).
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "label", "split")
#: How many offending values an error names.
SHOWN = 5


class ManifestError(WorkbookError, ValueError):
    """A manifest that cannot be used as it is: empty, columns missing, unknown labels or splits."""


def _shown(values: Sequence) -> str:
    values = list(dict.fromkeys(map(repr, values)))
    return ", ".join(values[:SHOWN]) + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")


def check_manifest(table: pd.DataFrame, where: str = "manifest", columns: Sequence[str] = REQUIRED_COLUMNS,
                   leaks: bool = True) -> pd.DataFrame:
    """``table`` checked as :func:`read_manifest` checks a file (``where`` names it in errors)."""
    missing = [c for c in dict.fromkeys([*REQUIRED_COLUMNS, *columns]) if c not in table.columns]
    if missing:
        raise ManifestError(f"{where} lacks column(s) {missing}; a manifest has {list(REQUIRED_COLUMNS)} at least: "
                            "make it with workbook curate (or notebook 01)")
    labels = table["label"].astype(str)
    bad = labels[~labels.isin(CLASSES)]
    if len(bad):
        raise ManifestError(f"{where}: {len(bad)} row(s) have a label outside {list(CLASSES)}: {_shown(bad)}; "
                            "write the class names exactly so (lower case) or drop those rows")
    splits = table["split"].astype(str)
    bad = splits[~splits.isin(SPLITS)]
    if len(bad):
        raise ManifestError(f"{where}: {len(bad)} row(s) have a split outside {list(SPLITS)}: {_shown(bad)}; "
                            "use those split names")
    if leaks:
        from data_prep.split import check_no_leak

        check_no_leak(table)
    return table


def read_manifest(manifest: pd.DataFrame | Path | str, columns: Sequence[str] = REQUIRED_COLUMNS,
                  what: str = "manifest", leaks: bool = True) -> pd.DataFrame:
    """The manifest (read when given a path, blank cells kept as ""), checked
    (:func:`check_manifest`): :class:`~data_prep.errors.InputNotFoundError` for a missing file,
    :class:`ManifestError` for an empty one, missing ``columns``, unknown labels or splits, and
    :class:`data_prep.split.LeakError` for an image id, file or patient in two splits."""
    if isinstance(manifest, pd.DataFrame):
        return check_manifest(manifest, what, columns, leaks)
    path = Path(manifest)
    if not path.is_file():
        raise InputNotFoundError(f"{what} {path} not found: curate the data first (notebook 01, or "
                                 f"`workbook curate --data-dir D --out {path.parent}`), or pass the manifest.csv it wrote")
    try:
        table = pd.read_csv(path, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{what} {path} is empty; curate again (workbook curate) to rewrite it") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ManifestError(f"{what} {path} is not a readable CSV ({str(error).splitlines()[0]}); "
                            "curate again to rewrite it") from None
    return check_manifest(table, f"{what} {path}", columns, leaks)
