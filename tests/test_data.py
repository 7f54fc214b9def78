"""Batches from the cache, the augmentation policies, and the single path to model input."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_prep.schema import CLASSES
from nbhelpers.pipeline.data import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    POLICIES,
    AugmentPolicy,
    CachedDataset,
    batches,
    from_model_input,
    num_batches,
    to_model_input,
)
from nbhelpers.pipeline.cache import CachedSplit, build_cache
from nbhelpers.pipeline.preprocess import PreprocessConfig

N_IMAGES = 10
SIZE = 16
LEVEL_STEP = 20  # image i is filled with grey level i * LEVEL_STEP, so rows can be identified


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> CachedSplit:
    root = tmp_path_factory.mktemp("data")
    rel = []
    for i in range(N_IMAGES):
        Image.fromarray(np.full((20, 30), i * LEVEL_STEP, np.uint8), "L").save(root / f"{i}.png")
        rel.append(f"{i}.png")
    manifest = pd.DataFrame({"image_id": [f"img{i}" for i in range(N_IMAGES)], "path": rel,
                             "label": [CLASSES[i % 3] for i in range(N_IMAGES)], "split": "train"})
    cfg = PreprocessConfig(size=SIZE, clahe=False, resize="stretch")
    return build_cache(manifest, root, root / "cache", cfg, progress=False).split("train")


def ramp_batch(b: int = 4, size: int = 24) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = ((x * 9 + y * 2) % 256).to(torch.uint8)
    return img.expand(b, 1, size, size).clone()


# --------------------------------------------------------------------------- batches


def _ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].to(torch.int64) // LEVEL_STEP).tolist()


def test_batches_in_order_with_matching_labels(split: CachedSplit) -> None:
    out = list(batches(split, batch_size=4))
    assert [len(x) for x, _ in out] == [4, 4, 2] == [len(y) for _, y in out]
    assert num_batches(split, 4) == 3 and num_batches(split, 4, drop_last=True) == 2
    x, y = out[0]
    assert x.dtype == torch.uint8 and x.shape == (4, 1, SIZE, SIZE) and y.dtype == torch.int64
    seen = [i for x, _ in out for i in _ids(x)]
    assert seen == list(range(N_IMAGES))
    labels = [int(v) for _, y in out for v in y]
    assert labels == [i % 3 for i in range(N_IMAGES)]


def test_shuffled_batches_are_a_seeded_permutation(split: CachedSplit) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        rows = []
        for x, y in batches(split, 3, shuffle=True, seed=seed, epoch=epoch):
            ids = _ids(x)
            assert y.tolist() == [i % 3 for i in ids]  # labels travel with their images
            rows += ids
        return rows

    first = order(0, 0)
    assert sorted(first) == list(range(N_IMAGES)) and first != list(range(N_IMAGES))
    assert order(0, 0) == first
    assert order(0, 1) != first and order(1, 0) != first


def test_drop_last_and_bad_batch_size(split: CachedSplit) -> None:
    sizes = [len(x) for x, _ in batches(split, 4, shuffle=True, drop_last=True)]
    assert sizes == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(split, 0))


def test_batches_move_to_the_requested_device(split: CachedSplit) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = next(batches(split, 4, device=device))
    assert x.device.type == device and y.device.type == device and _ids(x.cpu()) == [0, 1, 2, 3]


def test_dataset_for_dataloader(split: CachedSplit) -> None:
    dataset = CachedDataset(split)
    assert len(dataset) == N_IMAGES
    x, y = dataset[3]
    assert x.shape == (1, SIZE, SIZE) and int(x[0, 0, 0]) == 3 * LEVEL_STEP and y == 0
    clone = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert clone._images is None and int(clone[5][0][0, 0, 0]) == 5 * LEVEL_STEP
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.dtype == torch.uint8 and xb.shape == (4, 1, SIZE, SIZE) and yb.tolist() == [0, 1, 2, 0]


# --------------------------------------------------------------------------- model input


def test_to_model_input_normalises_with_imagenet_stats() -> None:
    x = ramp_batch()
    out = to_model_input(x)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 24, 24)
    unit = x.float() / 255
    for c in range(3):
        expected = (unit[:, 0] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c], expected)
    gray = to_model_input(x[:, 0], in_chans=1)  # (B, H, W) accepted too
    assert gray.shape == (4, 1, 24, 24)
    torch.testing.assert_close(gray[:, 0], (unit[:, 0] - GRAY_MEAN) / GRAY_STD)
    torch.testing.assert_close(from_model_input(out), unit[:, 0])
    torch.testing.assert_close(from_model_input(gray), unit[:, 0])


def test_to_model_input_rejects_wrong_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        to_model_input(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_evaluation_ignores_the_policy() -> None:
    x = ramp_batch()
    paper = AugmentPolicy.from_name("paper")
    torch.testing.assert_close(to_model_input(x, paper, train=False), to_model_input(x))
    off = AugmentPolicy.from_name("off")
    assert not off.active
    torch.testing.assert_close(to_model_input(x, off, train=True), to_model_input(x))


def test_policy_names() -> None:
    assert set(POLICIES) == {"off", "light", "paper"}
    paper = AugmentPolicy.from_name("paper")
    assert paper.hflip > 0 and paper.vflip > 0 and paper.rotate > 0 and paper.shear > 0 and paper.contrast > 0
    assert AugmentPolicy.from_name("light").hflip == 0
    with pytest.raises(ValueError, match="paper"):
        AugmentPolicy.from_name("heavy")


def test_flips_are_exact() -> None:
    x = ramp_batch().float() / 255
    torch.testing.assert_close(AugmentPolicy(hflip=1.0)(x), x.flip(-1))
    torch.testing.assert_close(AugmentPolicy(vflip=1.0)(x), x.flip(-2))
    torch.testing.assert_close(AugmentPolicy(hflip=1.0, vflip=1.0)(x), x.flip(-1).flip(-2))


def test_paper_policy_is_seeded_and_per_image() -> None:
    x = ramp_batch(b=8)
    paper = AugmentPolicy.from_name("paper")

    def run(seed: int) -> torch.Tensor:
        return to_model_input(x, paper, train=True, generator=torch.Generator().manual_seed(seed))

    a = run(0)
    assert a.shape == (8, 3, 24, 24)
    torch.testing.assert_close(run(0), a)
    assert not torch.allclose(run(1), a)
    # The same input image comes out differently in each slot of the batch.
    flat = a[:, 0].reshape(8, -1)
    assert len({tuple(row.round(decimals=3).tolist()) for row in flat}) == 8
    shown = from_model_input(a)
    assert shown.min() >= 0 and shown.max() <= 1


def test_light_policy_changes_little() -> None:
    x = ramp_batch(b=16, size=64)
    clean = to_model_input(x)
    light = to_model_input(x, AugmentPolicy.from_name("light"), train=True, generator=torch.Generator().manual_seed(0))
    change = (from_model_input(light) - from_model_input(clean)).abs().mean(dim=(1, 2))
    assert torch.all(change > 0) and torch.all(change < 0.25)


def test_brightness_only_scales_intensity() -> None:
    x = torch.full((32, 1, 8, 8), 0.5)
    out = AugmentPolicy(brightness=0.2)(x, torch.Generator().manual_seed(0))
    means = out.mean(dim=(1, 2, 3))
    assert torch.all((means >= 0.4 - 1e-6) & (means <= 0.6 + 1e-6)) and means.std() > 0.01
    torch.testing.assert_close(out, out[:, :, :1, :1].expand_as(out))  # no geometric change


def test_policy_rejects_uint8() -> None:
    with pytest.raises(ValueError, match="float batch"):
        AugmentPolicy.from_name("paper")(ramp_batch())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmentation_runs_on_the_gpu_like_on_the_cpu() -> None:
    x = ramp_batch(b=8, size=64)
    paper = AugmentPolicy.from_name("paper")
    cpu = to_model_input(x, paper, train=True, generator=torch.Generator().manual_seed(3))
    gpu = to_model_input(x.cuda(), paper, train=True, generator=torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- previews for notebook 02


def test_preview_arrays(data_dir: Path) -> None:
    from data_prep.images import load_gray
    from nbhelpers.pipeline.preprocess import clahe, prepare
    from nbhelpers.evaluation.preview import augment_examples, clahe_variants, resize_variants

    img = load_gray(data_dir / "nih-cxr14-subset/images/00000061_012.png")
    variants = clahe_variants(img, (1.0, 3.0), tile_grid=4)
    assert list(variants) == ["original", "clip 1", "clip 3"]
    np.testing.assert_array_equal(variants["clip 3"], clahe(img, 3.0, 4))
    sizes = {mode: im.shape for mode, im in resize_variants(img, 48).items()}
    assert sizes == {"letterbox": (48, 48), "stretch": (48, 48), "crop": (48, 48)}
    small = prepare(img, PreprocessConfig(size=48))
    examples = augment_examples(small, AugmentPolicy.from_name("paper"), n=5, seed=2)
    assert examples.shape == (5, 48, 48) and examples.dtype == np.uint8
    np.testing.assert_array_equal(examples, augment_examples(small, AugmentPolicy.from_name("paper"), n=5, seed=2))
    unchanged = augment_examples(small, AugmentPolicy.from_name("off"), n=2)
    assert np.abs(unchanged.astype(int) - small.astype(int)).max() <= 1  # round trip through normalisation


def test_preview_figures(data_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_prep.images import load_gray
    from nbhelpers.evaluation.preview import (
        plot_augment_examples,
        plot_clahe_grid,
        plot_histograms,
        plot_resize_variants,
    )

    img = load_gray(data_dir / "nih-cxr14-subset/images/00000061_012.png")[::4, ::4].copy()
    figures = [
        plot_clahe_grid({"normal": img, "other": img}, (1.0, 2.0)),
        plot_histograms(img, PreprocessConfig(clip_limit=3.0)),
        plot_resize_variants(img, 32),
        plot_augment_examples(img[:64, :64].copy(), AugmentPolicy.from_name("light"), n=3),
    ]
    assert [len(f.axes) for f in figures] == [6, 4, 4, 3]
    assert figures[0].axes[2].get_title() == "clip 2"
    for fig in figures:
        plt.close(fig)
