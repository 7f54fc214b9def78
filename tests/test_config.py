from __future__ import annotations

import pytest
import torch

from nbhelpers.settings import config
from data_prep import datadir
from nbhelpers.experiments.ablation import load_grid
from nbhelpers.settings.device import DeviceError, pick_device
from nbhelpers.settings.presets import load_preset


def test_profiles_have_the_same_settings():
    profiles = config.load_profiles()
    assert {"smoke", "teach", "full"} <= set(profiles)
    assert set(profiles["smoke"]) == set(profiles["teach"]) == set(profiles["full"])


def test_the_notebooks_default_to_a_profile_the_mirror_can_supply():
    # Run All in JupyterLab must work where the sources are: the default curates strictly within
    # what the public sources hold (about 267 COVID-19 PA films), unlike the paper's 475.
    import papermill

    from nbhelpers.tools import run

    for path in run.ordered_notebooks():
        assert papermill.inspect_notebook(str(path))["profile"]["default"] == '"teach"', path.name
    teach = config.load_profile("teach")
    assert teach["balance"] == "strict" and teach["per_class"] <= 200 and teach["device"] == "cpu"


def test_full_profile_is_the_paper_protocol():
    full = config.load_profile("full")
    assert (full["per_class"], full["image_size"], full["preset"]) == (475, 224, "seed001")
    assert full["split"] == [0.7, 0.1, 0.2]
    preset = load_preset("seed001")
    assert (preset["epochs"], preset["batch_size"], preset["optimizer"]) == (50, 32, "adam")
    assert preset["lr"] == pytest.approx(2e-4)


def test_profiles_and_their_presets_agree_on_the_image_size():
    # notebook 02's cache and the trainer's must be the same images
    for name, profile in config.load_profiles().items():
        assert profile["image_size"] == load_preset(profile["preset"])["image_size"], name
        assert set(profile["ablation_groups"]) <= {r.group for r in load_grid()}, name


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(config.ProfileError, match="smoke"):
        config.load_profile("smok")


def test_resolve_overrides_and_rejects_typos(tmp_path):
    s = config.resolve("smoke", run_dir=tmp_path, need_data=False, image_size=32, clip_limit=None)
    assert s.image_size == 32 and s.clip_limit == config.load_profile("smoke")["clip_limit"]
    assert s.run_dir == tmp_path.resolve()
    with pytest.raises(config.ProfileError, match="image_sise"):
        config.resolve("smoke", need_data=False, image_sise=3)
    with pytest.raises(AttributeError, match="nonsense"):
        s.nonsense


def test_data_dir_errors_name_the_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(datadir.DATA_ENV, raising=False)
    with pytest.raises(datadir.DataNotFoundError, match=datadir.DATA_ENV):
        datadir.data_dir()
    monkeypatch.setenv(datadir.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(datadir.DataNotFoundError, match="absent"):
        datadir.data_dir()
    assert datadir.data_dir(tmp_path) == tmp_path.resolve()


def test_data_dir_finds_the_mirror(data_dir, monkeypatch):
    monkeypatch.setenv(datadir.DATA_ENV, str(data_dir))
    assert (datadir.data_dir() / "covid-chestxray-dataset" / "metadata.csv").is_file()


def test_auto_device_falls_back_in_order(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("nbhelpers.settings.device._mps_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    assert "cpu" in capsys.readouterr().out
    monkeypatch.setattr("nbhelpers.settings.device._mps_available", lambda: True)
    assert pick_device("auto", verbose=False).type == "mps"


def test_absent_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        pick_device("tpu")


def test_a_file_given_as_the_data_folder_is_named(tmp_path):
    csv = tmp_path / "metadata.csv"
    csv.write_text("x\n")
    with pytest.raises(datadir.DataNotFoundError, match=r"is a file, not a folder"):
        datadir.data_dir(csv)


def test_resolve_checks_the_type_of_every_override(tmp_path):
    # Before: image_size="abc" or clahe="no" passed into the settings and failed cells later.
    with pytest.raises(config.ProfileError, match=r"image_size must be an integer, got 'abc'"):
        config.resolve("smoke", need_data=False, image_size="abc")
    with pytest.raises(config.ProfileError, match=r"clahe must be true or false"):
        config.resolve("smoke", need_data=False, clahe="no")
    assert config.resolve("smoke", need_data=False, min_age=None, clip_limit=3).clip_limit == 3.0
    assert config.resolve("smoke", need_data=False, seeds=[0, 1]).seeds == [0, 1]


def test_a_settings_file_replaces_the_profile_and_is_checked(tmp_path):
    values = {**config.load_profile("smoke"), "clahe": False}
    path = config.write_settings(tmp_path, "smoke", values, {"clahe": False})
    assert config.resolve("smoke", need_data=False, settings_file=path).clahe is False
    assert config.resolve("smoke", need_data=False, settings_file=path, clahe=True).clahe is True
    with pytest.raises(config.ProfileError, match="missing or unreadable"):
        config.resolve("smoke", need_data=False, settings_file=tmp_path / "absent.json")
    path.write_text(path.read_text().replace('"clahe": false', '"clahe": "off"'))
    with pytest.raises(config.ProfileError, match="clahe must be true or false"):
        config.resolve("smoke", need_data=False, settings_file=path)


def test_display_path_hides_this_machines_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(datadir.DATA_ENV, str(tmp_path / "sources"))
    assert config.display_path(config.REPO_ROOT / "results" / "runs" / "teach") == "results/runs/teach"
    assert config.display_path(tmp_path / "sources" / "nih" / "a.png") == "$CXR_DATA_DIR/nih/a.png"
    assert config.display_path(tmp_path / "sources") == "$CXR_DATA_DIR"
    elsewhere = config.display_path(tmp_path / "x" / "y")
    assert elsewhere == ".../x/y" and str(tmp_path) not in elsewhere
