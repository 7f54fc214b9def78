"""Class-activation maps through the maintained ``grad-cam`` library, and a check that they depend on the model.

The target layer(s) and any reshape for transformer tokens come from the model registry, so
no notebook needs per-model code; ``target_layers``/``reshape_transform`` override them (e.g. to
explain one branch of a dual-branch model).  Every image in a batch gets its own target class
(one ``ClassifierOutputTarget`` per image): a single target would explain only the first image.

Methods (:data:`METHODS`): ``gradcam``, ``gradcam++``, ``xgradcam`` and ``layercam`` need one
forward and one backward pass; ``eigencam`` (first principal component of the activations) is
gradient-free and as cheap; ``scorecam`` is gradient-free but runs one forward pass per channel of
the target layer (1,024 for DenseNet121: minutes per image on a CPU at 224 px).

While CAMs are computed the model is put in eval mode and its in-place activations are switched
off, then both are restored, so the caller's model is left as it was.  In-place activations matter
because on a CPU grad-cam's stored activations share memory with the layer output: an in-place
ReLU after the target layer would silently rewrite them (on a GPU they are copied, so results
would differ between devices).

:func:`randomisation_check` is the model-randomisation test of Adebayo et al. (NeurIPS 2018,
"Sanity checks for saliency maps") as they define it: raw maps (Grad-CAM before its ReLU and
normalisation) of the trained model against those of copies re-initialised stage by stage from
the top down (cascading) and one stage at a time (independent), compared by Spearman rank
correlation of absolute values, SSIM and HOG similarity (scikit-image).  Maps that stay similar
explain the input, not the model; a blank map is counted and fails the check.
:func:`road_scores` measures faithfulness with grad-cam's ROAD metric (Rong et al., ICML 2022).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from nbhelpers.pipeline.data import to_model_input
from nbhelpers.models import cam_reshape_transform, cam_target_layers

METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}
#: Methods that use no gradients (they explain the layer's activations, or score masked inputs).
GRADIENT_FREE = ("eigencam", "scorecam")
#: Masked images per forward pass in Score-CAM.
SCORECAM_BATCH = 32
#: Images per CAM call in :func:`cams_for_images`.
DEFAULT_BATCH = 16
#: Shares (%) of pixels ROAD removes, most- and least-relevant first (fewer than grad-cam's nine: CPU cost).
ROAD_PERCENTILES = (20, 40, 60, 80)
#: Standard deviation of the normal draw for parameters of modules without ``reset_parameters``
#: (the scale timm and Swin initialise position-bias tables and layer scales with).
REINIT_STD = 0.02


def channels_last_to_first(x: torch.Tensor) -> torch.Tensor:
    """Reshape for Swin-style layers whose output is (B, H, W, C): the (B, C, H, W) grid grad-cam needs."""
    return x.permute(0, 3, 1, 2)


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """Reshape for ViT-style token output (B, N, C) with N a square (no class token) to (B, C, sqrt N, sqrt N).

    Raises ValueError when N is not a square number (drop a class token first).
    """
    b, n, c = x.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid; drop any class token before reshaping")
    return x.transpose(1, 2).reshape(b, c, side, side)


class CamError(RuntimeError):
    """grad-cam produced no map (e.g. no gradient reached the target layer)."""


@contextmanager
def _explaining(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no in-place activations for the duration, then the caller's settings back."""
    was_training = model.training
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for module in inplace:
        module.inplace = False
    try:
        yield model.eval()
    finally:
        for module in inplace:
            module.inplace = True
        model.train(was_training)


def examples_per_class(labels: Sequence[int], n: int) -> list[int]:
    """Indices of up to ``n`` images taken round-robin over the classes present in ``labels``
    (first of each class, then second of each, ...), so a small figure shows every class."""
    labels = np.asarray(labels)
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return picked


def compute_cams(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None,
                 method: str = "gradcam", *, target_layers: Sequence[nn.Module] | None = None,
                 reshape_transform: Callable | None = None) -> np.ndarray:
    """Return CAMs in [0, 1] of shape (B, H, W) for model input ``x`` (B, C, H, W).

    ``targets`` gives the class to explain per image (default: the predicted class).
    ``target_layers`` default to the model's registered ones, and so does ``reshape_transform``
    unless ``target_layers`` are given (then it defaults to no reshape).  The model's
    mode and in-place flags are restored afterwards.  Works with frozen parameters and inside
    ``torch.no_grad()``.  Raises ValueError for an unknown method or a target list of the wrong
    length, :class:`CamError` when grad-cam returns no map.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; use one of {', '.join(METHODS)}")
    if targets is not None and len(targets) != len(x):
        raise ValueError(f"{len(targets)} targets for {len(x)} images: give one target class per image")
    layers = list(target_layers) if target_layers is not None else cam_target_layers(model)
    # Given layers bring their own reshape (or none); the registered reshape belongs to the registered layers.
    registered = cam_reshape_transform(model) if target_layers is None else None
    reshape = reshape_transform if reshape_transform is not None else registered
    # An input that needs its gradient keeps the graph alive even when every parameter is frozen.
    x = x.detach().clone().requires_grad_(method not in GRADIENT_FREE)
    per_image = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    cams = None
    with _explaining(model), torch.enable_grad(), \
            METHODS[method](model=model, target_layers=layers, reshape_transform=reshape) as cam:
        if method == "scorecam":
            cam.batch_size = SCORECAM_BATCH
        try:
            cams = cam(input_tensor=x, targets=per_image)
        except (AttributeError, TypeError) as err:
            # grad-cam fails obscurely (None.shape) when a target layer recorded nothing.
            if cam.activations_and_grads.activations:
                raise
            raise _no_map(model, method, target_layers is not None) from err
    # grad-cam's context manager swallows an IndexError and prints it; do not return nothing silently.
    if cams is None or len(cams) != len(x):
        raise _no_map(model, method, target_layers is not None)
    return cams


def _no_map(model: nn.Module, method: str, given: bool) -> CamError:
    name = getattr(model, "model_name", type(model).__name__)
    layers = "given target layers" if given else f"registered target layers {getattr(model, 'cam_layer_names', '?')}"
    return CamError(f"{method} gave no CAM for {name}: no activation or gradient reached the {layers}; "
                    "pick layers that forward() uses")


def predict_classes(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Predicted class index per image of model input ``x``, in eval mode (the caller's mode is restored)."""
    with _explaining(model), torch.no_grad():
        return model(x).argmax(1).cpu().numpy()


def cams_for_images(model: nn.Module, images: np.ndarray, targets: Sequence[int] | None = None,
                    method: str = "gradcam", *, batch_size: int = DEFAULT_BATCH, in_chans: int = 3,
                    device: torch.device | str = "cpu", progress: bool = True,
                    target_layers: Sequence[nn.Module] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CAMs of cached uint8 images (N, H, W), in batches, each explained for its target class.

    Images go through :func:`nbhelpers.pipeline.data.to_model_input` (no augmentation) on ``device``.
    ``targets`` default to the predicted classes; ``target_layers`` to the registered ones
    (see :func:`layers_for_grid`).  Returns ``(cams float32 (N, H, W), predicted
    int (N,))``, so the same images can be explained by several models side by side.  Raises
    ValueError for a target list of the wrong length (and as :func:`compute_cams`).
    """
    images = np.asarray(images)
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images: give one target class per image")
    cams, predicted = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=f"{method} CAMs", unit="batch", disable=not progress):
        raw = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        x = to_model_input(raw, None, in_chans=in_chans, train=False)
        pred = predict_classes(model, x)
        chosen = pred if targets is None else targets[start : start + batch_size]
        cams.append(compute_cams(model, x, chosen, method, target_layers=target_layers))
        predicted.append(pred)
    if not cams:
        h, w = images.shape[1:3] if images.ndim == 3 else (0, 0)
        return np.zeros((0, h, w), np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(cams), np.concatenate(predicted)


# --------------------------------------------------------------------------- resolution


#: A CAM drawn from fewer cells per side than this cannot localise anything as small as a lung.
MIN_GRID = 7


def feature_grids(model: nn.Module, size: int, in_chans: int = 3) -> list[tuple[str, int, int]]:
    """Every module whose output is a (B, C, H, W) map, in execution order, with its grid (H, W)
    for a ``size`` px input: where a CAM could be drawn, and how coarse it would be.  Modules
    called more than once in a forward pass are left out."""
    seen: list[tuple[str, int, int]] = []
    calls: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def record(_m, _i, out, name=name):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                seen.append((name, int(out.shape[2]), int(out.shape[3])))

        hooks.append(module.register_forward_hook(record))
    try:
        with _explaining(model), torch.no_grad():
            model(torch.zeros(1, in_chans, size, size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    # A module called more than once (torchvision's Bottleneck reuses one ReLU three times) has no
    # single grid: a CAM hook keeps its last call, which may be coarser than its first.
    return [entry for entry in seen if calls[entry[0]] == 1]


def cam_grid(model: nn.Module, size: int, target_layers: Sequence[nn.Module] | None = None) -> tuple[int, int]:
    """The (H, W) grid of the CAM target layer (the last of ``target_layers``, default the
    registered ones) for a ``size`` px input."""
    layer = (list(target_layers) if target_layers is not None else cam_target_layers(model))[-1]
    names = {id(m): n for n, m in model.named_modules()}
    grids = {n: (h, w) for n, h, w in feature_grids(model, size)}
    return grids.get(names.get(id(layer), ""), (0, 0))


def layers_for_grid(models: dict[str, nn.Module], size: int, min_grid: int = MIN_GRID
                    ) -> tuple[dict[str, list[nn.Module] | None], int]:
    """Target layers that give every model the same CAM grid of at least ``min_grid`` cells per
    side at ``size`` px, so maps compare like with like: the smallest grid of ``min_grid`` or
    more cells that every model produces (the deepest layers that can still localise), and in
    each model the last layer (in execution order) that produces it.  A model whose registered layer already gives that grid keeps it (None).  Returns the
    layers per model and the grid side; side 0 means no common grid exists (the registered
    layers are kept)."""
    found = {label: feature_grids(net, size) for label, net in models.items()}
    common = set.intersection(*[{h for _, h, w in grids if h == w and h >= min_grid} for grids in found.values()]) \
        if found else set()
    if not common:
        return {label: None for label in models}, 0
    side = min(common)  # the deepest layers that still resolve min_grid cells: coarser cannot localise
    out: dict[str, list[nn.Module] | None] = {}
    for label, net in models.items():
        if cam_grid(net, size) == (side, side):
            out[label] = None
            continue
        name = [n for n, h, w in found[label] if h == side and w == side][-1]
        out[label] = [dict(net.named_modules())[name]]
    return out, side


# --------------------------------------------------------------------------- sanity check


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every weight re-initialised (Adebayo et al.'s full randomisation).

    Modules with ``reset_parameters`` use their own initialiser (BatchNorm also resets its running
    statistics); any other parameter is drawn from N(0, :data:`REINIT_STD`).  Randomness comes from
    ``seed`` only and leaves the global torch RNG untouched.  Registry attributes (CAM layers) are kept.
    """
    twin = copy.deepcopy(model)
    reinitialise(twin, seed)
    return twin


def stages(model: nn.Module, min_stages: int = 4) -> list[tuple[str, nn.Module]]:
    """The model's parameterised blocks in registration (forward) order, coarse enough to
    re-initialise one at a time: its top-level children, the largest one split into its own
    children until there are at least ``min_stages`` (DenseNet's ``features`` becomes its dense
    blocks and transitions).  Blocks without parameters are left out."""
    def params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    blocks = [(name, child) for name, child in model.named_children() if params(child)]
    while len(blocks) < min_stages:
        k = max(range(len(blocks)), key=lambda i: params(blocks[i][1])) if blocks else None
        if k is None:
            break
        inner = [(f"{blocks[k][0]}.{n}", c) for n, c in blocks[k][1].named_children() if params(c)]
        if len(inner) < 2:
            break
        blocks[k:k + 1] = inner
    return blocks


def reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` in place (as :func:`randomised_copy` does)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            else:
                for param in sub.parameters(recurse=False):
                    param.normal_(0.0, REINIT_STD)


def raw_maps(model: nn.Module, x: torch.Tensor, targets: Sequence[int],
             target_layers: Sequence[nn.Module] | None = None) -> np.ndarray:
    """Grad-CAM before its ReLU and normalisation: sum over channels of (mean gradient of the
    target score) x activation at the target layer, upsampled to the input size.  Signed, on
    its own scale, so a randomised model's map is not stretched into a confident-looking one.
    Returns float (B, H, W); raises :class:`CamError` when the layer records nothing."""
    layers = list(target_layers) if target_layers is not None else cam_target_layers(model)
    reshape = cam_reshape_transform(model) if target_layers is None else None
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        store["a"] = reshape(out) if reshape is not None else out
        store["a"].retain_grad()

    handle = layers[-1].register_forward_hook(hook)
    try:
        with _explaining(model), torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            if "a" not in store:
                raise _no_map(model, "raw grad-cam", target_layers is not None)
            score = logits[torch.arange(len(x)), torch.as_tensor(list(targets), device=logits.device)].sum()
            model.zero_grad(set_to_none=True)
            score.backward()
            act, grad = store["a"], store["a"].grad
    finally:
        handle.remove()
    if grad is None:
        raise _no_map(model, "raw grad-cam", target_layers is not None)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    maps = (weights * act).sum(dim=1).detach().float().cpu().numpy()
    h, w = x.shape[-2:]
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps])


def is_blank(raw: np.ndarray) -> bool:
    """A map with no structure (constant, all zero, or not finite): it points nowhere."""
    raw = np.asarray(raw, dtype=np.float64)
    if not np.isfinite(raw).all():
        return True
    scale = max(float(np.abs(raw).max()), 1e-30)
    return float(np.ptp(raw)) <= 1e-6 * scale or float(np.abs(raw).max()) < 1e-12


def _unit(raw: np.ndarray) -> np.ndarray:
    mag = np.abs(np.asarray(raw, dtype=np.float64))
    top = mag.max()
    return mag / top if top > 0 else mag


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Similarity of two raw maps as Adebayo et al. (2018) measure it: Spearman rank correlation
    of the absolute values, SSIM (scikit-image) and the Pearson correlation of the HOG features
    of the absolute maps scaled to [0, 1].  NaN for each when either map is blank."""
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    if is_blank(a) or is_blank(b):
        return {"spearman": float("nan"), "ssim": float("nan"), "hog": float("nan")}
    ua, ub = _unit(a), _unit(b)
    spearman = float(stats.spearmanr(np.abs(a).ravel(), np.abs(b).ravel()).statistic)
    ssim = float(structural_similarity(ua, ub, data_range=1.0))
    cell = max(4, min(ua.shape) // 8)
    ha = hog(ua, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)
    hb = hog(ub, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)
    similar = float(np.corrcoef(ha, hb)[0, 1]) if ha.std() > 0 and hb.std() > 0 else float("nan")
    return {"spearman": spearman, "ssim": ssim, "hog": similar}


def cam_similarity(cams_a: np.ndarray, cams_b: np.ndarray) -> pd.DataFrame:
    """Per-image :func:`map_similarity` of two map stacks (N, H, W), with ``blank_a`` /
    ``blank_b`` saying which side had no map.  Raises ValueError for unequal shapes."""
    cams_a, cams_b = np.asarray(cams_a), np.asarray(cams_b)
    if cams_a.shape != cams_b.shape:
        raise ValueError(f"CAM stacks differ in shape: {cams_a.shape} vs {cams_b.shape}")
    rows = [{**map_similarity(a, b), "blank_a": is_blank(a), "blank_b": is_blank(b)} for a, b in zip(cams_a, cams_b)]
    return pd.DataFrame(rows, columns=["spearman", "ssim", "hog", "blank_a", "blank_b"])


#: A model passes the randomisation check when the mean Spearman correlation (absolute raw maps)
#: between its maps and those of the fully re-initialised model stays below this, and no map
#: on either side is blank.  Adebayo et al. read a rank correlation near 1 as "insensitive".
PASS_SPEARMAN = 0.5


def randomisation_check(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None,
                        seed: int = 0, target_layers: Sequence[nn.Module] | None = None) -> pd.DataFrame:
    """The model-randomisation test of Adebayo et al. (2018) on raw Grad-CAM maps (:func:`raw_maps`).

    *Cascading*: the stages (:func:`stages`) are re-initialised from the top (output) down, one
    more each step, and the maps compared with the trained model's after every step.
    *Independent*: each stage alone is re-initialised.  ``targets`` (default: the trained
    model's predicted classes) are explained throughout, so only the weights differ.  Returns one
    row per (mode, stage, image): mode, stage (the stage re-initialised last, or alone), step,
    image, spearman, ssim, hog, blank_trained, blank_random.  A blank map is counted (never a
    pass).  Raises as :func:`raw_maps`.
    """
    if targets is None:
        targets = predict_classes(model, x).tolist()
    layer_names = [n for n, m in model.named_modules() if any(m is t for t in (target_layers or []))]
    own = raw_maps(model, x, targets, target_layers)
    blocks = stages(model)
    rows = []

    def compare(twin: nn.Module, mode: str, stage: str, step: int) -> None:
        layers = [dict(twin.named_modules())[n] for n in layer_names] if layer_names else None
        other = raw_maps(twin, x, targets, layers)
        for k, (a, b) in enumerate(zip(own, other)):
            rows.append({"mode": mode, "stage": stage, "step": step, "image": k, **map_similarity(a, b),
                         "blank_trained": is_blank(a), "blank_random": is_blank(b)})

    cascade = copy.deepcopy(model)
    named = dict(cascade.named_modules())
    for step, (name, _) in enumerate(reversed(blocks), 1):
        reinitialise(named[name], seed + step)
        compare(cascade, "cascading", name, step)
    for step, (name, _) in enumerate(blocks, 1):
        alone = copy.deepcopy(model)
        reinitialise(dict(alone.named_modules())[name], seed + 1000 + step)
        compare(alone, "independent", name, step)
    return pd.DataFrame(rows)


def randomisation_verdict(check: pd.DataFrame) -> dict[str, object]:
    """Summarise :func:`randomisation_check`: the fully randomised (last cascading) step's mean
    Spearman / SSIM / HOG, the blank maps counted on each side, and ``passed`` (mean Spearman
    below :data:`PASS_SPEARMAN` and no blank map), with ``reason`` in words."""
    cascading = check[check["mode"] == "cascading"]
    last = cascading[cascading["step"] == cascading["step"].max()]
    blank_trained = int(last["blank_trained"].sum())
    blank_random = int(last["blank_random"].sum())
    spearman = float(last["spearman"].mean()) if last["spearman"].notna().any() else float("nan")
    if blank_trained or blank_random:
        passed, reason = False, (f"{blank_trained} trained and {blank_random} randomised map(s) are blank: "
                                 "a blank map shows nothing, so the check cannot pass")
    elif not spearman < PASS_SPEARMAN:
        passed, reason = False, (f"maps of the randomised model still rank pixels like the trained one "
                                 f"(Spearman {spearman:.2f} >= {PASS_SPEARMAN}): they explain the image, not the model")
    else:
        passed, reason = True, f"maps change when the weights do (Spearman {spearman:.2f} < {PASS_SPEARMAN})"
    return {"images": int(last["image"].nunique()), "spearman_full": spearman,
            "ssim_full": float(last["ssim"].mean()), "hog_full": float(last["hog"].mean()),
            "blank_trained": blank_trained, "blank_random": blank_random, "passed": passed, "reason": reason}


def road_scores(model: nn.Module, x: torch.Tensor, cams: np.ndarray, targets: Sequence[int],
                percentiles: Sequence[int] = ROAD_PERCENTILES, seed: int = 0) -> np.ndarray:
    """Per-image ROAD score of ``cams`` for ``model`` on input ``x``, through grad-cam's ``ROADCombined``.

    The pixels a CAM ranks highest (then lowest) are replaced by a noisy linear infill of their
    neighbours at each of ``percentiles``; the score is half the mean drop in the target class's
    softmax probability when the least relevant pixels go minus when the most relevant go.
    Positive = removing what the map points at hurts the prediction more (a faithful map); about
    0 for a random map.  The infill noise is drawn from ``seed`` (the global RNG is left as it
    was).  Raises ValueError for mismatched lengths.
    """
    if not len(cams) == len(x) == len(targets):
        raise ValueError(f"road_scores needs one CAM and one target per image: {len(cams)} CAMs, "
                         f"{len(targets)} targets, {len(x)} images")
    per_image = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    with _explaining(model), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # grad-cam 1.5.7's imputer hands a torch tensor to np.argwhere; numpy 2 warns, the result is right.
        warnings.filterwarnings("ignore", message="__array_wrap__", category=DeprecationWarning)
        torch.manual_seed(seed)
        scores = ROADCombined(percentiles=list(percentiles))(x.detach(), np.asarray(cams), per_image, model)
    return np.asarray(scores, dtype=np.float64)
