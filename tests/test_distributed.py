"""Data-parallel training on the CPU (gloo, 2 processes) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import real_manifest
from torch import nn

from nbhelpers.pipeline.cache import ImageCache, build_cache
from nbhelpers.pipeline.preprocess import PreprocessConfig
from nbhelpers.settings.config import REPO_ROOT
from nbhelpers.training import distributed
from nbhelpers.training.config import TrainConfig
from nbhelpers.training.loop import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORLD = 2
#: 15 training images in global batches of 10: a full batch (5 + 5 per rank) and a last batch
#: of 5 that splits 3 + 2, so the per-rank loss weighting is exercised; "paper" augmentation
#: checks that every image gets the transform it gets in one process.
CFG = dict(batch_size=10, lr=1e-3, augment="paper", seed=3)
#: Per-epoch mean losses and weights may differ by the order of float sums only (measured here:
#: 1.1e-7 relative on the losses, 1.5e-8 on any weight); without BatchNorm nothing else differs.
RTOL, WEIGHT_ATOL = 1e-5, 1e-6
#: Run folder files that exist once a run has trained two epochs.
RUN_FILES = {".lock", "best.pt", "last.pt", "last.prev.pt", "log.csv", "train_config.json"}
WRITE_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.truncate",
                "os.chmod", "shutil.rmtree", "shutil.copyfile", "tempfile.mkstemp")


def _plain_net() -> nn.Module:
    """A small network without BatchNorm or dropout: one process and two see the same function."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record_writes(root: Path, writes: list) -> None:
    """Record every file-system change this process makes under ``root`` (Python audit events)."""
    prefix = os.path.abspath(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and isinstance(path, (str, Path)) and os.path.abspath(path).startswith(prefix):
                writes.append((event, str(path)))
        elif event in WRITE_EVENTS:
            paths = [a for a in args if isinstance(a, (str, Path))]
            if any(os.path.abspath(p).startswith(prefix) for p in paths):
                writes.append((event, [str(p) for p in paths]))

    sys.addaudithook(hook)


def _worker(rank: int, port: int, cache_path: str, runs: str) -> None:
    """One rank: a straight 2-epoch run (a), then 1 epoch and a resume to 2 (b); rank 1 must write nothing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    writes: list = []
    if rank:
        _record_writes(Path(runs), writes)
    ranks = distributed.start("cpu")
    try:
        cache = ImageCache.open(cache_path)
        train, val = cache.split("train"), cache.split("val")
        for name, epochs, resume in (("a", 2, False), ("b", 1, False), ("b", 2, True)):
            distributed.fit_distributed(_plain_net(), train, val, TrainConfig(epochs=epochs, **CFG),
                                        Path(runs) / name, ranks, meta={"model": "plain"}, resume=resume,
                                        progress=False)
    finally:
        distributed.stop(ranks)
    assert not writes, f"rank {rank} wrote under the run folders: {writes}"


@pytest.fixture(scope="module")
def cache(data_dir, tmp_path_factory):
    manifest = real_manifest(data_dir, per_class=6, splits=("train",) * 5 + ("val",))
    return build_cache(manifest, data_dir, tmp_path_factory.mktemp("cache"), PreprocessConfig(size=32), progress=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_two_ranks_train_like_one_process_resume_and_only_rank_0_writes(cache, tmp_path):
    train, val = cache.split("train"), cache.split("val")
    assert (len(train), len(val)) == (15, 3)
    one = fit(_plain_net(), train, val, TrainConfig(epochs=2, **CFG), tmp_path / "one", "cpu",
              meta={"model": "plain"}, progress=False)
    runs = tmp_path / "runs"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(cache.path), str(runs)), nprocs=WORLD)

    straight = pd.read_csv(runs / "a" / "log.csv")
    resumed = pd.read_csv(runs / "b" / "log.csv")
    for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert straight[column].tolist() == pytest.approx(one[column].tolist(), rel=RTOL), column
    for name, tensor in _weights(tmp_path / "one" / "last.pt").items():
        assert torch.allclose(_weights(runs / "a" / "last.pt")[name], tensor, rtol=RTOL, atol=WEIGHT_ATOL), name
    # Interrupted after epoch 1 and resumed: the same run as the straight one.
    timing = ["seconds", "train_images_per_s"]
    pd.testing.assert_frame_equal(straight.drop(columns=timing), resumed.drop(columns=timing), rtol=1e-6)
    for name, tensor in _weights(runs / "a" / "last.pt").items():
        assert torch.allclose(_weights(runs / "b" / "last.pt")[name], tensor, rtol=1e-6, atol=1e-7), name
    # The files of one process, once each (rank 1's writes are checked inside the worker).
    for folder in (runs / "a", runs / "b", tmp_path / "one"):
        assert {p.name for p in folder.iterdir()} == RUN_FILES, folder
    summary = json.loads((runs / "a" / "train_config.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": False, "device_type": "cpu"}
    assert summary["epochs_run"] == 2


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CXR_PROGRESS": "quiet"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
               "--master-port", str(_free_port()), "-m", "nbhelpers", "train", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_train_command_writes_once_and_one_process_resumes_it(data_dir, tmp_path):
    from nbhelpers.tools.cli import main

    manifest = tmp_path / "manifest.csv"
    real_manifest(data_dir, per_class=6, splits=("train",) * 4 + ("val", "test")).to_csv(manifest, index=False)
    out = tmp_path / "run"
    common = ["--model", "mobilenetv2", "--manifest", str(manifest), "--data-dir", str(data_dir), "--out", str(out),
              "--preset", "smoke", "--device", "cpu", "--n-boot", "20", "--set", "image_size=32", "batch_size=4"]
    first = _torchrun([*common, "--set", "epochs=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("run written to") == 1  # rank 0 alone prints
    assert {p.name for p in out.iterdir()} == RUN_FILES - {"last.prev.pt"} | {
        "metrics.json", "test_predictions.csv", "curves.png", "cache"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": False, "device_type": "cpu"}
    assert len(pd.read_csv(out / "test_predictions.csv")) == 3
    log1 = pd.read_csv(out / "log.csv")
    # The record holds no process count, so one process resumes what two started.
    assert main(["train", *common, "--set", "epochs=2", "--resume"]) == 0
    log2 = pd.read_csv(out / "log.csv")
    assert log2["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(log1, log2.iloc[:1])
    assert "distributed" not in json.loads((out / "metrics.json").read_text())


def test_shards_cover_each_batch_once():
    for n in range(1, 12):
        for world in (1, 2, 3):
            bounds = [distributed.shard(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    assert distributed.drops_last(15, 10, 2) is False and distributed.drops_last(13, 10, 2) is True
    assert distributed.drops_last(11, 10, 1) is True and distributed.drops_last(20, 10, 2) is False


def test_setup_errors_are_one_line(monkeypatch, capsys, tmp_path):
    from nbhelpers.tools.cli import main  # imported here: the spawned ranks import this module and need none of it

    with pytest.raises(distributed.DistributedSetupError, match="batch_size 10 does not split over 3"):
        distributed.check_batch(10, 3)
    base = ["train", "--model", "mobilenetv2", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]
    assert main([*base, "--sync-bn"]) == 2  # outside torchrun
    assert "apply to a run started by torchrun" in capsys.readouterr().err
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    if not torch.cuda.is_available():
        assert main([*base, "--dist-backend", "nccl"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --dist-backend nccl needs CUDA GPUs") and err.count("\n") == 1
        assert main([*base, "--device", "cpu", "--sync-bn"]) == 2
        assert "--sync-bn needs CUDA GPUs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
