"""The common table of every source's images: :func:`load_table` and the :class:`Report` of what it read.

:func:`load_table` finds the source folders under the data directory, runs each source's adapter
(:data:`data_prep.sources.SOURCES`), hashes the image files, and returns the table together with
a :class:`Report` of what was read and what was skipped: rows with the wrong number of fields or
cut off at the end of the file (``malformed_row``), repeated rows (``duplicate_row``), rows
listing one image with different labels or patients (``conflicting_rows``: the image is
dropped), paths that leave their source folder (``unsafe_path``: ``..``, absolute paths,
symbolic links pointing elsewhere) and rows whose image is absent (``missing_image``).  A
damaged or unpinned metadata file (:mod:`data_prep.metadata`) and a source folder that seems to
be there under a wrong name are listed under ``Report.warnings``.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data_prep.fingerprint import file_digests
from data_prep.metadata import MetadataLog, SourceFormatError, SourceNotFoundError
from data_prep.schema import CLASSES, TABLE_COLUMNS
from data_prep.sources import SOURCES

#: Columns of every "skipped" / "dropped" frame: which image, why, and the specifics.
DROP_COLUMNS: tuple[str, ...] = ("image_id", "reason", "detail")
#: How many example rows a report prints per problem.
EXAMPLES_SHOWN = 5
#: How alike (difflib ratio) a folder name must be to a source folder's name to be named as a
#: probably misnamed copy of it ("covid-chestxray-dataset-master" against "covid-chestxray-dataset").
NEAR_NAME_RATIO = 0.8
# A drive letter ("C:") at the start of a path segment: a Windows absolute path.
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class Report:
    """What :func:`load_table` read: sources present and absent, rows and images per source, skips."""

    data_dir: Path
    loaded: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # metadata rows per source
    images: dict[str, int] = field(default_factory=dict)  # rows kept (image file present) per source
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(DROP_COLUMNS)))
    warnings: list[str] = field(default_factory=list)  # one line per damaged or unexpected file or folder

    def counts(self) -> dict[str, int]:
        """Skipped rows per reason."""
        return {str(k): int(v) for k, v in self.skipped["reason"].value_counts().sort_index().items()}

    def __str__(self) -> str:
        return self.describe()

    def describe(self, where: str | None = None) -> str:
        """What was loaded, absent and skipped, one line each; the data folder shown as ``where``
        (e.g. ``$CXR_DATA_DIR``) when given."""
        lines = [f"data directory: {where if where is not None else self.data_dir}"]
        for name in self.loaded:
            lines.append(f"  {name}: {self.rows[name]} metadata rows, {self.images[name]} with an image file")
        if self.absent:
            lines.append(f"  absent (skipped): {', '.join(self.absent)}")
        lines += [f"  warning: {w}" for w in self.warnings]
        for reason, group in self.skipped.groupby("reason", sort=True):
            examples = "; ".join(group["detail"].head(EXAMPLES_SHOWN))
            lines.append(f"  skipped {len(group)} row(s), {reason}: e.g. {examples}")
        return "\n".join(lines)


def _folder_names(names: Sequence[str]) -> str:
    """``a/``, ``a/, b/ or c/``: the folder names of ``names``' sources, every alternative listed."""
    return ", ".join(" or ".join(f"{f}/" for f in SOURCES[n].folders) for n in names)


def _misnamed(data_dir: Path, name: str) -> list[str]:
    """Folders of ``data_dir`` that look like a misnamed copy of source ``name``'s folder (a GitHub
    archive unpacks ``covid-chestxray-dataset`` as ``covid-chestxray-dataset-master``, say).

    A folder counts when its name, ignoring case, starts with one of the source's folder names or
    is at least :data:`NEAR_NAME_RATIO` alike, and is more like this source than any other.
    """
    known = {f.lower(): s.name for s in SOURCES.values() for f in s.folders}

    def likeness(low: str, wanted: str) -> float:
        return 1.0 if low.startswith(wanted) else difflib.SequenceMatcher(None, low, wanted).ratio()

    found = []
    for child in sorted(data_dir.iterdir()):
        low = child.name.lower()
        if not child.is_dir() or child.name.startswith(".") or low in known:
            continue
        score, source = max((likeness(low, wanted), owner) for wanted, owner in known.items())
        if source == name and score >= NEAR_NAME_RATIO:
            found.append(child.name)
    return found


def _rename_hint(data_dir: Path, name: str) -> str:
    """``"; found X/, which looks like Y/: rename it to Y"`` for a misnamed copy of ``name``'s folder, else ""."""
    near = _misnamed(data_dir, name)
    if not near:
        return ""
    target = SOURCES[name].folders[0]
    return f"; found {', '.join(f'{n}/' for n in near)} in {data_dir}, which looks like {target}/: rename it to {target}"


def _resolve_sources(
    data_dir: Path, sources: Sequence[str] | None
) -> tuple[dict[str, Path], list[str], list[str]]:
    """Map each wanted source to its folder; explicit asks must exist, defaults may be absent.

    Returns the folders, the absent sources, and a warning for each absent source whose folder
    seems to be there under a wrong name.  Raises :class:`SourceNotFoundError` for a missing
    explicit source or when no source is present (naming every folder name and any near miss),
    KeyError for an unknown source name.
    """
    unknown = [s for s in (sources or ()) if s not in SOURCES]
    if unknown:
        raise KeyError(f"unknown source(s) {unknown}; known sources: {', '.join(SOURCES)}")
    wanted = list(sources) if sources is not None else list(SOURCES)
    found: dict[str, Path] = {}
    absent: list[str] = []
    for name in wanted:
        folder = SOURCES[name].find(data_dir)
        if folder is not None:
            found[name] = folder
        elif sources is not None:
            raise SourceNotFoundError(
                f"source {name!r} was asked for but its folder {data_dir / SOURCES[name].folders[0]} does not "
                f"exist{_rename_hint(data_dir, name)}; fetch it with `workbook download --to {data_dir} "
                f"--sources {name}` or leave it out of sources"
            )
        else:
            absent.append(name)
    if not found:
        hints = "".join(_rename_hint(data_dir, n) for n in wanted)
        raise SourceNotFoundError(
            f"no source folder found in data directory {data_dir} (expected one of: {_folder_names(wanted)})"
            f"{hints}; point data_dir / $CXR_DATA_DIR at the folder holding the upstream sources "
            "or fetch them with `workbook download`"
        )
    warnings = [
        f"source {name} is absent{hint} (or pass the sources to use)"
        for name in absent if (hint := _rename_hint(data_dir, name))
    ]
    return found, absent, warnings


def _unsafe(folder: Path, root: Path, rel: str) -> str:
    """Why the metadata path ``rel`` does not name a file inside ``folder`` (resolved: ``root``), or ""."""
    parts = rel.replace("\\", "/").split("/")
    # An absolute name joined to a folder ("images/" + "/etc/passwd") leaves an empty segment.
    if rel.startswith(("/", "\\")) or "" in parts[:-1] or any(WINDOWS_DRIVE.match(p) for p in parts):
        return "is an absolute path"
    if ".." in parts:
        return "climbs out of its folder with '..'"
    resolved = (folder / rel).resolve()
    if not resolved.is_relative_to(root):
        return f"resolves to {resolved} (a symbolic link leading out of {folder.name}/)"
    return ""


def _judge(
    name: str, folder: Path, root: Path, data_dir: Path, image_id: str, listed: list[tuple[int, dict[str, object]]]
) -> tuple[dict[str, object] | None, list[dict[str, str]]]:
    """The table row of one image from the metadata rows ``(row number, record)`` that list it
    (None when it is left out), and the ``Report.skipped`` entries those rows give."""
    number, record = listed[0]
    rel = f"{folder.name}/{record['path']}"
    if len({(r["label"], r["patient_id"]) for _, r in listed}) > 1:
        # One image, two stories (class or patient): neither row can be trusted, and a
        # wrong patient would let the image's person cross splits.
        told = "; ".join(f"row {n}: label {r['label'] or '(none)'}, patient {r['patient_id']}"
                         for n, r in listed)
        return None, [{"image_id": image_id, "reason": "conflicting_rows",
                       "detail": f"{name} metadata lists {rel} in {len(listed)} rows that disagree "
                       f"({told}); the image is dropped"}] + [
            {"image_id": f"{image_id}#row{n}", "reason": "conflicting_rows",
             "detail": f"{name} metadata row {n} repeats {rel} and disagrees ({told})"} for n, _ in listed[1:]]
    # The image itself stays (from its first row); the id marks the repeated metadata row.
    skipped = [{"image_id": f"{image_id}#row{n}", "reason": "duplicate_row",
                "detail": f"{name} metadata row {n} repeats {rel}"} for n, _ in listed[1:]]
    problem = _unsafe(folder, root, str(record["path"]))
    if problem:
        return None, skipped + [{"image_id": image_id, "reason": "unsafe_path",
                                 "detail": f"{name} metadata row {number}: path {str(record['path'])!r} {problem}; "
                                 f"it must name a file inside {folder.name}/"}]
    if not (data_dir / rel).is_file():
        return None, skipped + [{"image_id": image_id, "reason": "missing_image",
                                 "detail": f"{name} metadata row {number}: {rel} not found"}]
    return {**record, "image_id": image_id, "source": name, "path": rel,
            "patient_id": f"{name}:{record['patient_id']}", "sha256": ""}, skipped


def _source_rows(
    name: str, folder: Path, data_dir: Path, records: list[dict[str, object]]
) -> tuple[list[dict[str, object]], list[dict[str, str]]]:
    """The table rows of one source's adapter ``records`` and the skipped entries, image by image."""
    # Group the rows by image first: whether a repeat is harmless depends on all of them.
    by_image: dict[str, list[tuple[int, dict[str, object]]]] = {}
    for number, record in enumerate(records, start=1):
        image_id = f"{name}:{folder.name}/{record['path']}"
        by_image.setdefault(image_id, []).append((int(record.get("row", number)), record))
    root = folder.resolve()
    rows: list[dict[str, object]] = []
    skipped: list[dict[str, str]] = []
    for image_id, listed in by_image.items():
        row, skips = _judge(name, folder, root, data_dir, image_id, listed)
        skipped += skips
        if row is not None:
            rows.append(row)
    return rows, skipped


def load_table(
    data_dir: Path, sources: Sequence[str] | None = None, hash_images: bool = True, workers: int | None = None
) -> tuple[pd.DataFrame, Report]:
    """Read every (or the named) source under ``data_dir`` into one table with ``TABLE_COLUMNS``.

    Rows are sorted by ``image_id``; ``path`` is relative to ``data_dir`` (POSIX) and
    ``patient_id`` is ``"<source>:<upstream id>"``.  Left out and listed in ``Report.skipped``:
    malformed or cut-off metadata rows (``"<source>:<folder>/<file>#line<N>"``), repeated rows for
    one image (``"<image_id>#row<N>"``, since its image stays in the table), every row of an image
    listed with different labels or patients (``conflicting_rows``), paths leaving their source
    folder (``unsafe_path``) and rows whose image file is absent.  Damaged or unpinned metadata
    files and misnamed source folders are listed (and printed to stderr) as ``Report.warnings``.
    With ``hash_images`` each image's SHA-256 is taken (:func:`data_prep.fingerprint.file_digests`:
    from the fingerprint store, or read by ``workers`` threads), else ``sha256`` is "".
    ``table.attrs["data_dir"]`` records ``data_dir`` for :func:`data_prep.curate.curate`.
    Raises :class:`SourceNotFoundError` when ``data_dir`` or an explicitly named source folder is
    missing, or when no source is present; :class:`SourceFormatError` naming the file and source
    for an empty, undecodable, unparsable or column-less metadata file.
    """
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise SourceNotFoundError(
            f"data directory {data_dir} is a file, not a folder; pass the folder holding the upstream "
            f"sources ({_folder_names(list(SOURCES))})"
        )
    if not data_dir.is_dir():
        raise SourceNotFoundError(
            f"data directory {data_dir} does not exist; set $CXR_DATA_DIR or pass the folder holding "
            "the upstream sources (covid-chestxray-dataset/, Figure1-COVID-chestxray-dataset/, ...)"
        )
    folders, absent, warnings = _resolve_sources(data_dir, sources)
    report = Report(data_dir=data_dir, loaded=list(folders), absent=absent, warnings=warnings)
    rows: list[dict[str, object]] = []
    skipped: list[dict[str, str]] = []
    for name, folder in folders.items():
        log = MetadataLog(name, pin=SOURCES[name].pin)
        records = SOURCES[name].read(folder, log)
        report.warnings += log.warnings
        skipped += [{"image_id": f"{name}:{folder.name}/{where}", "reason": "malformed_row", "detail": detail}
                    for where, detail in log.malformed]
        kept, skips = _source_rows(name, folder, data_dir, records)
        rows += kept
        skipped += skips
        report.rows[name] = len(records) + len(log.malformed)
        report.images[name] = len(kept)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).sort_values("image_id", ignore_index=True)
    table["age"] = table["age"].astype(float)
    if hash_images:
        table["sha256"] = file_digests([data_dir / p for p in table["path"]], workers)
    bad = set(table["label"]) - set(CLASSES) - {""}
    if bad:  # an adapter bug, not a data problem: fail loudly rather than curate nonsense
        raise SourceFormatError(f"adapters produced labels outside {CLASSES}: {sorted(bad)}")
    report.skipped = pd.DataFrame(skipped, columns=list(DROP_COLUMNS))
    table.attrs["data_dir"] = str(data_dir)
    return table, report
