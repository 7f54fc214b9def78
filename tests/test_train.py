from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbhelpers import models
from nbhelpers.preprocess import CachedSplit, PreprocessConfig, build_cache
from nbhelpers.train import TrainConfig, fit, load_checkpoint, make_optimizer, predict

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def real_cache(data_dir, tmp_path_factory):
    """A tiny cache of real mirror images: 4 per class, 32 px."""
    nih = pd.read_csv(data_dir / "nih-cxr14-subset" / "Data_Entry_2017_v2020.csv")
    covid = sorted((data_dir / "covid-chestxray-dataset" / "images").glob("*.jp*g"))[:4]
    rows = [("covid", p.relative_to(data_dir).as_posix()) for p in covid]
    for label, finding in (("normal", "No Finding"), ("pneumonia", "Pneumonia")):
        names = nih.loc[nih["Finding Labels"] == finding, "Image Index"].head(4)
        rows += [(label, f"nih-cxr14-subset/images/{n}") for n in names]
    manifest = pd.DataFrame(rows, columns=["label", "path"]).assign(
        image_id=lambda d: d["path"], split=["train", "train", "train", "val"] * 3)
    return build_cache(manifest, data_dir, tmp_path_factory.mktemp("cache"), PreprocessConfig(size=32), progress=False)


def test_loss_falls_when_training_on_the_same_images(real_cache, tmp_path):
    torch.manual_seed(0)
    net = models.create("densenet121", num_classes=3)
    train = real_cache.split("train")
    log = fit(net, train, train, TrainConfig(epochs=4, batch_size=9, lr=1e-3), tmp_path, CPU)
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    assert (tmp_path / "log.csv").is_file() and (tmp_path / "last.pt").is_file()


def test_best_checkpoint_is_the_best_validation_epoch(real_cache, tmp_path):
    torch.manual_seed(0)
    net = models.create("densenet121", num_classes=3)
    log = fit(net, real_cache.split("train"), real_cache.split("val"), TrainConfig(epochs=3, batch_size=9, lr=1e-3),
              tmp_path, CPU, meta={"model": "densenet121"})
    fresh = models.create("densenet121", num_classes=3)
    state = load_checkpoint(tmp_path / "best.pt", fresh)
    assert state["epoch"] == int(log["val_acc"].idxmax()) + 1  # ties keep the earlier epoch
    assert state["meta"] == {"model": "densenet121"}
    probs = predict(fresh, real_cache.split("val"), CPU, batch_size=2)
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean(probs.argmax(1) == real_cache.split("val").labels) == pytest.approx(state["val_acc"])


def test_same_seed_same_run(tmp_path):
    rng = np.random.default_rng(0)
    split = CachedSplit("train", rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), np.array([0, 1, 2] * 2),
                        [str(i) for i in range(6)], tmp_path)
    logs = []
    for run in range(2):
        torch.manual_seed(0)
        net = models.create("densenet121", num_classes=3)
        cfg = TrainConfig(epochs=1, batch_size=3, augment="paper", seed=5)
        logs.append(fit(net, split, split, cfg, tmp_path / str(run), CPU)["train_loss"].item())
    assert logs[0] == logs[1]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="sgdx"))
    with pytest.raises(FileNotFoundError, match="run the training notebook"):
        load_checkpoint(tmp_path / "best.pt", torch.nn.Linear(2, 2))
