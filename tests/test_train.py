from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import real_manifest
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from data_prep.schema import CLASSES
from nbhelpers import models
from nbhelpers.pipeline.cache import CachedSplit, build_cache
from nbhelpers.pipeline.preprocess import PreprocessConfig
from nbhelpers.settings.presets import PresetError, list_presets
from nbhelpers.evaluation.predict import predict
from nbhelpers.training.checkpoint import load_checkpoint
from nbhelpers.training.config import TrainConfig, config_from_preset
from nbhelpers.training.loop import amp_dtype, fit, make_optimizer
from nbhelpers.training.runs import load_run, read_manifest, runs_table, train_run
from nbhelpers.tools import cli
from nbhelpers.tools.cli import main

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")
#: The smallest registered model with dropout (so resuming must restore torch's RNG too); fast on 2 cores.
TINY = "mobilenetv2"


def _real_manifest(data_dir: Path, per_class: int = 4, splits=("train", "train", "train", "val")) -> pd.DataFrame:
    """``per_class`` real mirror images per class: ieee8023 COVID, NIH normal and pneumonia."""
    return real_manifest(data_dir, per_class, splits)


@pytest.fixture(scope="module")
def real_cache(data_dir, tmp_path_factory):
    """A tiny cache of real mirror images: 4 per class (3 train, 1 val), 32 px."""
    return build_cache(_real_manifest(data_dir), data_dir, tmp_path_factory.mktemp("cache"), PreprocessConfig(size=32),
                       progress=False)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(TINY, num_classes=3)


def test_loss_falls_when_training_on_the_same_images(real_cache, tmp_path):
    train = real_cache.split("train")
    log = fit(_net(), train, train, TrainConfig(epochs=4, batch_size=9, lr=1e-3), tmp_path, CPU, progress=False)
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    assert (tmp_path / "log.csv").is_file() and (tmp_path / "last.pt").is_file()
    assert {"lr", "val_loss", "train_images_per_s", "best"} <= set(pd.read_csv(tmp_path / "log.csv").columns)


def test_best_checkpoint_is_the_best_validation_epoch(real_cache, tmp_path):
    log = fit(_net(), real_cache.split("train"), real_cache.split("val"), TrainConfig(epochs=3, batch_size=9, lr=1e-3),
              tmp_path, CPU, meta={"model": TINY}, progress=False)
    fresh = models.create(TINY, num_classes=3)
    state = load_checkpoint(tmp_path / "best.pt", fresh)
    assert state["epoch"] == int(log["val_acc"].idxmax()) + 1  # ties keep the earlier epoch
    assert state["meta"] == {"model": TINY}
    probs = predict(fresh, real_cache.split("val"), CPU, batch_size=2)
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean(probs.argmax(1) == real_cache.split("val").labels) == pytest.approx(state["val_acc"])


def test_same_seed_same_run(tmp_path):
    rng = np.random.default_rng(0)
    split = CachedSplit("train", rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), np.array([0, 1, 2] * 2),
                        [str(i) for i in range(6)], tmp_path)
    logs = []
    for run in range(2):
        cfg = TrainConfig(epochs=1, batch_size=3, augment="paper", seed=5)
        logs.append(fit(_net(), split, split, cfg, tmp_path / str(run), CPU, progress=False)["train_loss"].item())
    assert logs[0] == logs[1]


def _net_with_dropout(seed: int = 0) -> torch.nn.Module:
    # None of the small zoo models that train at 32 px has active dropout; this one draws from
    # torch's global generator on every training batch.
    return torch.nn.Sequential(_net(seed), torch.nn.Dropout(0.3))


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(real_cache, tmp_path):
    # Augmentation, dropout, a step schedule and Adam state must all be restored exactly.
    train, val = real_cache.split("train"), real_cache.split("val")
    cfg = dict(batch_size=4, lr=1e-3, augment="paper", scheduler="step", step_size=1, gamma=0.5, seed=3)
    straight = _net_with_dropout()
    log_straight = fit(straight, train, val, TrainConfig(epochs=3, **cfg), tmp_path / "a", CPU, progress=False)
    fit(_net_with_dropout(), train, val, TrainConfig(epochs=2, **cfg), tmp_path / "b", CPU, progress=False)
    resumed = _net_with_dropout(seed=99)  # a different initialisation: everything must come from last.pt
    log_resumed = fit(resumed, train, val, TrainConfig(epochs=3, **cfg), tmp_path / "b", CPU, resume=True,
                      progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    pd.testing.assert_frame_equal(log_straight.drop(columns=["seconds", "train_images_per_s"]),
                                  log_resumed.drop(columns=["seconds", "train_images_per_s"]))
    assert log_resumed["lr"].tolist() == [1e-3, 5e-4, 2.5e-4]


def test_resume_refuses_a_checkpoint_with_other_settings(real_cache, tmp_path):
    train = real_cache.split("train")
    fit(_net(), train, train, TrainConfig(epochs=1, batch_size=9, lr=1e-3), tmp_path, CPU, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume .*\['lr'\]"):
        fit(_net(), train, train, TrainConfig(epochs=2, batch_size=9, lr=1e-2), tmp_path, CPU, resume=True,
            progress=False)


def test_early_stopping_triggers_after_patience_epochs(real_cache, tmp_path):
    # A learning rate this small cannot change a prediction, so validation accuracy never improves
    # after epoch 1 and patience 2 stops the run after epoch 3 of 10.
    train, val = real_cache.split("train"), real_cache.split("val")
    cfg = TrainConfig(epochs=10, batch_size=9, lr=1e-12, patience=2)
    log = fit(_net(), train, val, cfg, tmp_path, CPU, progress=False)
    assert list(log["epoch"]) == [1, 2, 3]
    summary = json.loads((tmp_path / "train_config.json").read_text())
    assert summary["stopped_early"] is True and summary["best_epoch"] == 1
    # Resuming a run that stopped early trains nothing more.
    again = fit(_net(), train, val, cfg, tmp_path, CPU, resume=True, progress=False)
    assert list(again["epoch"]) == [1, 2, 3]


def test_presets_load_with_the_papers_settings():
    assert {"seed001", "seed000", "smoke"} <= set(list_presets())
    cfg, extras = config_from_preset("seed001")
    assert (cfg.optimizer, cfg.lr, cfg.betas, cfg.batch_size, cfg.epochs, cfg.patience) == (
        "adam", 2e-4, (0.9, 0.999), 32, 50, 0)
    assert extras["image_size"] == 224 and extras["pretrained"] is True
    cfg, extras = config_from_preset("seed000")
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.patience, cfg.scheduler, cfg.step_size, cfg.gamma) == (
        "adamw", 1.5e-4, 60, 10, "step", 8, 0.8)
    assert extras["image_size"] == 448
    cfg, extras = config_from_preset("smoke", epochs=1, loss="cb_focal", seed=4)
    assert (cfg.epochs, cfg.loss, cfg.seed, extras["pretrained"]) == (1, "cb_focal", 4, False)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="sgdx"))
    with pytest.raises(ValueError, match="TrainConfig.scheduler"):
        TrainConfig(scheduler="plateau")
    with pytest.raises(FileNotFoundError, match="run the training notebook"):
        load_checkpoint(tmp_path / "best.pt", torch.nn.Linear(2, 2))
    with pytest.raises(PresetError, match=r"unknown training preset 'seed01'.*seed001"):
        config_from_preset("seed01")
    with pytest.raises(PresetError, match="'epoch' is not a setting of preset 'smoke'"):
        config_from_preset("smoke", epoch=3)
    with pytest.raises(FileNotFoundError, match=r"manifest .*missing\.csv not found: curate"):
        read_manifest(tmp_path / "missing.csv")
    no_val = pd.DataFrame({"image_id": ["a"], "path": ["a.png"], "label": ["covid"], "split": ["train"]})
    with pytest.raises(ValueError, match=r"no images in split\(s\) \['val'\]"):
        read_manifest(no_val)
    with pytest.raises(ValueError, match="fp16"):
        amp_dtype(TrainConfig(amp="fp16"), CPU)
    assert amp_dtype(TrainConfig(amp="auto"), CPU) is None
    assert amp_dtype(TrainConfig(amp="bf16"), CPU) is torch.bfloat16


def test_missing_manifest_stops_a_run_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="curate the data first"):
        train_run(TINY, tmp_path / "manifest.csv", tmp_path, tmp_path / "run", preset="smoke")
    with pytest.raises(PresetError, match="unknown training preset"):
        train_run(TINY, tmp_path / "manifest.csv", tmp_path, tmp_path / "run", preset="fast")
    assert not (tmp_path / "run").exists()


def test_command_line_names_a_setup_mistake_in_one_line(tmp_path, capsys):
    argv = ["train", "--model", TINY, "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "run")]
    assert main(argv + ["--preset", "smoke", "--data-dir", str(tmp_path)]) == 2
    assert "curate the data first" in capsys.readouterr().err
    assert main(argv + ["--preset", "seed002", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown training preset 'seed002'") and "seed001" in err


def test_command_line_run_evaluates_the_test_split_once_and_matches_sklearn(data_dir, tmp_path):
    manifest = _real_manifest(data_dir, splits=("train", "train", "val", "test"))
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "run"
    status = main(["train", "--model", TINY, "--manifest", str(tmp_path / "manifest.csv"), "--data-dir", str(data_dir),
                   "--out", str(out), "--preset", "smoke", "--seed", "1", "--device", "cpu", "--n-boot", "50",
                   "--set", "epochs=2", "image_size=32", "loss=\"label_smoothing\""])
    assert status == 0
    for name in ("log.csv", "best.pt", "last.pt", "metrics.json", "test_predictions.csv", "curves.png"):
        assert (out / name).is_file(), name
    run = load_run(out)
    m = run.metrics
    assert (m["model"], m["preset"], m["seed"], m["config"]["loss"]) == (TINY, "smoke", 1, "label_smoothing")
    assert m["data"]["counts"] == {"train": 6, "val": 3, "test": 3} and m["data"]["preprocess"]["size"] == 32
    assert m["device"].startswith("cpu") and m["date"] and len(run.log) == 2
    preds = pd.read_csv(out / "test_predictions.csv")
    assert sorted(preds["image_id"]) == sorted(manifest.loc[manifest["split"] == "test", "image_id"])
    probs = preds[[f"p_{c}" for c in CLASSES]].to_numpy()
    y, y_pred = preds["label"].to_numpy(), probs.argmax(1)
    test = m["test"]
    assert test["n"] == 3
    assert test["accuracy"] == pytest.approx(accuracy_score(y, y_pred))
    assert test["macro_sensitivity"] == pytest.approx(recall_score(y, y_pred, average="macro"))
    assert test["macro_f1"] == pytest.approx(f1_score(y, y_pred, average="macro", zero_division=0))
    assert test["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-6)
    ci = {row["metric"]: row for row in test["ci"]}
    assert ci["accuracy"]["low"] <= test["accuracy"] <= ci["accuracy"]["high"]
    # The test predictions came from the best-validation checkpoint.
    net = models.create(TINY, num_classes=3)
    assert load_checkpoint(out / "best.pt", net)["epoch"] == m["best_epoch"]
    table = runs_table([out])
    assert table.loc[0, "model"] == TINY and table.loc[0, "accuracy"] == pytest.approx(test["accuracy"])
    from nbhelpers.evaluation.metrics import aggregate

    summary = aggregate(table)
    assert summary.loc[0, "runs"] == 1 and "macro_auc" in summary.columns and "best_epoch_mean" not in summary.columns


def test_training_benchmark_reports_both_paths_and_their_ratio(data_dir, tmp_path):
    out = tmp_path / "train_cpu.txt"
    argv = ["bench", "train", "--models", "squeezenet", "--size", "32", "--batch-size", "4", "--steps", "2", "--repeats", "1",
            "--threads", "1", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    text = out.read_text()
    assert text.startswith("$ workbook bench train --models squeezenet")
    assert "device: cpu" in text and "torch " + torch.__version__ in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("model"))
    row = next(line for line in text.splitlines() if line.lstrip().startswith("squeezenet")).split()
    values = dict(zip(header.split(), row))
    for column in ("train_bare", "train_data", "infer_b1_bare", "infer_b1_data", "infer_b64_bare", "infer_b64_data"):
        assert float(values[column].replace(",", "")) > 0, column
    ratio = float(values["train_data"].replace(",", "")) / float(values["train_bare"].replace(",", ""))
    assert float(values["data/bare"]) == pytest.approx(ratio, abs=0.02)
    with pytest.raises(models.UnknownModelError):
        cli.dispatch(["bench", "train", "--models", "densenet12", "--device", "cpu", "--data-dir", str(data_dir)])


def test_tracking_is_off_by_default_and_tensorboard_holds_the_logs_curves(data_dir, tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nbhelpers.training import tracking

    manifest = _real_manifest(data_dir, splits=("train", "train", "val", "test"))
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    argv = ["train", "--model", TINY, "--manifest", str(tmp_path / "manifest.csv"), "--data-dir", str(data_dir),
            "--preset", "smoke", "--device", "cpu", "--n-boot", "20", "--set", "epochs=2", "image_size=32"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert main([*argv, "--out", str(tmp_path / "tracked"), "--track", "tensorboard"]) == 0
    events = EventAccumulator(str(tmp_path / "tracked" / "tensorboard"))
    events.Reload()
    log = pd.read_csv(tmp_path / "tracked" / "log.csv")
    val = [(e.step, e.value) for e in events.Scalars("accuracy/val")]
    assert val == [(int(r.epoch), pytest.approx(r.val_acc)) for r in log.itertuples()]
    assert [e.value for e in events.Scalars("loss/train")] == pytest.approx(list(log["train_loss"]), rel=1e-6)
    capsys.readouterr()
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else
                        real_find_spec(name, *a))
    assert main([*argv, "--out", str(tmp_path / "mlflow"), "--track", "mlflow"]) == 2  # MLflow not installed
    assert capsys.readouterr().err.strip() == ("error: --track mlflow needs MLflow: pip install mlflow, or use "
                                               "--track tensorboard")
    assert not (tmp_path / "mlflow" / "last.pt").exists()
