"""Readable views of a model for the notebooks: a compact layer table and its attention maps."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from .attention import AttentionGate

SUMMARY_COLUMNS = ("layer", "type", "params", "output_shape")


def summary_table(model: nn.Module, depth: int = 2, input_size: tuple[int, ...] | None = None) -> pd.DataFrame:
    """Return one row per module down to ``depth`` dots in its name: layer, type, params, output shape.

    ``params`` counts the module's whole subtree.  With ``input_size`` (C, H, W), one zero image is
    passed through (in eval mode, without gradients) and each row gets its output shape; otherwise
    that column is empty.  The model's training mode is restored afterwards.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rows = {name: (type(m).__name__, sum(p.numel() for p in m.parameters()))
            for name, m in model.named_modules() if name and name.count(".") < depth}
    shapes: dict[str, str] = {}
    if input_size is not None:
        def hook(name: str):
            def record(_module: nn.Module, _inputs: tuple, output: object) -> None:
                if isinstance(output, torch.Tensor):
                    shapes[name] = "x".join(map(str, output.shape[1:]))
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n in rows]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    data = [(n, t, p, shapes.get(n, "")) for n, (t, p) in rows.items()]
    return pd.DataFrame(data, columns=list(SUMMARY_COLUMNS))


def attention_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` (no gradients) and return every attention map it computed, by layer name.

    Maps come from the :class:`~nbhelpers.models.attention.AttentionGate` modules inside CBAM,
    ECA, MSCAM, HFF and non-local blocks: channel maps are (B, C, 1, 1), spatial maps
    (B, 1, H, W), MSCAM maps (B, C, H, W), non-local maps (B, HW, HW).  Keys are the gate's dotted
    name without the trailing ``.gate``.  Returns an empty dict for models without such blocks.
    """
    maps: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, AttentionGate):
            key = name.removesuffix(".gate")
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=key: maps.__setitem__(key, out.detach().cpu())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return maps
