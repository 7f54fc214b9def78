"""Class-activation maps through the maintained ``grad-cam`` library, at a grid fine enough to localise.

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

Whether the maps depend on the model (the randomisation check) and how faithful they are (ROAD)
is measured in :mod:`nbhelpers.evaluation.sanity`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from data_prep.progress import tqdm

from nbhelpers.pipeline.data import to_model_input
from nbhelpers.models import cam_reshape_transform, cam_target_layers
from data_prep.errors import WorkbookError

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


class CamError(WorkbookError, RuntimeError):
    """grad-cam produced no map (e.g. no gradient reached the target layer)."""


@contextmanager
def explaining(model: nn.Module) -> Iterator[nn.Module]:
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
    with explaining(model), torch.enable_grad(), \
            METHODS[method](model=model, target_layers=layers, reshape_transform=reshape) as cam:
        if method == "scorecam":
            cam.batch_size = SCORECAM_BATCH
        try:
            cams = cam(input_tensor=x, targets=per_image)
        except (AttributeError, TypeError) as err:
            # grad-cam fails obscurely (None.shape) when a target layer recorded nothing.
            if cam.activations_and_grads.activations:
                raise
            raise no_map_error(model, method, target_layers is not None) from err
    # grad-cam's context manager swallows an IndexError and prints it; do not return nothing silently.
    if cams is None or len(cams) != len(x):
        raise no_map_error(model, method, target_layers is not None)
    return cams


def no_map_error(model: nn.Module, method: str, given: bool) -> CamError:
    """The :class:`CamError` for ``method`` recording nothing at the ``given`` (else the
    registered) target layers of ``model``, naming the model and the layers."""
    name = getattr(model, "model_name", type(model).__name__)
    layers = "given target layers" if given else f"registered target layers {getattr(model, 'cam_layer_names', '?')}"
    return CamError(f"{method} gave no CAM for {name}: no activation or gradient reached the {layers}; "
                    "pick layers that forward() uses")


def predict_classes(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Predicted class index per image of model input ``x``, in eval mode (the caller's mode is restored)."""
    with explaining(model), torch.no_grad():
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
        with explaining(model), torch.no_grad():
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
