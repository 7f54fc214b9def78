"""Typed settings, atomic and weights-only checkpoints, resume records and the run-folder lock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import filelock
import numpy as np
import pandas as pd
import pytest
from conftest import real_manifest
import torch

from data_prep import atomic
from data_prep.errors import WorkbookError
from nbhelpers import models
from nbhelpers.training import checkpoint, command, runs
from nbhelpers.settings.keyvalue import AssignmentError
from nbhelpers.pipeline.cache import CachedSplit
from nbhelpers.training.checkpoint import CheckpointError, RunFolderInUse, load_checkpoint, read_checkpoint
from nbhelpers.tools.cli import main
from nbhelpers.training.config import TrainConfig, config_from_preset
from nbhelpers.training.loop import fit
from nbhelpers.training.runs import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
TINY = "mobilenetv2"
REPO = Path(__file__).resolve().parents[1]


def _split(tmp_path: Path) -> CachedSplit:
    """Six random 32 px images of three classes: enough to train a step, nothing to decode."""
    rng = np.random.default_rng(0)
    return CachedSplit("train", rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), np.array([0, 1, 2] * 2),
                       [str(i) for i in range(6)], tmp_path)


def _net(seed: int = 0, name: str = TINY) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(name, num_classes=3)


CFG = dict(batch_size=3, lr=1e-3, seed=1)


# --------------------------------------------------------------------------- typed settings


def test_train_config_refuses_a_value_of_the_wrong_type_naming_the_field():
    with pytest.raises(ValueError, match=r"^TrainConfig\.epochs must be an integer, got 1\.5$"):
        TrainConfig(epochs=1.5)
    with pytest.raises(ValueError, match=r"^TrainConfig\.epochs must be an integer, got 'abc'$"):
        TrainConfig(epochs="abc")
    with pytest.raises(ValueError, match=r"TrainConfig\.channels_last must be true or false, got 'false'"):
        TrainConfig(channels_last="false")
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs must be an integer, got None"):
        TrainConfig(epochs=None)
    # The good case: integers where numbers are expected, a list for betas.
    cfg = TrainConfig(lr=1, betas=[0.9, 0.99], epochs=3)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.betas == (0.9, 0.99) and cfg.epochs == 3


def test_preset_extras_are_typed_so_a_string_never_reaches_bool():
    with pytest.raises(AssignmentError, match="preset 'smoke' setting pretrained must be true or false, got 'false'"):
        config_from_preset("smoke", pretrained="false")
    with pytest.raises(AssignmentError, match="preset 'smoke' setting image_size must be an integer"):
        config_from_preset("smoke", image_size="64")
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs must be an integer, got 1\.5"):
        config_from_preset("smoke", epochs=1.5)
    cfg, extras = config_from_preset("smoke", pretrained=False, image_size=32, epochs=2)
    assert extras["pretrained"] is False and extras["image_size"] == 32 and cfg.epochs == 2


def test_a_wrong_type_stops_train_run_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs must be an integer, got 1\.5"):
        train_run(TINY, tmp_path / "manifest.csv", tmp_path, tmp_path / "run", preset="smoke", epochs=1.5)
    with pytest.raises(AssignmentError, match="'clahee' is not a PreprocessConfig field; did you mean clahe"):
        runs.plan_run(TINY, pd.DataFrame({"image_id": ["a", "b"], "path": ["a", "b"], "label": ["covid"] * 2,
                                          "split": ["train", "val"]}), "smoke", preprocess={"clahee": False})
    assert not (tmp_path / "run").exists()


def test_command_line_types_set_preprocess_and_option_values(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_train_run(*args, **kwargs):
        seen.update(kwargs)
        raise WorkbookError("stop here")

    monkeypatch.setattr(command, "train_run", fake_train_run)
    argv = ["train", "--model", "densenet121_cbam", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run")]
    assert main(argv + ["--set", "pretrained=false", "epochs=3", "scheduler=none", "--preprocess", "clahe=FALSE",
                        "--option", "attention=none"]) == 2
    assert seen["pretrained"] is False and seen["epochs"] == 3 and seen["scheduler"] == "none"
    assert seen["preprocess"] == {"clahe": False} and seen["model_options"] == {"attention": "none"}
    capsys.readouterr()
    assert main(argv + ["--set", "epochs=1.5"]) == 2
    err = capsys.readouterr().err
    assert err == "error: epochs must be an integer, got '1.5'\n"
    assert main(argv + ["--set", "epoch=3"]) == 2
    assert "did you mean epochs" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    atomic.WriteError("no space left on the device while writing run/last.pt; free some space"),
    RunFolderInUse("run/.lock"), models.ModelOptionError("model 'x' has no option 'y'"),
    AssignmentError("epochs must be ..."), CheckpointError("run/last.pt is not a readable checkpoint (truncated)"),
])
def test_command_line_reports_setup_errors_in_one_line_and_exits_2(monkeypatch, tmp_path, capsys, error):
    from nbhelpers.pipeline.cache import CacheError

    for raised in (error, CacheError("cache incomplete\nrebuild it")):
        monkeypatch.setattr(command, "train_run", lambda *a, raised=raised, **k: (_ for _ in ()).throw(raised))
        assert main(["train", "--model", TINY, "--manifest", "m.csv", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_command_line_lets_a_bug_raise(monkeypatch, tmp_path):
    monkeypatch.setattr(command, "train_run", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--model", TINY, "--manifest", "m.csv", "--out", str(tmp_path)])


# --------------------------------------------------------------------------- atomic checkpoints

KILLED = 17
CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from data_prep import atomic
    from nbhelpers import models
    from nbhelpers.pipeline.cache import CachedSplit
    from nbhelpers.training.config import TrainConfig
    from nbhelpers.training.loop import fit

    out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    writes = []

    def hook(tmp):
        # The temporary last.pt of epoch `kill_at` is complete but not yet in place: die here.
        if tmp.name.startswith(".last.pt."):
            writes.append(tmp)
            if len(writes) == kill_at:
                os._exit({killed})

    atomic.BEFORE_REPLACE = hook
    rng = np.random.default_rng(0)
    split = CachedSplit("train", rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), np.array([0, 1, 2] * 2),
                        [str(i) for i in range(6)], out)
    torch.manual_seed(0)
    fit(models.create("mobilenetv2", num_classes=3), split, split, TrainConfig(epochs=3, batch_size=3, lr=1e-3,
        seed=1), out, "cpu", progress=False)
""").format(killed=KILLED)


def test_a_kill_while_writing_last_pt_leaves_the_previous_one_to_resume_from(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(out), "2"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == KILLED, done.stderr[-2000:]
    state = read_checkpoint(out / "last.pt")  # whole, and the one of epoch 1
    assert state["epoch"] == 1 and state["log"][-1]["epoch"] == 1
    split = _split(tmp_path)
    resumed = _net(seed=99)
    log = fit(resumed, split, split, TrainConfig(epochs=3, **CFG), out, CPU, resume=True, progress=False)
    assert list(log["epoch"]) == [1, 2, 3]
    straight = _net()
    fit(straight, split, split, TrainConfig(epochs=3, **CFG), tmp_path / "straight", CPU, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_run_files_are_written_through_a_temporary_file_and_last_pt_keeps_its_predecessor(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(atomic, "BEFORE_REPLACE", lambda tmp: written.append(tmp.name.split(".")[1]))
    split = _split(tmp_path)
    fit(_net(), split, split, TrainConfig(epochs=2, **CFG), tmp_path / "run", CPU, progress=False)
    assert {"best", "last", "log", "train_config"} <= set(written)
    assert read_checkpoint(tmp_path / "run" / "last.prev.pt")["epoch"] == 1
    assert read_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))


# --------------------------------------------------------------------------- weights-only loading


class _RunsCode:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_checkpoint_whose_unpickling_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt is not a readable checkpoint .*could run code.*refused"):
        load_checkpoint(tmp_path / "best.pt", _net())
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "payload": _RunsCode(marker)}, run / "last.pt")
    split = _split(tmp_path)
    with pytest.raises(CheckpointError, match="could run code"):
        fit(_net(), split, split, TrainConfig(epochs=1, **CFG), run, CPU, resume=True, progress=False)
    assert not marker.exists()


def test_our_own_checkpoints_load_weights_only(tmp_path):
    split = _split(tmp_path)
    fit(_net(), split, split, TrainConfig(epochs=1, augment="paper", **CFG), tmp_path, CPU, meta={"model": TINY},
        progress=False)
    for name in ("best.pt", "last.pt"):
        state = torch.load(tmp_path / name, weights_only=True)
        assert state["provenance"]["model"] == TINY and state["epoch"] == 1
    assert isinstance(torch.load(tmp_path / "last.pt", weights_only=True)["rng"]["numpy"]["keys"], torch.Tensor)


# --------------------------------------------------------------------------- damaged checkpoints, full disks


def test_a_damaged_last_pt_names_the_file_and_offers_the_previous_good_one(tmp_path):
    split = _split(tmp_path)
    fit(_net(), split, split, TrainConfig(epochs=2, **CFG), tmp_path / "run", CPU, progress=False)
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a truncated copy
    with pytest.raises(CheckpointError) as caught:
        fit(_net(), split, split, TrainConfig(epochs=3, **CFG), tmp_path / "run", CPU, resume=True, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{last} is not a readable checkpoint (")
    assert (f"the previous good one is {last.with_name('last.prev.pt')}: move it to last.pt to resume after "
            "epoch 1, or start afresh without --resume") in message
    # The good case: following the advice resumes from epoch 1.
    os.replace(last.with_name("last.prev.pt"), last)
    log = fit(_net(), split, split, TrainConfig(epochs=3, **CFG), tmp_path / "run", CPU, resume=True, progress=False)
    assert list(log["epoch"]) == [1, 2, 3]
    last.write_bytes(b"")  # no previous one left to offer after a fresh removal
    last.with_name("last.prev.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last\.pt is not a readable checkpoint .*; start afresh without --resume"):
        fit(_net(), split, split, TrainConfig(epochs=4, **CFG), tmp_path / "run", CPU, resume=True, progress=False)


def test_a_full_disk_while_saving_names_the_file_in_one_line(tmp_path, monkeypatch):
    split = _split(tmp_path)

    def torch_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4160 vs 4048")

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(atomic.WriteError, match=r"^cannot write .*best\.pt: PyTorch could not finish the file") as caught:
        fit(_net(), split, split, TrainConfig(epochs=1, **CFG), tmp_path / "a", CPU, progress=False)
    assert "\n" not in str(caught.value) and "enforce" not in str(caught.value)
    monkeypatch.undo()

    real_replace = os.replace

    def replace_full(src, dst):
        if str(dst).endswith("last.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_full)
    with pytest.raises(atomic.WriteError, match=r"^no space left on the device while writing .*last\.pt"):
        fit(_net(), split, split, TrainConfig(epochs=1, **CFG), tmp_path / "b", CPU, progress=False)
    assert not list((tmp_path / "b").glob(".*.tmp"))  # no temporary file left behind


# --------------------------------------------------------------------------- resume records


def _manifest(data_dir: Path, per_class: int = 3) -> pd.DataFrame:
    return real_manifest(data_dir, per_class, ["train", "train", "val"] + ["train"] * (per_class - 3))


def test_resume_checks_model_data_and_settings_and_says_what_differs(data_dir, tmp_path):
    out = tmp_path / "run"
    run = dict(data_dir=data_dir, out_dir=out, preset="smoke", device="cpu", progress=False, n_boot=10,
               cache_root=tmp_path / "cache", image_size=32)
    manifest = _manifest(data_dir)
    train_run(TINY, manifest, **run)
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: .*model mobilenetv2, not squeezenet"):
        train_run("squeezenet", manifest, resume=True, **run)
    with pytest.raises(ValueError, match=r"different \['manifest_hash', 'cache_key'\] \(it holds manifest_hash \w+, "
                                         r"not \w+; cache_key"):
        train_run(TINY, _manifest(data_dir, per_class=4), resume=True, **run)
    with pytest.raises(ValueError, match=r"preprocess\.clahe true, not false"):
        train_run(TINY, manifest, resume=True, preprocess={"clahe": False}, **run)
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 1  # refused before preprocessing
    # The good case: only epochs changed, so the run continues.
    result = train_run(TINY, manifest, resume=True, epochs=2, **run)
    assert list(result.log["epoch"]) == [1, 2]
    saved = json.loads((out / "metrics.json").read_text())["provenance"]
    assert saved == runs.run_provenance(TINY, manifest, "smoke", 0, preprocess={"size": 32}, epochs=2)
    assert json.loads((out / "train_config.json").read_text())["provenance"] == saved


def test_resume_with_another_architecture_names_the_model_the_checkpoint_holds(tmp_path):
    split = _split(tmp_path)
    fit(_net(), split, split, TrainConfig(epochs=1, **CFG), tmp_path, CPU, meta={"model": TINY}, progress=False)
    with pytest.raises(ValueError, match="it holds model mobilenetv2, not squeezenet"):
        fit(_net(name="squeezenet"), split, split, TrainConfig(epochs=2, **CFG), tmp_path, CPU,
            meta={"model": "squeezenet"}, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"its weights \(model mobilenetv2\) do not fit this model"):
        fit(_net(name="squeezenet"), split, split, TrainConfig(epochs=2, **CFG), tmp_path, CPU, resume=True,
            progress=False, provenance={"model": TINY})


# --------------------------------------------------------------------------- the run-folder lock


def test_a_second_run_on_the_same_folder_stops_with_one_clear_line(tmp_path, monkeypatch, data_dir, capsys):
    monkeypatch.setattr(checkpoint, "LOCK_TIMEOUT", 0.2)
    out = tmp_path / "run"
    out.mkdir()
    split = _split(tmp_path)
    held = filelock.FileLock(out / ".lock")
    with held:
        with pytest.raises(RunFolderInUse) as caught:
            fit(_net(), split, split, TrainConfig(epochs=1, **CFG), out, CPU, progress=False)
        assert str(caught.value) == (f"{out} is in use by another training run (lock {out / '.lock'}); "
                                     "wait for it or choose another --out")
        _manifest(data_dir).to_csv(tmp_path / "manifest.csv", index=False)
        argv = ["train", "--model", TINY, "--manifest", str(tmp_path / "manifest.csv"), "--data-dir", str(data_dir),
                "--out", str(out), "--preset", "smoke", "--device", "cpu", "--set", "image_size=32"]
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: {caught.value}\n"
        assert not (out / "last.pt").exists()
    # The good case: once the other run let go, training proceeds.
    log = fit(_net(), split, split, TrainConfig(epochs=1, **CFG), out, CPU, progress=False)
    assert list(log["epoch"]) == [1]


def test_a_preprocessing_field_added_since_a_run_counts_as_its_default():
    from nbhelpers.training.provenance import provenance_differences

    before = {"model": "m", "preprocess": {"size": 64, "clahe": True}}  # recorded before blackout existed
    assert provenance_differences(before, {"model": "m", "preprocess": {"size": 64, "clahe": True,
                                                                        "blackout": "none"}}) == []
    changed = provenance_differences(before, {"model": "m", "preprocess": {"size": 64, "clahe": True,
                                                                           "blackout": "lungs"}})
    assert [key for key, _ in changed] == ["preprocess.blackout"]
    assert [key for key, _ in provenance_differences(before, {"model": "m", "preprocess": {"size": 32, "clahe": True}})] \
        == ["preprocess.size"]


def test_nested_holds_of_one_folder_share_its_lock_and_release_it_together(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "LOCK_TIMEOUT", 0.2)
    out = tmp_path / "run"
    with checkpoint.hold_run_folder(out):
        (out / ".last.pt.123.tmp").write_bytes(b"written inside the hold")
        with checkpoint.hold_run_folder(out):  # fit inside train_run: no wait, no cleanup of the outer's files
            assert (out / ".last.pt.123.tmp").exists()
        with pytest.raises(filelock.Timeout):  # still held after the inner block
            filelock.FileLock(out / ".lock").acquire(timeout=0.1)
    other = filelock.FileLock(out / ".lock")
    other.acquire(timeout=0.1)  # both blocks done: free
    other.release()
