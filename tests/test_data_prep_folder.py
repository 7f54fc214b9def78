"""The user's own image folders as a source: class subfolders, metadata.csv, copies of public films."""

from __future__ import annotations

import argparse
import re
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_prep import command, copies, folders
from data_prep.curate import build
from data_prep.errors import run_reporting
from data_prep.fingerprint import phash
from data_prep.images import load_gray
from data_prep.recipe import CurationParams, CurationSettingError

IEEE, NIH = "covid-chestxray-dataset", "nih-cxr14-subset"
N_COPIES = 12  # re-saved copies per class
N_NOVEL = 4  # films of the mirror left out of the small data folder, per class


def _resave(src: Path, dst: Path, quality: int = 70, scale: float = 0.8) -> None:
    """``src`` as a re-posted copy: 0.8x the size, JPEG at quality 70."""
    img = np.asarray(load_gray(src))
    small = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(dst), small, [cv2.IMWRITE_JPEG_QUALITY, quality])


def _synthetic(dst: Path, seed: int, size: int = 256) -> None:
    """A smooth random grey image: no film of any source."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), sigmaX=12)
    img = cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(dst), img)


def _write_dicom(pixels: np.ndarray, path: Path, **header: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in {"Modality": "CR", **header}.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _small_mirror(data_dir: Path, out: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """A data folder with some real mirror films: ieee8023 (its pinned metadata, a few adult PA
    COVID-19 X-rays of distinct patients) and NIH (adult normals and pneumonias).  Returns the
    ieee8023 and NIH normal files copied, then ieee8023 and NIH normal files left out."""
    meta = pd.read_csv(data_dir / IEEE / "metadata.csv", dtype=str)
    meta = meta[(meta["finding"].str.contains("COVID-19", na=False)) & (meta["view"] == "PA")
                & (meta["modality"] == "X-ray") & (pd.to_numeric(meta["age"], errors="coerce") >= 18)]
    meta = meta[[(data_dir / IEEE / "images" / f).is_file() for f in meta["filename"]]].drop_duplicates("patientid")
    ieee_in, ieee_out = list(meta["filename"][:N_COPIES + 8]), list(meta["filename"][N_COPIES + 8:N_COPIES + 8 + N_NOVEL])
    (out / IEEE / "images").mkdir(parents=True)
    shutil.copy(data_dir / IEEE / "metadata.csv", out / IEEE / "metadata.csv")
    for name in ieee_in:
        shutil.copy(data_dir / IEEE / "images" / name, out / IEEE / "images" / name)
    nih = pd.read_csv(data_dir / NIH / "Data_Entry_2017_v2020.csv", dtype=str)
    adults = nih[nih["Patient Age"].astype(int) >= 18]
    normals = adults[adults["Finding Labels"] == "No Finding"].drop_duplicates("Patient ID")
    pneumonias = adults[adults["Finding Labels"].str.contains("Pneumonia")].drop_duplicates("Patient ID").head(26)
    chosen = pd.concat([normals.head(N_COPIES + 8), pneumonias])
    (out / NIH / "images").mkdir(parents=True)
    chosen.to_csv(out / NIH / "Data_Entry_2017_v2020.csv", index=False)
    for name in chosen["Image Index"]:
        shutil.copy(data_dir / NIH / "images" / name, out / NIH / "images" / name)
    left = normals[~normals["Patient ID"].isin(chosen["Patient ID"])]
    return ieee_in, list(normals["Image Index"].head(N_COPIES + 8)), ieee_out, list(left["Image Index"].head(N_NOVEL))


@pytest.fixture(scope="module")
def copies_run(data_dir: Path, tmp_path_factory):
    """One curation of the small mirror with two image folders: re-saved copies of its films
    and films it lacks under alias names (no metadata.csv), and a folder whose metadata.csv puts
    a copy and a new film under one patient."""
    root = tmp_path_factory.mktemp("folders")
    mirror = root / "data"
    ieee_in, nih_in, ieee_out, nih_out = _small_mirror(data_dir, mirror)
    mine = root / "kaggle_like"
    copied = {}  # folder-relative path of each copy -> the original's image id
    for k, name in enumerate(ieee_in[:N_COPIES]):
        _resave(mirror / IEEE / "images" / name, mine / "COVID-19" / f"COVID-{k}.jpg")
        copied[f"COVID-19/COVID-{k}.jpg"] = f"ieee8023:{IEEE}/images/{name}"
    for k, name in enumerate(nih_in[:N_COPIES]):
        _resave(mirror / NIH / "images" / name, mine / "NORMAL" / f"Normal-{k}.jpeg")
        copied[f"NORMAL/Normal-{k}.jpeg"] = f"nih:{NIH}/images/{name}"
    # A DICOM re-encode of a public film is a copy too.
    film = np.asarray(load_gray(mirror / NIH / "images" / nih_in[N_COPIES]))
    _write_dicom(cv2.resize(film, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA), mine / "NORMAL" / "Normal-dcm.dcm")
    copied["NORMAL/Normal-dcm.dcm"] = f"nih:{NIH}/images/{nih_in[N_COPIES]}"
    novel = []
    for k, name in enumerate(ieee_out):
        shutil.copy(data_dir / IEEE / "images" / name, mine / "COVID-19" / f"new-{k}{Path(name).suffix}")
        novel.append(f"COVID-19/new-{k}{Path(name).suffix}")
    for k, name in enumerate(nih_out):
        shutil.copy(data_dir / NIH / "images" / name, mine / "NORMAL" / f"new-{k}.png")
        novel.append(f"NORMAL/new-{k}.png")
    for k in range(2):
        _synthetic(mine / "NORMAL" / f"synthetic-{k}.png", seed=k)
        novel.append(f"NORMAL/synthetic-{k}.png")
    grouped = root / "grouped"
    _resave(mirror / IEEE / "images" / ieee_in[N_COPIES], grouped / "covid" / "p1-copy.jpg")
    _synthetic(grouped / "covid" / "p1-new.png", seed=7)
    pd.DataFrame({"filename": ["p1-copy.jpg", "covid/p1-new.png"], "patient_id": ["p1", "p1"]}).to_csv(
        grouped / "metadata.csv", index=False)
    params = CurationParams(per_class=1000, balance="down", image_folders=(str(mine), str(grouped)), seed=0)
    result = build(mirror, root / "out", params)
    return result, copied, novel, ieee_in[N_COPIES], mirror


def test_resaved_copies_in_a_folder_are_found_and_never_cross_splits(copies_run):
    result, copied, novel, _, mirror = copies_run
    source = "folder-kaggle_like"
    dropped = result.dropped.set_index("image_id")
    found = [rel for rel in copied if str(dropped["reason"].get(f"{source}:{rel}", "")).startswith("duplicate")]
    missed = sorted(set(copied) - set(found))
    how = dropped.loc[[f"{source}:{rel}" for rel in found], "reason"].value_counts().to_dict()
    duplicates = result.duplicates
    links = duplicates[duplicates["image_a"].str.startswith(source + ":") & (duplicates["evidence"] == "hash")]
    print(f"re-saved copies found {len(found)} of {len(copied)} ({how}, hash distances "
          f"{links['distance'].min()}-{links['distance'].max()} bits); missed {len(missed)}: {missed}")
    assert len(found) >= len(copied) - 1 and not [m for m in missed if m.endswith(".dcm")]
    # The public original is kept and the folder's copy dropped, the copy's patient joined to it.
    assert not any(str(dropped["reason"].get(o, "")).startswith("duplicate") for o in copied.values())
    joined = {p for m in result.summary["patient_merges"]["merges"] for p in m["patients"]}
    assert {f"{source}:{rel}" for rel in found} <= joined
    new_ids = [f"{source}:{rel}" for rel in novel]
    assert not [i for i in new_ids if str(dropped["reason"].get(i, "")).startswith("duplicate")]
    manifest = result.manifest.set_index("image_id")
    for rel, original in copied.items():
        copy = f"{source}:{rel}"
        if copy in manifest.index and original in manifest.index:  # a missed copy still may not cross
            assert manifest.at[copy, "split"] == manifest.at[original, "split"], rel
    assert source in result.summary["available_by_source"]
    assert set(manifest.loc[manifest["source"] == source, "path"].map(lambda p: Path(p).is_absolute())) <= {True}
    # The pair pictures of notebook 01 find a folder's image by the pair's path, not its id.
    pairs = duplicates[duplicates["image_a"].str.startswith(source) | duplicates["image_b"].str.startswith(source)].head(2)
    images, _ = copies.pair_thumbnails(pairs.assign(decision="one film: copy dropped"), mirror)
    assert len(images) == 4 and all(im.ndim == 2 for im in images)


def test_metadata_patient_ids_group_a_folder_and_copies_join_them(copies_run):
    result, _, _, original_name, _ = copies_run
    source = "folder-grouped"
    dropped = result.dropped.set_index("image_id")
    assert str(dropped.at[f"{source}:covid/p1-copy.jpg", "reason"]).startswith("duplicate")
    kept = result.manifest.set_index("image_id")
    original = f"ieee8023:{IEEE}/images/{original_name}"
    merged = next(m for m in result.summary["patient_merges"]["merges"] if f"{source}:p1" in m["patients"])
    assert merged["into"].startswith("ieee8023:")  # the public patient's id is kept
    # 25 covid films are available and 26 of each other class, so balancing keeps every covid film.
    assert result.summary["per_class"] == result.summary["available_per_class"]["covid"] == 25
    # The patient's other film follows the original's patient, and so its split.
    assert kept.at[f"{source}:covid/p1-new.png", "patient_id"] == merged["into"] == kept.at[original, "patient_id"]
    assert kept.at[f"{source}:covid/p1-new.png", "split"] == kept.at[original, "split"]
    info = result.summary["image_folders"]
    assert info[source]["metadata"] == "metadata.csv" and info[source]["patient_warning"] == ""
    assert info["folder-kaggle_like"]["files_without_patient_id"] == info["folder-kaggle_like"]["images"]
    warning = info["folder-kaggle_like"]["patient_warning"]
    assert "no patient ids" in warning and "cannot be guaranteed" in warning
    assert warning in result.summary["warnings"]


def _images(folder: Path, names: dict[str, int]) -> None:
    for sub, n in names.items():
        for k in range(n):
            _synthetic(folder / sub / f"{k}.png", seed=zlib.crc32(f"{sub}/{k}".encode()))


def test_class_aliases_unknown_subfolders_and_mapping(tmp_path: Path):
    for cls, names in folders.CLASS_ALIASES.items():
        assert {folders.class_of(n) for n in names} | {folders.class_of(n.upper()) for n in names} == {cls}
    assert folders.class_of("Lung_Opacity") == ""
    assert folders.class_of("lung opacity", {"Lung_Opacity": "pneumonia"}) == "pneumonia"
    mine = tmp_path / "COVID-19_Radiography_Dataset"
    _images(mine, {"covid_19": 2, "No Finding": 2, "Viral Pneumonia": 1, "Lung_Opacity": 3, "Other stuff": 1})
    _images(mine / "covid_19", {"masks": 2})  # the Kaggle layout's lung masks: not images of the class
    rows, skipped, info, warnings = folders.load_image_folders([mine])
    source = "folder-covid_19_radiography_dataset"
    assert rows["label"].value_counts().to_dict() == {"covid": 2, "normal": 2, "pneumonia": 1}
    assert set(rows["source"]) == {source} and set(rows["finding"]) == {"covid_19", "No Finding", "Viral Pneumonia"}
    assert info[source]["unmapped"] == {"Lung_Opacity": 3, "Other stuff": 1}
    assert (skipped["reason"] == "unmapped_folder").sum() == 4  # every unused image counted
    assert info[source]["not_read"] == {"covid_19/masks": 2}
    assert any("Lung_Opacity/ (3 images)" in w and "--map-folder" in w for w in warnings)
    rows, skipped, info, _ = folders.load_image_folders([mine], {"Lung_Opacity": "pneumonia"})
    assert (rows["label"] == "pneumonia").sum() == 4 and info[source]["unmapped"] == {"Other stuff": 1}
    with pytest.raises(folders.ImageFolderError, match="names \\['Lung_Opacty'\\]"):
        folders.load_image_folders([mine], {"Lung_Opacty": "pneumonia"})
    with pytest.raises(CurationSettingError, match="folder_classes"):
        CurationParams(folder_classes={"Lung_Opacity": "opacity"})


def test_metadata_csv_groups_files_and_counts_what_it_cannot_use(tmp_path: Path):
    mine = tmp_path / "clinic"
    _images(mine, {"COVID": 3, "Normal": 2})
    pd.DataFrame({"filename": ["0.png", "COVID/1.png", "Normal/0.png", "gone.png", "1.png"],
                  "patient_id": ["a", "a", "b", "c", "a"], "age": ["40", "41", "12", "", ""],
                  "view": ["PA", "PA", "AP", "", ""]}).to_csv(mine / "metadata.csv", index=False)
    with pytest.raises(folders.ImageFolderError, match="matches 2 images"):  # 0.png is in COVID/ and Normal/
        folders.load_image_folders([mine])
    pd.DataFrame({"filename": ["COVID/0.png", "COVID/1.png", "Normal/0.png", "gone.png", "COVID/1.png"],
                  "patient_id": ["a", "a", "b", "c", "a"], "age": ["40", "41", "12", "", ""],
                  "view": ["PA", "PA", "AP", "", ""]}).to_csv(mine / "metadata.csv", index=False)
    rows, skipped, info, warnings = folders.load_image_folders([mine])
    by = rows.set_index("image_id")
    assert by.at["folder-clinic:COVID/0.png", "patient_id"] == "folder-clinic:a"
    assert by.at["folder-clinic:COVID/1.png", "patient_id"] == "folder-clinic:a"
    assert by.at["folder-clinic:Normal/0.png", "age"] == 12 and by.at["folder-clinic:Normal/0.png", "view"] == "AP"
    assert by.at["folder-clinic:COVID/2.png", "patient_id"] == "folder-clinic:COVID/2.png"  # no row: its own patient
    assert skipped.set_index("image_id")["reason"].to_dict() == {
        "folder-clinic:metadata.csv#row4": "missing_image", "folder-clinic:COVID/1.png#row5": "duplicate_row"}
    assert info["folder-clinic"]["files_without_patient_id"] == 2
    assert any("2 of 5 files have no patient id" in w for w in warnings)
    (mine / "metadata.csv").unlink()
    rows, _, info, warnings = folders.load_image_folders([mine])
    assert rows["patient_id"].nunique() == 5
    assert info["folder-clinic"]["patient_warning"].startswith(
        f"folder folder-clinic ({mine}): no patient ids (no metadata.csv), each of 5 files counts as its own patient")


def test_a_folder_alone_is_curated_and_children_are_filtered(tmp_path: Path):
    mine = tmp_path / "clinic"
    _images(mine, {"COVID": 4, "Pneumonia": 4, "Normal": 5})
    pd.DataFrame({"filename": ["Normal/4.png"], "age": ["9"]}).to_csv(mine / "metadata.csv", index=False)
    (tmp_path / "empty_data").mkdir()
    result = build(tmp_path / "empty_data", tmp_path / "out", CurationParams(per_class=4, image_folders=str(mine)))
    assert len(result.manifest) == 12 and set(result.manifest["source"]) == {"folder-clinic"}
    assert result.dropped.set_index("image_id").at["folder-clinic:Normal/4.png", "reason"] == "age"
    assert result.summary["paper_recipe"]["taken_per_class"] == {"covid": 0, "pneumonia": 0, "normal": 0}
    assert any("cannot be guaranteed" in w for w in result.summary["warnings"])
    table = folders.folder_table(result.summary)
    assert table.loc[0, "source"] == "folder-clinic" and table.loc[0, "normal"] == 5


def _workbook(argv: list[str]) -> int:
    """``workbook curate ...`` as ``nbhelpers.tools.cli.main`` runs it (the same option and run
    functions, errors reported by ``run_reporting``), without importing the training stack."""
    assert argv[0] == "curate"
    parser = argparse.ArgumentParser(prog="workbook curate")
    command.add_curate_arguments(parser)
    return run_reporting(command.run_curate_command, parser.parse_args(argv[1:]))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "image folder .*missing does not exist"),
    (lambda p: p.mkdir(), "image folder .*missing is empty"),
    (lambda p: _images(p, {"foo": 1, "bar": 1}),
     r"has no class subfolder \(found: bar/, foo/\); accepted names: covid: COVID"),
    (lambda p: (p / "COVID").mkdir(parents=True), "hold no image files"),
])
def test_bad_folders_stop_the_command_with_one_line(tmp_path: Path, capsys, make, message):
    make(tmp_path / "missing")
    (tmp_path / "data").mkdir()
    argv = ["curate", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--image-folder", str(tmp_path / "missing")]
    assert _workbook(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_map_folder_option_is_checked(tmp_path: Path, capsys):
    (tmp_path / "data").mkdir()
    argv = ["curate", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--image-folder", str(tmp_path), "--map-folder", "Lung_Opacity:pneumonia"]
    assert _workbook(argv) == 2
    assert "expected NAME=CLASS" in capsys.readouterr().err


def test_dicom_files_in_a_folder_decode_and_give_their_header(tmp_path: Path):
    mine = tmp_path / "pacs"
    pixels = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (160, 1))
    _write_dicom(pixels, mine / "Normal" / "film.dcm", PatientAge="055Y", PatientSex="F", ViewPosition="AP")
    _write_dicom(pixels[::-1].copy(), mine / "Normal" / "export0001", PatientAge="061Y")  # no suffix: sniffed
    rows, skipped, info, _ = folders.load_image_folders([mine])
    by = rows.set_index("image_id")
    film = by.loc["folder-pacs:Normal/film.dcm"]
    assert (film["view"], film["age"], film["sex"], film["modality"]) == ("AP", 55.0, "F", "X-ray")
    assert by.at["folder-pacs:Normal/export0001", "age"] == 61
    assert info["folder-pacs"]["dicom_headers_read"] == 2 and skipped.empty
    gray = load_gray(Path(film["path"]))
    assert gray.shape == (160, 128) and gray.dtype == np.uint8 and gray[0, -1] > gray[0, 0]
    assert phash(Path(film["path"])).shape == (256,)


def test_a_deeper_subfolder_and_a_dangling_link_are_counted_not_dropped_in_silence(tmp_path: Path):
    mine = tmp_path / "mine"
    _images(mine, {"COVID/images": 2, "COVID/images/sub": 1, "Normal": 2})
    (mine / "Normal" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a link to nothing
    (mine / "Normal" / "gone_dicom").symlink_to(tmp_path / "nowhere")  # no suffix: sniffed, not opened
    rows, skipped, info, warnings = folders.load_image_folders([mine])
    source = "folder-mine"
    assert rows["label"].value_counts().to_dict() == {"covid": 2, "normal": 2}
    assert info[source]["not_read"] == {"COVID/images/sub": 1}
    assert any("COVID/images/sub/ (1 files)" in w for w in warnings)
    broken = skipped[skipped["reason"] == "unreadable"]
    assert list(broken["image_id"]) == [f"{source}:Normal/gone.png"] and "missing file" in broken["detail"].iloc[0]
