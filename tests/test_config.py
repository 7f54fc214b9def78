from __future__ import annotations

import pytest
import torch

from nbhelpers import config
from nbhelpers.device import DeviceError, pick_device


def test_profiles_have_the_same_settings():
    profiles = config.load_profiles()
    assert {"smoke", "full"} <= set(profiles)
    assert set(profiles["smoke"]) == set(profiles["full"])


def test_full_profile_is_the_paper_protocol():
    full = config.load_profile("full")
    assert (full["per_class"], full["image_size"], full["epochs"], full["batch_size"]) == (475, 224, 50, 32)
    assert full["lr"] == pytest.approx(2e-4)
    assert full["split"] == [0.7, 0.1, 0.2]


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(config.ProfileError, match="smoke"):
        config.load_profile("smok")


def test_resolve_overrides_and_rejects_typos(tmp_path):
    s = config.resolve("smoke", run_dir=tmp_path, need_data=False, epochs=3, lr=None)
    assert s.epochs == 3 and s.lr == config.load_profile("smoke")["lr"]
    assert s.run_dir == tmp_path.resolve()
    with pytest.raises(config.ProfileError, match="epoch"):
        config.resolve("smoke", need_data=False, epoch=3)
    with pytest.raises(AttributeError, match="nonsense"):
        s.nonsense


def test_data_dir_errors_name_the_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(config.DATA_ENV, raising=False)
    with pytest.raises(config.DataNotFoundError, match=config.DATA_ENV):
        config.data_dir()
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(config.DataNotFoundError, match="absent"):
        config.data_dir()
    assert config.data_dir(tmp_path) == tmp_path.resolve()


def test_data_dir_finds_the_mirror(data_dir, monkeypatch):
    monkeypatch.setenv(config.DATA_ENV, str(data_dir))
    assert (config.data_dir() / "covid-chestxray-dataset" / "metadata.csv").is_file()


def test_auto_device_falls_back_in_order(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("nbhelpers.device._mps_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    assert "cpu" in capsys.readouterr().out
    monkeypatch.setattr("nbhelpers.device._mps_available", lambda: True)
    assert pick_device("auto", verbose=False).type == "mps"


def test_absent_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        pick_device("tpu")
