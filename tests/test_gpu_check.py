"""The GPU check's dry run on the CPU: the cache it packs, every file it writes, and that it runs
where the project's curation, notebook and CAM packages are absent (as on the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import real_manifest

from nbhelpers.settings.config import REPO_ROOT
from nbhelpers.tools import gpu_cache, gpu_check
from nbhelpers.tools.cli import main

#: What a bare GPU machine's Python (torch, timm, scikit-learn, ...) lacks of the project's requirements.
ABSENT = ("imagehash", "pydicom", "ptflops", "pytorch_grad_cam", "papermill", "ray", "nbformat", "ipywidgets",
          "ipykernel", "IPython", "jupyterlab", "torchxrayvision")
FILES = ("gpu_env.txt", "gpu_throughput.txt", "gpu_protocol.txt", "gpu_ddp.txt")
#: Small models keep the dry run short on a shared CPU; the defaults run the papers' models.
MODELS = ["squeezenet", "mobilenetv2"]


@pytest.fixture(scope="module")
def packed(data_dir, tmp_path_factory):
    """A packed cache of 18 real mirror images at 32 px (train 12, val 3, test 3), by the command."""
    folder = tmp_path_factory.mktemp("gpu")
    table = real_manifest(data_dir, per_class=6, splits=("train",) * 4 + ("val", "test"))
    # two films per patient within a split (a patient across splits is a leak the reader refuses)
    table["patient_id"] = [f"{s}{i // 2}" for i, s in enumerate(table["split"])]
    table.to_csv(folder / "manifest.csv", index=False)
    code = main(["gpu-check", "build-cache", "--data-dir", str(data_dir), "--out", str(folder / "cache"),
                 "--manifest", str(folder / "manifest.csv"), "--size", "32", "--workers", "1"])
    assert code == 0
    return folder / "cache"


def test_packed_cache_holds_every_split_with_patients(packed):
    meta = json.loads((packed / gpu_cache.META_NAME).read_text())
    assert meta["counts"] == {"train": 12, "val": 3, "test": 3} and meta["preprocess"]["size"] == 32
    data = gpu_cache.read_packed(packed)
    test = data.splits["test"]
    assert test.images.shape == (3, 32, 32) and test.images.dtype.name == "uint8"
    assert len(set(data.patients(test.image_ids))) >= 2
    small = gpu_cache.read_packed(packed, size=16, per_split=5)
    assert small.splits["train"].images.shape == (5, 16, 16)
    assert sorted(p.name for p in packed.iterdir()) == ["images.npz", "manifest.csv", "meta.json"]


def test_a_damaged_or_missing_cache_and_no_gpu_are_one_line_errors(packed, tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "build it with `workbook gpu-check build-cache" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("meta.json", "manifest.csv"):
        (damaged / name).write_bytes((packed / name).read_bytes())
    (damaged / "images.npz").write_bytes((packed / "images.npz").read_bytes()[:-10])
    with pytest.raises(gpu_cache.GpuCacheError, match="does not match its SHA-256"):
        gpu_cache.read_packed(damaged)
    if not torch.cuda.is_available():
        assert gpu_check.main(["--cache", str(packed), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no CUDA GPU here") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _blocking(folder: Path) -> Path:
    """A ``sitecustomize`` that makes :data:`ABSENT` unimportable in every Python started with it."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        class _Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(ABSENT)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, _Absent())
    """))
    return folder


@pytest.mark.slow
def test_dry_run_writes_every_file_with_its_header_without_the_absent_packages(packed, tmp_path):
    block = _blocking(tmp_path / "block")
    probe = subprocess.run([sys.executable, "-c", "import imagehash"], env={**os.environ, "PYTHONPATH": str(block)},
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'imagehash'" in probe.stderr  # the blocker works
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(block), "GPU_PYTHON": sys.executable, "GPU_CACHE": str(packed),
           "OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--models", *MODELS,
                           "--protocol-models", *MODELS], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "gpu_check.log"])
    texts = {name: (out / name).read_text() for name in FILES}
    for name, text in texts.items():
        lines = text.splitlines()
        assert lines[0].startswith("$ python3 -m nbhelpers.tools.gpu_check --cache"), name
        assert lines[1].startswith("date: ") and lines[2].startswith("device: cpu"), name
        assert "(dry run: CPU, toy size)" in text and "FAILED" not in text, name
    assert "TFLOP/s" in texts["gpu_env.txt"] and "GB/s" in texts["gpu_env.txt"]
    table = texts["gpu_throughput.txt"]
    assert all(f"{m} " in table for m in MODELS) and "True" in table and "False" in table and "data/bare" in table
    protocol = texts["gpu_protocol.txt"]
    assert all(f"== {m}: 1 of 1 epochs" in protocol for m in MODELS)
    assert "accuracy: " in protocol and "patient bootstrap" in protocol
    assert "torchrun" in texts["gpu_ddp.txt"] and "backend gloo" in texts["gpu_ddp.txt"]
    assert (out / "gpu_check.log").read_text().count("$ python3 -m nbhelpers.tools.gpu_check") == len(FILES)
