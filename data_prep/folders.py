"""Your own image folders as curation sources: one subfolder per class, an optional ``metadata.csv``.

A folder such as Kaggle's COVID-19 Radiography Dataset holds one subfolder per class.  Subfolder
names are matched ignoring case, spaces, ``_`` and ``-`` against :data:`CLASS_ALIASES`; others
(``Lung_Opacity``) are used only when mapped (``folder_classes={"Lung_Opacity": "pneumonia"}``,
``--map-folder Lung_Opacity=pneumonia``), else every image in them is counted as
``unmapped_folder``.  A class subfolder's images are the files directly in it and in its
``images/`` subfolder (the Kaggle layout keeps lung masks in ``masks/``, which is not read and
is counted).  PNG, JPEG and DICOM are read (:mod:`data_prep.images`); a DICOM header gives view,
age, sex and modality where ``metadata.csv`` does not.

``metadata.csv`` beside the class subfolders has a ``filename`` column and any of
``patient_id``, ``view``, ``age``, ``sex``.  ``filename`` is the path relative to the folder
(``COVID/COVID-1.png``) or the bare file name (``COVID-1.png``) when no other image has it.
Without a patient id a file is its own patient, and the folder's entry in the curation summary
(``summary["image_folders"]``) and ``summary["warnings"]`` say loudly that a patient-grouped
split cannot be guaranteed for it.  Each folder becomes the source ``folder-<name>`` (``-2``,
``-3`` appended when two folders share a name); its images go through the same filters,
de-duplication against every other source, balancing and split as the public sources.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data_prep.errors import WorkbookError
from data_prep.images import DICOM_MAGIC, DICOM_MAGIC_OFFSET, DICOM_SUFFIXES, IMAGE_SUFFIXES
from data_prep.metadata import MetadataLog, read_metadata_csv
from data_prep.progress import tqdm
from data_prep.schema import CLASSES, FOLDER_PREFIX, TABLE_COLUMNS
from data_prep.sources import parse_age, parse_sex
from data_prep.fingerprint import file_digests
from data_prep.table import DROP_COLUMNS

#: Subfolder names taken as each class without being asked (compared by :func:`folder_key`).
CLASS_ALIASES: dict[str, tuple[str, ...]] = {
    "covid": ("COVID", "COVID-19", "covid19", "covid_19"),
    "pneumonia": ("Pneumonia", "Viral Pneumonia", "Bacterial Pneumonia"),
    "normal": ("Normal", "No Finding", "no_finding"),
}
METADATA_NAME = "metadata.csv"
#: Columns ``metadata.csv`` may have; only ``filename`` is required.
METADATA_COLUMNS = ("filename", "patient_id", "view", "age", "sex")
#: The subfolder of a class subfolder whose images are taken too (the Kaggle layout).
IMAGES_SUBFOLDER = "images"
FOLDER_LICENSE = "your own images (licence not recorded)"
#: Why a subfolder that looks like a class is not one by default.
NOT_BY_DEFAULT = {"lung opacity": "its films are mixed non-COVID opacities, not only pneumonia"}


class ImageFolderNotFoundError(WorkbookError, FileNotFoundError):
    """An image folder does not exist or is a file."""


class ImageFolderError(WorkbookError, ValueError):
    """An image folder is empty, has no class subfolder, repeats, or its ``metadata.csv`` cannot be used."""


def folder_key(name: str) -> str:
    """A subfolder name as it is compared: lower case, runs of spaces, ``_`` and ``-`` as one space."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def accepted_names() -> str:
    """The subfolder names taken as classes, for messages: ``covid: COVID, COVID-19, ...; ...``."""
    return "; ".join(f"{c}: {', '.join(names)}" for c, names in CLASS_ALIASES.items())


def class_of(name: str, folder_classes: Mapping[str, str] | None = None) -> str:
    """The class a subfolder ``name`` holds: a ``folder_classes`` entry first, then an alias, else ""."""
    key = folder_key(name)
    for given, cls in (folder_classes or {}).items():
        if folder_key(given) == key:
            return cls
    return next((c for c, names in CLASS_ALIASES.items() if key in {folder_key(n) for n in names}), "")


def source_names(folders: Sequence[Path]) -> list[str]:
    """One unique source name per folder: ``folder-`` and its name in lower case (``-2`` on a repeat)."""
    names: list[str] = []
    for folder in folders:
        base = FOLDER_PREFIX + (re.sub(r"[^a-z0-9]+", "_", folder.name.lower()).strip("_") or "images")
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix or not path.is_file():
        return False
    with open(path, "rb") as f:  # DICOM exports often have no suffix: sniff for the magic
        f.seek(DICOM_MAGIC_OFFSET)
        return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


@dataclass
class FolderScan:
    """What one image folder holds: its ``rows`` (table columns), the ``skipped`` entries
    (:data:`data_prep.table.DROP_COLUMNS`), the JSON-able ``info`` of the summary and ``warnings``."""

    source: str
    folder: Path
    rows: list[dict[str, object]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _check_folder(folder: Path) -> list[Path]:
    """The visible entries of ``folder``; raises when it is missing, a file or empty."""
    fix = "pass the folder that holds one subfolder per class (COVID/, Normal/, ...)"
    if folder.is_file():
        raise ImageFolderNotFoundError(f"image folder {folder} is a file; {fix}")
    if not folder.is_dir():
        raise ImageFolderNotFoundError(f"image folder {folder} does not exist; {fix}")
    children = _visible(folder)
    if not children:
        raise ImageFolderError(f"image folder {folder} is empty; put one subfolder of images per class in it "
                               f"(accepted names: {accepted_names()})")
    return children


def _class_files(class_dir: Path) -> tuple[list[Path], dict[str, int], int]:
    """The image files of one class subfolder, the files of subfolders not read (by name), and the
    number of other (non-image) files."""
    files, not_read, other = [], {}, 0
    for child in _visible(class_dir):
        if child.is_dir() and child.name.lower() == IMAGES_SUBFOLDER:
            inner = [p for p in _visible(child) if not p.is_dir()]  # a dangling link too: counted when read
            files += [p for p in inner if _is_image(p)]
            other += sum(not _is_image(p) for p in inner)
            for deeper in (p for p in _visible(child) if p.is_dir()):  # images/sub/ is not read: say so
                not_read[f"{class_dir.name}/{child.name}/{deeper.name}"] = _count_files(deeper)
        elif child.is_dir():
            not_read[f"{class_dir.name}/{child.name}"] = _count_files(child)
        elif _is_image(child):
            files.append(child)
        else:
            other += 1
    return files, not_read, other


def _list_folder(folder: Path, source: str, folder_classes: Mapping[str, str]) -> tuple[dict, FolderScan]:
    """Every image file of ``folder`` with its class subfolder and class ("" when unmapped)."""
    children = _check_folder(folder)
    subdirs = [p for p in children if p.is_dir()]
    classes = {d.name: class_of(d.name, folder_classes) for d in subdirs}
    if not any(classes.values()):
        found = ", ".join(f"{d.name}/" for d in subdirs) or "no subfolders"
        raise ImageFolderError(
            f"image folder {folder} has no class subfolder (found: {found}); accepted names: {accepted_names()}; "
            "map another name with --map-folder NAME=CLASS (folder_classes={NAME: CLASS})")
    scan = FolderScan(source=source, folder=folder)
    listing: dict[str, tuple[Path, str, str]] = {}  # rel path -> (file, subfolder, class)
    not_read: dict[str, int] = {}
    other = 0
    for d in subdirs:
        files, skipped_dirs, n_other = _class_files(d)
        not_read.update(skipped_dirs)
        other += n_other
        listing.update({p.relative_to(folder).as_posix(): (p, d.name, classes[d.name]) for p in files})
    if not any(cls for _, _, cls in listing.values()):
        shown = ", ".join(f"{name}/" for name, cls in classes.items() if cls)
        raise ImageFolderError(
            f"image folder {folder}: its class subfolders {shown} hold no image files "
            f"({', '.join(IMAGE_SUFFIXES)}); put the images directly in them or in their {IMAGES_SUBFOLDER}/ subfolder")
    loose = sum(1 for p in children if p.is_file() and p.name != METADATA_NAME and _is_image(p))
    scan.info = {"path": str(folder), "source": source, "subfolders": classes, "not_read": not_read,
                 "loose_images": loose, "not_images": other}
    return listing, scan


def _unusable_name(name: str) -> str:
    """Why a ``metadata.csv`` filename cannot name an image of the folder ("" when it can)."""
    if not name:
        return "malformed_row"
    if name.startswith("/") or ".." in name.split("/") or re.match(r"^[A-Za-z]:", name):
        return "unsafe_path"
    return ""


def _rows_by_image(scan: FolderScan, frame: pd.DataFrame, columns: dict[str, str],
                   listing: dict[str, tuple[Path, str, str]]) -> dict[str, list[tuple[int, dict]]]:
    """``metadata.csv``'s rows grouped by the image they name (its path relative to the folder);
    rows naming none go to ``scan.skipped``.  Raises :class:`ImageFolderError` for an ambiguous name."""
    path = scan.folder / METADATA_NAME
    by_name: dict[str, list[str]] = {}
    for rel in listing:
        by_name.setdefault(rel.rsplit("/", 1)[-1].lower(), []).append(rel)
    lower = {rel.lower(): rel for rel in listing}
    listed: dict[str, list[tuple[int, dict]]] = {}
    for number, record in zip(frame.index, frame.to_dict("records")):
        values = {c: str(record[columns[c]]).strip() if c in columns else "" for c in METADATA_COLUMNS}
        name = values["filename"].replace("\\", "/")
        where = f"{scan.source}:{METADATA_NAME}#row{number}"
        if reason := _unusable_name(name):
            scan.skipped.append({"image_id": where, "reason": reason,
                                 "detail": f"{path} row {number}: filename {name!r} must name an image inside "
                                 f"{scan.folder} (relative path or bare name)"})
            continue
        if "/" in name:
            matches = [rel] if (rel := name if name in listing else lower.get(name.lower())) else []
        else:
            matches = by_name.get(name.lower(), [])
        if len(matches) > 1:
            raise ImageFolderError(
                f"{path} row {number}: filename {name!r} matches {len(matches)} images ({', '.join(matches[:3])}); "
                "give the path relative to the folder instead of the bare name")
        if not matches:
            scan.skipped.append({"image_id": where, "reason": "missing_image",
                                 "detail": f"{path} row {number}: {name} is no image in a subfolder of {scan.folder}"})
            continue
        listed.setdefault(matches[0], []).append((int(number), values))
    return listed


def _metadata_rows(scan: FolderScan, listing: dict[str, tuple[Path, str, str]]) -> tuple[dict[str, dict], set[str]]:
    """``metadata.csv``'s values per listed image (by relative path), and the images whose rows
    disagree on the patient (left out as ``conflicting_rows``); its other problems go to ``scan``."""
    path = scan.folder / METADATA_NAME
    if not path.is_file():
        return {}, set()
    log = MetadataLog(scan.source)
    frame = read_metadata_csv(path, (), log)
    scan.warnings += log.warnings
    scan.skipped += [{"image_id": f"{scan.source}:{where}", "reason": "malformed_row", "detail": d}
                     for where, d in log.malformed]
    columns = {c.strip().lower(): c for c in frame.columns}
    if "filename" not in columns:
        raise ImageFolderError(
            f"{path} has no 'filename' column (found {list(frame.columns)}); its columns are "
            f"{', '.join(METADATA_COLUMNS)} (only filename is required)")
    out, conflicts = {}, set()
    for rel, rows in _rows_by_image(scan, frame, columns, listing).items():
        image_id = f"{scan.source}:{rel}"
        if len({v["patient_id"] for _, v in rows}) > 1:
            conflicts.add(rel)
            told = "; ".join(f"row {n}: patient {v['patient_id'] or '(none)'}" for n, v in rows)
            scan.skipped.append({"image_id": image_id, "reason": "conflicting_rows",
                                 "detail": f"{path} lists {rel} in {len(rows)} rows that disagree ({told}); "
                                 "the image is dropped"})
            continue
        scan.skipped += [{"image_id": f"{image_id}#row{n}", "reason": "duplicate_row",
                          "detail": f"{path} row {n} repeats {rel}"} for n, _ in rows[1:]]
        out[rel] = rows[0][1]
    return out, conflicts


def _dicom_header(path: Path) -> dict[str, object]:
    """View, age, sex and modality from a DICOM header ({} when ``path`` is no readable DICOM)."""
    if not (path.suffix.lower() in DICOM_SUFFIXES or not path.suffix):
        return {}
    import pydicom  # only needed for DICOM files

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError, KeyError):
        return {}  # decoding it later names the problem as "unreadable"
    modality = str(getattr(header, "Modality", "") or "").strip()
    return {"view": str(getattr(header, "ViewPosition", "") or "").strip(),
            "age": parse_age(getattr(header, "PatientAge", "")), "sex": parse_sex(getattr(header, "PatientSex", "")),
            "modality": "X-ray" if modality in ("", "CR", "DX") else modality}


def _table_row(given: Mapping[str, str], header: Mapping[str, object], cls: str, subfolder: str) -> dict[str, object]:
    """The columns of one image told by ``metadata.csv`` (``given``), else by its DICOM ``header``."""
    return {
        "label": cls, "finding": subfolder,
        "view": given.get("view") or header.get("view", ""), "modality": header.get("modality", "X-ray"),
        "age": parse_age(given["age"]) if given.get("age") else header.get("age", math.nan),
        "sex": parse_sex(given["sex"]) if given.get("sex") else header.get("sex", ""),
        "license": FOLDER_LICENSE,
    }


def _manifest_path(file: Path, data_dir: Path | None) -> str:
    """Relative to ``data_dir`` when inside it (the manifest stays valid when both move), else absolute."""
    resolved = file.resolve()
    if data_dir is not None and resolved.is_relative_to(data_dir.resolve()):
        return resolved.relative_to(data_dir.resolve()).as_posix()
    return resolved.as_posix()


def _patient_warning(scan: FolderScan, n_files: int, without: int, has_metadata: bool) -> str:
    if not without:
        return ""
    if not has_metadata:
        return (f"folder {scan.source} ({scan.folder}): no patient ids (no {METADATA_NAME}), each of {n_files} "
                "files counts as its own patient: a patient-grouped split cannot be guaranteed for it; add "
                f"{METADATA_NAME} with columns filename, patient_id beside the class subfolders")
    return (f"folder {scan.source} ({scan.folder}): {without} of {n_files} files have no patient id in "
            f"{METADATA_NAME}, each counts as its own patient: a patient-grouped split cannot be guaranteed for them")


def scan_folder(folder: Path, source: str, folder_classes: Mapping[str, str] | None = None,
                data_dir: Path | None = None, hash_images: bool = True) -> FolderScan:
    """Read one image folder into table rows (:data:`data_prep.schema.TABLE_COLUMNS`).

    ``path`` is relative to ``data_dir`` when the folder lies inside it, else absolute; ``image_id``
    is ``<source>:<path relative to the folder>``; ``patient_id`` is ``<source>:<metadata patient
    id>``, or ``<source>:<relative path>`` (its own patient) without one.  Images of unmapped
    subfolders, and unusable ``metadata.csv`` rows, are ``scan.skipped``.  Raises
    :class:`ImageFolderNotFoundError` for a missing folder and :class:`ImageFolderError` for an
    empty one, one without a class subfolder or image, or an unusable ``metadata.csv``.
    """
    folder = Path(folder).expanduser()
    listing, scan = _list_folder(folder, source, folder_classes or {})
    metadata, conflicts = _metadata_rows(scan, listing)
    unmapped: dict[str, int] = {}
    without_patient, from_header = 0, 0
    files: list[Path] = []
    for rel, (file, subfolder, cls) in tqdm(sorted(listing.items()), desc=f"{source}: files", unit="file"):
        image_id = f"{source}:{rel}"
        if not cls:
            unmapped[subfolder] = unmapped.get(subfolder, 0) + 1
            scan.skipped.append({"image_id": image_id, "reason": "unmapped_folder",
                                 "detail": f"subfolder {subfolder}/ of {folder} is no class; map it with "
                                 f"--map-folder {shlex.quote(subfolder + '=CLASS')} to use it"})
            continue
        if rel in conflicts:
            continue
        if not file.is_file():  # a link to nothing, or a file gone since the listing
            scan.skipped.append({"image_id": image_id, "reason": "unreadable",
                                 "detail": f"{file} is a link to a missing file, or vanished"})
            continue
        given = metadata.get(rel, {})
        header = _dicom_header(file) if not all(given.get(k) for k in ("view", "age", "sex")) else {}
        from_header += bool(header)
        without_patient += not given.get("patient_id")
        row = _table_row(given, header, cls, subfolder)
        scan.rows.append({**row, "image_id": image_id, "source": source, "path": _manifest_path(file, data_dir),
                          "patient_id": f"{source}:{given.get('patient_id') or rel}",
                          "sha256": ""})
        files.append(file)
    if hash_images:
        for row, digest in zip(scan.rows, file_digests(files)):
            row["sha256"] = digest
    n = len(scan.rows)
    patient_warning = _patient_warning(scan, n, without_patient, (folder / METADATA_NAME).is_file())
    scan.info.update({
        "images": n, "per_class": {c: sum(r["label"] == c for r in scan.rows) for c in CLASSES},
        "unmapped": unmapped, "metadata": METADATA_NAME if (folder / METADATA_NAME).is_file() else None,
        "files_without_patient_id": without_patient, "dicom_headers_read": from_header,
        "patient_warning": patient_warning,
    })
    scan.warnings += [w for w in (patient_warning, *_layout_warnings(scan)) if w]
    return scan


def _layout_warnings(scan: FolderScan) -> list[str]:
    """One line per thing of the folder that was not used: unmapped subfolders, nested ones, loose files."""
    info, out = scan.info, []
    if info["unmapped"]:
        shown = ", ".join(f"{name}/ ({n} images)" for name, n in info["unmapped"].items())
        why = "; ".join(f"{name} is not used unless mapped: {NOT_BY_DEFAULT[folder_key(name)]}"
                        for name in info["unmapped"] if folder_key(name) in NOT_BY_DEFAULT)
        out.append(f"folder {scan.source}: subfolder(s) {shown} match no class and are dropped as unmapped_folder"
                   f"{'; ' + why if why else ''}; map one with --map-folder NAME=CLASS; "
                   f"accepted names: {accepted_names()}")
    if info["not_read"]:
        shown = ", ".join(f"{name}/ ({n} files)" for name, n in info["not_read"].items())
        out.append(f"folder {scan.source}: {shown} not read: only files directly in a class subfolder or in its "
                   f"{IMAGES_SUBFOLDER}/ subfolder are images (masks/ holds lung masks in the Kaggle layout)")
    if info["loose_images"]:
        out.append(f"folder {scan.source}: {info['loose_images']} image file(s) lie outside any class subfolder "
                   "and are not used; move them into the subfolder of their class")
    return out


def load_image_folders(
    folders: Sequence[Path | str], folder_classes: Mapping[str, str] | None = None,
    data_dir: Path | None = None, hash_images: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, object]], list[str]]:
    """Read every image folder; return their table rows (sorted by ``image_id``), the skipped
    entries (:data:`DROP_COLUMNS`), each folder's summary entry by source name, and the warnings.

    Raises what :func:`scan_folder` raises, and :class:`ImageFolderError` when a folder is given
    twice or a ``folder_classes`` name is no subfolder of any folder.
    """
    paths = [Path(f).expanduser() for f in folders]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise ImageFolderError(f"image folder {p} is given twice ({seen[key]}); name each folder once")
        seen[key] = p
    scans = [scan_folder(p, name, folder_classes, data_dir, hash_images) for p, name in zip(paths, source_names(paths))]
    subfolders = {folder_key(s) for scan in scans for s in scan.info["subfolders"]}
    unused = [name for name in (folder_classes or {}) if folder_key(name) not in subfolders]
    if unused:
        found = sorted({s for scan in scans for s in scan.info["subfolders"]})
        raise ImageFolderError(f"folder_classes names {unused} but no image folder has such a subfolder "
                               f"(found: {', '.join(found)}); check the spelling in --map-folder NAME=CLASS")
    rows = pd.DataFrame([r for s in scans for r in s.rows], columns=list(TABLE_COLUMNS))
    rows = rows.sort_values("image_id", ignore_index=True).astype({"age": float})
    skipped = pd.DataFrame([r for s in scans for r in s.skipped], columns=list(DROP_COLUMNS))
    return rows, skipped, {s.source: s.info for s in scans}, [w for s in scans for w in s.warnings]


def folder_table(summary: Mapping[str, object]) -> pd.DataFrame:
    """The image folders of a curation ``summary`` as a table for reading: one row per folder
    with its source name, path, images per class, unmapped images and how patients were found."""
    rows = []
    for source, info in dict(summary.get("image_folders", {})).items():
        rows.append({"source": source, "path": info["path"], **{c: info["per_class"][c] for c in CLASSES},
                     "unmapped": sum(info["unmapped"].values()),
                     "patients": "each file its own patient" if info["files_without_patient_id"] == info["images"]
                     else f"{info['metadata']} ({info['files_without_patient_id']} without id)",
                     "warning": info["patient_warning"]})
    return pd.DataFrame(rows, columns=["source", "path", *CLASSES, "unmapped", "patients", "warning"])
