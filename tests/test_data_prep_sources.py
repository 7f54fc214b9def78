"""The source adapters on the real mirror (and on a generated RSNA fixture in its real layout)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_prep.schema import CLASSES, TABLE_COLUMNS
from data_prep.sources import SOURCES, map_ieee8023_finding, map_nih_labels, parse_age
from data_prep.metadata import SourceFormatError, SourceNotFoundError
from data_prep.table import load_table


@pytest.fixture(scope="module")
def mirror(data_dir: Path) -> tuple[pd.DataFrame, object]:
    return load_table(data_dir)


def test_table_has_schema_columns_and_namespaced_ids(mirror) -> None:
    table, _ = mirror
    assert tuple(table.columns) == TABLE_COLUMNS
    assert table["image_id"].is_unique
    assert (table["image_id"] == table["source"] + ":" + table["path"]).all()
    assert (table["patient_id"].str.split(":").str[0] == table["source"]).all()
    assert set(table["label"]) <= set(CLASSES) | {""}
    assert not table["path"].str.contains("\\\\", regex=False).any()  # POSIX paths
    assert table["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()


def test_ieee8023_parses_real_metadata(mirror, data_dir: Path) -> None:
    table, report = mirror
    ieee = table[table["source"] == "ieee8023"]
    assert report.rows["ieee8023"] == 751
    # 751 rows - 35 absent images/volumes - 10 rows listing 5 images under two patients each
    assert report.images["ieee8023"] == 706
    assert set(ieee["modality"]) == {"X-ray", "CT"}
    assert {"PA", "AP", "AP Supine", "L"} <= set(ieee["view"])
    assert (ieee.loc[ieee["finding"] == "COVID-19, ARDS", "label"] == "covid").all()
    assert (ieee.loc[ieee["finding"] == "todo", "label"] == "").all()
    assert (ieee.loc[ieee["finding"] == "Streptococcus", "label"] == "pneumonia").all()
    assert ieee["age"].isna().any() and ieee["age"].max() <= 120


def test_ieee8023_finding_mapping_handles_both_schemas() -> None:
    assert map_ieee8023_finding("Pneumonia/Viral/COVID-19") == "covid"
    assert map_ieee8023_finding("COVID-19, ARDS") == "covid"
    assert map_ieee8023_finding("Pneumonia/Bacterial/Streptococcus") == "pneumonia"
    assert map_ieee8023_finding("SARS") == "pneumonia"
    assert map_ieee8023_finding("No Finding") == "normal"
    for unmapped in ("todo", "Unknown", "ARDS", "Tuberculosis", ""):
        assert map_ieee8023_finding(unmapped) == ""


def test_figure1_latin1_metadata_and_name_quirk_resolve(mirror, data_dir: Path) -> None:
    table, report = mirror
    fig = table[table["source"] == "figure1"].set_index("image_id")
    assert report.rows["figure1"] == report.images["figure1"] == 55
    # COVID-00003a / COVID-00003b are two films of patient COVID-00003.
    film_a = fig.loc["figure1:Figure1-COVID-chestxray-dataset/images/COVID-00003a.jpg"]
    film_b = fig.loc["figure1:Figure1-COVID-chestxray-dataset/images/COVID-00003b.jpg"]
    assert film_a["patient_id"] == film_b["patient_id"] == "figure1:COVID-00003"
    assert "figure1:Figure1-COVID-chestxray-dataset/images/COVID-00015a.png" in fig.index  # png, not jpg
    assert (data_dir / film_a["path"]).is_file()
    assert fig.loc["figure1:Figure1-COVID-chestxray-dataset/images/COVID-00002.jpg", "age"] == 50  # "50+"
    assert fig["label"].value_counts().to_dict() == {"covid": 35, "": 15, "normal": 3, "pneumonia": 2}


def test_actualmed_labels_by_finding_and_reports_missing_images(mirror) -> None:
    table, report = mirror
    am = table[table["source"] == "actualmed"]
    assert am["label"].value_counts().to_dict() == {"covid": 26, "normal": 18, "": 10}
    assert (am.loc[am["label"] == "", "finding"] == "").all()  # blank finding = inconclusive
    missing = report.skipped[report.skipped["reason"] == "missing_image"]
    assert missing["image_id"].str.startswith("actualmed:").sum() == 238 - 54


def test_nih_labels_and_ages(mirror) -> None:
    table, _ = mirror
    nih = table[table["source"] == "nih"]
    assert nih["label"].value_counts().to_dict() == {"normal": 500, "pneumonia": 500}
    assert (nih["age"] < 18).sum() == 72 + 23
    assert map_nih_labels("Edema|Pneumonia") == "pneumonia"
    assert map_nih_labels("No Finding") == "normal"
    assert map_nih_labels("Effusion") == ""


def test_missing_images_are_reported_with_examples(mirror) -> None:
    table, report = mirror
    missing = report.skipped[report.skipped["reason"] == "missing_image"]
    assert len(missing) == 219
    assert "covid-chestxray-dataset/volumes/" in " ".join(missing["detail"])
    assert not table["image_id"].isin(missing["image_id"]).any()
    text = str(report)
    assert "skipped 219 row(s), missing_image" in text and "absent (skipped): rsna" in text


@pytest.mark.parametrize("raw,age", [("65", 65.0), ("50+", 50.0), ("mid 50s", 50.0), ("058Y", 58.0), ("", math.nan), ("413", math.nan)])
def test_parse_age(raw: str, age: float) -> None:
    assert parse_age(raw) == age or (math.isnan(age) and math.isnan(parse_age(raw)))


def _write_dicom(path: Path, age: str, sex: str, view: str, seed: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PatientAge, ds.PatientSex, ds.ViewPosition = "CR", age, sex, view
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 1, 8, 8, 7
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_rsna(root: Path) -> Path:
    """A tiny RSNA Pneumonia Detection Challenge folder in the real layout (DICOMs + both CSVs)."""
    folder = root / "rsna-pneumonia-detection-challenge"
    images = folder / "stage_2_train_images"
    images.mkdir(parents=True)
    cases = [("p-normal", "Normal", "45", 0), ("p-opacity", "Lung Opacity", "61", 2),
             ("p-other", "No Lung Opacity / Not Normal", "30", 0), ("p-child", "Normal", "09", 0)]
    info, labels = [], []
    for i, (pid, cls, age, boxes) in enumerate(cases):
        _write_dicom(images / f"{pid}.dcm", age, "F" if i % 2 else "M", "PA", seed=i)
        for _ in range(max(boxes, 1)):  # one row per box upstream
            info.append({"patientId": pid, "class": cls})
            labels.append({"patientId": pid, "x": "", "y": "", "width": "", "height": "", "Target": int(boxes > 0)})
    info.append({"patientId": "p-absent", "class": "Normal"})
    pd.DataFrame(info).to_csv(folder / "stage_2_detailed_class_info.csv", index=False)
    pd.DataFrame(labels).to_csv(folder / "stage_2_train_labels.csv", index=False)
    return folder


# RSNA's real headers store PatientAge as plain digits ("51"), which pydicom flags as a non-standard AS value.
@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_rsna_adapter_reads_dicom_layout(tmp_path: Path) -> None:
    make_rsna(tmp_path)
    table, report = load_table(tmp_path, sources=["rsna"])
    assert len(table) == 4  # one row per image although "p-opacity" has two box rows
    by_id = table.set_index("patient_id")
    assert by_id.loc["rsna:p-opacity", "label"] == "pneumonia"
    assert by_id.loc["rsna:p-normal", "label"] == "normal"
    assert by_id.loc["rsna:p-other", "label"] == ""
    assert by_id.loc["rsna:p-child", "age"] == 9
    assert by_id.loc["rsna:p-normal", "view"] == "PA" and by_id.loc["rsna:p-normal", "modality"] == "X-ray"
    assert report.skipped["detail"].str.contains("p-absent.dcm").any()


def test_wrong_directory_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        load_table(tmp_path / "no-such-folder")
    with pytest.raises(SourceNotFoundError, match=str(tmp_path)):
        load_table(tmp_path)  # exists but holds no source
    with pytest.raises(SourceNotFoundError, match="Figure1-COVID-chestxray-dataset"):
        load_table(tmp_path, sources=["figure1"])
    with pytest.raises(KeyError, match="known sources"):
        load_table(tmp_path, sources=["kaggle"])


def test_malformed_metadata_names_file_and_columns(tmp_path: Path) -> None:
    folder = tmp_path / SOURCES["actualmed"].folders[0]
    folder.mkdir()
    (folder / "metadata.csv").write_text("patientid,finding\nANON1,COVID-19\n")
    with pytest.raises(SourceFormatError, match=r"metadata\.csv lacks column\(s\).*imagename"):
        load_table(tmp_path, sources=["actualmed"])


def test_explicit_subset_and_no_hashing(data_dir: Path) -> None:
    table, report = load_table(data_dir, sources=["figure1"], hash_images=False)
    assert report.loaded == ["figure1"] and set(table["source"]) == {"figure1"}
    assert (table["sha256"] == "").all()
