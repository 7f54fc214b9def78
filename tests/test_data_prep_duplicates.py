"""Copies on real mirror files: found, dropped, their patients joined, never in two splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_prep import copies
from data_prep.recipe import CurationParams
from data_prep.curate import curate
from data_prep.table import load_table
from data_prep.split import LeakError, check_no_leak

IEEE = "ieee8023:covid-chestxray-dataset/images/"


@pytest.fixture(scope="module")
def paper(data_dir: Path):
    table, report = load_table(data_dir)
    return curate(table, CurationParams(balance="down"), data_dir=data_dir, report=report)


def test_the_captioned_re_post_is_found_and_its_patients_are_joined(paper):
    # extubation-1.jpg (patient 196) is AR-1.jpg (patient 192) with "day 1" burnt in: 44 bits apart,
    # beyond the 32-bit hash threshold, so only the keypoint check can find it.
    pairs = paper.duplicates.set_index(["image_a", "image_b"])
    hit = pairs.loc[(IEEE + "AR-1.jpg", IEEE + "extubation-1.jpg")]
    assert hit["evidence"] == "keypoints" and 32 < hit["distance"] <= copies.BAND_HIGH
    assert hit["inliers"] >= copies.MIN_INLIERS
    dropped = paper.dropped.set_index("image_id")
    assert dropped.loc[IEEE + "extubation-1.jpg", "reason"] == "duplicate_keypoints"
    merges = {tuple(m["patients"]) for m in paper.summary["patient_merges"]["merges"]}
    assert ("ieee8023:192", "ieee8023:196") in merges
    manifest = paper.manifest.set_index("image_id")
    assert manifest.loc[IEEE + "extubation-13.jpg", "patient_id"] == "ieee8023:192"  # the other film of 196
    if IEEE + "AR-1.jpg" in manifest.index:
        assert manifest.loc[IEEE + "AR-1.jpg", "split"] == manifest.loc[IEEE + "extubation-13.jpg", "split"]


def test_every_grey_band_pair_is_decided_and_different_films_stay(paper):
    band = paper.duplicates[paper.duplicates["evidence"].isin(["keypoints", "keypoints_same_patient", "different_film"])]
    assert len(band) == paper.summary["patient_merges"]["band_pairs"] > 100
    assert band["distance"].between(33, copies.BAND_HIGH).all()
    different = band[~band["same_film"]]
    assert (different.loc[different["evidence"] == "different_film", "inliers"] < copies.MIN_INLIERS).all()
    alike = band[band["evidence"] == "keypoints_same_patient"]  # one patient's look-alike films: both kept
    assert (alike["patient_a"] == alike["patient_b"]).all()
    assert not set(alike["image_b"]) & set(paper.dropped["image_id"])
    kept = set(paper.manifest["image_id"]) | set(paper.dropped["image_id"])
    assert set(different["image_a"]) <= kept


def test_cross_source_copies_join_patients(paper):
    merges = paper.summary["patient_merges"]
    assert merges["across_sources"] >= 1  # Figure1 COVID-00022 is an ieee8023 film
    joined = {p for m in merges["merges"] for p in m["patients"]}
    assert {"ieee8023:36", "figure1:COVID-00022"} <= joined


def _copy_image(src: Path, dst: Path, quality: int = 70, scale: float = 0.8) -> None:
    img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    small = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), small, [cv2.IMWRITE_JPEG_QUALITY, quality])


def test_leak_check_fails_on_a_near_copy_in_another_split(tmp_path: Path, data_dir: Path):
    src = data_dir / "nih-cxr14-subset" / "images" / "00000013_005.png"
    if not src.is_file():
        src = sorted((data_dir / "nih-cxr14-subset" / "images").glob("*.png"))[0]
    shutil.copy(src, tmp_path / "a.png")
    _copy_image(src, tmp_path / "copy.jpg")
    other = sorted((data_dir / "nih-cxr14-subset" / "images").glob("*.png"))[-1]
    shutil.copy(other, tmp_path / "b.png")
    manifest = pd.DataFrame({"image_id": ["x:a", "y:copy", "x:b"], "path": ["a.png", "copy.jpg", "b.png"],
                             "patient_id": ["x:1", "y:9", "x:2"], "label": ["normal"] * 3,
                             "split": ["train", "test", "test"]})
    check_no_leak(manifest)  # ids and bytes alone see nothing
    with pytest.raises(LeakError, match=r"near-identical images.*x:a \(train\) ~ y:copy \(test\)"):
        check_no_leak(manifest, data_dir=tmp_path)
    check_no_leak(manifest.assign(split=["train", "train", "test"]), data_dir=tmp_path)
    # The same check from the pairs curation already found (a superset's, with a film not in the manifest).
    near = pd.DataFrame({"image_a": ["x:a", "x:gone"], "image_b": ["y:copy", "x:b"], "distance": [6, 3]})
    with pytest.raises(LeakError, match=r"x:a \(train\) ~ y:copy \(test\), 6 bits"):
        check_no_leak(manifest, data_dir=tmp_path, near=near)
    check_no_leak(manifest.assign(split=["train", "train", "test"]), data_dir=tmp_path, near=near)
    check_no_leak(manifest, data_dir=tmp_path, near=near.assign(distance=[40, 3]))  # beyond max_distance


def _dicom_from(png: Path, path: Path) -> None:
    pixels = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    pixels = cv2.resize(pixels, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PatientAge, ds.PatientSex, ds.ViewPosition = "CR", "55", "M", "PA"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_rsna_images_that_are_nih_images_are_linked_as_one_patient(tmp_path: Path, data_dir: Path):
    # RSNA's films were drawn from ChestX-ray14 and re-encoded as DICOM under new ids.
    nih_src = data_dir / "nih-cxr14-subset"
    meta = pd.read_csv(nih_src / "Data_Entry_2017_v2020.csv", dtype=str)
    adults = meta[meta["Patient Age"].astype(int) >= 18]
    normals = adults[adults["Finding Labels"] == "No Finding"].head(6)
    pneumonias = adults[adults["Finding Labels"].str.contains("Pneumonia")].head(3)
    nih = tmp_path / "nih-cxr14-subset"
    (nih / "images").mkdir(parents=True)
    pd.concat([normals, pneumonias]).to_csv(nih / "Data_Entry_2017_v2020.csv", index=False)
    for name in pd.concat([normals, pneumonias])["Image Index"]:
        shutil.copy(nih_src / "images" / name, nih / "images" / name)
    shutil.copytree(data_dir / "Figure1-COVID-chestxray-dataset", tmp_path / "Figure1-COVID-chestxray-dataset")
    rsna = tmp_path / "rsna-pneumonia-detection-challenge"
    (rsna / "stage_2_train_images").mkdir(parents=True)
    reposted = list(normals["Image Index"][:2])
    rows = []
    for k, name in enumerate(reposted):
        pid = f"rsna-{k}"
        _dicom_from(nih / "images" / name, rsna / "stage_2_train_images" / f"{pid}.dcm")
        rows.append({"patientId": pid, "class": "Normal"})
    pd.DataFrame(rows).to_csv(rsna / "stage_2_detailed_class_info.csv", index=False)
    pd.DataFrame([{"patientId": r["patientId"], "Target": 0} for r in rows]).to_csv(
        rsna / "stage_2_train_labels.csv", index=False)
    table, report = load_table(tmp_path)
    result = curate(table, CurationParams(per_class=3, balance="down"), data_dir=tmp_path, report=report)
    merges = result.summary["patient_merges"]
    assert merges["nih_rsna"] == 2
    for k, name in enumerate(reposted):
        pid = normals.loc[normals["Image Index"] == name, "Patient ID"].iloc[0]
        group = next(m for m in merges["merges"] if f"rsna:rsna-{k}" in m["patients"])
        assert f"nih:{pid}" in group["patients"]


def test_components_join_chains_and_leave_singles_out():
    from data_prep.dedup import _components

    assert _components(7, [(5, 3), (3, 1), (0, 6), (6, 0), (1, 5)]) == [[0, 6], [1, 3, 5]]
    assert _components(3, []) == []
