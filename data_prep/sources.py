"""One adapter per public chest X-ray source, each turning upstream metadata into the common table.

Every source lives under the data directory in its own upstream layout (folder named like the
upstream repository).  An adapter reads the upstream metadata file, maps each row to the columns
of :data:`data_prep.schema.TABLE_COLUMNS` and resolves the image file.  :func:`load_table` runs the
adapters, hashes the image files, and returns the table together with a :class:`Report` of what
was read and what was skipped (metadata rows whose image is absent, repeated metadata rows).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from nbhelpers.config import DataNotFoundError
from data_prep.schema import CLASSES, TABLE_COLUMNS

#: Columns of every "skipped" / "dropped" frame: which image, why, and the specifics.
DROP_COLUMNS: tuple[str, ...] = ("image_id", "reason", "detail")
#: How many example rows a report prints per problem.
EXAMPLES_SHOWN = 5
#: Ages above this are recording errors (NIH has a few 400+ year-old patients); they become unknown.
MAX_PLAUSIBLE_AGE = 120
HASH_CHUNK_BYTES = 1 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

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
    """An upstream metadata file lacks the columns its adapter reads."""


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


def _read_csv(path: Path, columns: Sequence[str], **kwargs: object) -> pd.DataFrame:
    """Read an upstream CSV as text, checking that the adapter's columns are present."""
    if not path.is_file():
        raise SourceNotFoundError(
            f"metadata file {path} is missing; the source folder must keep its upstream layout "
            "(re-fetch it with `python -m data_prep.download`)"
        )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SourceFormatError(
            f"{path} lacks column(s) {missing}; found {list(frame.columns)}. "
            "Is this the upstream file at the pinned version (see data_prep.download.PINNED)?"
        )
    return frame


@dataclass(frozen=True)
class Source:
    """A public source: where it lives, how it is licensed, and how its metadata is read.

    ``read(folder)`` returns one dict per metadata row with the table columns except ``image_id``,
    ``source``, ``sha256``; its ``path`` is relative to ``folder`` and may not exist yet.
    """

    name: str
    folders: tuple[str, ...]  # folder names under the data directory, preferred first
    license: str
    url: str
    read: Callable[[Path], list[dict[str, object]]]

    def find(self, data_dir: Path) -> Path | None:
        """Return this source's folder under ``data_dir``, or None when none of its names exists."""
        for name in self.folders:
            if (data_dir / name).is_dir():
                return data_dir / name
        return None


def _read_ieee8023(folder: Path) -> list[dict[str, object]]:
    frame = _read_csv(
        folder / "metadata.csv",
        ("patientid", "finding", "view", "modality", "folder", "filename", "age", "sex", "license"),
    )
    return [
        {
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
        for r in frame.itertuples(index=False)
    ]


def _figure1_image(images: Path, name: str, listing: dict[str, str]) -> str:
    """Resolve ``<patientid>.<ext>`` whatever the extension and its case (jpg, JPG, png, jpeg)."""
    for suffix in IMAGE_SUFFIXES:
        found = listing.get((name + suffix).lower())
        if found is not None:
            return f"{images.name}/{found}"
    return f"{images.name}/{name}.jpg"  # the usual upstream name; reported as missing


def _read_figure1(folder: Path) -> list[dict[str, object]]:
    # Figure1's metadata is Latin-1 (accented letters in the notes), not UTF-8.
    frame = _read_csv(
        folder / "metadata.csv", ("patientid", "finding", "view", "modality", "age", "sex"), encoding="latin-1"
    )
    images = folder / "images"
    listing = {p.name.lower(): p.name for p in images.iterdir()} if images.is_dir() else {}
    rows = []
    for r in frame.itertuples(index=False):
        name = _text(r.patientid)
        film = FIGURE1_FILM_SUFFIX.match(name)
        finding = _text(r.finding)
        rows.append(
            {
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


def _read_actualmed(folder: Path) -> list[dict[str, object]]:
    frame = _read_csv(
        folder / "metadata.csv", ("patientid", "finding", "view", "modality", "imagename", "age", "sex")
    )
    return [
        {
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
        for r in frame.itertuples(index=False)
    ]


def _read_nih(folder: Path) -> list[dict[str, object]]:
    frame = _read_csv(
        folder / "Data_Entry_2017_v2020.csv",
        ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"),
    )
    return [
        {
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
        for r in frame.to_dict("records")
    ]


def _read_rsna(folder: Path) -> list[dict[str, object]]:
    import pydicom  # only needed for this source

    classes = _read_csv(folder / "stage_2_detailed_class_info.csv", ("patientId", "class"))
    # One row per bounding box upstream: several rows per patientId, so keep the first of each.
    classes = classes.drop_duplicates("patientId", keep="first")
    images = folder / "stage_2_train_images"
    rows = []
    for r in tqdm(classes.to_dict("records"), desc="rsna: DICOM headers", unit="file", leave=False):
        path = images / f"{r['patientId']}.dcm"
        age, sex, view, modality = math.nan, "", "", "X-ray"
        if path.is_file():
            header = pydicom.dcmread(path, stop_before_pixels=True)
            age = parse_age(getattr(header, "PatientAge", ""))
            sex = _sex(getattr(header, "PatientSex", ""))
            view = _text(getattr(header, "ViewPosition", ""))
            modality = "X-ray" if _text(getattr(header, "Modality", "CR")) in ("CR", "DX") else _text(header.Modality)
        rows.append(
            {
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

    def counts(self) -> dict[str, int]:
        """Skipped rows per reason."""
        return {str(k): int(v) for k, v in self.skipped["reason"].value_counts().sort_index().items()}

    def __str__(self) -> str:
        lines = [f"data directory: {self.data_dir}"]
        for name in self.loaded:
            lines.append(f"  {name}: {self.rows[name]} metadata rows, {self.images[name]} with an image file")
        if self.absent:
            lines.append(f"  absent (skipped): {', '.join(self.absent)}")
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


def _resolve_sources(data_dir: Path, sources: Sequence[str] | None) -> tuple[dict[str, Path], list[str]]:
    """Map each wanted source to its folder; explicit asks must exist, defaults may be absent."""
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
                f"exist; fetch it with `python -m data_prep.download --to {data_dir} --sources {name}` "
                "or leave it out of sources"
            )
        else:
            absent.append(name)
    if not found:
        expected = ", ".join(f"{SOURCES[n].folders[0]}/" for n in wanted)
        raise SourceNotFoundError(
            f"no source folder found in data directory {data_dir} (expected one of: {expected}); "
            "point data_dir / $CXR_DATA_DIR at the folder holding the upstream sources "
            "or fetch them with `python -m data_prep.download`"
        )
    return found, absent


def load_table(
    data_dir: Path, sources: Sequence[str] | None = None, hash_images: bool = True
) -> tuple[pd.DataFrame, Report]:
    """Read every (or the named) source under ``data_dir`` into one table with ``TABLE_COLUMNS``.

    Rows are sorted by ``image_id``; ``path`` is relative to ``data_dir`` (POSIX) and
    ``patient_id`` is ``"<source>:<upstream id>"``.  Rows whose image file is absent and repeated
    metadata rows for one image are left out and listed in ``Report.skipped`` (a repeated row as
    ``"<image_id>#row<N>"``, since its image stays in the table).  With
    ``hash_images`` each image's SHA-256 is computed (progress bar), else ``sha256`` is "".
    ``table.attrs["data_dir"]`` records ``data_dir`` for :func:`data_prep.curate.curate`.
    Raises :class:`SourceNotFoundError` when ``data_dir`` or an explicitly named source folder is
    missing, or when no source is present; :class:`SourceFormatError` for a malformed metadata file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SourceNotFoundError(
            f"data directory {data_dir} does not exist; set $CXR_DATA_DIR or pass the folder holding "
            "the upstream sources (covid-chestxray-dataset/, Figure1-COVID-chestxray-dataset/, ...)"
        )
    folders, absent = _resolve_sources(data_dir, sources)
    report = Report(data_dir=data_dir, loaded=list(folders), absent=absent)
    rows: list[dict[str, object]] = []
    skipped: list[dict[str, str]] = []
    for name, folder in folders.items():
        records = SOURCES[name].read(folder)
        seen: set[str] = set()
        kept = 0
        for number, record in enumerate(records, start=1):
            rel = f"{folder.name}/{record['path']}"
            image_id = f"{name}:{rel}"
            if image_id in seen:
                # The image itself stays (from its first row); the id marks the repeated metadata row.
                skipped.append({"image_id": f"{image_id}#row{number}", "reason": "duplicate_row",
                                "detail": f"{name} metadata row {number} repeats {rel}"})
                continue
            seen.add(image_id)
            if not (data_dir / rel).is_file():
                skipped.append({"image_id": image_id, "reason": "missing_image",
                                "detail": f"{name} metadata row {number}: {rel} not found"})
                continue
            kept += 1
            rows.append({**record, "image_id": image_id, "source": name, "path": rel,
                         "patient_id": f"{name}:{record['patient_id']}", "sha256": ""})
        report.rows[name] = len(records)
        report.images[name] = kept
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
