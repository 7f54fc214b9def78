"""What a run trains, as one record that compares alike wherever it was stored.

A run's record (:func:`nbhelpers.training.runs.run_provenance`: model, options, pretrained,
TrainConfig, manifest hash, preprocessing and cache key) goes into its checkpoints,
``train_config.json`` and ``metrics.json``.  Resuming a run, and reusing a finished one in the
ablation grid or the shortcut probes, compare the stored record with the one that would be
trained now (:func:`provenance_differences`); a difference is named field by field, so the
message says what to change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from data_prep.errors import WorkbookError

#: TrainConfig fields that may change when resuming (the rest must match ``last.pt``).
RESUMABLE_CHANGES = ("epochs", "patience")

_NOT_RECORDED = object()


def jsonable(value: Any) -> Any:
    """NaN/inf to None and numpy scalars to Python, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plain_values(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, NaN as None), so records compare alike
    whether they come from memory, ``metrics.json`` or a checkpoint."""
    return json.loads(json.dumps(jsonable(value)))


def _flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig fields by their own names, PreprocessConfig fields as ``preprocess.<field>``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "config" and isinstance(value, Mapping):
            out.update(value)
        elif key == "preprocess" and isinstance(value, Mapping):
            out.update({f"preprocess.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def provenance_differences(
    saved: Mapping[str, Any] | None, now: Mapping[str, Any], ignore: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """What differs between a stored :func:`nbhelpers.training.runs.run_provenance` record and the
    current one, as ``(name, "name saved, not now")`` pairs (TrainConfig fields by name,
    preprocessing fields as ``preprocess.<field>``); names in ``ignore`` are skipped;
    ``saved=None`` (a run written before records were kept) differs in every entry.  A
    preprocessing field that a saved record lacks was added to the pipeline after the run, and
    every such field defaults to what the pipeline did before it existed (a mitigation or blackout
    switched off), so it counts as its default.  An empty list means the run is the same."""
    from dataclasses import fields

    from nbhelpers.pipeline.preprocess import PreprocessConfig

    old, new = _flatten(plain_values(dict(saved or {}))), _flatten(plain_values(dict(now)))
    if any(key.startswith("preprocess.") for key in old):
        defaults = {f"preprocess.{f.name}": plain_values(f.default) for f in fields(PreprocessConfig)}
        old = {**{k: v for k, v in defaults.items() if k in new and k not in old}, **old}
    out = []
    for key in dict.fromkeys([*new, *old]):
        if key in ignore:
            continue
        a, b = old.get(key, _NOT_RECORDED), new.get(key, _NOT_RECORDED)
        if a != b:
            shown = ["(not recorded)" if v is _NOT_RECORDED else v if isinstance(v, str) else json.dumps(v)
                     for v in (a, b)]
            out.append((key, f"{key} {shown[0]}, not {shown[1]}"))
    return out


def saved_record(state: Mapping[str, Any]) -> dict[str, Any]:
    """The run record a checkpoint holds; one written before records were kept has only its
    config and model name."""
    saved = state.get("provenance")
    if saved is None:
        meta = state.get("meta") or {}
        saved = {"config": state.get("config", {}), **({"model": meta["model"]} if "model" in meta else {})}
    return dict(saved)


class RunMismatchError(WorkbookError, ValueError):
    """A checkpoint belongs to another run than the one asked for: it was trained with other
    settings, or holds the weights of another model; the message says what differs."""


def check_resumable(saved: Mapping[str, Any] | None, now: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`RunMismatchError` (a ValueError) naming every difference when the run
    ``saved`` in the checkpoint at ``path`` is not the run ``now`` describes (``epochs`` and
    ``patience`` may change)."""
    differences = provenance_differences(saved, now, ignore=RESUMABLE_CHANGES)
    if differences:
        raise RunMismatchError(
            f"cannot resume from {path}: it was trained with different {[k for k, _ in differences]} "
            f"(it holds {'; '.join(text for _, text in differences)}); use the same settings, a new output folder, "
            "or start afresh without --resume (resume=False)"
        )
