"""CLAHE, resizing, the config key, and the cache being rebuilt exactly when its inputs change."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import nbhelpers.pipeline.cache as pc
import nbhelpers.pipeline.preprocess as pp
from nbhelpers.settings.config import load_profile, resolve
from data_prep.images import ImageReadError, load_gray
from nbhelpers.pipeline.cache import CacheError, ImageCache, build_cache, cache_key, manifest_hash
from nbhelpers.pipeline.preprocess import PreprocessConfig, clahe, clahe_order_difference, enhance, prepare, resize

SMALL = PreprocessConfig(size=32)


def low_contrast(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 100 + 20 * np.sin(x / 9.0) * np.cos(y / 13.0) + rng.normal(0, 2, (h, w))
    return np.clip(base, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- CLAHE and resizing


def test_clahe_raises_contrast_more_with_higher_clip_limit() -> None:
    img = low_contrast()
    mild, strong = clahe(img, 1.0, 8), clahe(img, 4.0, 8)
    assert mild.dtype == np.uint8 and mild.shape == img.shape
    assert img.std() < mild.std() < strong.std()


def test_clahe_tile_grid_matters_and_input_is_checked() -> None:
    img = low_contrast()
    assert not np.array_equal(clahe(img, 2.0, 2), clahe(img, 2.0, 8))
    with pytest.raises(ValueError, match="uint8"):
        clahe(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        clahe(np.dstack([img] * 3))


def test_enhance_switch() -> None:
    img = low_contrast()
    assert enhance(img, PreprocessConfig(clahe=False)) is img
    np.testing.assert_array_equal(enhance(img, PreprocessConfig(clip_limit=3.0, tile_grid=4)), clahe(img, 3.0, 4))


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    img = np.full((50, 100), 200, np.uint8)  # wide
    out = resize(img, 64, "letterbox")
    assert out.shape == (64, 64)
    assert np.all(out[:16] == 0) and np.all(out[-16:] == 0)  # bands above and below
    assert np.all(out[16:48] == 200)


def test_stretch_and_crop() -> None:
    img = np.zeros((50, 100), np.uint8)
    img[:, :25] = 255  # left quarter bright
    stretched = resize(img, 40, "stretch")
    assert stretched.shape == (40, 40) and stretched[:, :8].mean() > 250
    cropped = resize(img, 40, "crop")
    assert cropped.shape == (40, 40)
    # Crop keeps the centre half of the width: the bright quarter is cut away entirely.
    assert cropped.max() == 0


def test_resize_enlarges_small_images() -> None:
    out = resize(np.full((10, 20), 90, np.uint8), 64, "letterbox")
    assert out.shape == (64, 64) and np.all(out[32, :] == 90)


def test_prepare_keeps_letterbox_padding_out_of_clahe() -> None:
    img = low_contrast(60, 120)
    for stage in pp.CLAHE_STAGES:
        out = prepare(img, PreprocessConfig(size=64, clahe_stage=stage))
        assert out.shape == (64, 64) and out.dtype == np.uint8
        assert np.all(out[:10] == 0) and np.all(out[-10:] == 0), stage
        assert out[32].std() > 0


def test_clahe_order_changes_pixels(data_dir: Path) -> None:
    img = load_gray(data_dir / "nih-cxr14-subset/images/00000061_012.png")
    diff = clahe_order_difference(img, PreprocessConfig(size=64))
    assert diff["mean_abs"] > 1.0 and 0 < diff["frac_gt10"] < 1
    same = prepare(img, PreprocessConfig(size=64, clahe=False, clahe_stage="before_resize"))
    np.testing.assert_array_equal(same, prepare(img, PreprocessConfig(size=64, clahe=False, clahe_stage="after_resize")))


# --------------------------------------------------------------------------- config


def test_config_key_is_stable_and_covers_every_field() -> None:
    base = PreprocessConfig()
    assert base.key() == PreprocessConfig().key() == PreprocessConfig(clip_limit=2).key()
    changed = {
        "size": 64, "clahe": False, "clip_limit": 3.0, "tile_grid": 4, "resize": "stretch",
        "clahe_stage": "after_resize", "mask_markers": True, "lung_crop": True, "hist_match": True, "blackout": "center",
    }
    assert set(changed) == {f.name for f in dataclasses.fields(PreprocessConfig)}
    keys = {dataclasses.replace(base, **{name: value}).key() for name, value in changed.items()}
    assert len(keys) == len(changed) and base.key() not in keys


def test_key_without_mitigations_is_the_key_from_before_they_existed() -> None:
    cfg = PreprocessConfig(size=64)
    payload = {"size": 64, "clahe": True, "clip_limit": 2.0, "tile_grid": 8, "resize": "letterbox",
               "clahe_stage": "before_resize", "pipeline_version": pp.PIPELINE_VERSION}
    assert cfg.key() == pp._hash_text(json.dumps(payload, sort_keys=True))


@pytest.mark.parametrize("bad", [{"size": 0}, {"clip_limit": 0}, {"tile_grid": 0}, {"resize": "pad"},
                                 {"clahe_stage": "never"}, {"lung_crop": "yes"}])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        PreprocessConfig(**bad)


def test_config_from_profile() -> None:
    smoke = load_profile("smoke")
    cfg = PreprocessConfig.from_settings(smoke)
    assert cfg.size == smoke["image_size"] and cfg.clahe == smoke["clahe"]
    assert cfg.clip_limit == smoke["clip_limit"] and cfg.tile_grid == smoke["tile_grid"]
    assert PreprocessConfig.from_settings(smoke, clahe=False).clahe is False
    settings = resolve("full", need_data=False)  # what a notebook session holds
    assert PreprocessConfig.from_settings(settings) == PreprocessConfig(size=settings.image_size)


# --------------------------------------------------------------------------- the cache


@pytest.fixture
def real_manifest(data_dir: Path) -> pd.DataFrame:
    rows = [
        ("nih-cxr14-subset/images/00000061_012.png", "normal", "train"),
        ("nih-cxr14-subset/images/00005435_000.png", "pneumonia", "train"),  # RGBA
        ("Actualmed-COVID-chestxray-dataset/images/"
         "CR.1.2.840.113564.192168196.2020031913094890017.1203801020003.png", "covid", "train"),
        ("covid-chestxray-dataset/images/pneumocystis-pneumonia-2-L.png", "pneumonia", "val"),
        (sorted(p.relative_to(data_dir).as_posix()
                for p in (data_dir / "Figure1-COVID-chestxray-dataset/images").glob("*.jpg"))[0], "covid", "test"),
    ]
    for rel, _, _ in rows:
        assert (data_dir / rel).is_file(), rel
    return pd.DataFrame({
        "image_id": [f"test:{r}" for r, _, _ in rows],
        "path": [r for r, _, _ in rows],
        "label": [label for _, label, _ in rows],
        "split": [split for _, _, split in rows],
    })


@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def counting(path):
        calls.append(Path(path))
        return load_gray(path)

    monkeypatch.setattr(pp, "load_gray", counting)
    monkeypatch.setattr(pc, "load_gray", counting)
    return calls


def test_build_cache_contents(real_manifest: pd.DataFrame, data_dir: Path, tmp_path: Path) -> None:
    cache = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    assert not cache.reused and cache.path == tmp_path / cache_key(real_manifest, SMALL)
    assert cache.splits == ("train", "val", "test")
    train = cache.split("train")
    assert len(train) == 3 and isinstance(train.images, np.memmap)
    assert train.images.dtype == np.uint8 and train.images.shape == (3, 32, 32)
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [2, 1, 0]
    assert train.image_ids == real_manifest["image_id"][:3].tolist()
    assert train.class_counts() == {"covid": 1, "pneumonia": 1, "normal": 1}
    for i, rel in enumerate(real_manifest["path"][:3]):
        np.testing.assert_array_equal(train.images[i], prepare(load_gray(data_dir / rel), SMALL))
    meta = json.loads((cache.path / pc.META_FILE).read_text())
    assert meta["manifest_hash"] == manifest_hash(real_manifest) and meta["config"]["size"] == 32
    assert [p.name for p in tmp_path.iterdir()] == [cache.key]  # no leftover temporary folder
    with pytest.raises(CacheError, match="holds splits"):
        cache.split("holdout")


def test_cache_reused_when_unchanged(real_manifest, data_dir, tmp_path, count_loads) -> None:
    first = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    assert len(count_loads) == len(real_manifest)
    again = build_cache(real_manifest.copy(), data_dir, tmp_path, PreprocessConfig(size=32), progress=False)
    assert again.reused and again.path == first.path
    assert len(count_loads) == len(real_manifest)  # nothing decoded the second time


PARAMETER_CHANGES = {"size": 24, "clahe": False, "clip_limit": 4.0, "tile_grid": 4, "resize": "stretch",
                     "clahe_stage": "after_resize", "mask_markers": True, "lung_crop": True, "hist_match": True,
                     "blackout": "center"}


def test_parameter_changes_cover_every_field() -> None:
    assert set(PARAMETER_CHANGES) == {f.name for f in dataclasses.fields(PreprocessConfig)}


@pytest.mark.parametrize("change", sorted(PARAMETER_CHANGES))
def test_cache_rebuilt_when_a_parameter_changes(real_manifest, data_dir, tmp_path, count_loads, change) -> None:
    first = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    second = build_cache(real_manifest, data_dir, tmp_path,
                         dataclasses.replace(SMALL, **{change: PARAMETER_CHANGES[change]}),
                         progress=False)
    assert not second.reused and second.path != first.path
    # histogram matching reads the training images once more, for its reference
    extra = int((real_manifest["split"] == "train").sum()) if change == "hist_match" else 0
    assert len(count_loads) == 2 * len(real_manifest) + extra
    assert second.cfg == dataclasses.replace(SMALL, **{change: PARAMETER_CHANGES[change]})
    assert not np.array_equal(np.asarray(first.split("train").images), np.asarray(second.split("train").images))


def test_cache_rebuilt_when_the_manifest_changes(real_manifest, data_dir, tmp_path, count_loads) -> None:
    first = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    relabelled = real_manifest.assign(label=["covid"] * len(real_manifest))
    second = build_cache(relabelled, data_dir, tmp_path, SMALL, progress=False)
    assert not second.reused and second.path != first.path
    assert second.split("train").labels.tolist() == [0, 0, 0]
    fewer = build_cache(real_manifest.iloc[:2], data_dir, tmp_path, SMALL, progress=False)
    assert not fewer.reused and fewer.splits == ("train",) and len(fewer.split("train")) == 2
    assert build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False).reused


def test_threaded_build_matches_serial(real_manifest, data_dir, tmp_path) -> None:
    serial = build_cache(real_manifest, data_dir, tmp_path / "serial", SMALL, progress=False)
    threaded = build_cache(real_manifest, data_dir, tmp_path / "threaded", SMALL, workers=3, progress=False)
    for name in serial.splits:
        np.testing.assert_array_equal(serial.split(name).images, threaded.split(name).images)
        assert serial.split(name).image_ids == threaded.split(name).image_ids


def test_unreadable_image_aborts_build_and_names_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(low_contrast(), "L").save(data / "good.png")
    (data / "bad.png").write_bytes(b"garbage")
    manifest = pd.DataFrame({"image_id": ["g", "b"], "path": ["good.png", "bad.png"],
                             "label": ["normal", "covid"], "split": ["train", "train"]})
    cache_root = tmp_path / "cache"
    for workers in (1, 2):
        with pytest.raises(ImageReadError, match=r"bad\.png.*image_id 'b'"):
            build_cache(manifest, data, cache_root, SMALL, workers=workers, progress=False)
    assert list(cache_root.iterdir()) == []  # nothing half-built is left to be reused
    fixed = build_cache(manifest.iloc[:1], data, cache_root, SMALL, progress=False)
    assert len(fixed.split("train")) == 1


def test_generated_kinds_in_one_cache(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(low_contrast().astype(np.uint16) * 40).save(data / "sixteen.png")
    Image.fromarray(low_contrast(), "L").convert("P").save(data / "palette.png")
    manifest = pd.DataFrame({"image_id": ["a", "b"], "path": ["sixteen.png", "palette.png"],
                             "label": ["normal", "pneumonia"], "split": ["test", "test"]})
    split = build_cache(manifest, data, tmp_path / "cache", SMALL, progress=False).split("test")
    assert split.images.shape == (2, 32, 32) and split.images[:, 16].std() > 0


def test_manifest_checks(real_manifest: pd.DataFrame, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="split"):
        manifest_hash(real_manifest.drop(columns="split"))
    with pytest.raises(ValueError, match="holdout"):
        build_cache(real_manifest.assign(split="holdout"), data_dir, tmp_path, SMALL, progress=False)
    with pytest.raises(ValueError, match="unknown label"):
        build_cache(real_manifest.assign(label="flu"), data_dir, tmp_path, SMALL, progress=False)
    assert manifest_hash(real_manifest) != manifest_hash(real_manifest.assign(sha256="abc"))


def test_open_incomplete_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="meta.json"):
        ImageCache.open(tmp_path)


# --------------------------------------------------------------------------- the benchmark command


def test_loader_benchmark_reports_both_paths(data_dir: Path, tmp_path: Path, capsys) -> None:
    from nbhelpers.tools import cli

    argv = ["bench", "loader", "--data-dir", str(data_dir), "--n", "6", "--size", "32", "--batch-size", "4",
            "--min-seconds", "0.05", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (out,) = tmp_path.glob("loader_*.txt")  # loader_<device>.txt
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert text.startswith("$ workbook bench loader")
    rates = {line[:3]: float(line.split(":")[-1].split()[0]) for line in text.splitlines() if line[:3] in
             ("(a)", "(b)")}
    assert set(rates) == {"(a)", "(b)"} and all(r > 0 for r in rates.values())
    assert rates["(b)"] > rates["(a)"]


def test_benchmark_sample_skips_masks_and_empty_folders(data_dir: Path, tmp_path: Path) -> None:
    from nbhelpers.tools import bench

    paths = bench.sample_images(data_dir, 50, seed=1)
    assert len(paths) == 50 and not any("annotations" in p.parts for p in paths)
    assert paths == bench.sample_images(data_dir, 50, seed=1)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        bench.sample_images(tmp_path, 5, seed=0)


# --------------------------------------------------------------------------- the cache is checked before use


def _fresh_process() -> None:
    """Forget which caches this process verified, as a new process would."""
    pc._VERIFIED.clear()


def _built(real_manifest, data_dir, tmp_path) -> pc.ImageCache:
    cache = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    _fresh_process()
    return cache


def test_meta_records_shapes_dtypes_and_checksums(real_manifest, data_dir, tmp_path) -> None:
    cache = _built(real_manifest, data_dir, tmp_path)
    files = json.loads((cache.path / pc.META_FILE).read_text())["files"]
    assert set(files) == {"train", "val", "test"}
    assert files["train"]["images"]["shape"] == [3, 32, 32] and files["train"]["images"]["dtype"] == "|u1"
    assert files["train"]["labels"]["shape"] == [3] and files["train"]["labels"]["dtype"] == "<i8"
    assert files["val"]["ids"]["count"] == 1
    for entry in files["train"].values():
        assert entry["sha256"] == pc.sha256_file(cache.path / entry["file"])


def test_intact_cache_is_verified_and_reused(real_manifest, data_dir, tmp_path, count_loads) -> None:
    first = _built(real_manifest, data_dir, tmp_path)
    again = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    assert again.reused and again.path == first.path and len(count_loads) == len(real_manifest)
    assert ImageCache.open(first.path).splits == first.splits


def _rebuilt_because(real_manifest, data_dir, tmp_path, count_loads, capsys, why: str) -> None:
    cache_path = tmp_path / cache_key(real_manifest, SMALL)
    with pytest.raises(CacheError, match=rf"{cache_path}.*{why}.*rm -rf {cache_path}"):
        ImageCache.open(cache_path)
    capsys.readouterr()
    rebuilt = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    out = capsys.readouterr().out
    assert not rebuilt.reused and len(count_loads) == 2 * len(real_manifest)
    assert out.count("\n") == 1 and out.startswith(f"rebuilding preprocessing cache {cache_path}") and re.search(why, out)
    _fresh_process()
    assert ImageCache.open(cache_path).meta["counts"] == {"train": 3, "val": 1, "test": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache_path.name]  # nothing left aside
    np.testing.assert_array_equal(rebuilt.split("train").images[0],
                                  prepare(load_gray(data_dir / real_manifest["path"][0]), SMALL))


def test_truncated_array_is_detected_and_rebuilt(real_manifest, data_dir, tmp_path, count_loads, capsys) -> None:
    cache = _built(real_manifest, data_dir, tmp_path)
    images = cache.path / "train_images.npy"
    os.truncate(images, images.stat().st_size - 100)
    _rebuilt_because(real_manifest, data_dir, tmp_path, count_loads, capsys, "truncated")


def test_flipped_bytes_are_detected_and_rebuilt(real_manifest, data_dir, tmp_path, count_loads, capsys) -> None:
    cache = _built(real_manifest, data_dir, tmp_path)
    images = cache.path / "train_images.npy"
    data = bytearray(images.read_bytes())
    data[-10:] = bytes(255 - b for b in data[-10:])  # same size, same header: only the checksum tells
    images.write_bytes(bytes(data))
    _rebuilt_because(real_manifest, data_dir, tmp_path, count_loads, capsys, "SHA-256")


def test_changed_labels_are_detected_in_the_same_process(real_manifest, data_dir, tmp_path) -> None:
    cache = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    ImageCache.open(cache.path)  # verified and remembered
    labels = cache.path / "train_labels.npy"
    # Rewritten the way editors and np.save-then-move save files (a new file moved over the old): a new inode.
    np.save(tmp_path / "new_labels.npy", np.array([0, 0, 0], dtype=np.int64))
    os.replace(tmp_path / "new_labels.npy", labels)
    with pytest.raises(CacheError, match="train_labels.npy does not match its SHA-256"):
        ImageCache.open(cache.path)


def test_missing_meta_does_not_block_the_rebuild(real_manifest, data_dir, tmp_path, count_loads, capsys) -> None:
    cache = _built(real_manifest, data_dir, tmp_path)
    (cache.path / pc.META_FILE).unlink()  # e.g. a copy that stopped before its last file
    _rebuilt_because(real_manifest, data_dir, tmp_path, count_loads, capsys, "no meta.json")


def test_wrong_shape_in_meta_is_detected(real_manifest, data_dir, tmp_path, count_loads, capsys) -> None:
    cache = _built(real_manifest, data_dir, tmp_path)
    meta_path = cache.path / pc.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["files"]["train"]["images"]["shape"] = [3, 32, 31]
    meta_path.write_text(json.dumps(meta))
    _rebuilt_because(real_manifest, data_dir, tmp_path, count_loads, capsys, r"meta.json says \|u1 \[3, 32, 31\]")


def test_cache_without_checksums_is_rebuilt(real_manifest, data_dir, tmp_path, count_loads, capsys) -> None:
    cache = _built(real_manifest, data_dir, tmp_path)
    meta_path = cache.path / pc.META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as written before checksums were recorded
    meta_path.write_text(json.dumps(meta))
    _rebuilt_because(real_manifest, data_dir, tmp_path, count_loads, capsys, "no file checksums")


def test_verification_is_cheap_once_done(real_manifest, data_dir, tmp_path, monkeypatch) -> None:
    cache = build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    hashed: list[Path] = []
    real_sha = pc.sha256_file
    monkeypatch.setattr(pc, "sha256_file", lambda path: hashed.append(path) or real_sha(path))
    for _ in range(3):
        ImageCache.open(cache.path)
        build_cache(real_manifest, data_dir, tmp_path, SMALL, progress=False)
    assert hashed == []  # verified when it was built, not again while unchanged
    _fresh_process()
    ImageCache.open(cache.path)
    assert len(hashed) == 3 * 3  # a new process hashes each split's three files once
