"""One adapter per public chest X-ray source, each turning upstream metadata into the common table.

Every source lives under the data directory in its own upstream layout (folder named like the
upstream repository).  An adapter reads the upstream metadata file, maps each row to the columns
of :data:`data_prep.schema.TABLE_COLUMNS` and resolves the image file.  :func:`load_table` runs the
adapters, hashes the image files, and returns the table together with a :class:`Report` of what
was read and what was skipped: rows with the wrong number of fields or cut off at the end of the
file (``malformed_row``), repeated rows (``duplicate_row``), rows listing one image with different
labels or patients (``conflicting_rows``: the image is dropped), paths that leave their source
folder (``unsafe_path``: ``..``, absolute paths, symbolic links pointing elsewhere) and rows whose
image is absent (``missing_image``).

Metadata must be non-empty text in its upstream encoding (UTF-8; Latin-1 for Figure1), else
:class:`SourceFormatError` names the file and the source.  A file that looks truncated, or that
differs from the version pinned in :data:`data_prep.pins.PINNED` (SHA-256 and row count), is
read anyway and listed under ``Report.warnings``.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm.auto import tqdm

from data_prep.datadir import DataNotFoundError
from data_prep.pins import PINNED
from data_prep.schema import CLASSES, TABLE_COLUMNS

#: Columns of every "skipped" / "dropped" frame: which image, why, and the specifics.
DROP_COLUMNS: tuple[str, ...] = ("image_id", "reason", "detail")
#: How many example rows a report prints per problem.
EXAMPLES_SHOWN = 5
#: Ages above this are recording errors (NIH has a few 400+ year-old patients); they become unknown.
MAX_PLAUSIBLE_AGE = 120
HASH_CHUNK_BYTES = 1 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: How many offending row numbers a metadata warning names.
ROWS_SHOWN = 10
#: How alike (difflib ratio) a folder name must be to a source folder's name to be named as a
#: probably misnamed copy of it ("covid-chestxray-dataset-master" against "covid-chestxray-dataset").
NEAR_NAME_RATIO = 0.8
UTF8_BOM = b"\xef\xbb\xbf"
# A drive letter ("C:") at the start of a path segment: a Windows absolute path.
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")

# ieee8023 findings: the last level of a hierarchical finding ("Pneumonia/Viral/COVID-19") or a
# flat one ("COVID-19, ARDS", "Streptococcus").  Every pathogen the collection lists as a cause of
# pneumonia maps to "pneumonia"; ARDS alone, tuberculosis, "todo" and "Unknown" map to nothing.
IEEE_PNEUMONIA_FINDINGS = frozenset(
    {
        "pneumonia", "viral", "bacterial", "fungal", "sars", "mers", "mers-cov", "influenza", "h1n1",
        "varicella", "herpes", "streptococcus", "staphylococcus", "staphylococcus aureus",
        "klebsiella", "legionella", "e.coli", "chlamydophila", "mycoplasma",
        "mycoplasma bacterial pneumonia", "pneumocystis", "aspergillosis", "nocardia", "lipoid",
    }
)
FIGURE1_FINDINGS = {"covid-19": "covid", "pneumonia": "pneumonia", "no finding": "normal"}
ACTUALMED_FINDINGS = {"covid-19": "covid", "no finding": "normal"}
SOURCES_LICENSES = {
    "figure1": "research use only (Figure 1 COVID-19 Chest X-ray Dataset Initiative)",
    "actualmed": "research use only (Actualmed COVID-19 Chest X-ray Dataset Initiative)",
    "nih": "NIH ChestX-ray14: unrestricted use, citation requested",
    "rsna": "RSNA Pneumonia Detection Challenge: Kaggle competition rules",
}
RSNA_CLASSES = {"Normal": "normal", "Lung Opacity": "pneumonia"}  # "No Lung Opacity / Not Normal": none

# Figure1 images are named after the image's patientid, which carries a letter for each film of
# one patient: COVID-00003a, COVID-00003b -> patient COVID-00003.
FIGURE1_FILM_SUFFIX = re.compile(r"^(?P<patient>.*\d)[a-z]$")
AGE_NUMBER = re.compile(r"\d+(\.\d+)?")


class SourceNotFoundError(DataNotFoundError):
    """A source folder or its metadata file is not where the upstream layout puts it."""


class SourceFormatError(ValueError):
    """An upstream metadata file is empty, not text in its encoding, unparsable CSV, or lacks the
    columns its adapter reads."""


@dataclass
class MetadataLog:
    """What reading one source's metadata found besides its rows.

    ``malformed`` holds ``(id, detail)`` for every row that was left out because it has the wrong
    number of fields (``id`` is ``"<file>#line<N>"``); ``warnings`` holds one line per problem with
    a whole file (cut off, not the pinned version).
    """

    source: str
    malformed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_age(value: object) -> float:
    """Return an age in years from upstream text (``"65"``, ``"50+"``, ``"early 40s"``, ``"058Y"``).

    Ranges and decades give their lower bound (``"50+"`` and ``"mid 50s"`` give 50), which is all the
    adult filter needs.  Blank, unparseable or implausible values (over :data:`MAX_PLAUSIBLE_AGE`)
    give NaN.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    match = AGE_NUMBER.search(str(value))
    if match is None:
        return math.nan
    age = float(match.group())
    return age if age <= MAX_PLAUSIBLE_AGE else math.nan


def _text(value: object) -> str:
    """Upstream cell as stripped text; NaN and None become ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _sex(value: object) -> str:
    text = _text(value).upper()[:1]
    return text if text in ("M", "F") else ""


def map_ieee8023_finding(finding: str) -> str:
    """Map an ieee8023 ``finding`` (flat or hierarchical, possibly comma-joined) to a class or ""."""
    levels = [level.strip().lower() for level in finding.split("/") if level.strip()]
    parts = {part.strip() for level in levels for part in level.split(",") if part.strip()}
    if "covid-19" in parts:
        return "covid"
    if "no finding" in parts:
        return "normal"
    if (levels and levels[0] == "pneumonia") or parts & IEEE_PNEUMONIA_FINDINGS:
        return "pneumonia"
    return ""


def map_nih_labels(labels: str) -> str:
    """Map NIH ``Finding Labels`` (pipe-separated) to ``normal`` (No Finding), ``pneumonia`` or ""."""
    parts = {part.strip() for part in labels.split("|")}
    if parts == {"No Finding"}:
        return "normal"
    if "Pneumonia" in parts:
        return "pneumonia"
    return ""


def _source_of(folder: Path) -> str:
    """The name of the source whose folder is ``folder`` (its folder name when none is)."""
    for source in SOURCES.values():
        if folder.name in source.folders:
            return source.name
    return folder.name


def _refetch_hint(source: str) -> str:
    """How to get a good copy of ``source``'s metadata again."""
    if source == "nih":
        return "download it again by hand from https://nihcc.app.box.com/v/ChestXray-NIHCC"
    return "re-fetch it with `python -m data_prep.download`"


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
    snap = PINNED.get(log.source)
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


def _read_csv(
    path: Path, columns: Sequence[str], log: MetadataLog | None = None, encoding: str = "utf-8"
) -> pd.DataFrame:
    """Read an upstream CSV as text, indexed by data row number (1 = the first row after the header).

    Checks that the file is non-empty text in ``encoding``, parses it (quoted fields, blank lines
    skipped, like pandas) and that the adapter's ``columns`` are present.  Rows with another number
    of fields than the header, and a last row cut off (no final newline, too few fields, or an
    unclosed quote), are left out and listed in ``log.malformed``; such a file, and a pinned file
    whose bytes differ from the pin, get a line in ``log.warnings``.  Raises
    :class:`SourceNotFoundError` when the file is missing and :class:`SourceFormatError` (naming the
    file and the source) when it is empty, not decodable, unparsable or lacks a column.
    """
    if not path.is_file():
        raise SourceNotFoundError(
            f"metadata file {path} is missing; the source folder must keep its upstream layout "
            "(re-fetch it with `python -m data_prep.download`)"
        )
    log = log if log is not None else MetadataLog(_source_of(path.parent))
    where = f"{path.parent.name}/{path.name} ({log.source})"
    fix = _refetch_hint(log.source)
    raw = path.read_bytes()
    if not raw.strip():
        raise SourceFormatError(f"{where} is empty ({len(raw)} bytes); {fix}")
    text = _decode(raw, encoding, where, fix)
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
    width = len(header)
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
    _check_pin(path, raw, len(rows) - int(cut), log, where)
    frame = pd.DataFrame(good, columns=header, index=pd.Index(index, name="row"), dtype=str)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SourceFormatError(
            f"{path} lacks column(s) {missing}; found {list(frame.columns)}. "
            "Is this the upstream file at the pinned version (see data_prep.pins.PINNED)?"
        )
    return frame


@dataclass(frozen=True)
class Source:
    """A public source: where it lives, how it is licensed, and how its metadata is read.

    ``read(folder, log)`` returns one dict per metadata row with the table columns except
    ``image_id``, ``source``, ``sha256``, plus ``row`` (its data row number in the metadata file);
    its ``path`` is relative to ``folder`` and may not exist yet.  Problems with the file go to the
    :class:`MetadataLog` ``log``.
    """

    name: str
    folders: tuple[str, ...]  # folder names under the data directory, preferred first
    license: str
    url: str
    read: Callable[[Path, MetadataLog | None], list[dict[str, object]]]

    def find(self, data_dir: Path) -> Path | None:
        """Return this source's folder under ``data_dir``, or None when none of its names exists."""
        for name in self.folders:
            if (data_dir / name).is_dir():
                return data_dir / name
        return None


def _read_ieee8023(folder: Path, log: MetadataLog | None = None) -> list[dict[str, object]]:
    frame = _read_csv(
        folder / "metadata.csv",
        ("patientid", "finding", "view", "modality", "folder", "filename", "age", "sex", "license"), log,
    )
    return [
        {
            "row": r.Index,
            "path": f"{_text(r.folder) or 'images'}/{_text(r.filename)}",
            "patient_id": _text(r.patientid),
            "label": map_ieee8023_finding(_text(r.finding)),
            "finding": _text(r.finding),
            "view": _text(r.view),
            "modality": _text(r.modality),
            "age": parse_age(r.age),
            "sex": _sex(r.sex),
            "license": _text(r.license),
        }
        for r in frame.itertuples()
    ]


def _figure1_image(images: Path, name: str, listing: dict[str, str]) -> str:
    """Resolve ``<patientid>.<ext>`` whatever the extension and its case (jpg, JPG, png, jpeg)."""
    for suffix in IMAGE_SUFFIXES:
        found = listing.get((name + suffix).lower())
        if found is not None:
            return f"{images.name}/{found}"
    return f"{images.name}/{name}.jpg"  # the usual upstream name; reported as missing


def _read_figure1(folder: Path, log: MetadataLog | None = None) -> list[dict[str, object]]:
    # Figure1's metadata is Latin-1 (accented letters in the notes), not UTF-8.
    frame = _read_csv(
        folder / "metadata.csv", ("patientid", "finding", "view", "modality", "age", "sex"), log, encoding="latin-1"
    )
    images = folder / "images"
    listing = {p.name.lower(): p.name for p in images.iterdir()} if images.is_dir() else {}
    rows = []
    for r in frame.itertuples():
        name = _text(r.patientid)
        film = FIGURE1_FILM_SUFFIX.match(name)
        finding = _text(r.finding)
        rows.append(
            {
                "row": r.Index,
                "path": _figure1_image(images, name, listing),
                "patient_id": film.group("patient") if film else name,
                "label": FIGURE1_FINDINGS.get(finding.lower(), ""),
                "finding": finding,
                "view": _text(r.view),
                "modality": _text(r.modality),
                "age": parse_age(r.age),
                "sex": _sex(r.sex),
                "license": SOURCES_LICENSES["figure1"],
            }
        )
    return rows


def _read_actualmed(folder: Path, log: MetadataLog | None = None) -> list[dict[str, object]]:
    frame = _read_csv(
        folder / "metadata.csv", ("patientid", "finding", "view", "modality", "imagename", "age", "sex"), log
    )
    return [
        {
            "row": r.Index,
            "path": f"images/{_text(r.imagename)}",
            "patient_id": _text(r.patientid),
            # A blank finding is "Inconclusive" in the notes: it maps to no class and is dropped.
            "label": ACTUALMED_FINDINGS.get(_text(r.finding).lower(), ""),
            "finding": _text(r.finding),
            "view": _text(r.view),
            "modality": _text(r.modality),
            "age": parse_age(r.age),
            "sex": _sex(r.sex),
            "license": SOURCES_LICENSES["actualmed"],
        }
        for r in frame.itertuples()
    ]


def _read_nih(folder: Path, log: MetadataLog | None = None) -> list[dict[str, object]]:
    frame = _read_csv(
        folder / "Data_Entry_2017_v2020.csv",
        ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"), log,
    )
    return [
        {
            "row": number,
            "path": f"images/{_text(r['Image Index'])}",
            "patient_id": _text(r["Patient ID"]),
            "label": map_nih_labels(_text(r["Finding Labels"])),
            "finding": _text(r["Finding Labels"]),
            "view": _text(r["View Position"]),
            "modality": "X-ray",
            "age": parse_age(r["Patient Age"]),
            "sex": _sex(r["Patient Gender"]),
            "license": SOURCES_LICENSES["nih"],
        }
        for number, r in zip(frame.index, frame.to_dict("records"))
    ]


def _read_rsna(folder: Path, log: MetadataLog | None = None) -> list[dict[str, object]]:
    import pydicom  # only needed for this source

    classes = _read_csv(folder / "stage_2_detailed_class_info.csv", ("patientId", "class"), log)
    # One row per bounding box upstream: several rows per patientId, so keep the first of each.
    classes = classes.drop_duplicates("patientId", keep="first")
    images = folder / "stage_2_train_images"
    rows = []
    records = zip(classes.index, classes.to_dict("records"))
    for number, r in tqdm(list(records), desc="rsna: DICOM headers", unit="file", leave=False):
        path = images / f"{r['patientId']}.dcm"
        if path.resolve().parent != images.resolve():  # '../' in an id: load_table refuses the row unread
            path = images / "__outside__.dcm"
        age, sex, view, modality = math.nan, "", "", "X-ray"
        if path.is_file():
            header = pydicom.dcmread(path, stop_before_pixels=True)
            age = parse_age(getattr(header, "PatientAge", ""))
            sex = _sex(getattr(header, "PatientSex", ""))
            view = _text(getattr(header, "ViewPosition", ""))
            modality = "X-ray" if _text(getattr(header, "Modality", "CR")) in ("CR", "DX") else _text(header.Modality)
        rows.append(
            {
                "row": number,
                "path": f"{images.name}/{r['patientId']}.dcm",
                "patient_id": r["patientId"],
                "label": RSNA_CLASSES.get(r["class"], ""),
                "finding": r["class"],
                "view": view,
                "modality": modality,
                "age": age,
                "sex": sex,
                "license": SOURCES_LICENSES["rsna"],
            }
        )
    return rows


#: The registry of adapters, in the order their images are preferred when de-duplicating.
SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("ieee8023", ("covid-chestxray-dataset",), "per image (metadata.csv license column)",
               "https://github.com/ieee8023/covid-chestxray-dataset", _read_ieee8023),
        Source("figure1", ("Figure1-COVID-chestxray-dataset",), SOURCES_LICENSES["figure1"],
               "https://github.com/agchung/Figure1-COVID-chestxray-dataset", _read_figure1),
        Source("actualmed", ("Actualmed-COVID-chestxray-dataset",), SOURCES_LICENSES["actualmed"],
               "https://github.com/agchung/Actualmed-COVID-chestxray-dataset", _read_actualmed),
        Source("rsna", ("rsna-pneumonia-detection-challenge",), SOURCES_LICENSES["rsna"],
               "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge", _read_rsna),
        Source("nih", ("ChestX-ray14", "nih-cxr14-subset"), SOURCES_LICENSES["nih"],
               "https://nihcc.app.box.com/v/ChestXray-NIHCC", _read_nih),
    )
}


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
        lines = [f"data directory: {self.data_dir}"]
        for name in self.loaded:
            lines.append(f"  {name}: {self.rows[name]} metadata rows, {self.images[name]} with an image file")
        if self.absent:
            lines.append(f"  absent (skipped): {', '.join(self.absent)}")
        lines += [f"  warning: {w}" for w in self.warnings]
        for reason, group in self.skipped.groupby("reason", sort=True):
            examples = "; ".join(group["detail"].head(EXAMPLES_SHOWN))
            lines.append(f"  skipped {len(group)} row(s), {reason}: e.g. {examples}")
        return "\n".join(lines)


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
                f"exist{_rename_hint(data_dir, name)}; fetch it with `python -m data_prep.download --to {data_dir} "
                f"--sources {name}` or leave it out of sources"
            )
        else:
            absent.append(name)
    if not found:
        hints = "".join(_rename_hint(data_dir, n) for n in wanted)
        raise SourceNotFoundError(
            f"no source folder found in data directory {data_dir} (expected one of: {_folder_names(wanted)})"
            f"{hints}; point data_dir / $CXR_DATA_DIR at the folder holding the upstream sources "
            "or fetch them with `python -m data_prep.download`"
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


def load_table(
    data_dir: Path, sources: Sequence[str] | None = None, hash_images: bool = True
) -> tuple[pd.DataFrame, Report]:
    """Read every (or the named) source under ``data_dir`` into one table with ``TABLE_COLUMNS``.

    Rows are sorted by ``image_id``; ``path`` is relative to ``data_dir`` (POSIX) and
    ``patient_id`` is ``"<source>:<upstream id>"``.  Left out and listed in ``Report.skipped``:
    malformed or cut-off metadata rows (``"<source>:<folder>/<file>#line<N>"``), repeated rows for
    one image (``"<image_id>#row<N>"``, since its image stays in the table), every row of an image
    listed with different labels or patients (``conflicting_rows``), paths leaving their source
    folder (``unsafe_path``) and rows whose image file is absent.  Damaged or unpinned metadata
    files and misnamed source folders are listed (and printed to stderr) as ``Report.warnings``.
    With ``hash_images`` each image's SHA-256 is computed (progress bar), else ``sha256`` is "".
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
        log = MetadataLog(name)
        records = SOURCES[name].read(folder, log)
        report.warnings += log.warnings
        skipped += [{"image_id": f"{name}:{folder.name}/{where}", "reason": "malformed_row", "detail": detail}
                    for where, detail in log.malformed]
        # Group the rows by image first: whether a repeat is harmless depends on all of them.
        by_image: dict[str, list[tuple[int, dict[str, object]]]] = {}
        for number, record in enumerate(records, start=1):
            image_id = f"{name}:{folder.name}/{record['path']}"
            by_image.setdefault(image_id, []).append((int(record.get("row", number)), record))
        root = folder.resolve()
        kept = 0
        for image_id, listed in by_image.items():
            number, record = listed[0]
            rel = f"{folder.name}/{record['path']}"
            if len({(r["label"], r["patient_id"]) for _, r in listed}) > 1:
                # One image, two stories (class or patient): neither row can be trusted, and a
                # wrong patient would let the image's person cross splits.
                told = "; ".join(f"row {n}: label {r['label'] or '(none)'}, patient {r['patient_id']}"
                                 for n, r in listed)
                skipped.append({"image_id": image_id, "reason": "conflicting_rows",
                                "detail": f"{name} metadata lists {rel} in {len(listed)} rows that disagree "
                                f"({told}); the image is dropped"})
                skipped += [{"image_id": f"{image_id}#row{n}", "reason": "conflicting_rows",
                             "detail": f"{name} metadata row {n} repeats {rel} and disagrees ({told})"}
                            for n, _ in listed[1:]]
                continue
            for n, _ in listed[1:]:
                # The image itself stays (from its first row); the id marks the repeated metadata row.
                skipped.append({"image_id": f"{image_id}#row{n}", "reason": "duplicate_row",
                                "detail": f"{name} metadata row {n} repeats {rel}"})
            problem = _unsafe(folder, root, str(record["path"]))
            if problem:
                skipped.append({"image_id": image_id, "reason": "unsafe_path",
                                "detail": f"{name} metadata row {number}: path {str(record['path'])!r} {problem}; "
                                f"it must name a file inside {folder.name}/"})
                continue
            if not (data_dir / rel).is_file():
                skipped.append({"image_id": image_id, "reason": "missing_image",
                                "detail": f"{name} metadata row {number}: {rel} not found"})
                continue
            kept += 1
            rows.append({**record, "image_id": image_id, "source": name, "path": rel,
                         "patient_id": f"{name}:{record['patient_id']}", "sha256": ""})
        report.rows[name] = len(records) + len(log.malformed)
        report.images[name] = kept
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).sort_values("image_id", ignore_index=True)
    table["age"] = table["age"].astype(float)
    if hash_images:
        table["sha256"] = [
            sha256_file(data_dir / p) for p in tqdm(table["path"], desc="hashing images", unit="image")
        ]
    bad = set(table["label"]) - set(CLASSES) - {""}
    if bad:  # an adapter bug, not a data problem: fail loudly rather than curate nonsense
        raise SourceFormatError(f"adapters produced labels outside {CLASSES}: {sorted(bad)}")
    report.skipped = pd.DataFrame(skipped, columns=list(DROP_COLUMNS))
    table.attrs["data_dir"] = str(data_dir)
    return table, report
