from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from nbhelpers import models
from nbhelpers.evaluation.cam import (
    METHODS,
    CamError,
    cams_for_images,
    channels_last_to_first,
    compute_cams,
    examples_per_class,
    predict_classes,
    cam_grid,
    layers_for_grid,
    tokens_to_grid,
)
from nbhelpers.evaluation.sanity import (
    cam_similarity,
    randomisation_check,
    randomisation_verdict,
    randomised_copy,
    raw_maps,
    stages,
    road_scores,
)
from nbhelpers.pipeline.data import to_model_input
from nbhelpers.models.registry import set_cam_layers

SIZE = 64


def test_examples_cover_every_class_first():
    assert examples_per_class([0, 0, 0, 1, 2, 2], 4) == [0, 3, 4, 1]
    assert examples_per_class([1, 1], 5) == [0, 1]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create("densenet121_cbam", num_classes=3)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


class Tiny(nn.Module):
    """Conv -> (CAM layer) -> in-place ReLU -> pool -> linear: an in-place op right after the target."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return set_cam_layers(Tiny(), ["conv"])


def hand_gradcam(model: nn.Module, layer_name: str, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Grad-CAM from its definition, ReLU(sum_k mean(dy/dA_k) A_k), scaled as grad-cam scales it.

    Runs on a copy without in-place activations, so A is the layer's output as it produced it.
    """
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    seen = {}
    handle = model.get_submodule(layer_name).register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    act = seen["a"]
    (grad,) = torch.autograd.grad(out[torch.arange(len(x)), torch.tensor(targets)].sum(), act)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1)).detach().numpy()
    return scale_cam_image(scale_cam_image(cam, (x.shape[-1], x.shape[-2])))


def test_each_image_gets_its_own_target(net, x):
    same = compute_cams(net, torch.cat([x[:1], x[:1]]), targets=[0, 2])
    assert same.shape == (2, SIZE, SIZE) and 0.0 <= same.min() and same.max() <= 1.0
    # the same image explained for two different classes gives two different maps
    assert not np.allclose(same[0], same[1])
    alone = compute_cams(net, x[:1], targets=[2])
    np.testing.assert_allclose(alone[0], same[1], atol=1e-5)


def test_bad_requests_are_named(net, x):
    with pytest.raises(ValueError, match="one target class per image"):
        compute_cams(net, x, targets=[0])
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_cams(net, x, method="magic")


def test_gradcam_on_densenet_matches_its_definition(net, x):
    ours = compute_cams(net, x, targets=[0, 1])
    expected = hand_gradcam(net, "features.norm5", x, [0, 1])
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_inplace_op_after_the_target_layer_does_not_corrupt_the_map(tiny, x):
    expected = hand_gradcam(tiny, "conv", x, [0, 1])
    np.testing.assert_allclose(compute_cams(tiny, x, [0, 1]), expected, atol=1e-4)
    # What the workaround is for: plain grad-cam on a CPU stores the activation after the ReLU overwrote it.
    with GradCAM(model=tiny, target_layers=[tiny.conv]) as raw:
        corrupted = raw(input_tensor=x, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(1)])
    assert not np.allclose(corrupted, expected, atol=1e-3)


def test_callers_model_is_left_as_it_was(net, x):
    net.train()
    inplace_before = [m.inplace for m in net.modules() if hasattr(m, "inplace")]
    assert any(inplace_before)  # DenseNet's ReLUs are in-place: the case this guards
    try:
        compute_cams(net, x[:1], targets=[0])
        assert net.training
        assert [m.inplace for m in net.modules() if hasattr(m, "inplace")] == inplace_before
    finally:
        net.eval()


def test_frozen_weights_and_no_grad_still_give_maps(tiny, x):
    expected = compute_cams(tiny, x, [0, 1])
    for p in tiny.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = compute_cams(tiny, x, [0, 1])
    np.testing.assert_allclose(frozen, expected, atol=1e-6)
    assert frozen.max() > 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_map_per_image(tiny, x, method):
    cams = compute_cams(tiny, x, [0, 1], method)
    assert cams.shape == (2, SIZE, SIZE) and cams.dtype == np.float32
    assert 0.0 <= cams.min() and cams.max() <= 1.0 and cams.max() > 0


def test_a_target_layer_that_forward_never_uses_is_named(tiny, x):
    unused = nn.Conv2d(3, 4, 1)
    with pytest.raises(CamError, match="gave no CAM for Tiny: .* given target layers"):
        compute_cams(tiny, x, [0, 1], target_layers=[unused])


def test_reshape_path_explains_hifuses_swin_branch():
    torch.manual_seed(0)
    hifuse = models.create("hifuse_tiny", num_classes=3)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    swin = hifuse.global_stages[-1]  # its output is (B, H, W, C)
    explicit = compute_cams(hifuse, x, [1], target_layers=[swin], reshape_transform=channels_last_to_first)
    assert explicit.shape == (1, SIZE, SIZE) and explicit.max() > 0
    # The same layer registered with its reshape, as a model module would do, gives the same map.
    registered = set_cam_layers(copy.deepcopy(hifuse), ["global_stages.3"], reshape=channels_last_to_first)
    np.testing.assert_allclose(compute_cams(registered, x, [1]), explicit, atol=1e-5)


def test_tokens_to_grid_keeps_each_token_at_its_place():
    tokens = torch.arange(2 * 9 * 4, dtype=torch.float32).reshape(2, 9, 4)
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 4, 3, 3)
    assert torch.equal(grid[1, :, 2, 1], tokens[1, 7])  # token 7 = row 2, column 1
    with pytest.raises(ValueError, match="class token"):
        tokens_to_grid(torch.zeros(1, 10, 4))


def test_cams_for_cached_images_batch_and_predict(tiny):
    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE), dtype=np.uint8)
    cams, predicted = cams_for_images(tiny, images, batch_size=2, progress=False)
    assert cams.shape == (5, SIZE, SIZE) and predicted.shape == (5,)
    x = to_model_input(torch.from_numpy(images), None, in_chans=3)
    np.testing.assert_array_equal(predicted, predict_classes(tiny, x))
    np.testing.assert_allclose(cams, compute_cams(tiny, x, predicted.tolist()), atol=1e-5)
    with pytest.raises(ValueError, match="one target class per image"):
        cams_for_images(tiny, images, targets=[0, 1], progress=False)


def test_randomised_copy_changes_every_weight_and_nothing_else(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    state = torch.random.get_rng_state()
    twin = randomised_copy(tiny, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, before[key])  # the original is untouched
        assert not torch.equal(twin.state_dict()[key], value), key
    again = randomised_copy(tiny, seed=3)
    for key, value in twin.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)
    assert twin.cam_layer_names == ["conv"]


def test_similarity_of_a_map_with_itself_and_with_others():
    rng = np.random.default_rng(0)
    cams = rng.random((3, 32, 32)).astype(np.float32)
    own = cam_similarity(cams, cams)
    np.testing.assert_allclose(own[["spearman", "ssim", "hog"]].to_numpy(), 1.0, atol=1e-6)
    flipped = cam_similarity(cams, cams[:, ::-1, :].copy())
    assert (flipped["spearman"] < 0.5).all() and (flipped["ssim"] < 0.5).all()
    # A blank map is no map: no similarity is made up for it, and it is flagged.
    blank = np.zeros((1, 32, 32), np.float32)
    one = cam_similarity(cams[:1], blank).iloc[0]
    assert np.isnan(one["spearman"]) and one["blank_b"] and not one["blank_a"]
    assert cam_similarity(blank, blank).iloc[0][["blank_a", "blank_b"]].all()
    with pytest.raises(ValueError, match="differ in shape"):
        cam_similarity(cams, cams[:2])


BLOB = 8  # side of the square the trained model learns to find


def blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images with a bright (class 0), a dark (class 1) or no (class 2) square at a random place."""
    x = torch.randn(n, 1, SMALL, SMALL, generator=generator) * 0.3
    y = torch.randint(0, 3, (n,), generator=generator)
    where = torch.zeros(n, SMALL, SMALL, dtype=torch.bool)
    for i in range(n):
        r, c = torch.randint(0, SMALL - BLOB, (2,), generator=generator).tolist()
        where[i, r : r + BLOB, c : c + BLOB] = True
        if y[i] < 2:
            x[i, 0, r : r + BLOB, c : c + BLOB] += 2.0 if y[i] == 0 else -2.0
    return x.expand(-1, 3, -1, -1).contiguous(), y, where


SMALL = 32
TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def trained():
    """Tiny trained to tell a bright from a dark square from none (a few seconds on a CPU)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = set_cam_layers(Tiny(), ["conv"])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(TRAIN_STEPS):
        x, y, _ = blobs(32, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x, y, where = blobs(48, generator)
    keep = y < 2
    assert (predict_classes(model, x) == y.numpy()).mean() > 0.9
    return model, x[keep], y[keep].tolist(), where[keep].numpy()


def test_trained_models_cam_finds_the_square_and_its_random_copys_does_not(trained):
    model, x, targets, where = trained
    inside = lambda cams: np.mean([(c * w).sum() / c.sum() for c, w in zip(cams, where)])  # noqa: E731
    area = BLOB**2 / SMALL**2
    assert inside(compute_cams(model, x, targets)) > 5 * area
    assert inside(compute_cams(randomised_copy(model), x, targets)) < inside(compute_cams(model, x, targets)) / 2


def test_randomisation_check_passes_a_trained_model(trained):
    model, x, targets, _ = trained
    own = compute_cams(model, x, targets)
    np.testing.assert_allclose(cam_similarity(own, compute_cams(model, x, targets))[["spearman", "ssim"]].to_numpy(),
                               1.0, atol=1e-6)
    result = randomisation_check(model, x, targets, seed=0)
    assert set(result["mode"]) == {"cascading", "independent"}
    assert len(result) == 2 * len(stages(model)) * len(x)  # every stage, both modes, every image
    verdict = randomisation_verdict(result)
    assert verdict["passed"], verdict["reason"]
    assert verdict["blank_trained"] == verdict["blank_random"] == 0
    default_targets = randomisation_check(model, x, seed=0)  # the predicted classes, here the true ones
    np.testing.assert_allclose(default_targets[["spearman", "ssim"]].to_numpy(), result[["spearman", "ssim"]].to_numpy(),
                               atol=1e-6)


class EdgeDetector(nn.Module):
    """A CAM that ignores the learned weights: the target layer is a fixed edge filter (a buffer,
    not a parameter), so re-initialising the head only rescales the same map."""

    def __init__(self) -> None:
        super().__init__()
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("kernel", sobel.view(1, 1, 3, 3))
        self.edges = nn.Identity()
        self.head = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1, keepdim=True)
        edges = self.edges(nn.functional.conv2d(grey, self.kernel, padding=1).abs())
        return self.head(edges.mean(dim=(2, 3)))


def test_randomisation_check_fails_a_map_that_ignores_the_weights(trained):
    _, x, targets, _ = trained
    model = set_cam_layers(EdgeDetector(), ["edges"])
    verdict = randomisation_verdict(randomisation_check(model, x, targets, seed=0))
    assert not verdict["passed"] and verdict["spearman_full"] > 0.99
    assert "explain the image, not the model" in verdict["reason"]


def test_a_blank_map_fails_the_check_and_is_counted(trained):
    model, x, targets, _ = trained
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.head.weight.zero_()  # no gradient reaches the CAM layer: every map is blank
    result = randomisation_check(dead, x, targets, seed=0)
    verdict = randomisation_verdict(result)
    assert verdict["blank_trained"] == len(x) and not verdict["passed"]
    assert result["spearman"].isna().all()  # nothing made up for a blank map


def test_raw_maps_are_gradcam_before_its_relu(trained):
    model, x, targets, _ = trained
    raw = raw_maps(model, x, targets)
    cams = compute_cams(model, x, targets)
    positive = np.clip(raw, 0, None)
    for r, c in zip(positive, cams):
        if r.max() > 0:
            np.testing.assert_allclose(r / r.max(), c / max(c.max(), 1e-12), atol=0.05)
    assert (raw < 0).any()  # the signed map keeps what the ReLU would cut


def test_layers_for_grid_give_every_model_the_same_grid_of_at_least_7_cells():
    nets = {name: models.create(name, num_classes=3) for name in ("densenet121", "resnet50", "mobilenetv2")}
    assert all(cam_grid(net, SIZE) == (2, 2) for net in nets.values())  # the registered layers at 64 px
    layers, side = layers_for_grid(nets, SIZE)
    assert side == 8
    assert all(cam_grid(net, SIZE, layers[name]) == (8, 8) for name, net in nets.items())
    cams = compute_cams(nets["densenet121"], torch.randn(1, 3, SIZE, SIZE), [0], target_layers=layers["densenet121"])
    assert cams.shape == (1, SIZE, SIZE)


def test_road_scores_a_faithful_map_above_a_random_and_an_inverted_one(trained):
    model, x, targets, _ = trained
    cams = compute_cams(model, x, targets)
    own = road_scores(model, x, cams, targets)
    assert own.shape == (len(x),) and own.mean() > 0.2
    noise = np.random.default_rng(0).random(cams.shape).astype(np.float32)
    assert abs(road_scores(model, x, noise, targets).mean()) < 0.1
    assert road_scores(model, x, 1 - cams, targets).mean() < -0.2
    np.testing.assert_allclose(road_scores(model, x, cams, targets), own)  # seeded infill noise
    with pytest.raises(ValueError, match="one CAM and one target per image"):
        road_scores(model, x, cams[:1], targets)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_models_gradcam_follows_the_definition(name, x):
    torch.manual_seed(0)
    model = models.create(name, num_classes=3)
    cams = compute_cams(model, x, [0, 1])
    assert cams.shape == (2, SIZE, SIZE) and np.isfinite(cams).all()
    if len(model.cam_layer_names) == 1:  # several layers are averaged by grad-cam: no single definition
        np.testing.assert_allclose(cams, hand_gradcam(model, model.cam_layer_names[0], x, [0, 1]), atol=1e-4)


def test_a_module_called_twice_is_never_chosen_as_the_cam_layer():
    # torchvision's Bottleneck applies one ReLU three times; its last call is coarser than its first.
    nets = {"resnet50_plain": models.create("resnet50_fpn_attn", num_classes=3, fpn=False, attention=False)}
    layers, side = layers_for_grid(nets, SIZE)
    assert side == 8 and cam_grid(nets["resnet50_plain"], SIZE, layers["resnet50_plain"]) == (8, 8)


def test_verdict_sentences_count_seeds_and_name_a_failure():
    from nbhelpers.experiments import explain

    energy = pd.DataFrame([{"model": "g/a", "images": 4, "patients": 3, "seeds": 3, "blank_maps": 0,
                            "energy_mean": 0.5, "area_mean": 0.3, "excess_mean": 0.2, "excess_ci_low": 0.1,
                            "excess_ci_high": 0.3, "pointing_rate": 0.75, "pointing_low": 0.3,
                            "pointing_high": 0.95, "pointing_chance": 0.3}])
    verdicts = pd.DataFrame([
        {"model": "g/a", "seed": 0, "spearman_full": 0.1, "passed": True, "reason": "maps change"},
        {"model": "g/a", "seed": 1, "spearman_full": 0.7, "passed": False, "reason": "they explain the image"},
        {"model": "g/b", "seed": 0, "spearman_full": 0.2, "passed": True, "reason": "maps change"},
    ])
    below = energy.assign(model="g/below", excess_mean=-0.1, excess_ci_low=-0.2, excess_ci_high=-0.05)
    unsure = energy.assign(model="g/unsure", excess_mean=0.05, excess_ci_low=-0.01, excess_ci_high=0.1)
    readings = explain.verdict_sentences(pd.concat([below, unsure]), verdicts.iloc[:0])
    assert "less than a uniform map would" in readings[0] and "not shown to favour the lungs" in readings[1]
    lines = explain.verdict_sentences(energy, verdicts)
    assert "passed: its maps favour the lungs" in lines[0] and "4 images of 3 patients" in lines[0]
    assert "averaged over 3 seeds" in lines[0]
    assert lines[1] == "g/a: randomisation check passed in 1 of 2 seeds' runs; failed: they explain the image."
    assert lines[2].startswith("g/b: randomisation check passed in 1 of 1 seeds' runs (mean Spearman 0.20")
