"""The grid's engines: Ray Tune trials and a submitit job array train the same runs into the same
folders as the loop in this process, a crashed trial is retried, and bad engine options are one
line and exit status 2 before anything is written."""

from __future__ import annotations

import functools
import json
import os
import sys
from itertools import product
from pathlib import Path

import pandas as pd
import pytest
from conftest import real_manifest

from nbhelpers.experiments import ablation, engines
from nbhelpers.experiments.ablation import Row
from nbhelpers.experiments.engines import Engine, EngineError, Job, RunsFailed
from nbhelpers.settings.config import REPO_ROOT
from nbhelpers.tools import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [Row("g", "base", "mobilenetv2", baseline=True), Row("g", "no_clahe", "mobilenetv2", preprocess={"clahe": False})]
SEEDS = [0, 1]
#: The smallest runs the grid tests train: 32 px, one epoch, nine real images.
GRID = dict(seeds=SEEDS, preset="smoke", device="cpu", image_size=32)


def _manifest(data_dir: Path) -> pd.DataFrame:
    return real_manifest(data_dir, 3, ["train", "val", "test"])


@pytest.fixture(scope="module")
def local_grid(data_dir, tmp_path_factory):
    """The 2-row x 2-seed grid trained by the local engine: what every other engine must match."""
    root = tmp_path_factory.mktemp("local_grid")
    return root, ablation.run_grid(ROWS, _manifest(data_dir), data_dir, root, **GRID)


@pytest.fixture(scope="module")
def ray_here():
    """One Ray of two CPUs for the module (the engine uses it and leaves it running); shut down at the end."""
    import ray

    assert engines.connect(Engine("ray", ray_cpus=2))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials call this module's functions
    yield ray
    ray.shutdown()


def _record(root: Path, row: Row, seed: int) -> dict:
    return json.loads((ablation.run_dir(root, row, seed) / "metrics.json").read_text())


def _same_runs(root: Path, reference: Path, rows=ROWS, seeds=SEEDS) -> None:
    for row, seed in product(rows, seeds):
        ours, theirs = _record(root, row, seed), _record(reference, row, seed)
        assert ours["provenance"] == theirs["provenance"] and ours["test"] == theirs["test"], (row.name, seed)
        predictions = [pd.read_csv(ablation.run_dir(r, row, seed) / "test_predictions.csv") for r in (root, reference)]
        pd.testing.assert_frame_equal(*predictions)


def _crash_once(markers: Path, *args, **kwargs):
    """train_run, except that the first try of ``no_clahe`` seed 0 kills its worker process mid-grid."""
    from nbhelpers.training.runs import train_run  # the worker's own, not the test's stand-in

    folder = Path(args[3])
    marker = Path(markers) / f"{folder.parent.name}-{folder.name}"
    if (folder.parent.name, folder.name) == ("no_clahe", "seed0") and not marker.exists():
        marker.touch()
        os._exit(3)  # as a killed or crashed process: no exception, no cleanup
    return train_run(*args, **kwargs)


@pytest.fixture(scope="module")
def ray_grid(data_dir, tmp_path_factory, ray_here):
    """The same grid as Ray trials (one Ray experiment for the tests below: Ray starts its workers
    slowly), one trial of which dies on its first try."""
    root, markers = tmp_path_factory.mktemp("ray_grid"), tmp_path_factory.mktemp("markers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nbhelpers.training.runs.train_run", functools.partial(_crash_once, markers))
        table = ablation.run_grid(ROWS, _manifest(data_dir), data_dir, root, engine=Engine("ray", max_failures=1),
                                  **GRID)
    return root, table, markers


@pytest.mark.slow
def test_ray_trains_the_runs_the_local_loop_trains(data_dir, local_grid, ray_grid, capsys):
    reference, table = local_grid
    root, runs, _ = ray_grid
    pd.testing.assert_frame_equal(runs, table)
    _same_runs(root, reference)
    assert len(list((root / "engine_logs" / "ray").iterdir())) == 1  # the experiment, under the grid root
    # The local engine finishes what Ray started: Ray's runs are finished runs with matching records.
    ablation.run_grid(ROWS, _manifest(data_dir), data_dir, root, **GRID)
    assert "4 of 4 runs already finished with these settings; 0 to train" in capsys.readouterr().out


@pytest.mark.slow
def test_a_trial_killed_mid_run_is_retried_and_the_grid_completes(local_grid, ray_grid):
    root, _, markers = ray_grid
    assert [p.name for p in markers.iterdir()] == ["no_clahe-seed0"]  # its first try did die
    _same_runs(root, local_grid[0], ROWS[1:], [0])  # and its second trained the run the local loop trains


@pytest.mark.slow
def test_a_run_that_keeps_failing_is_named_after_its_retries(tmp_path, ray_here):
    with pytest.raises(RunsFailed) as failed:  # int: a function Ray's workers can import
        engines.run_jobs(int, [Job(tmp_path / "bad", ("seven",))], Engine("ray", max_failures=1), tmp_path, verbose=0)
    message = str(failed.value)
    assert message.startswith(f"1 of 1 runs failed on Ray (2 tries each); first: {tmp_path / 'bad'}: ValueError: ")
    assert "\n" not in message and str(tmp_path / "engine_logs" / "ray") in message


@pytest.mark.slow
def test_a_local_submitit_array_trains_the_same_grid(data_dir, tmp_path, local_grid, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the array's processes share the machine's cores
    engine = Engine("slurm", slurm_cluster="local", time_min=20)
    runs = ablation.run_grid(ROWS, _manifest(data_dir), data_dir, tmp_path, engine=engine, **GRID)
    pd.testing.assert_frame_equal(runs, local_grid[1])
    _same_runs(tmp_path, local_grid[0])
    assert "slurm (local): 4 runs as job array" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_array_task_is_submitted_again_then_named(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, where the bad job makes a folder")
    jobs = [Job(tmp_path / "taken", (tmp_path / "taken",)), Job(tmp_path / "made", (tmp_path / "made",))]
    with pytest.raises(RunsFailed) as failed:  # os.makedirs: a function the array's processes can import
        engines.run_jobs(os.makedirs, jobs, Engine("slurm", slurm_cluster="local", max_failures=1), tmp_path)
    message = str(failed.value)
    assert message.startswith(f"1 of 2 runs failed on SLURM (local) (2 tries each); first: {tmp_path / 'taken'}: ")
    assert "FileExistsError" in message and "\n" not in message
    assert (tmp_path / "made").is_dir()
    out = capsys.readouterr().out
    assert "2 runs as job array" in out and "1 runs as job array" in out and "(retry 1 of the failed ones)" in out


# --------------------------------------------------------------------------- bad engine options: one line, exit 2


@pytest.fixture
def grid_command(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image_id,path,label,split\n")
    out = tmp_path / "grid"
    return out, ["grid", "--manifest", str(manifest), "--out", str(out), "--groups", "cbam", "--preset", "smoke"]


@pytest.mark.parametrize("extra, env, expected", [
    (["--engine", "ray", "--address", "127.0.0.1:9"], {},
     "cannot reach Ray at 127.0.0.1:9: Connection refused; start one with `ray start --head` or drop --address"),
    (["--engine", "ray"], {"RAY_ADDRESS": "127.0.0.1:9"},
     "cannot reach Ray at 127.0.0.1:9: Connection refused; start one with `ray start --head` or unset RAY_ADDRESS"),
    (["--engine", "slurm"], {"PATH": ""}, "no SLURM here (sbatch not found): use --engine local or --engine ray"),
    (["--engine", "ray", "--gpus-per-trial", "0.25"], {},
     "--gpus-per-trial 0.25 asks for GPUs, but this machine has none (torch.cuda.is_available() is False): "
     "drop it, or give --address of a Ray cluster with GPUs"),
    (["--engine", "slurm", "--slurm-cluster", "local", "--gpus-per-job", "1"], {},
     "--gpus-per-job 1 asks for GPUs, but this machine has none (torch.cuda.is_available() is False): "
     "drop it, or run on SLURM (--slurm-cluster slurm)"),
    (["--gpus-per-trial", "1"], {}, "--gpus-per-trial is an option of --engine ray, not of --engine local"),
    (["--engine", "ray", "--gpus-per-trial", "1.5"], {},
     "--gpus-per-trial must be a fraction of one GPU (0.25, 0.5) or a whole number, got 1.5"),
], ids=["address", "RAY_ADDRESS", "no-sbatch", "gpu-trial", "gpu-job", "wrong-engine", "gpu-fraction"])
def test_bad_engine_options_are_one_line_and_write_nothing(grid_command, monkeypatch, capsys, extra, env, expected):
    out, argv = grid_command
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a CPU machine, wherever the test runs
    assert cli.main(argv + extra) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert not out.exists()


@pytest.mark.parametrize("engine, module, pin", [("ray", "ray.tune", engines.RAY_PIN),
                                                 ("slurm", "submitit", engines.SUBMITIT_PIN)])
def test_a_missing_engine_package_names_its_pin(grid_command, monkeypatch, capsys, engine, module, pin):
    out, argv = grid_command
    monkeypatch.setitem(sys.modules, module, None)  # `import ray.tune` / `import submitit` now fails
    extra = ["--engine", engine] + ["--slurm-cluster", "local"] * (engine == "slurm")
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --engine {engine} needs ") and err.endswith(f"pip install '{pin}'\n")
    assert err.count("\n") == 1 and not out.exists()


def test_the_engine_pins_are_the_grid_extra():
    pins = (REPO_ROOT / "requirements-grid.txt").read_text().splitlines()
    assert engines.RAY_PIN in pins and engines.SUBMITIT_PIN in pins


def test_ray_and_submitit_are_imported_only_for_their_engine():
    import subprocess

    code = ("import sys; from nbhelpers.experiments import ablation, engines, engine_ray, engine_slurm; "
            "from nbhelpers.tools import bench_engine; "
            "print(sorted(m for m in ('ray', 'submitit') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_paths_leave_the_process_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = Job(Path("g/a/seed0"), ("m", Path("manifest.csv"), None, Path("g/a/seed0")), {"cache_root": Path("cache"),
                                                                                         "preset": "smoke"}).portable()
    assert job.folder == tmp_path / "g/a/seed0" and job.args == ("m", tmp_path / "manifest.csv", None,
                                                                tmp_path / "g/a/seed0")
    assert job.kwargs == {"cache_root": tmp_path / "cache", "preset": "smoke"}
    with pytest.raises(EngineError, match="unknown engine"):
        Engine("spark").check()


@pytest.mark.slow
def test_the_engine_bench_measures_the_same_work_both_ways(tmp_path, ray_here):
    from nbhelpers.tools import bench_engine

    assert bench_engine.spin(10) == bench_engine.spin(10) > 0
    numbers = bench_engine.measure(trials=2, seconds=0.2, ray_cpus=1, root=tmp_path)
    assert numbers["median_here"] > 0 and numbers["median_inside"] > 0 and numbers["per_trial"] > 0
    lines = bench_engine.format_report(numbers, 2, 1)
    assert lines[0].startswith(f"work per trial: {numbers['steps']:,} steps") and "% per trial)" in lines[-1]
