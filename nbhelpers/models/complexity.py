"""Size and cost of the model zoo: parameters, MACs from two counters, CPU latency, and the papers' figures.

Two counters, because they disagree for attention models:

* **ptflops** (``gmacs_ptflops``) hooks ``nn.Module`` types and a few functional ops.  It counts
  convs, linears, norms, activations and pooling, and the attention of ``nn.MultiheadAttention``
  and timm's ``Attention``, but not ``F.scaled_dot_product_attention`` nor the ``@`` operator, so
  it misses the attention products of our own MSA, Swin and non-local blocks.  Tools of this kind
  (ptflops, thop) are what papers usually quote.
* **torch.utils.flop_counter** (``gmacs_aten``) counts at the ATen level: every conv, matmul
  and attention kernel (we register the formula for the CPU attention kernel it lacks), but no
  norms, activations, pooling or element-wise adds.  ``gmacs_attention`` is its share in attention
  products (SDPA and batched matmuls).

Both report multiply-accumulates (MACs): ptflops natively, flop_counter's FLOPs halved.
FLOPs = 2 x MACs.  The seeds' "FLOPs" are MACs: seed 000's ResNet50 at 448 px is 16.5 "GFLOPs",
4 x the 4.1 GMACs ResNet50 needs at 224 px.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any, Iterable

import pandas as pd
import torch
from ptflops import get_model_complexity_info
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from data_prep.progress import tqdm

from data_prep.options import add_out
from nbhelpers.models import create, list_models, model_spec
from nbhelpers.settings.config import RESULTS_DIR
from nbhelpers.settings.tables import provenance_header, write_table

GIGA, MEGA = 1e9, 1e6
LATENCY_BATCHES = (1, 16)
LATENCY_WARMUP, LATENCY_REPEATS = 1, 3
SEED = 0
DEFAULT_OUT = RESULTS_DIR / "tables"
#: The table's file names in the output folder: ``complexity.csv`` and ``complexity.md``.
TABLE_NAME = "complexity"

#: The seeds' own figures: (model, options, image size) -> what the paper reports.
#: Seed 000 Table 4 measures every network at its 448 px input (VGG16's 442.5 M params are its
#: fully connected layers on a 14x14 map; its "EfficientNet" has B3's size, 10.7 M params).
#: Seed 003 gives CPU frames per second only.  Seeds 001 and 004 give no size or cost.
PAPER_FIGURES: dict[tuple[str, str, int], dict[str, Any]] = {
    ("lgfnet", "", 448): {"paper_params_m": 3.6, "paper_gmacs": 3.7, "paper": "seed 000 Table 4"},
    ("resnet50", "", 448): {"paper_params_m": 23.5, "paper_gmacs": 16.5, "paper": "seed 000 Table 4"},
    ("vgg16", "", 448): {"paper_params_m": 442.5, "paper_gmacs": 61.8, "paper": "seed 000 Table 4"},
    ("efficientnet_b0", "", 448): {"paper_params_m": 10.7, "paper_gmacs": 4.0,
                                   "paper": "seed 000 Table 4 (EfficientNet, B3-sized)"},
    ("densenet121", "", 448): {"paper_params_m": 6.9, "paper_gmacs": 11.5, "paper": "seed 000 Table 4"},
    ("mobilevit_s", "", 448): {"paper_params_m": 4.9, "paper_gmacs": 5.8, "paper": "seed 000 Table 4"},
    ("resnet50", "", 224): {"paper_cpu_fps": 7.89, "paper": "seed 003 Table 2 (their Xeon Gold 6226)"},
    ("resnet50_fpn_attn", "", 224): {"paper_cpu_fps": 12.75, "paper": "seed 003 Table 2 (their Xeon Gold 6226)"},
}

#: The rows of the committed table: every model at its paper's input size, the ablation
#: variants, and seed 000's comparison networks again at its 448 px.
SEED000_COMPARISON = ("resnet50", "vgg16", "efficientnet_b0", "densenet121", "mobilevit_s", "mobilenetv2")
ABLATIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("densenet121_cbam", {"attention": "channel"}),
    ("densenet121_cbam", {"attention": "spatial"}),
    ("lgfnet", {"variant": "local_only"}),
    ("lgfnet", {"variant": "dual"}),
    ("lgfnet", {"variant": "dual_mscam"}),
    ("lgfnet", {"variant": "dual_msa"}),
    ("resnet50_fpn_attn", {"fpn": False, "attention": True}),
    ("resnet50_fpn_attn", {"fpn": True, "attention": False}),
    ("resnet50_fpn_attn", {"fpn": False, "attention": False}),
)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # flop_counter knows the CUDA attention kernels but not the CPU one.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_ATTENTION_OPS = ("scaled_dot_product", "bmm")


def aten_macs(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Return (all MACs, attention MACs) of one forward pass of ``model`` on ``x``, via flop_counter."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in per_op.items() if any(a in str(op) for a in _ATTENTION_OPS))
    return counter.get_total_flops() / 2, attention / 2


def complexity(model: nn.Module, image_size: int, in_chans: int = 3) -> dict[str, float]:
    """Measure ``model`` on one ``in_chans`` x ``image_size`` x ``image_size`` image (eval mode).

    Returns ``params_m`` (millions), ``gmacs_ptflops``, ``gmacs_aten`` and ``gmacs_attention``
    (10^9 multiply-accumulates; FLOPs = 2 x MACs; see the module docstring for what each counter
    includes).  Raises RuntimeError naming the size if ptflops fails on the model.
    """
    was_training = model.training
    model.eval()
    try:
        macs, _ = get_model_complexity_info(
            model, (in_chans, image_size, image_size), as_strings=False, print_per_layer_stat=False, verbose=False
        )
        if macs is None:
            raise RuntimeError(f"ptflops could not count {type(model).__name__} at {image_size} px")
        device = next(model.parameters()).device
        total, attention = aten_macs(model, torch.zeros(1, in_chans, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / MEGA,
        "gmacs_ptflops": macs / GIGA,
        "gmacs_aten": total / GIGA,
        "gmacs_attention": attention / GIGA,
    }


def latency(model: nn.Module, image_size: int, batch_size: int, in_chans: int = 3,
            warmup: int = LATENCY_WARMUP, repeats: int = LATENCY_REPEATS) -> dict[str, float]:
    """Median CPU wall time of ``repeats`` forward passes at ``batch_size``, after ``warmup`` passes.

    Returns ``ms_per_batch`` and ``images_per_s``.  Runs in inference mode on the CPU with the
    current ``torch.get_num_threads()``; a benchmark, not a test.
    """
    model = model.eval().cpu()
    x = torch.randn(batch_size, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(SEED))
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return {"ms_per_batch": median * 1e3, "images_per_s": batch_size / median}


def _options_text(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def complexity_table(names: Iterable[str | tuple[str, dict[str, Any]]] | None = None, image_size: int | None = None,
                     in_chans: int = 3, with_latency: bool = False) -> pd.DataFrame:
    """One row per model: size and cost at ``image_size`` (default: each model's paper input size).

    ``names`` holds model names or ``(name, options)`` pairs (default: every registered model).
    Columns: model, options, source, image_size, the :func:`complexity` columns, the papers'
    figures where :data:`PAPER_FIGURES` has them, and with ``with_latency`` CPU ``ms_b1``,
    ``ips_b1``, ``ms_b16``, ``ips_b16`` (milliseconds per batch, images per second).
    """
    rows = []
    items = [(n, {}) if isinstance(n, str) else n for n in (names or list_models())]
    torch.manual_seed(SEED)
    for name, options in tqdm(items, desc="models", unit="model"):
        spec = model_spec(name)
        size = image_size or spec.image_size
        model = create(name, in_chans=in_chans, **options)
        row: dict[str, Any] = {"model": name, "options": _options_text(options), "source": spec.source,
                               "image_size": size, **complexity(model, size, in_chans)}
        if with_latency:
            for batch in LATENCY_BATCHES:
                timing = latency(model, size, batch, in_chans)
                row[f"ms_b{batch}"] = timing["ms_per_batch"]
                row[f"ips_b{batch}"] = timing["images_per_s"]
        row.update(PAPER_FIGURES.get((name, row["options"], size), {}))
        rows.append(row)
    table = pd.DataFrame(rows)
    if "paper_params_m" in table:
        table["params_gap_pct"] = 100 * (table["params_m"] / table["paper_params_m"] - 1)
        table["gmacs_gap_pct"] = 100 * (table["gmacs_ptflops"] / table["paper_gmacs"] - 1)
    return table


def default_rows() -> list[tuple[str, dict[str, Any]]]:
    """The committed table's rows: all models at their paper's size, ablations, seed 000 at 448 px."""
    return [(n, {}) for n in list_models()] + list(ABLATIONS)


def _header(table: pd.DataFrame, command: str) -> str:
    """The Markdown file's title, provenance and the meaning of each column."""
    device = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    header = [
        "# Model size and cost",
        "",
        provenance_header(command, seeds=[SEED], device=device, notes=f"torch {torch.__version__}."),
        "",
        "- `params_m`: parameters (millions) with a 3-class head and 3-channel input.",
        "- `gmacs_ptflops`: ptflops, module hooks; misses attention products of our own attention "
        "blocks (SDPA, `@`), counts norms/activations/pooling.",
        "- `gmacs_aten`: torch.utils.flop_counter / 2; every conv, matmul and attention product, "
        "no norms/activations/pooling. `gmacs_attention`: its attention-product share.",
        "- MACs, not FLOPs (FLOPs = 2 x MACs); the seeds' \"FLOPs\" are MACs. `paper_*`: the seed's own "
        "figures; `*_gap_pct`: ours (ptflops) vs the paper.",
        "- `ms_b1`/`ms_b16`: median CPU milliseconds per batch of 1/16 on this machine; `ips_*`: images per second.",
        f"  Median of {LATENCY_REPEATS} runs after {LATENCY_WARMUP} warm-up: on a machine shared with other jobs, "
        "single rows can be several times too slow; compare rows measured on an idle machine.",
        *_counter_notes(table),
    ]
    return "\n".join(header)


def _counter_notes(table: pd.DataFrame) -> list[str]:
    """One line per model with a paper figure where the two MAC counters disagree by over 10 %:
    which counter the paper's number matches, measured from the table (nothing typed in)."""
    lines = []
    for row in table.itertuples(index=False):
        paper, hooks, aten = getattr(row, "paper_gmacs", None), row.gmacs_ptflops, row.gmacs_aten
        if paper is None or pd.isna(paper) or abs(aten - hooks) <= 0.1 * hooks:
            continue
        closer = "ptflops" if abs(hooks - paper) <= abs(aten - paper) else "the aten count"
        lines.append(
            f"- {row.model} @{row.image_size}: the paper's {paper:g} GMACs matches {closer} (ptflops {hooks:.3g}, "
            f"{100 * (hooks - paper) / paper:+.1f} %; aten {aten:.3g}, {100 * (aten - paper) / paper:+.1f} %). "
            f"The difference, {aten - hooks:.3g} G, is mostly attention products ({row.gmacs_attention:.3g} G), "
            "which ptflops' module hooks do not see: "
            + ("the paper's figure leaves them out too, as a hook-based counter (ptflops, thop) does."
               if closer == "ptflops" else "the paper's figure includes them."))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook complexity``."""
    add_out(parser, f"{TABLE_NAME}.csv and {TABLE_NAME}.md", default=DEFAULT_OUT)
    parser.add_argument("--models", nargs="*", help="model names (default: all, plus ablations and 448 px rows)")
    parser.add_argument("--no-latency", action="store_true", help="skip the CPU latency benchmark")


def run_command(args: argparse.Namespace) -> int:
    """``workbook complexity``: measure the models and write ``complexity.csv`` / ``.md`` to ``--out``."""
    latency_on = not args.no_latency
    if args.models:
        table = complexity_table(args.models, with_latency=latency_on)
    else:
        parts = [complexity_table(default_rows(), with_latency=latency_on),
                 complexity_table(SEED000_COMPARISON, image_size=448, with_latency=False)]
        table = pd.concat(parts, ignore_index=True)
    csv_path, md_path = write_table(table, args.out, TABLE_NAME, _header(table, args.command_line), float_format="%.4g")
    print(f"wrote {csv_path} and {md_path} ({len(table)} rows)")
    return 0
