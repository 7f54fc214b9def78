"""One adapter per public chest X-ray source, each turning upstream metadata into the common table's rows.

Every source lives under the data directory in its own upstream layout (folder named like the
upstream repository).  An adapter reads the upstream metadata file (checked as
:mod:`data_prep.metadata` describes), maps each row to the columns of
:data:`data_prep.schema.TABLE_COLUMNS` and resolves the image file.  :data:`SOURCES` is the
registry of adapters, in the order their images are preferred when de-duplicating;
:func:`data_prep.table.load_table` runs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from data_prep.progress import tqdm

from data_prep.metadata import MetadataLog, read_metadata_csv
from data_prep.pins import GitSnapshot

#: Ages above this are recording errors (NIH has a few 400+ year-old patients); they become unknown.
MAX_PLAUSIBLE_AGE = 120
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


def parse_sex(value: object) -> str:
    """``M``, ``F`` or "" from upstream text (``"M"``, ``"female"``, a DICOM ``PatientSex``)."""
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


def _read_csv(
    path: Path, columns: Sequence[str], log: MetadataLog | None = None, encoding: str = "utf-8"
) -> pd.DataFrame:
    """:func:`data_prep.metadata.read_metadata_csv` of an adapter's file; without a ``log`` the
    problems are logged under the source whose folder holds ``path``."""
    if log is None:
        name = _source_of(path.parent)
        log = MetadataLog(name, pin=SOURCES[name].pin if name in SOURCES else None)
    return read_metadata_csv(path, columns, log, encoding)


@dataclass(frozen=True)
class Source:
    """A public source: where it lives, how it is licensed, and how its metadata is read.

    ``read(folder, log)`` returns one dict per metadata row with the table columns except
    ``image_id``, ``source``, ``sha256``, plus ``row`` (its data row number in the metadata file);
    its ``path`` is relative to ``folder`` and may not exist yet.  Problems with the file go to the
    :class:`MetadataLog` ``log``.  ``fetch`` names how ``workbook download`` gets it (a key of
    :data:`data_prep.download.FETCHERS`: ``github`` at ``pin``, ``kaggle``, ``nih-box``; empty:
    it cannot be downloaded); ``pin`` is the upstream version it was built against.
    """

    name: str
    folders: tuple[str, ...]  # folder names under the data directory, preferred first
    license: str
    url: str
    read: Callable[[Path, MetadataLog | None], list[dict[str, object]]]
    fetch: str = ""
    pin: GitSnapshot | None = None

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
            "sex": parse_sex(r.sex),
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
                "sex": parse_sex(r.sex),
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
            "sex": parse_sex(r.sex),
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
            "sex": parse_sex(r["Patient Gender"]),
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
            sex = parse_sex(getattr(header, "PatientSex", ""))
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
        # The GitHub sources at the commits of the development mirror (see its SOURCES.md), with the
        # SHA-256 of their metadata and its number of data rows (a differing file gets a warning).
        Source("ieee8023", ("covid-chestxray-dataset",), "per image (metadata.csv license column)",
               "https://github.com/ieee8023/covid-chestxray-dataset", _read_ieee8023, "github",
               GitSnapshot("ieee8023/covid-chestxray-dataset", "584034aa", "metadata.csv",
                           "e46ffab4cdeb4866491d32afe466baefd7acbcf268a75c260f81d8520b8664a0", 751)),
        Source("figure1", ("Figure1-COVID-chestxray-dataset",), SOURCES_LICENSES["figure1"],
               "https://github.com/agchung/Figure1-COVID-chestxray-dataset", _read_figure1, "github",
               GitSnapshot("agchung/Figure1-COVID-chestxray-dataset", "95bb569e", "metadata.csv",
                           "c4a6313343797ed8f052d2887e451013f93ecc8ebec4b05d0f1bb6d2eee42db7", 55)),
        Source("actualmed", ("Actualmed-COVID-chestxray-dataset",), SOURCES_LICENSES["actualmed"],
               "https://github.com/agchung/Actualmed-COVID-chestxray-dataset", _read_actualmed, "github",
               GitSnapshot("agchung/Actualmed-COVID-chestxray-dataset", "27240dd8", "metadata.csv",
                           "df7d0b406282d9b8e7163316c9028410f50502ea55159863d798bc6e0c35e10e", 238)),
        Source("rsna", ("rsna-pneumonia-detection-challenge",), SOURCES_LICENSES["rsna"],
               "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge", _read_rsna, "kaggle"),
        Source("nih", ("ChestX-ray14", "nih-cxr14-subset"), SOURCES_LICENSES["nih"],
               "https://nihcc.app.box.com/v/ChestXray-NIHCC", _read_nih, "nih-box"),
    )
}


def pinned() -> dict[str, GitSnapshot]:
    """Every source pinned to a GitHub commit, by name (read from :data:`SOURCES` when called)."""
    return {name: s.pin for name, s in SOURCES.items() if s.pin is not None}
