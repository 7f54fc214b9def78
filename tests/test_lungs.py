from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep.table import load_table
from nbhelpers.evaluation import lungs
from data_prep import annotations
from nbhelpers.pipeline import lungmasks
from nbhelpers.pipeline.preprocess import PreprocessConfig, RESIZE_MODES, prepare

# ieee8023 images: one whose mask upstream named "<stem>_mask.png.png", one without a mask, one plain.
DOUBLE_SUFFIX = "post-intubuation-pneumomediastium-and-pneumothorax-background-covid-19-pneumonia-day1"
LATERAL_WITHOUT_MASK = "covid-19-pneumonia-14-L.png"
PLAIN = "1-s2.0-S0929664620300449-gr2_lrg-a"


@pytest.fixture(scope="module")
def ieee(data_dir: Path) -> pd.DataFrame:
    table, _ = load_table(data_dir, ["ieee8023"], hash_images=False)
    return table


# --------------------------------------------------------------------------- finding masks on real files


def test_masks_are_indexed_by_image_stem_with_both_upstream_namings(data_dir):
    index = annotations.mask_index(data_dir)
    assert len(index) > 200
    assert index[DOUBLE_SUFFIX].name == f"{DOUBLE_SUFFIX}_mask.png.png"
    assert index[PLAIN].name == f"{PLAIN}_mask.png"
    assert "README" not in index and not any(k.endswith(".png") for k in index)


def test_manifest_rows_find_their_masks_and_the_rest_are_reported(data_dir, ieee):
    found = annotations.find_masks(ieee, data_dir)
    assert list(found.index) == list(ieee["image_id"])
    matched = found.dropna()
    assert 150 < len(matched) < len(ieee)
    for image_id, mask in matched.items():  # every match is named after its own image
        assert mask.name.startswith(Path(image_id.split(":", 1)[1]).stem + "_mask.png")
    without = annotations.rows_without_mask(ieee, data_dir)
    assert len(without) == len(ieee) - len(matched)
    assert LATERAL_WITHOUT_MASK in {Path(p).name for p in without["path"]}


def test_other_sources_never_borrow_an_ieee8023_mask(data_dir):
    # An NIH file that happened to share an ieee8023 image's stem must not get its mask.
    rows = pd.DataFrame({"image_id": ["nih:x", "ieee8023:y"], "source": ["nih", "ieee8023"],
                         "path": [f"nih-cxr14-subset/images/{PLAIN}.png", f"covid-chestxray-dataset/images/{PLAIN}.jpg"]})
    found = annotations.find_masks(rows, data_dir)
    assert found["nih:x"] is None and found["ieee8023:y"] is not None
    # Without a source column the path's folder decides.
    assert annotations.find_masks(rows.drop(columns="source"), data_dir)["nih:x"] is None


def test_missing_mask_folder_is_named(tmp_path):
    (tmp_path / "covid-chestxray-dataset").mkdir()
    with pytest.raises(annotations.LungMaskError, match="lungVAE-masks"):
        annotations.mask_index(tmp_path)
    with pytest.raises(KeyError, match="path"):
        annotations.find_masks(pd.DataFrame({"image_id": ["a"]}), tmp_path)


def test_real_masks_in_training_geometry(data_dir, ieee):
    cfg = PreprocessConfig(size=64)
    found = annotations.find_masks(ieee, data_dir)
    ids = list(found.dropna().index[:4]) + [f"ieee8023:covid-chestxray-dataset/images/{LATERAL_WITHOUT_MASK}"]
    result = lungmasks.lung_masks(ieee, data_dir, cfg, image_ids=ids, progress=False)
    assert result.image_ids == ids[:4] and result.missing == ids[4:]
    assert result.masks.shape == (4, 64, 64) and result.masks.dtype == bool
    areas = result.masks.reshape(4, -1).mean(axis=1)
    assert ((areas > 0.1) & (areas < 0.5)).all()  # two lung fields: a fifth to a half of the square
    # Lungs are the dark (air-filled) part of the chest: darker than the rest of the film's content.
    for image_id, mask in zip(result.image_ids, result.masks):
        image = prepare(np.asarray(Image.open(data_dir / image_id.split(":", 1)[1]).convert("L")),
                        PreprocessConfig(size=64, clahe=False))
        body = image > 0  # leave the letterbox padding out
        assert image[mask].mean() < image[body & ~mask].mean()
    with pytest.raises(KeyError, match="not in the manifest"):
        lungmasks.lung_masks(ieee, data_dir, cfg, image_ids=["ieee8023:nowhere.png"], progress=False)


# --------------------------------------------------------------------------- geometry on synthetic files


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("shape", [(300, 500), (500, 300)])
def test_mask_lands_on_the_pixels_it_marks_in_every_resize_mode(mode, shape):
    image = np.full(shape, 40, dtype=np.uint8)
    mask = np.zeros(shape, dtype=bool)
    mask[60:240, 80:200] = True  # a block off-centre, so a flip or shift would show
    image[mask] = 220
    cfg = PreprocessConfig(size=48, clahe=False, resize=mode)
    prepared, small = prepare(image, cfg), lungmasks.prepare_mask(mask, cfg)
    assert small.shape == (48, 48)
    bright = prepared > 130
    agreement = (bright == small).mean()
    assert agreement > 0.99, f"{mode} {shape}: mask and image disagree on {1 - agreement:.1%} of pixels"


def test_load_mask_thresholds_and_resizes_to_its_image(tmp_path):
    grey = np.zeros((20, 40), dtype=np.uint8)
    grey[:, 10:20] = 127  # just under half scale: not lung
    grey[:, 20:30] = 128
    path = tmp_path / "a_mask.png"
    Image.fromarray(grey).save(path)
    mask = annotations.load_mask(path)
    assert mask.dtype == bool and mask[:, 20:30].all() and not mask[:, :20].any()
    bigger = annotations.load_mask(path, shape=(40, 80))
    assert bigger.shape == (40, 80) and abs(bigger.mean() - mask.mean()) < 0.05
    (tmp_path / "broken_mask.png").write_bytes(b"not a png")
    with pytest.raises(annotations.LungMaskError, match="broken_mask.png"):
        annotations.load_mask(tmp_path / "broken_mask.png")


def test_positions_in_a_split():
    masks = lungmasks.LungMasks(image_ids=["b", "d"], masks=np.zeros((2, 4, 4), bool), missing=["c"])
    assert masks.positions_in(["a", "b", "c", "d"]) == [1, 3]
    with pytest.raises(KeyError, match="not among"):
        masks.positions_in(["a", "b"])


# --------------------------------------------------------------------------- energy


def square_mask(size: int = 10) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[2:7, 3:8] = True  # 25 of 100 pixels
    return mask


def test_lung_energy_against_the_uniform_baseline():
    mask = square_mask()
    assert lungs.lung_energy(np.ones((10, 10)), mask) == pytest.approx(0.25)  # uniform map = area share
    assert lungs.lung_energy(mask * 0.7, mask) == pytest.approx(1.0)
    assert lungs.lung_energy(~mask * 1.0, mask) == pytest.approx(0.0)
    half = np.where(mask, 1.0, 1 / 3)  # 25 units inside, 25 outside
    assert lungs.lung_energy(half, mask) == pytest.approx(0.5)
    assert np.isnan(lungs.lung_energy(np.zeros((10, 10)), mask))
    with pytest.raises(ValueError, match="shape"):
        lungs.lung_energy(np.ones((10, 12)), mask)
    with pytest.raises(ValueError, match="non-negative"):
        lungs.lung_energy(-np.ones((10, 10)), mask)


def test_table_and_summary_flag_a_model_that_looks_outside():
    masks = np.stack([square_mask()] * 3)
    rng = np.random.default_rng(0)
    cams = {
        "inside": masks * rng.uniform(0.5, 1.0, masks.shape),
        "uniform": np.ones(masks.shape),
        "outside": ~masks * rng.uniform(0.5, 1.0, masks.shape),
    }
    per_image = lungs.lung_energy_table(cams, masks, ["a", "b", "c"])
    assert list(per_image.columns) == ["model", "image_id", "lung_energy", "lung_area", "excess", "outside",
                                       "pointing_hit", "blank"]
    assert len(per_image) == 9 and set(per_image["image_id"]) == {"a", "b", "c"}
    summary = lungs.summarise_lung_energy(per_image)
    assert list(summary.index) == ["inside", "uniform", "outside"]
    assert summary.loc["inside", "energy_mean"] == pytest.approx(1.0)
    assert summary.loc["uniform", "energy_mean"] == pytest.approx(0.25)
    assert summary.loc["uniform", "area_mean"] == pytest.approx(0.25)
    # decided by the interval: a uniform map (excess exactly 0) is not measurably outside
    assert summary["looks_outside"].to_dict() == {"inside": False, "uniform": False, "outside": True}
    assert summary["lung_verdict"].to_dict() == {"inside": lungs.FAVOURS_LUNGS, "uniform": lungs.UNDETERMINED,
                                                 "outside": lungs.AVOIDS_LUNGS}
    assert summary.loc["outside", "outside_share"] == 1.0 and summary.loc["inside", "outside_share"] == 0.0
    assert summary.loc["inside", "excess_ci_low"] <= 0.75 <= summary.loc["inside", "excess_ci_high"]
    with pytest.raises(ValueError, match="shape"):
        lungs.lung_energy_table({"bad": np.ones((2, 10, 10))}, masks, ["a", "b", "c"])


def test_table_takes_lung_masks_and_std_reflects_spread():
    masks = lungmasks.LungMasks(image_ids=["a", "b"], masks=np.stack([square_mask()] * 2))
    one = np.ones((10, 10))
    cams = {"m": np.stack([one, square_mask() * 1.0])}  # energy 0.25 and 1.0
    summary = lungs.summarise_lung_energy(lungs.lung_energy_table(cams, masks))
    assert summary.loc["m", "energy_mean"] == pytest.approx(0.625)
    assert summary.loc["m", "energy_std"] == pytest.approx(np.std([0.25, 1.0], ddof=1))
    assert summary.loc["m", "images"] == 2


def test_the_uniform_baseline_is_taken_over_the_film_not_the_padding():
    # Before: the lung share of the whole square, so letterbox padding made any map look lung-bound.
    mask = square_mask()                        # 25 of 100 pixels
    film = np.zeros((10, 10), bool)
    film[:, 2:8] = True                         # a letterboxed film: 60 pixels, the lungs among them
    mask &= film
    uniform_on_film = film.astype(float)
    table = lungs.lung_energy_table({"u": uniform_on_film[None]}, mask[None], ["a"], films=film[None])
    assert table.loc[0, "lung_area"] == pytest.approx(mask.sum() / film.sum())
    assert table.loc[0, "excess"] == pytest.approx(0.0)  # a uniform map on the film has no excess
    square = lungs.lung_energy_table({"u": uniform_on_film[None]}, mask[None], ["a"])
    assert square.loc[0, "excess"] > 0.05  # measured against the whole square it would look lung-bound


def test_pointing_game_counts_hits_and_blank_maps():
    mask = square_mask()
    inside, outside = np.zeros((10, 10)), np.zeros((10, 10))
    inside[np.argwhere(mask)[0][0], np.argwhere(mask)[0][1]] = 1.0
    outside[0, 0] = 1.0
    assert lungs.pointing_hit(inside, mask) is True and lungs.pointing_hit(outside, mask) is False
    assert lungs.pointing_hit(np.zeros((10, 10)), mask) is None
    table = lungs.lung_energy_table({"m": np.stack([inside, outside, np.zeros((10, 10))])},
                                    np.stack([mask] * 3), ["a", "b", "c"])
    summary = lungs.summarise_lung_energy(table).loc["m"]
    assert summary["blank_maps"] == 1 and summary["images"] == 2 and summary["pointing_hits"] == 1
    assert summary["pointing_low"] < 0.5 < summary["pointing_high"]


def test_film_mask_leaves_out_blank_borders():
    img = np.zeros((20, 30), np.uint8)
    img[3:17, 5:25] = np.random.default_rng(0).integers(0, 255, (14, 20))
    film = lungmasks.film_mask(img)
    assert film[3:17, 5:25].all() and film.sum() == 14 * 20


# --------------------------------------------------------------------------- bounding boxes


def test_boxes_are_scaled_to_the_image_and_hold_its_mask(data_dir):
    boxes, masks = annotations.box_index(data_dir), annotations.mask_index(data_dir)
    images = {p.stem: p for p in (data_dir / "covid-chestxray-dataset" / "images").iterdir()}
    assert all(len(b) == 2 for _, b in boxes.values())  # a right and a left lung box each
    both = sorted(s for s in boxes if s in masks and s in images)[:15]
    assert len(both) == 15
    for stem in both:
        shape = np.asarray(Image.open(images[stem])).shape[:2]
        box = annotations.box_mask(boxes[stem][1], boxes[stem][0], shape)
        if box is None:  # drawn on another version of the image
            continue
        mask = annotations.load_mask(masks[stem], shape)
        assert (mask & box).sum() / mask.sum() > 0.85, stem  # the lungs lie inside their boxes
        assert box.mean() > mask.mean()  # and the boxes are looser


def test_box_mask_scales_and_refuses_another_aspect_ratio():
    mask = annotations.box_mask([[10, 20, 30, 40]], drawn_on=(200, 100), shape=(100, 50))
    assert mask.shape == (100, 50) and mask.sum() == 15 * 20 and mask[10:30, 5:20].all()
    assert annotations.box_mask([[10, 20, 30, 40]], drawn_on=(200, 100), shape=(100, 100)) is None


def test_boxes_fill_in_where_masks_are_missing(data_dir, ieee):
    boxes, masks = annotations.box_index(data_dir), annotations.mask_index(data_dir)
    stem_of = {Path(p).stem: i for i, p in zip(ieee["image_id"], ieee["path"])}
    box_only = [stem_of[s] for s in sorted(boxes) if s not in masks and s in stem_of][:2]
    with_mask = [stem_of[s] for s in sorted(masks) if s in stem_of][:1]
    ids = with_mask + box_only
    cfg = PreprocessConfig(size=32)
    plain = lungmasks.lung_masks(ieee, data_dir, cfg, image_ids=ids, progress=False)
    assert plain.image_ids == with_mask and plain.missing == box_only
    filled = lungmasks.lung_masks(ieee, data_dir, cfg, image_ids=ids, progress=False, boxes=True)
    assert filled.image_ids == ids and filled.kinds == ["mask", "boxes", "boxes"] and not filled.missing
    np.testing.assert_array_equal(filled.masks[0], plain.masks[0])
    assert all(0.1 < m.mean() < 0.8 for m in filled.masks[1:])


def test_summary_counts_each_image_once_over_seeds_and_resamples_patients():
    mask = square_mask()
    masks = np.stack([mask] * 4)
    inside, outside = mask * 1.0, ~mask * 1.0
    seeds = []
    for seed, cams in enumerate(([inside, inside, outside, outside], [inside, outside, outside, outside])):
        table = lungs.lung_energy_table({"m": np.stack(cams)}, masks, ["a", "b", "c", "d"])
        seeds.append(table.assign(seed=seed, patient_id=["p1", "p1", "p2", "p3"]))
    summary = lungs.summarise_lung_energy(pd.concat(seeds)).loc["m"]
    assert summary["images"] == 4 and summary["patients"] == 3 and summary["seeds"] == 2
    # a is lung-bound in both seeds (excess 0.75), b in one (0.75 and -0.25), c and d in none (-0.25)
    assert summary["excess_mean"] == pytest.approx((0.75 + 0.25 - 0.25 - 0.25) / 4)
    assert summary["pointing_hits"] == pytest.approx(1.0 + 0.5) and summary["pointing_rate"] == pytest.approx(1.5 / 4)
    assert summary["excess_ci_low"] <= summary["excess_mean"] <= summary["excess_ci_high"]
    # four distinct images, not eight seed-image pairs: the interval is that of the seed-averaged values
    pairs = pd.concat(seeds).assign(image_id=lambda t: t["image_id"] + "/" + t["seed"].astype(str))
    assert lungs.summarise_lung_energy(pairs).loc["m", "images"] == 8


def test_lung_verdict_reads_the_interval_not_the_point():
    assert lungs.lung_verdict(0.01, 0.2) == lungs.FAVOURS_LUNGS
    assert lungs.lung_verdict(-0.2, -0.01) == lungs.AVOIDS_LUNGS
    assert lungs.lung_verdict(-0.2, 0.01) == lungs.UNDETERMINED  # a negative point estimate is not enough
    assert lungs.lung_verdict(float("nan"), float("nan")) == lungs.UNDETERMINED
