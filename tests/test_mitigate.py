from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from data_prep.images import load_gray
from nbhelpers.pipeline.lungmasks import lung_masks, prepare_mask
from nbhelpers.pipeline.mitigate import (
    Box,
    crop,
    histogram,
    lung_box,
    marker_mask,
    mask_markers,
    match_histogram,
    reference_histogram,
)
from nbhelpers.tools.lung_box import lung_box_check, summarise_check
from nbhelpers.pipeline.cache import META_FILE, build_cache
from nbhelpers.pipeline.preprocess import PreprocessConfig, prepare, source_content
from nbhelpers.tools import cli

NIH_IMAGE = "nih-cxr14-subset/images/00000061_012.png"


@pytest.fixture(scope="module")
def nih(data_dir: Path) -> np.ndarray:
    return load_gray(data_dir / NIH_IMAGE)


# --------------------------------------------------------------------------- lung box


def test_lung_box_agrees_with_the_ieee8023_lung_masks(data_dir: Path) -> None:
    table = lung_box_check(data_dir, progress=False)
    summary = summarise_check(table)
    assert summary["images"] >= 150
    assert summary["found"] >= 0.9
    assert summary["iou_gt_0.5"] >= 0.9
    assert summary["covered_median"] >= 0.95  # the crop keeps the lungs
    assert summary["box_share_median"] < 0.9  # and still cuts something away


def test_lung_box_is_inside_the_image_and_absent_on_a_blank_film(nih: np.ndarray) -> None:
    box = lung_box(nih)
    assert box is not None
    h, w = nih.shape
    assert 0 <= box.top < box.bottom <= h and 0 <= box.left < box.right <= w
    assert 0.2 < box.area() / nih.size < 0.95
    assert lung_box(np.full((300, 300), 128, np.uint8)) is None
    assert crop(nih, None) is nih
    assert crop(nih, box).shape == (box.bottom - box.top, box.right - box.left)


# --------------------------------------------------------------------------- markers


def _with_text(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    marked = img.copy()
    cv2.putText(marked, "PORTABLE", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2, cv2.LINE_AA)
    text = np.zeros_like(img)
    cv2.putText(text, "PORTABLE", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2, cv2.LINE_AA)
    return marked, text > 128


def test_marker_mask_finds_burnt_in_text_and_little_else(nih: np.ndarray) -> None:
    marked, text = _with_text(nih)
    found = marker_mask(marked)
    assert found[text].mean() >= 0.9
    ys, xs = np.nonzero(text)
    away = np.ones_like(found)
    away[max(0, ys.min() - 10) : ys.max() + 10, max(0, xs.min() - 10) : xs.max() + 10] = False
    assert found[away].mean() < 0.02
    filled = mask_markers(marked)
    assert filled.shape == marked.shape and filled.dtype == np.uint8
    assert filled[text].mean() < marked[text].mean() - 60  # the white letters are gone
    np.testing.assert_array_equal(filled[~found], marked[~found])  # nothing else changes


def test_no_marker_on_a_smooth_image() -> None:
    smooth = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8), (51, 51), 0)
    assert not marker_mask(smooth).any()
    assert mask_markers(smooth) is smooth


# --------------------------------------------------------------------------- histograms


def test_match_histogram_follows_the_reference(nih: np.ndarray, data_dir: Path) -> None:
    other = load_gray(next((data_dir / "Figure1-COVID-chestxray-dataset/images").glob("*.jpg")))
    matched = match_histogram(nih, histogram(other))
    gap_before = np.abs(np.cumsum(histogram(nih)) - np.cumsum(histogram(other))).max()
    gap_after = np.abs(np.cumsum(histogram(matched)) - np.cumsum(histogram(other))).max()
    assert gap_after < 0.05 < gap_before
    # the mapping is monotone: darker stays darker
    order = np.argsort(nih.ravel(), kind="stable")
    assert (np.diff(matched.ravel()[order].astype(int)) >= 0).all()
    np.testing.assert_array_equal(match_histogram(nih, histogram(nih)), nih)
    with pytest.raises(ValueError, match="256"):
        match_histogram(nih, np.ones(10))


def test_reference_histogram_weights_every_group_equally() -> None:
    a, b = np.eye(256)[10], np.eye(256)[200]
    ref = reference_histogram([a, a, a, b], ["nih", "nih", "nih", "ieee8023"])
    assert ref[10] == pytest.approx(0.5) and ref[200] == pytest.approx(0.5)
    assert reference_histogram([a, a, a, b])[10] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one"):
        reference_histogram([])


# --------------------------------------------------------------------------- in the preprocessing


def test_prepare_applies_the_mitigations(nih: np.ndarray) -> None:
    plain = PreprocessConfig(size=64)
    cropped = PreprocessConfig(size=64, lung_crop=True)
    content, box = source_content(nih, cropped)
    assert box == lung_box(nih) and content.shape == (box.bottom - box.top, box.right - box.left)
    assert not np.array_equal(prepare(nih, plain), prepare(nih, cropped))
    with pytest.raises(ValueError, match="reference histogram"):
        prepare(nih, PreprocessConfig(size=64, hist_match=True))
    matched = prepare(nih, PreprocessConfig(size=64, hist_match=True, clahe=False), reference=np.ones(256))
    assert matched.shape == (64, 64)


def test_cache_records_reference_and_missing_lung_boxes(data_dir: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200), 120, np.uint8))
    manifest = pd.DataFrame({
        "image_id": ["nih", "blank", "fig"],
        "path": [str(data_dir / NIH_IMAGE), str(blank),
                 str(next((data_dir / "Figure1-COVID-chestxray-dataset/images").glob("*.jpg")))],
        "label": ["normal", "normal", "covid"],
        "split": ["train", "train", "test"],
        "source": ["nih", "other", "figure1"],
    })
    cfg = PreprocessConfig(size=32, lung_crop=True, hist_match=True)
    cache = build_cache(manifest, "/", tmp_path / "cache", cfg, progress=False)
    meta = json.loads((cache.path / META_FILE).read_text())
    assert meta["lung_box_missing"] == ["blank"]  # reported, kept uncropped
    assert len(cache.split("train")) == 2
    ref = np.array(meta["reference_histogram"])
    assert ref.shape == (256,) and ref.sum() == pytest.approx(1, abs=1e-5)
    assert ref[120] >= 0.5  # the blank image's one grey level carries half the weight: one of two sources


def test_masks_follow_the_lung_crop(data_dir: Path) -> None:
    mask = np.zeros((100, 200), bool)
    mask[40:60, 100:150] = True
    box = Box(20, 80, 50, 170)
    cfg = PreprocessConfig(size=60, resize="stretch")
    cut = prepare_mask(mask, cfg, box)  # the 60x120 box stretched to 60x60: rows x1, columns x0.5
    ys, xs = np.nonzero(cut)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 39, 25, 49)


def test_lung_masks_are_cut_like_the_images(data_dir: Path) -> None:
    from data_prep.annotations import mask_index

    stem = sorted(mask_index(data_dir))[0]
    path = next((data_dir / "covid-chestxray-dataset/images").glob(f"{stem}.*")).relative_to(data_dir).as_posix()
    manifest = pd.DataFrame({"image_id": ["x"], "path": [path], "source": ["ieee8023"]})
    plain = lung_masks(manifest, data_dir, PreprocessConfig(size=64), progress=False)
    cropped = lung_masks(manifest, data_dir, PreprocessConfig(size=64, lung_crop=True), progress=False)
    assert plain.image_ids == cropped.image_ids == ["x"]
    assert cropped.masks.mean() > plain.masks.mean()  # after the crop the lungs fill more of the square


def test_lung_box_cli_writes_a_report(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lung_box.txt"
    assert cli.main(["lung-box", "--data-dir", str(data_dir), "--per-source", "5", "--out", str(tmp_path)]) == 0
    text = out.read_text()
    assert "found:" in text and "iou_median" in text and "nih" in text
    assert cli.main(["lung-box", "--data-dir", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_lung_crop_fills_the_square_without_letterbox_bars(data_dir: Path) -> None:
    wide = load_gray(sorted((data_dir / "Actualmed-COVID-chestxray-dataset/images").glob("*.png"))[0])
    assert wide.shape[1] > 1.2 * wide.shape[0]  # a landscape film: letterboxed, it gets bars
    boxed = prepare(wide, PreprocessConfig(size=64, clahe=False))
    cropped = prepare(wide, PreprocessConfig(size=64, clahe=False, lung_crop=True))
    assert (boxed[:4] == 0).all()  # black bars above ...
    assert (cropped[:4] > 0).any() and (cropped[-4:] > 0).any()  # ... not after the crop
    assert PreprocessConfig(lung_crop=True).fit == "stretch" and PreprocessConfig().fit == "letterbox"


def test_blackout_variants_on_a_real_film(data_dir):
    from data_prep.images import load_gray
    from nbhelpers.pipeline.mitigate import LUNG_BOX, blackout, center_box, share_box
    from nbhelpers.pipeline.preprocess import PreprocessConfig

    img = load_gray(next((data_dir / "nih-cxr14-subset" / "images").glob("*.png")))
    box = center_box(img.shape)
    centre = blackout(img, "center")
    assert (centre[box.top:box.bottom, box.left:box.right] == 0).all()
    assert (centre[: box.top] == img[: box.top]).all()
    lungs = share_box(img.shape, LUNG_BOX)
    only = blackout(img, "lungs_only")
    assert (only[lungs.top:lungs.bottom, lungs.left:lungs.right] == img[lungs.top:lungs.bottom, lungs.left:lungs.right]).all()
    assert only[: lungs.top].sum() == 0 and only.sum() < img.sum()
    assert blackout(img, "lungs")[lungs.top:lungs.bottom, lungs.left:lungs.right].sum() == 0
    assert blackout(img, "none") is img
    with pytest.raises(ValueError, match="blackout must be one of"):
        blackout(img, "middle")
    # A config without blackout keeps the cache key it had before the option existed.
    assert PreprocessConfig().key() == PreprocessConfig(blackout="none").key() != PreprocessConfig(blackout="center").key()


def test_the_fixed_lung_box_is_the_median_of_the_mirrors_lung_masks(data_dir):
    """The blackout's one lung box for every film is where the ieee8023 lungVAE masks put the
    lungs (median box edges), and the same shares on every archive's films."""
    from data_prep.annotations import load_mask, mask_folder, mask_index
    from data_prep.images import load_gray
    from nbhelpers.pipeline.mitigate import LUNG_BOX, share_box

    masks = mask_index(data_dir)
    images = {p.stem: p for p in (mask_folder(data_dir).parent.parent / "images").iterdir()}
    edges = []
    for stem, path in sorted(masks.items())[:80]:
        if stem in images:
            img = load_gray(images[stem])
            ys, xs = np.nonzero(load_mask(path, img.shape))
            if len(ys):
                h, w = img.shape
                edges.append((ys.min() / h, (ys.max() + 1) / h, xs.min() / w, (xs.max() + 1) / w))
    assert np.abs(np.median(edges, axis=0) - np.array(LUNG_BOX)).max() < 0.03
    shares = {share_box(shape, LUNG_BOX).area() / (shape[0] * shape[1]) for shape in [(1024, 1024), (2000, 2500)]}
    assert max(shares) - min(shares) < 0.01
