"""torchxrayvision DenseNet121 weights as our DenseNet backbone: the files load (as a state dict and
as the pickled module torchxrayvision releases), the first conv and the input scale are converted
exactly, checkpoints keep the input map, and a missing file offline is one line (exit status 2)."""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from data_prep.errors import run_reporting
from nbhelpers.models import PretrainedWeightsError, create
from nbhelpers.models import xrv
from nbhelpers.pipeline.data import to_model_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = "densenet121-res224-all"
PRETRAINED = f"{xrv.XRV_PREFIX}{WEIGHTS}"
DENSENETS = ("densenet121", "densenet121_cbam")


def _reference(seed: int = 0) -> nn.Module:
    """A DenseNet121 shaped like torchxrayvision's: torchvision's layout with a 1-channel first
    conv, an 18-pathology classifier and its ``op_threshs`` buffer, random but fixed weights."""
    torch.manual_seed(seed)
    model = torchvision.models.densenet121(num_classes=18)
    model.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.register_buffer("op_threshs", torch.rand(18))
    with torch.no_grad():  # BN statistics that are not the identity, so a wrong key would show
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _save_as_torchxrayvision_module(model: nn.Module, path: Path, monkeypatch, legacy: bool = False) -> None:
    """``torch.save`` the whole module as torchxrayvision's release files are: classes named
    ``torchxrayvision.models.DenseNet`` etc., a module the loader then cannot import; ``legacy``
    writes torch's pre-1.6 file format, in which the 2019-2020 release files may be."""
    package, models = types.ModuleType("torchxrayvision"), types.ModuleType("torchxrayvision.models")
    package.models = models
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("torchvision.models"):
            fake = getattr(models, cls.__name__, None) or type(cls.__name__, (cls,), {"__module__": models.__name__})
            setattr(models, cls.__name__, fake)
            module.__class__ = fake
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torchxrayvision", package)
        m.setitem(sys.modules, "torchxrayvision.models", models)
        with warnings.catch_warnings():  # the legacy format stores class sources; these classes have none
            warnings.simplefilter("ignore")
            torch.save(model, path, _use_new_zipfile_serialization=not legacy)


@pytest.fixture()
def weights_home(tmp_path, monkeypatch) -> Path:
    """An empty home, so ``~/.torchxrayvision/models_data`` is ours; returns the weights file path."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = xrv.xrv_cache_dir() / xrv.XRV_DENSENET_WEIGHTS[WEIGHTS]
    path.parent.mkdir(parents=True)
    return path


def _xrv_scale(grey_u8: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's ``utils.normalize(img, 255)``: (2 * img / 255 - 1) * 1024."""
    return (2 * (grey_u8.double() / 255) - 1) * xrv.XRV_RANGE


def _grey(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["state_dict", "torchxrayvision_module", "legacy_torchxrayvision_module"])
@pytest.mark.parametrize("name", DENSENETS)
def test_weights_load_key_for_key_with_the_first_conv_spread_over_channels(weights_home, monkeypatch, name, layout):
    reference = _reference()
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    if layout == "state_dict":
        torch.save(reference.state_dict(), weights_home)
    else:
        _save_as_torchxrayvision_module(reference, weights_home, monkeypatch, legacy=layout.startswith("legacy"))
    model = create(name, num_classes=3, pretrained=PRETRAINED)
    ours = model.state_dict()
    features = [k for k in expected if k.startswith("features.") and k != "features.conv0.weight"]
    assert len(features) > 700 and all(torch.equal(ours[k], expected[k]) for k in features)
    conv0 = ours["features.conv0.weight"]
    assert conv0.shape == (64, 3, 7, 7)
    assert all(torch.equal(conv0[:, c:c + 1], expected["features.conv0.weight"] / 3) for c in range(3))
    assert isinstance(model.input_map, xrv.XrvInput) and model.classifier.out_features == 3


@pytest.mark.parametrize("in_chans", [3, 1])
def test_first_conv_on_our_input_equals_theirs_on_their_scale(weights_home, in_chans):
    reference = _reference().double()
    torch.save(reference.state_dict(), weights_home)
    model = create("densenet121", in_chans=in_chans, pretrained=PRETRAINED).double().eval()
    grey = _grey()
    theirs = reference.features.conv0(_xrv_scale(grey))
    # The converted conv on in_chans copies of their input is their conv: bit for bit with one
    # channel; with three, up to the float32 rounding of w / 3 (half an ulp, 6e-8 relative).
    same_input = model.features.conv0(_xrv_scale(grey).expand(-1, in_chans, -1, -1))
    scale = theirs.abs().max().item()
    torch.testing.assert_close(same_input, theirs, rtol=0, atol=0 if in_chans == 1 else 1e-7 * scale)
    # From the cached uint8 image through our normalisation and the input map: the float32
    # normalisation adds about 1e-7 of their 2048-wide range per pixel.
    ours = model.features.conv0(model.input_map(to_model_input(grey, in_chans=in_chans).double()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * scale)
    assert theirs.abs().max() > 100  # on their scale, not on ours


def test_the_input_map_gives_torchxrayvision_pixels():
    grey = _grey(batch=3, size=16)
    for in_chans in (1, 3, 4):
        mapped = xrv.XrvInput(in_chans).double()(to_model_input(grey, in_chans=in_chans).double())
        assert mapped.shape[1] == in_chans
        torch.testing.assert_close(mapped, _xrv_scale(grey).expand_as(mapped), rtol=0, atol=1e-3)
    assert _xrv_scale(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1024.0, 1024.0]


@pytest.mark.parametrize("name", DENSENETS)
def test_whole_backbone_matches_the_reference_densenet(weights_home, name):
    reference = _reference()
    torch.save(reference.state_dict(), weights_home)
    model = create(name, pretrained=PRETRAINED).eval()
    if name == "densenet121_cbam":  # attention is new and untrained: compare the plain path only
        for index in range(1, 5):
            setattr(model.features, f"cbam{index}", nn.Identity())
    grey = _grey()
    with torch.no_grad():
        ours = model.features(model.input_map(to_model_input(grey)))
        theirs = reference.features(_xrv_scale(grey).float())
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_a_checkpoint_rebuilds_the_input_map(weights_home):
    torch.save(_reference().state_dict(), weights_home)
    trained = create("densenet121", pretrained=PRETRAINED).eval()
    saved = trained.state_dict()
    assert {"input_map.scale", "input_map.shift"} <= set(saved)
    rebuilt = create("densenet121", pretrained=False).eval()  # how a finished run is reloaded
    rebuilt.load_state_dict(saved)  # strict: every key fits once the input map is installed
    x = to_model_input(_grey())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x))
    doubled = create("densenet121").double()
    doubled.load_state_dict(saved)  # the installed input map follows the model's dtype and device
    assert doubled.input_map.scale.dtype == torch.float64
    plain = create("densenet121").state_dict()
    trained.load_state_dict(plain)  # and a plain checkpoint takes it away again
    assert trained.input_map is None and "input_map" not in dict(trained.named_children())


def test_offline_without_the_file_is_one_line_naming_it(weights_home, monkeypatch, capsys):
    def refuse(host, *args, **kwargs):
        raise OSError(f"cannot reach {host}")

    monkeypatch.setattr(xrv, "probe", refuse)
    with pytest.raises(PretrainedWeightsError) as caught:
        create("densenet121_cbam", pretrained=PRETRAINED)
    message = str(caught.value)
    assert "\n" not in message and str(weights_home) in message
    assert xrv.XRV_RELEASE + weights_home.name in message and "pretrained=True" in message
    status = run_reporting(lambda args: create("densenet121", pretrained=PRETRAINED) and 0, argparse.Namespace())
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: torchxrayvision weights")


def test_a_missing_file_is_fetched_from_the_release(weights_home, tmp_path, monkeypatch):
    release = tmp_path / "release"
    release.mkdir()
    torch.save(_reference().state_dict(), release / weights_home.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(release))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        monkeypatch.setattr(xrv, "XRV_RELEASE", f"http://127.0.0.1:{httpd.server_address[1]}/")
        monkeypatch.setattr(xrv, "probe", lambda host, *a, **k: None)
        model = create("densenet121", pretrained=PRETRAINED)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert weights_home.read_bytes() == (release / weights_home.name).read_bytes()
    assert isinstance(model.input_map, xrv.XrvInput)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo the weights file ran code",))


def test_a_file_that_would_run_code_is_refused(weights_home, capfd):
    torch.save({"features.conv0.weight": torch.zeros(64, 1, 7, 7), "hook": _RunsCode()}, weights_home)
    with pytest.raises(PretrainedWeightsError, match="not a torch weights file.*os|posix.*system"):
        create("densenet121", pretrained=PRETRAINED)
    assert "ran code" not in capfd.readouterr().out


def test_xrv_weights_are_refused_where_there_are_none():
    with pytest.raises(PretrainedWeightsError, match="'resnet50' has no torchxrayvision weights.*densenet121"):
        create("resnet50", pretrained=PRETRAINED)
    with pytest.raises(PretrainedWeightsError, match="unknown torchxrayvision weights.*densenet121-res224-all"):
        create("densenet121", pretrained="xrv:densenet121-res999")


@pytest.mark.slow
def test_against_torchxrayvision_itself(weights_home):
    """With the library installed (it takes seconds to import): its own DenseNet, saved whole as its
    release files are, loads into ours, and its own normalize + features match our pipeline's."""
    txrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    theirs = txrv.models.DenseNet(weights=None).eval()
    for module in theirs.modules():  # BN statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(theirs, weights_home)
    ours = create("densenet121", pretrained=PRETRAINED).eval()
    grey = _grey()
    scaled = torch.from_numpy(txrv.utils.normalize(grey.numpy(), 255))
    with torch.no_grad():
        expected = theirs.features2(scaled)
        got = torch.flatten(nn.functional.adaptive_avg_pool2d(
            nn.functional.relu(ours.features(ours.input_map(to_model_input(grey)))), 1), 1)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
