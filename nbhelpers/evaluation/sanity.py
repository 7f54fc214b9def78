"""Whether class-activation maps explain the model: the randomisation check and ROAD faithfulness.

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
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from scipy import stats
from torch import nn

from nbhelpers.evaluation.cam import explaining, no_map_error, predict_classes
from nbhelpers.models import cam_reshape_transform, cam_target_layers

#: Shares (%) of pixels ROAD removes, most- and least-relevant first (fewer than grad-cam's nine: CPU cost).
ROAD_PERCENTILES = (20, 40, 60, 80)
#: Standard deviation of the normal draw for parameters of modules without ``reset_parameters``
#: (the scale timm and Swin initialise position-bias tables and layer scales with).
REINIT_STD = 0.02


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
        with explaining(model), torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            if "a" not in store:
                raise no_map_error(model, "raw grad-cam", target_layers is not None)
            score = logits[torch.arange(len(x)), torch.as_tensor(list(targets), device=logits.device)].sum()
            model.zero_grad(set_to_none=True)
            score.backward()
            act, grad = store["a"], store["a"].grad
    finally:
        handle.remove()
    if grad is None:
        raise no_map_error(model, "raw grad-cam", target_layers is not None)
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
    with explaining(model), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # grad-cam 1.5.7's imputer hands a torch tensor to np.argwhere; numpy 2 warns, the result is right.
        warnings.filterwarnings("ignore", message="__array_wrap__", category=DeprecationWarning)
        torch.manual_seed(seed)
        scores = ROADCombined(percentiles=list(percentiles))(x.detach(), np.asarray(cams), per_image, model)
    return np.asarray(scores, dtype=np.float64)
