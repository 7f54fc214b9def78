"""Curation on the real mirror: filters, de-duplication, balancing, split, outputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from data_prep.curate import ClassShortageError, build, curate
from data_prep.recipe import CurationParams, paper_labels
from data_prep.fingerprint import UnreadableImageError, load_gray
from data_prep.schema import CLASSES, MANIFEST_COLUMNS, SPLITS
from data_prep.table import load_table
from data_prep.split import check_no_leak

COVID_PA = "covid-chestxray-dataset/images/auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"


@pytest.fixture(scope="module")
def loaded(data_dir: Path):
    return load_table(data_dir)


@pytest.fixture(scope="module")
def paper_down(loaded):
    table, report = loaded
    return curate(table, CurationParams(balance="down"), report=report)


def test_paper_defaults_on_mirror_reach_balanced_counts(paper_down) -> None:
    s = paper_down.summary
    # PA-only ieee8023 is the binding constraint: ieee8023 + Figure1 + Actualmed COVID-19 films after
    # de-duplication (one captioned re-post, extubation-1.jpg, is found by keypoints).
    assert s["available_per_class"] == {"covid": 267, "pneumonia": 479, "normal": 448}
    assert s["per_class"] == 267
    assert paper_down.manifest["label"].value_counts().to_dict() == {c: 267 for c in CLASSES}
    assert sum(s["split_sizes"].values()) == 3 * 267
    assert tuple(paper_down.manifest.columns) == MANIFEST_COLUMNS
    assert "balanced down to 267" in s["balance_note"]
    json.dumps(s)  # JSON-able


def test_allowing_ap_views_adds_covid_films(loaded) -> None:
    table, report = loaded
    result = curate(table, CurationParams(balance="down", allow_ap=True), report=report)
    assert result.summary["available_per_class"]["covid"] == 476
    assert result.summary["per_class"] == 448


def test_filters_drop_ct_laterals_children_and_unmapped(paper_down, loaded) -> None:
    table, _ = loaded
    manifest, dropped = paper_down.manifest, paper_down.dropped.set_index("image_id")
    assert (manifest["modality"] == "X-ray").all()
    assert manifest["view"].isin(["PA", "AP", "AP Supine", "AP erect", "AP semi erect", ""]).all()
    assert (manifest.loc[manifest["source"] == "ieee8023", "view"] == "PA").all()
    assert not (manifest["age"] < 18).any()
    assert (manifest["label"] != "").all()
    reasons = dropped["reason"]
    ct = table.loc[table["modality"] == "CT", "image_id"]
    assert (reasons[ct] == "not_xray").all()
    lateral = table.loc[(table["view"] == "L") & (table["modality"] == "X-ray"), "image_id"]
    assert len(lateral) > 0 and (reasons[lateral] == "view").all()
    children = table.loc[(table["age"] < 18) & (table["source"] == "nih"), "image_id"]
    assert (reasons[children] == "age").all()
    inconclusive = table.loc[(table["source"] == "actualmed") & (table["finding"] == ""), "image_id"]
    assert len(inconclusive) == 10 and (reasons[inconclusive] == "unmapped_finding").all()
    # Actualmed normals are normal, not COVID-19 as "all data" would make them.
    am_normal = manifest[(manifest["source"] == "actualmed") & (manifest["finding"] == "No finding")]
    assert (am_normal["label"] == "normal").all()


def test_every_table_row_is_kept_or_dropped_once(paper_down, loaded) -> None:
    table, report = loaded
    kept, dropped = set(paper_down.manifest["image_id"]), paper_down.dropped["image_id"]
    assert dropped.is_unique and not kept & set(dropped)
    assert kept | set(dropped) == set(table["image_id"]) | set(report.skipped["image_id"])
    counts = paper_down.summary["dropped"]
    # ieee8023 lists 5 images twice, under patients 285 and 339 (287 and 340): 10 conflicting rows.
    assert counts["missing_image"] == 219 and counts["conflicting_rows"] == 10
    assert "duplicate_row" not in counts
    assert counts == paper_down.dropped["reason"].value_counts().to_dict()


def test_republished_copies_are_found(paper_down) -> None:
    dups = paper_down.dropped[paper_down.dropped["reason"].str.startswith("duplicate_")].set_index("image_id")
    # Figure1 re-published an ieee8023 film; ieee8023 lists one patient's films twice under two ids.
    assert "figure1:Figure1-COVID-chestxray-dataset/images/COVID-00022.jpg" in dups.index
    assert "9C34AF49" in dups.loc["figure1:Figure1-COVID-chestxray-dataset/images/COVID-00022.jpg", "detail"]
    assert (
        "ieee8023:covid-chestxray-dataset/images/covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-2.jpg"
        in dups.index
    )
    assert dups.loc["nih:nih-cxr14-subset/images/00002658_002.png", "reason"] == "duplicate_exact"


def _plant(data_dir: Path, tmp_path: Path, table: pd.DataFrame, name: str, source: str, label: str) -> pd.DataFrame:
    """Re-save a real COVID-19 film smaller, as PNG, and list it as an image of another source."""
    with Image.open(data_dir / COVID_PA) as img:
        img.convert("L").resize((300, 300)).save(tmp_path / name)
    row = table[table["path"] == COVID_PA].iloc[0].copy()
    row["source"], row["label"], row["path"] = source, label, f"planted/{name}"
    row["image_id"], row["patient_id"], row["sha256"] = f"{source}:planted/{name}", f"{source}:planted", "planted"
    row["view"] = ""
    return pd.DataFrame([row])


def test_planted_cross_source_duplicate_is_found(data_dir: Path, tmp_path: Path, loaded) -> None:
    table, _ = loaded
    root = tmp_path / "data"
    (root / "planted").mkdir(parents=True)
    for folder in {p.split("/")[0] for p in table["path"]}:
        (root / folder).symlink_to(data_dir / folder)
    same = _plant(data_dir, root / "planted", table, "copy.png", "actualmed", "covid")
    clash = _plant(data_dir, root / "planted", table, "clash.png", "figure1", "normal")
    subset = table[table["source"].isin(["ieee8023", "figure1", "actualmed"])]
    result = curate(pd.concat([subset, same], ignore_index=True), CurationParams(per_class=2, balance="down"), data_dir=root)
    dropped = result.dropped.set_index("image_id")
    assert dropped.loc["actualmed:planted/copy.png", "reason"] == "duplicate_near"
    assert COVID_PA in dropped.loc["actualmed:planted/copy.png", "detail"]
    result = curate(pd.concat([subset, clash], ignore_index=True), CurationParams(per_class=2, balance="down"), data_dir=root)
    dropped = result.dropped.set_index("image_id")
    assert dropped.loc["figure1:planted/clash.png", "reason"] == "duplicate_conflict"
    assert dropped.loc[f"ieee8023:{COVID_PA}", "reason"] == "duplicate_conflict"


def test_no_patient_crosses_splits(paper_down) -> None:
    manifest = paper_down.manifest
    check_no_leak(manifest)
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == set(SPLITS)
    sizes = paper_down.summary["split_sizes"]
    assert sizes["train"] > sizes["test"] > sizes["val"] > 0


def test_strict_balance_says_what_each_class_got(loaded) -> None:
    table, report = loaded
    with pytest.raises(ClassShortageError, match=r"covid=267, pneumonia=479, normal=448.*balance='down'"):
        curate(table, CurationParams(), report=report)


def test_manifest_is_byte_identical_on_rerun(data_dir: Path, tmp_path: Path) -> None:
    params = CurationParams(per_class=5, balance="down", seed=7)
    first = build(data_dir, tmp_path / "a", params, sources=["figure1", "actualmed"])
    build(data_dir, tmp_path / "b", params, sources=["figure1", "actualmed"])
    for name in ("manifest.csv", "dropped.csv", "summary.json", "duplicates.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert pd.read_csv(tmp_path / "a" / "manifest.csv").shape == first.manifest.shape
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["seed"] == 7


def test_corrupt_image_is_reported_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "Figure1-COVID-chestxray-dataset"
    (folder / "images").mkdir(parents=True)
    header = "patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,artifacts/distortion,notes\n"
    rows = [f"COVID-0000{i},,M,40,{f},,,,PA,X-ray,,\n" for i, f in enumerate(["COVID-19", "No finding", "Pneumonia", "COVID-19"])]
    (folder / "metadata.csv").write_text(header + "".join(rows), encoding="latin-1")
    for i in range(3):
        Image.new("L", (64, 64), color=40 * i).save(folder / "images" / f"COVID-0000{i}.png")
    (folder / "images" / "COVID-00003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UnreadableImageError, match="COVID-00003.jpg"):
        load_gray(folder / "images" / "COVID-00003.jpg")
    table, report = load_table(tmp_path)
    result = curate(table, CurationParams(per_class=1, balance="down", dedup=False, split=(1.0, 0.0, 0.0)), report=report)
    dropped = result.dropped.set_index("image_id")
    bad = "figure1:Figure1-COVID-chestxray-dataset/images/COVID-00003.jpg"
    assert dropped.loc[bad, "reason"] == "unreadable" and "COVID-00003.jpg" in dropped.loc[bad, "detail"]
    assert len(result.manifest) == 3


def test_paper_recipe_labels_all_figure1_and_actualmed_as_covid(loaded) -> None:
    table, _ = loaded
    paper = paper_labels(table)
    am = table["source"] == "actualmed"
    assert (paper[am] == "covid").all()
    assert ((paper != "") & (paper != table["label"])).sum() == 48  # 18+10 Actualmed, 3+2+15 Figure1


def test_params_validate_and_accept_profile_views() -> None:
    assert CurationParams(views=["PA", "AP"]).views == {"ieee8023": ("PA", "AP")}
    assert set(CurationParams(allow_ap=True).allowed_views("ieee8023")) >= {"PA", "AP", "AP Supine"}
    assert CurationParams().allowed_views("nih") is None
    with pytest.raises(ValueError, match="balance"):
        CurationParams(balance="up")
    with pytest.raises(ValueError, match="source_classes"):
        CurationParams(source_classes={"nih": ("flu",)})


def test_every_class_from_opens_only_the_named_sources():
    from data_prep.recipe import PAPER_SOURCE_CLASSES, every_class_from
    from data_prep.schema import CLASSES

    classes = every_class_from(["ieee8023"])
    assert classes["ieee8023"] == CLASSES and PAPER_SOURCE_CLASSES["ieee8023"] == ("covid",)
    assert {k: v for k, v in classes.items() if k != "ieee8023"} == {
        k: v for k, v in PAPER_SOURCE_CLASSES.items() if k != "ieee8023"}
