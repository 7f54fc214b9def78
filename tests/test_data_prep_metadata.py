"""Damaged metadata and outputs: unsafe paths, truncated or conflicting rows, bad encodings,
misnamed folders, too-small splits, and curation outputs that are replaced whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import data_prep.atomic as atomic
from data_prep.curate import DROP_REASONS, curate, write_outputs
from data_prep.recipe import CurationParams
from data_prep.schema import CLASSES, TABLE_COLUMNS
from data_prep.metadata import SourceFormatError, SourceNotFoundError
from data_prep.table import load_table
from nbhelpers.tools.cli import main

ACTUALMED = "Actualmed-COVID-chestxray-dataset"
IEEE = "covid-chestxray-dataset"
# Actualmed's columns: patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,
# modality,imagename,artifacts/distortion,notes (and CRLF line ends upstream).
ACTUALMED_ROW = "{pid},,M,50,{finding},,,,PA,X-ray,{image},,\r\n"


def copy_actualmed(data_dir: Path, root: Path, images: bool = True) -> Path:
    """A private copy of the real Actualmed folder (metadata and, with ``images``, its 54 images)."""
    folder = root / ACTUALMED
    folder.mkdir(parents=True)
    shutil.copy(data_dir / ACTUALMED / "metadata.csv", folder / "metadata.csv")
    if images:
        shutil.copytree(data_dir / ACTUALMED / "images", folder / "images")
    return folder


def first_image(folder: Path) -> str:
    return sorted(p.name for p in (folder / "images").iterdir())[0]


def synthetic_table(per_class: int = 6) -> pd.DataFrame:
    """A table in the load_table schema, one patient per image, for curation without image files."""
    rows = []
    for cls in CLASSES:
        for i in range(per_class):
            path = f"{ACTUALMED}/images/{cls}-{i}.png"
            rows.append({"image_id": f"actualmed:{path}", "source": "actualmed", "path": path,
                         "patient_id": f"actualmed:{cls}-{i}", "label": cls, "finding": cls, "view": "PA",
                         "modality": "X-ray", "age": 40.0, "sex": "F", "license": "test", "sha256": f"{cls}{i}"})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


NO_IMAGES = {"check_images": False, "dedup": False}


# --------------------------------------------------------------------------- paths inside the folder


def test_metadata_paths_cannot_leave_their_source_folder(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    folder = copy_actualmed(data_dir, root)
    real = first_image(folder)
    (root / "outside").mkdir()
    shutil.copy(folder / "images" / real, root / "outside" / "x.jpg")  # a real image, outside the source
    (folder / "outside").mkdir()
    shutil.copy(folder / "images" / real, folder / "outside" / "x.jpg")
    elsewhere = tmp_path / "elsewhere.png"
    shutil.copy(folder / "images" / real, elsewhere)
    (folder / "images" / "link-out.png").symlink_to(elsewhere)
    (folder / "images" / "link-in.png").symlink_to(folder / "images" / real)  # stays inside: fine
    extra = [("ESC1", "COVID-19", "../../outside/x.jpg"), ("ESC2", "COVID-19", "../outside/x.jpg"),
             ("ABS1", "No finding", "/etc/passwd"), ("LNK1", "COVID-19", "link-out.png"),
             ("LNK2", "COVID-19", "link-in.png")]
    with open(folder / "metadata.csv", "a", encoding="utf-8", newline="") as f:
        for pid, finding, image in extra:
            f.write(ACTUALMED_ROW.format(pid=pid, finding=finding, image=image))

    table, report = load_table(root)
    unsafe = report.skipped[report.skipped["reason"] == "unsafe_path"]
    details = " | ".join(unsafe["detail"])
    assert len(unsafe) == 4
    for text in ("../../outside/x.jpg", "../outside/x.jpg", "/etc/passwd", "link-out.png"):
        assert text in details
    assert "absolute" in details and "'..'" in details and "symbolic link" in details
    assert not table["path"].str.contains(r"\.\.|passwd|link-out", regex=True).any()
    assert f"{ACTUALMED}/images/link-in.png" in set(table["path"])
    assert report.images["actualmed"] == 54 + 1
    assert report.warnings == [next(w for w in report.warnings if "not the pinned version" in w)]
    assert DROP_REASONS.index("duplicate_row") < DROP_REASONS.index("unsafe_path") < DROP_REASONS.index("missing_image")


# --------------------------------------------------------------------------- truncated and ragged metadata


def test_mirror_metadata_matches_its_pins(data_dir: Path) -> None:
    _, report = load_table(data_dir, hash_images=False)
    assert report.warnings == []
    assert "malformed_row" not in set(report.skipped["reason"])


def test_metadata_cut_mid_row_is_a_warning_with_expected_and_found(data_dir: Path, tmp_path: Path) -> None:
    folder = copy_actualmed(data_dir, tmp_path, images=False)
    raw = (folder / "metadata.csv").read_bytes()
    lines = raw.split(b"\r\n")
    kept = b"\r\n".join(lines[:101]) + b"\r\n" + lines[101][:20]  # header + 100 rows + 20 bytes of row 101
    (folder / "metadata.csv").write_bytes(kept)
    _, report = load_table(tmp_path, hash_images=False)
    text = " | ".join(report.warnings)
    assert f"{ACTUALMED}/metadata.csv (actualmed) ends mid-row" in text and "no final newline" in text
    assert "is not the pinned version" in text and "100 rows, pinned 238" in text
    malformed = report.skipped[report.skipped["reason"] == "malformed_row"]
    assert len(malformed) == 1 and "cut off at the end of the file" in malformed["detail"].iloc[0]
    assert report.rows["actualmed"] == 101
    assert "warning:" in str(report)


def test_metadata_cut_inside_a_quoted_field_is_caught(data_dir: Path, tmp_path: Path) -> None:
    folder = copy_actualmed(data_dir, tmp_path, images=False)
    raw = (folder / "metadata.csv").read_bytes()
    quote = raw.index(b'"Inconclusive', len(raw) // 2)
    (folder / "metadata.csv").write_bytes(raw[: quote + 5])  # the field has 13 of 13 commas but no end
    _, report = load_table(tmp_path, hash_images=False)
    assert any("ends mid-row" in w and "inside a quoted field" in w for w in report.warnings)
    assert (report.skipped["reason"] == "malformed_row").sum() == 1


def test_rows_with_a_wrong_number_of_fields_are_skipped_not_fatal(data_dir: Path, tmp_path: Path) -> None:
    folder = copy_actualmed(data_dir, tmp_path, images=False)
    lines = (folder / "metadata.csv").read_bytes().split(b"\r\n")
    lines.insert(5, b"EXTRA,,M,50,COVID-19,,,,PA,X-ray,extra.png,,,one too many")
    lines.insert(9, b"SHORT,,M,50")
    (folder / "metadata.csv").write_bytes(b"\r\n".join(lines))
    table, report = load_table(tmp_path, hash_images=False)
    malformed = report.skipped[report.skipped["reason"] == "malformed_row"].set_index("image_id")
    assert sorted(malformed.index) == [f"actualmed:{ACTUALMED}/metadata.csv#line{n}" for n in (10, 6)]
    assert "has 14 fields, the header 13" in malformed["detail"].iloc[0] + malformed["detail"].iloc[1]
    assert any("2 row(s) have another number of fields" in w for w in report.warnings)
    assert report.rows["actualmed"] == 240
    # Row numbers in details still count the file's rows, malformed ones included.
    missing = report.skipped[report.skipped["reason"] == "missing_image"]
    assert missing["detail"].str.startswith("actualmed metadata row ").all()


def test_conflicting_rows_are_dropped_plain_repeats_kept_once(data_dir: Path, tmp_path: Path) -> None:
    folder = copy_actualmed(data_dir, tmp_path)
    meta = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
    on_disk = set(p.name for p in (folder / "images").iterdir())
    present = meta[meta["imagename"].isin(on_disk) & (meta["finding"] == "COVID-19")]
    same, clash = present.iloc[0], present.iloc[1]
    with open(folder / "metadata.csv", "a", encoding="utf-8", newline="") as f:
        f.write(ACTUALMED_ROW.format(pid=same["patientid"], finding="COVID-19", image=same["imagename"]))
        f.write(ACTUALMED_ROW.format(pid=clash["patientid"], finding="No finding", image=clash["imagename"]))
    table, report = load_table(tmp_path, sources=["actualmed"], hash_images=False)
    skipped = report.skipped.set_index("image_id")
    same_id = f"actualmed:{ACTUALMED}/images/{same['imagename']}"
    clash_id = f"actualmed:{ACTUALMED}/images/{clash['imagename']}"
    assert same_id in set(table["image_id"])
    assert skipped.loc[f"{same_id}#row239", "reason"] == "duplicate_row"
    assert clash_id not in set(table["image_id"])
    assert skipped.loc[clash_id, "reason"] == "conflicting_rows"
    assert skipped.loc[f"{clash_id}#row240", "reason"] == "conflicting_rows"
    detail = skipped.loc[clash_id, "detail"]
    assert "label covid" in detail and "label normal" in detail and "row 240" in detail


def test_mirror_images_listed_under_two_patients_are_conflicts(data_dir: Path) -> None:
    table, report = load_table(data_dir, sources=["ieee8023"], hash_images=False)
    conflicts = report.skipped[report.skipped["reason"] == "conflicting_rows"].set_index("image_id")
    image = f"ieee8023:{IEEE}/images/000001-24.jpg"
    assert image not in set(table["image_id"]) and len(conflicts) == 10
    assert "patient 285" in conflicts.loc[image, "detail"] and "patient 339" in conflicts.loc[image, "detail"]


# --------------------------------------------------------------------------- encodings and empty files


def _ieee_metadata_only(data_dir: Path, root: Path) -> Path:
    folder = root / IEEE
    folder.mkdir(parents=True)
    shutil.copy(data_dir / IEEE / "metadata.csv", folder / "metadata.csv")
    return folder / "metadata.csv"


def test_non_utf8_metadata_names_file_source_byte_and_fix(data_dir: Path, tmp_path: Path, capsys) -> None:
    path = _ieee_metadata_only(data_dir, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[123] = 0xFF
    path.write_bytes(bytes(raw))
    expected = (f"{IEEE}/metadata.csv (ieee8023) is not UTF-8 text (byte 0xff at offset 123); "
                "re-fetch it with `workbook download`")
    with pytest.raises(SourceFormatError) as err:
        load_table(tmp_path)
    assert str(err.value) == expected
    assert main(["curate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {expected}"]


def test_empty_metadata_is_one_clear_error(data_dir: Path, tmp_path: Path, capsys) -> None:
    path = _ieee_metadata_only(data_dir, tmp_path)
    path.write_bytes(b"")
    with pytest.raises(SourceFormatError, match=rf"^{IEEE}/metadata\.csv \(ieee8023\) is empty"):
        load_table(tmp_path)
    path.write_bytes(path.read_bytes() + b"\n\n")
    assert main(["curate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(ieee8023) is empty" in err[0]
    path.write_bytes((data_dir / IEEE / "metadata.csv").read_bytes().splitlines(keepends=True)[0])
    with pytest.raises(SourceFormatError, match="header line but no rows"):
        load_table(tmp_path)


def test_latin1_figure1_still_reads(data_dir: Path) -> None:
    table, report = load_table(data_dir, sources=["figure1"], hash_images=False)
    assert report.rows["figure1"] == 55 and report.warnings == []
    with pytest.raises(UnicodeDecodeError):
        (data_dir / "Figure1-COVID-chestxray-dataset/metadata.csv").read_bytes().decode("utf-8")


# --------------------------------------------------------------------------- folders


def test_empty_data_folder_names_every_source_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError) as err:
        load_table(tmp_path)
    for name in ("covid-chestxray-dataset/", "Figure1-COVID-chestxray-dataset/", "Actualmed-COVID-chestxray-dataset/",
                 "rsna-pneumonia-detection-challenge/", "nih-cxr14-subset/", "ChestX-ray14/"):
        assert name in str(err.value)
    assert "rename" not in str(err.value)


def test_misnamed_source_folder_is_named_as_the_culprit(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "covid-chestxray-dataset-master").mkdir()
    with pytest.raises(SourceNotFoundError, match=r"covid-chestxray-dataset-master/.*rename it to covid-chestxray-dataset"):
        load_table(tmp_path)
    with pytest.raises(SourceNotFoundError, match="rename it to covid-chestxray-dataset"):
        load_table(tmp_path, sources=["ieee8023"])
    copy_actualmed(data_dir, tmp_path, images=False)  # another source present: a warning, not an error
    _, report = load_table(tmp_path, hash_images=False)
    assert report.loaded == ["actualmed"]
    assert any("ieee8023" in w and "rename it to covid-chestxray-dataset" in w for w in report.warnings)


def test_data_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x\n")
    with pytest.raises(SourceNotFoundError, match="is a file, not a folder"):
        load_table(tmp_path / "data.csv")


# --------------------------------------------------------------------------- split warnings


def test_split_without_every_class_is_warned(capsys) -> None:
    table = synthetic_table(per_class=6)
    result = curate(table, CurationParams(per_class=6, split=(1.0, 0.0, 0.0), **NO_IMAGES))
    warnings = result.summary["warnings"]
    assert [w.split()[1] for w in warnings] == ["'val'", "'test'"]
    assert "split 'val' has 0 image(s) (covid=0, pneumonia=0, normal=0): too few to select a checkpoint" in warnings[0]
    assert "raise per_class (now 6)" in warnings[0] and "larger share than 0" in warnings[0]
    err = capsys.readouterr().err
    assert err.count("warning: split") == 2
    small = curate(table, CurationParams(per_class=2, **NO_IMAGES))  # 2 per class: val gets none
    assert any(w.startswith("split 'val' has") for w in small.summary["warnings"])


def test_adequate_splits_give_no_warning(capsys) -> None:
    result = curate(synthetic_table(per_class=20), CurationParams(per_class=20, **NO_IMAGES))
    assert result.summary["warnings"] == []
    assert "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------- outputs written together


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_write_leaves_previous_outputs_whole(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    first = curate(synthetic_table(per_class=20), CurationParams(per_class=20, seed=1, **NO_IMAGES))
    paths = write_outputs(first, out)
    assert sorted(paths) == ["dropped.csv", "duplicates.csv", "manifest.csv", "summary.json"]
    before = _outputs(out)
    second = curate(synthetic_table(per_class=20), CurationParams(per_class=10, seed=2, balance="down", **NO_IMAGES))
    staged: list[Path] = []

    def fail_at_last(tmp: Path) -> None:
        staged.append(tmp)
        if len(staged) == 3:  # every new file is written; none has replaced its old one yet
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "BEFORE_REPLACE", fail_at_last)
    with pytest.raises(OSError, match="No space left"):
        write_outputs(second, out)
    assert _outputs(out) == before  # the old set, and no temporary file left beside it
    assert [p.name.split(".")[1] for p in staged] == ["manifest", "dropped", "summary"]
    monkeypatch.setattr(atomic, "BEFORE_REPLACE", None)
    write_outputs(second, out)
    assert _outputs(out) != before
    assert json.loads((out / "summary.json").read_text())["per_class"] == 10


def test_unserialisable_summary_touches_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(curate(synthetic_table(per_class=20), CurationParams(per_class=20, **NO_IMAGES)), out)
    before = _outputs(out)
    other = curate(synthetic_table(per_class=20), CurationParams(per_class=5, balance="down", **NO_IMAGES))
    other.summary["bad"] = object()
    with pytest.raises(TypeError):
        write_outputs(other, out)
    assert _outputs(out) == before


KILL_SCRIPT = """
import os, signal, sys
import pandas as pd
import data_prep.atomic as atomic
from data_prep.recipe import CurationParams
from data_prep.curate import curate, write_outputs
table = pd.read_pickle(sys.argv[1])
result = curate(table, CurationParams(per_class=10, balance="down", seed=5, check_images=False, dedup=False))
atomic.BEFORE_REPLACE = lambda tmp: tmp.name.startswith(".summary.json") and os.kill(os.getpid(), signal.SIGKILL)
write_outputs(result, sys.argv[2])
"""


def test_killed_write_leaves_previous_outputs_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = synthetic_table(per_class=20)
    write_outputs(curate(table, CurationParams(per_class=20, **NO_IMAGES)), out)
    before = _outputs(out)
    table.to_pickle(tmp_path / "table.pkl")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "table.pkl"), str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    visible = {name: data for name, data in _outputs(out).items() if not name.startswith(".")}
    assert visible == before


def test_a_split_with_one_image_of_a_class_is_warned_too() -> None:
    # One validation film per class selects a checkpoint on a single image.
    result = curate(synthetic_table(per_class=10), CurationParams(per_class=10, split=(0.8, 0.1, 0.1), **NO_IMAGES))
    assert any(w.startswith("split 'val' has 3 image(s) (covid=1, pneumonia=1, normal=1)") for w in result.summary["warnings"])
