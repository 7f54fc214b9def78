"""Reading and checking one upstream metadata file: text, CSV rows, columns and the pinned version.

Metadata must be non-empty text in its upstream encoding (UTF-8; Latin-1 for Figure1), else
:class:`SourceFormatError` names the file and the source.  Rows with another number of fields
than the header, and a last row cut off at the end of the file, are left out and listed in the
:class:`MetadataLog` (``malformed_row`` once :func:`data_prep.table.load_table` reports them).
A file that looks truncated, or that differs from the version pinned in
:func:`data_prep.sources.pinned` (SHA-256 and row count), is read anyway and gets a line in
``MetadataLog.warnings``.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data_prep.datadir import DataNotFoundError
from data_prep.pins import GitSnapshot
from data_prep.schema import FOLDER_PREFIX
from data_prep.errors import WorkbookError

#: How many offending row numbers a metadata warning names.
ROWS_SHOWN = 10
UTF8_BOM = b"\xef\xbb\xbf"


class SourceNotFoundError(DataNotFoundError):
    """A source folder or its metadata file is not where the upstream layout puts it."""


class SourceFormatError(WorkbookError, ValueError):
    """An upstream metadata file is empty, not text in its encoding, unparsable CSV, or lacks the
    columns its adapter reads."""


@dataclass
class MetadataLog:
    """What reading one source's metadata found besides its rows.

    ``malformed`` holds ``(id, detail)`` for every row that was left out because it has the wrong
    number of fields (``id`` is ``"<file>#line<N>"``); ``warnings`` holds one line per problem with
    a whole file (cut off, not the pinned version).  ``pin`` is the source's pinned version (its
    ``Source`` entry's), against which its check file is compared.
    """

    source: str
    malformed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pin: GitSnapshot | None = None


def _refetch_hint(source: str) -> str:
    """How to get a good copy of ``source``'s metadata again."""
    if source.startswith(FOLDER_PREFIX):
        return "write it as UTF-8 CSV with a header line: filename and any of patient_id, view, age, sex"
    if source == "nih":
        return "download it again by hand from https://nihcc.app.box.com/v/ChestXray-NIHCC"
    return "re-fetch it with `workbook download`"


def _decode(raw: bytes, encoding: str, where: str, fix: str) -> str:
    """Decode metadata bytes; raise :class:`SourceFormatError` naming the first bad byte and its offset."""
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        return raw.decode(encoding)  # Latin-1 decodes any bytes
    bom = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        raise SourceFormatError(
            f"{where} is not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}); {fix}"
        ) from None


def _column_names(header: list[str]) -> list[str]:
    """Column names as pandas gives them: blank ones become ``Unnamed: <i>``, repeats get ``.1``, ``.2``."""
    names: list[str] = []
    for i, name in enumerate(header):
        name = name or f"Unnamed: {i}"
        base, k = name, 0
        while name in names:
            k += 1
            name = f"{base}.{k}"
        names.append(name)
    return names


def _ends_inside_quotes(text: str) -> bool:
    """Whether ``text`` ends inside a quoted field (the lenient parser silently closes it)."""
    try:
        for _ in csv.reader(io.StringIO(text, newline=""), strict=True):
            pass
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def _shown(numbers: Sequence[int]) -> str:
    more = f" and {len(numbers) - ROWS_SHOWN} more" if len(numbers) > ROWS_SHOWN else ""
    return ", ".join(map(str, numbers[:ROWS_SHOWN])) + more


def _check_pin(path: Path, raw: bytes, n_rows: int, log: MetadataLog, where: str) -> None:
    """Warn when ``path`` is the pinned check file of its source but not the pinned bytes; the
    warning gives both hashes and ``n_rows`` (rows read, a cut-off last one not counted) against
    the pinned row count."""
    snap = log.pin
    if snap is None or snap.check_file != path.name:
        return
    digest = hashlib.sha256(raw).hexdigest()
    if digest == snap.check_sha256:
        return
    rows = f"{n_rows} rows, pinned {snap.check_rows}" if snap.check_rows is not None else f"{n_rows} rows"
    log.warnings.append(
        f"{where} is not the pinned version (commit {snap.commit}): SHA-256 {digest[:12]}... expected "
        f"{snap.check_sha256[:12]}... ({rows}); {_refetch_hint(log.source)} unless a newer upstream version is meant"
    )


def _parse(text: str, where: str, fix: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header's column names and every non-blank data row as ``(line, fields)``; raises
    :class:`SourceFormatError` for unparsable CSV, a file of blank lines, or a header without rows."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        # Blank lines hold no row (pandas skips them too); line_num is the record's last line.
        records = [(reader.line_num, fields) for fields in reader if fields]
    except csv.Error as err:
        raise SourceFormatError(f"{where} is not parsable CSV ({err}, line {reader.line_num}); {fix}") from None
    if not records:
        raise SourceFormatError(f"{where} holds only blank lines; {fix}")
    header = _column_names(records[0][1])
    rows = records[1:]
    if not rows:
        raise SourceFormatError(f"{where} holds a header line but no rows; {fix}")
    return header, rows


def _whole_rows(
    path: Path, text: str, width: int, rows: list[tuple[int, list[str]]], log: MetadataLog, where: str, fix: str
) -> tuple[list[list[str]], list[int], bool]:
    """The rows with ``width`` fields and their data row numbers, and whether the last row is cut off.

    The others go to ``log.malformed``; a cut-off file and ragged rows each get a line in
    ``log.warnings``.
    """
    good: list[list[str]] = []
    index: list[int] = []
    ragged: list[int] = []
    last_line, last_fields = rows[-1]
    # A copy cut off mid-row ends inside quotes, or without a newline in a row that is too short.
    open_quote = _ends_inside_quotes(text)
    no_newline = not text.endswith(("\n", "\r"))
    cut = open_quote or (no_newline and len(last_fields) < width)
    for number, (line, fields) in enumerate(rows, start=1):
        if number == len(rows) and cut:
            log.malformed.append((f"{path.name}#line{line}", (
                f"{where} line {line} (row {number}) is cut off at the end of the file: "
                f"{len(last_fields)} of {width} fields")))
        elif len(fields) != width:
            ragged.append(number)
            log.malformed.append((f"{path.name}#line{line}", (
                f"{where} line {line} (row {number}) has {len(fields)} fields, the header {width}")))
        else:
            good.append(fields)
            index.append(number)
    if cut:
        how = ", ".join(x for x, on in (("inside a quoted field", open_quote), ("no final newline", no_newline)) if on)
        log.warnings.append(
            f"{where} ends mid-row (line {last_line} has {len(last_fields)} of {width} fields, {how}): "
            f"the file looks truncated and its last row is skipped; {fix}"
        )
    if ragged:
        log.warnings.append(
            f"{where}: {len(ragged)} row(s) have another number of fields than the header's {width} "
            f"(rows {_shown(ragged)}) and are skipped as malformed_row; {fix}"
        )
    return good, index, cut


def read_metadata_csv(path: Path, columns: Sequence[str], log: MetadataLog, encoding: str = "utf-8") -> pd.DataFrame:
    """Read an upstream CSV as text, indexed by data row number (1 = the first row after the header).

    Checks that the file is non-empty text in ``encoding``, parses it (quoted fields, blank lines
    skipped, like pandas) and that the adapter's ``columns`` are present.  Rows with another number
    of fields than the header, and a last row cut off (no final newline, too few fields, or an
    unclosed quote), are left out and listed in ``log.malformed``; such a file, and a pinned file
    whose bytes differ from the pin, get a line in ``log.warnings``.  Raises
    :class:`SourceNotFoundError` when the file is missing and :class:`SourceFormatError` (naming the
    file and ``log.source``) when it is empty, not decodable, unparsable or lacks a column.
    """
    if not path.is_file():
        raise SourceNotFoundError(
            f"metadata file {path} is missing; the source folder must keep its upstream layout "
            "(re-fetch it with `workbook download`)"
        )
    where = f"{path.parent.name}/{path.name} ({log.source})"
    fix = _refetch_hint(log.source)
    raw = path.read_bytes()
    if not raw.strip():
        raise SourceFormatError(f"{where} is empty ({len(raw)} bytes); {fix}")
    text = _decode(raw, encoding, where, fix)
    header, rows = _parse(text, where, fix)
    good, index, cut = _whole_rows(path, text, len(header), rows, log, where, fix)
    _check_pin(path, raw, len(rows) - int(cut), log, where)
    frame = pd.DataFrame(good, columns=header, index=pd.Index(index, name="row"), dtype=str)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SourceFormatError(
            f"{path} lacks column(s) {missing}; found {list(frame.columns)}. "
            "Is this the upstream file at the pinned version (see data_prep.sources.pinned())?"
        )
    return frame
