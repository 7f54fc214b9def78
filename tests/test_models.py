"""The model zoo: every model builds, learns and names its CAM layer; switches, weights and costs are right."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

from nbhelpers.models import complexity as cx
from nbhelpers.models import (
    PretrainedWeightsError,
    UnknownModelError,
    attention_maps,
    cam_reshape_transform,
    cam_target_layers,
    create,
    list_models,
    model_spec,
    summary_table,
)
from nbhelpers.models import pretrained as pw
from nbhelpers.models.densenet_cbam import DENSE_BLOCKS, backbone_state_dict, load_backbone
from nbhelpers.models.lgfnet import MSA
from nbhelpers.models.resnet_fpn import load_resnet_backbone
from nbhelpers.tools import cli

SIZE, BATCH = 64, 2
REQUIRED = {
    "densenet121", "densenet121_cbam", "lgfnet", "resnet50_fpn_attn", "hifuse_tiny", "resnet50", "vgg16",
    "efficientnet_b0", "mobilevit_s", "mobilenetv2", "squeezenet", "shufflenetv2",
}
SLOW_TO_BUILD = {"vgg16"}  # 134 M parameters take seconds just to initialise on 2 cores


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_required_names_are_registered():
    assert REQUIRED <= set(list_models())
    assert list_models("densenet*") == ["densenet121", "densenet121_cbam"]


@pytest.mark.parametrize(  # every registered model, so a thirteenth is tested as soon as it registers
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_BUILD else n for n in list_models()]
)
def test_model_builds_runs_backpropagates_and_exposes_cam_layers(name):
    torch.manual_seed(0)
    model = create(name, num_classes=3, in_chans=1)  # grayscale input: the first conv is adapted
    captured = []
    layers = cam_target_layers(model)
    handles = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in layers]
    out = model(torch.randn(BATCH, 1, SIZE, SIZE))
    for h in handles:
        h.remove()
    assert out.shape == (BATCH, 3) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:1]) and sum(g.abs().sum() for g in grads if g is not None) > 0
    # Grad-CAM needs a spatial map at each target layer (no reshape is needed for these layers).
    assert len(captured) == len(layers) >= 1
    assert all(t.ndim == 4 and t.shape[0] == BATCH for t in captured)
    assert cam_reshape_transform(model) is None
    assert model.model_name == name


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownModelError, match="densenet121_cbam") as err:
        create("densenet_cbam")
    assert isinstance(err.value, KeyError)
    with pytest.raises(UnknownModelError, match="list_models"):
        create("alexnet-xyz")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"'attn'.*attention='cbam'"):
        create("densenet121_cbam", attn="cbam")
    with pytest.raises(TypeError, match="no option 'variant'.*none"):
        create("resnet50", variant="full")


@pytest.mark.parametrize(("name", "options", "match"), [
    ("densenet121_cbam", {"attention": "both"}, "channel"),
    ("lgfnet", {"variant": "tiny"}, "dual_mscam"),
    ("densenet121", {"num_classes": 0}, "num_classes"),
])
def test_bad_option_values_raise_value_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        create(name, **options)


def test_models_without_weights_refuse_pretrained():
    for name in ("lgfnet", "hifuse_tiny"):
        with pytest.raises(ValueError, match="pretrained=False"):
            create(name, pretrained=True)


# --- ablation switches -------------------------------------------------------------------------

def test_cbam_switches_add_exactly_their_parameters():
    counts = {mode: n_params(create("densenet121_cbam", attention=mode)) for mode in ("none", "channel", "spatial", "cbam")}
    channel_mlps = sum(2 * c * (c // 16) for c in DENSE_BLOCKS.values())  # C -> C/16 -> C, no bias
    spatial_convs = len(DENSE_BLOCKS) * 2 * 7 * 7  # one 7x7 conv over [mean; max] per block
    assert counts["channel"] - counts["none"] == channel_mlps
    assert counts["spatial"] - counts["none"] == spatial_convs
    assert counts["cbam"] - counts["none"] == channel_mlps + spatial_convs
    # attention="none" is plain DenseNet121, the same size as torchvision's with a 3-class head.
    assert counts["none"] == n_params(create("densenet121")) == n_params(torchvision.models.densenet121(num_classes=3))
    assert n_params(create("densenet121_cbam", reduction=8)) > counts["cbam"]


def test_lgfnet_variants_grow_as_the_ablation_table_adds_parts():
    counts = {v: n_params(create("lgfnet", variant=v)) for v in ("local_only", "dual", "dual_mscam", "dual_msa", "full")}
    assert counts["local_only"] < counts["dual"] < counts["dual_mscam"] < counts["full"]
    assert counts["dual"] < counts["dual_msa"] < counts["full"]
    # MSCAM and MSA are independent additions: their parameter costs add up.
    assert counts["full"] - counts["dual"] == (counts["dual_mscam"] - counts["dual"]) + (counts["dual_msa"] - counts["dual"])


def test_lgfnet_matches_the_papers_size_within_15_percent():
    model = create("lgfnet")
    params = n_params(model) / 1e6
    assert abs(params / 3.6 - 1) <= 0.15, params
    gmacs = cx.complexity(model, 448)["gmacs_ptflops"]
    assert abs(gmacs / 3.7 - 1) <= 0.15, gmacs


def test_resnet_fpn_attention_switches():
    counts = {(f, a): n_params(create("resnet50_fpn_attn", fpn=f, attention=a)) for f in (False, True) for a in (False, True)}
    # Both off is plain ResNet50 with a 3-class head.
    assert counts[(False, False)] == n_params(torchvision.models.resnet50(num_classes=3))
    # The two additions are independent: each adds the same parameters with or without the other.
    assert counts[(True, True)] - counts[(False, True)] == counts[(True, False)] - counts[(False, False)] > 0
    assert counts[(True, True)] - counts[(True, False)] == counts[(False, True)] - counts[(False, False)] > 0


# --- pretrained weights ------------------------------------------------------------------------

def _offline(monkeypatch, tmp_path):
    def refuse(host, port=443, timeout=pw.NETWORK_TIMEOUT_S):
        raise OSError(f"cannot reach {host}")

    monkeypatch.setattr(pw, "probe", refuse)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch cache
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # an empty HF cache


@pytest.mark.parametrize("name", ["densenet121_cbam", "resnet50_fpn_attn", "squeezenet", "mobilenetv2", "resnet50"])
def test_pretrained_offline_fails_fast_with_a_clear_error(monkeypatch, tmp_path, name):
    _offline(monkeypatch, tmp_path)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError, match=rf"pretrained weights for {name}.*no network.*pretrained=False"):
        create(name, pretrained=True)
    assert time.monotonic() - start < 5


def test_probe_fails_within_its_timeout_on_a_closed_port():
    start = time.monotonic()
    with pytest.raises(OSError):
        pw.probe("127.0.0.1", port=1, timeout=2)
    assert time.monotonic() - start < 3


def test_densenet_weights_map_into_the_cbam_backbone():
    torch.manual_seed(0)
    reference = torchvision.models.densenet121(num_classes=3).eval()
    plain = create("densenet121").eval()
    load_backbone(plain, reference.state_dict())
    plain.classifier.load_state_dict(reference.classifier.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(plain(x), reference(x), atol=1e-5)  # same code path, same function

    cbam = create("densenet121_cbam", in_chans=1)
    timm_state = timm.create_model("densenet121").state_dict()  # timm's keys map too
    load_backbone(cbam, timm_state)
    assert torch.equal(cbam.features.conv0.weight, timm_state["features.conv0.weight"].sum(1, keepdim=True))
    key = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(cbam.state_dict()[key], timm_state[key])


def test_densenet_mapping_renames_legacy_keys_and_rejects_foreign_weights():
    state = torchvision.models.densenet121().state_dict()
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()}
    mapped = backbone_state_dict(legacy)
    assert "features.denseblock1.denselayer1.norm1.weight" in mapped and not any("classifier" in k for k in mapped)
    with pytest.raises(PretrainedWeightsError, match="densenet121_cbam"):
        load_backbone(create("densenet121_cbam"), torchvision.models.resnet18().state_dict())


def test_resnet_weights_map_into_the_attention_backbone():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(num_classes=3).eval()
    model = create("resnet50_fpn_attn", fpn=False, attention=True).eval()
    load_resnet_backbone(model, reference.state_dict())
    model.classifier.load_state_dict(reference.fc.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():  # new non-local blocks start as the identity, so ImageNet behaviour is kept
        assert torch.allclose(model(x), reference(x), atol=1e-4)


# --- inspection helpers --------------------------------------------------------------------------

def _real_image(data_dir, size: int = SIZE) -> torch.Tensor:
    path = sorted((data_dir / "nih-cxr14-subset" / "images").glob("*.png"))[0]
    grey = np.asarray(Image.open(path).convert("L").resize((size, size)), dtype=np.float32) / 255.0
    return torch.from_numpy(grey)[None, None]


def test_attention_maps_of_cbam_on_a_real_image(data_dir):
    torch.manual_seed(0)
    x = _real_image(data_dir)
    maps = attention_maps(create("densenet121_cbam", in_chans=1).eval(), x)
    assert set(maps) == {f"features.cbam{i}.{part}" for i in range(1, 5) for part in ("channel", "spatial")}
    assert maps["features.cbam1.channel"].shape == (1, 256, 1, 1)
    assert maps["features.cbam1.spatial"].shape == (1, 1, SIZE // 4, SIZE // 4)
    assert all(((m > 0) & (m < 1)).all() for m in maps.values())
    assert attention_maps(create("densenet121", in_chans=1).eval(), x) == {}


def test_attention_maps_of_lgfnet_and_nonlocal(data_dir):
    x = _real_image(data_dir)
    maps = attention_maps(create("lgfnet", in_chans=1).eval(), x)
    assert "stages.3.fusion.mscam" in maps and maps["stages.3.fusion.mscam"].shape == (1, 224, 2, 2)
    assert any(k.endswith(".eca") for k in maps)
    maps = attention_maps(create("resnet50_fpn_attn", in_chans=1).eval(), x)
    nonlocal5 = maps["backbone.layer4.2.attention"]  # (B, HW, HW), rows sum to one
    assert nonlocal5.shape == (1, 4, 4) and torch.allclose(nonlocal5.sum(-1), torch.ones(1, 4))


def test_summary_table_counts_parameters_and_shapes():
    model = create("densenet121_cbam")
    table = summary_table(model, depth=1, input_size=(3, SIZE, SIZE))
    assert list(table["layer"]) == ["features", "classifier"]
    assert table["params"].sum() == n_params(model)
    assert table.set_index("layer").loc["classifier", "output_shape"] == "3"
    assert model.training  # mode restored
    deeper = summary_table(model, depth=2)
    assert "features.cbam4" in set(deeper["layer"]) and (deeper["output_shape"] == "").all()


# --- size and cost -------------------------------------------------------------------------------

def test_aten_counter_sees_attention_that_ptflops_misses():
    tokens, dim = 64, 32
    model = nn.Sequential(MSA(dim))
    macs = cx.aten_macs(model, torch.zeros(1, tokens, dim))
    linear = tokens * dim * 3 * dim + tokens * dim * dim  # qkv and output projections
    attention = 2 * tokens * tokens * dim  # QK^T and AV over all heads
    assert macs == (linear + attention, attention)


def test_complexity_reports_both_counters():
    result = cx.complexity(create("resnet50"), 224)
    assert result["params_m"] == pytest.approx(23.51, abs=0.01)
    assert result["gmacs_ptflops"] == pytest.approx(4.1, rel=0.05)  # the well-known ResNet50 figure
    assert result["gmacs_aten"] == pytest.approx(4.1, rel=0.05) and result["gmacs_attention"] == 0


def test_complexity_table_and_command_line(tmp_path):
    table = cx.complexity_table(["squeezenet", ("lgfnet", {"variant": "dual"})], image_size=SIZE)
    assert list(table["model"]) == ["squeezenet", "lgfnet"] and list(table["options"]) == ["", "variant=dual"]
    assert (table["params_m"] > 0).all() and (table["image_size"] == SIZE).all()
    assert cli.main(["complexity", "--models", "lgfnet", "--no-latency", "--out", str(tmp_path / "cx")]) == 0
    csv = (tmp_path / "cx" / "complexity.csv").read_text()
    assert "lgfnet" in csv and "paper_params_m" in csv
    md = (tmp_path / "cx" / "complexity.md").read_text()
    assert "workbook complexity --models lgfnet" in md and torch.__version__ in md


def test_latency_returns_a_positive_rate():
    timing = cx.latency(create("squeezenet"), 32, 2, warmup=0, repeats=1)
    assert timing["ms_per_batch"] > 0 and timing["images_per_s"] > 0


def test_every_spec_names_its_source_and_input_size():
    for name in list_models():
        spec = model_spec(name)
        assert spec.source and spec.image_size in (224, 448)
    assert model_spec("lgfnet").image_size == 448


@pytest.mark.parametrize("name", ["densenet121_cbam", "lgfnet", "resnet50_fpn_attn", "hifuse_tiny", "mobilevit_s"])
def test_grad_cam_runs_from_the_recorded_layers_alone(name):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create(name).eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    with GradCAM(model, cam_target_layers(model), reshape_transform=cam_reshape_transform(model)) as cam:
        maps = cam(x, targets=[ClassifierOutputTarget(i) for i in range(BATCH)])
    assert maps.shape == (BATCH, SIZE, SIZE) and np.isfinite(maps).all() and maps.max() > 0


@pytest.mark.parametrize("size", [48, 100, 250])
def test_hifuse_runs_at_sizes_that_are_not_multiples_of_32(size):
    # Before: 48, 100 and 250 px stopped with "Sizes of tensors must match" in the fusion blocks.
    net = create("hifuse_tiny", num_classes=3, in_chans=3, pretrained=False).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, size, size)).shape == (1, 3)


def test_hifuse_names_the_smallest_size_it_takes():
    net = create("hifuse_tiny", num_classes=3, in_chans=3, pretrained=False).eval()
    with pytest.raises(ValueError, match="at least 4x4 px"):
        net(torch.zeros(1, 3, 2, 2))


THROWAWAY = '''
import torch
from torch import nn

from nbhelpers.models.registry import register_model, set_cam_layers


@register_model("throwaway_tiny", source="test", image_size=64, description="a model added in one module")
def throwaway_tiny(num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, num_classes))
    return set_cam_layers(net, ["0"])
'''


def test_a_model_is_added_in_one_module_and_the_workbook_picks_it_up(tmp_path, capsys):
    """One new module with ``@register_model`` is all a model needs: the package finds the module,
    and the registry, the CAM layers, the cost table and the command line see the model."""
    import importlib.util

    from nbhelpers import models
    from nbhelpers.models import registry

    (tmp_path / "throwaway_net.py").write_text(THROWAWAY)
    (tmp_path / "registry.py").write_text("# machinery, not a model\n")
    assert models.model_modules(tmp_path) == ["throwaway_net"]
    assert models.model_modules() == ["baselines", "densenet_cbam", "hifuse", "lgfnet", "resnet_fpn"]
    spec = importlib.util.spec_from_file_location("throwaway_net", tmp_path / "throwaway_net.py")
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert "throwaway_tiny" in list_models()
        net = create("throwaway_tiny", num_classes=3, in_chans=1)
        assert net(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 3) and len(cam_target_layers(net)) == 1
        assert cx.complexity(net, SIZE, in_chans=1)["params_m"] > 0
        assert cli.main(["complexity", "--models", "throwaway_tiny", "--no-latency", "--out", str(tmp_path)]) == 0
        assert "throwaway_tiny" in (tmp_path / "complexity.csv").read_text()
    finally:
        registry._REGISTRY.pop("throwaway_tiny", None)
