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
"Sanity checks for saliency maps"): the CAMs of a trained model are compared with those of a
copy whose weights are re-initialised.  Maps that stay similar explain the input, not the model.
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

from nbhelpers.data import to_model_input
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
#: Gaussian window of the structural similarity (Wang et al. 2004): 11 px, sigma 1.5, and its
#: stabilising constants for maps in [0, 1].
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
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
                    device: torch.device | str = "cpu", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CAMs of cached uint8 images (N, H, W), in batches, each explained for its target class.

    Images go through :func:`nbhelpers.data.to_model_input` (no augmentation) on ``device``.
    ``targets`` default to the predicted classes.  Returns ``(cams float32 (N, H, W), predicted
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
        cams.append(compute_cams(model, x, chosen, method))
        predicted.append(pred)
    if not cams:
        h, w = images.shape[1:3] if images.ndim == 3 else (0, 0)
        return np.zeros((0, h, w), np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(cams), np.concatenate(predicted)


# --------------------------------------------------------------------------- sanity check


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every weight re-initialised (Adebayo et al.'s full randomisation).

    Modules with ``reset_parameters`` use their own initialiser (BatchNorm also resets its running
    statistics); any other parameter is drawn from N(0, :data:`REINIT_STD`).  Randomness comes from
    ``seed`` only and leaves the global torch RNG untouched.  Registry attributes (CAM layers) are kept.
    """
    twin = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in twin.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for param in module.parameters(recurse=False):
                    param.normal_(0.0, REINIT_STD)
    return twin


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    blur = lambda m: cv2.GaussianBlur(m, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA)  # noqa: E731
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float((num / den).mean())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
    if flat_a and flat_b:
        return float("nan")  # two blank maps: nothing to rank
    if flat_a or flat_b:
        return 0.0  # a blank map ranks nothing, so it shares no ranking with the other
    return float(stats.spearmanr(a.ravel(), b.ravel()).statistic)


def cam_similarity(cams_a: np.ndarray, cams_b: np.ndarray) -> pd.DataFrame:
    """Per-image similarity of two CAM stacks (N, H, W) in [0, 1]: Spearman rank correlation and SSIM.

    A constant (blank) map has no ranking: its Spearman with a non-constant map is 0, with
    another constant map NaN.  Fresh networks often give blank Grad-CAMs (every weighted
    activation negative, cut by the ReLU), so the randomised side is often blank.  Returns a DataFrame with
    columns ``spearman`` and ``ssim``, one row per image.  Raises ValueError for unequal shapes.
    """
    cams_a, cams_b = np.asarray(cams_a), np.asarray(cams_b)
    if cams_a.shape != cams_b.shape:
        raise ValueError(f"CAM stacks differ in shape: {cams_a.shape} vs {cams_b.shape}")
    rows = [{"spearman": _spearman(a, b), "ssim": _ssim(a, b)} for a, b in zip(cams_a, cams_b)]
    return pd.DataFrame(rows, columns=["spearman", "ssim"])


def randomisation_check(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None,
                        method: str = "gradcam", seed: int = 0) -> pd.DataFrame:
    """Compare the CAMs of ``model`` with those of :func:`randomised_copy` on the same input.

    ``targets`` (default: the model's predicted classes) are explained in both models, so only
    the weights differ.  Returns :func:`cam_similarity` per image: high values mean the maps do
    not depend on what the model learnt and fail the sanity check.  Raises as :func:`compute_cams`.
    """
    if targets is None:
        targets = predict_classes(model, x).tolist()
    own = compute_cams(model, x, targets, method)
    random = compute_cams(randomised_copy(model, seed), x, targets, method)
    return cam_similarity(own, random)


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
