"""A run's settings checked for range and name once they are resolved, before notebook 01.

Types are checked where the overrides are read (:mod:`nbhelpers.settings.keyvalue`); here the
values: counts and sizes in range, split shares that sum to one, known models, presets, ablation
groups and devices, an image size every model the run trains can take.  The first problem is one
line naming the setting, its value and what is allowed (:class:`SettingValueError`, exit status 2),
so a wrong setting fails in seconds rather than in notebook 04 after the cache is built.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from data_prep.errors import WorkbookError


class SettingValueError(WorkbookError, ValueError):
    """A run setting of the right type but a value the workbook cannot use."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise SettingValueError(f"setting {key}={value!r} is not allowed: {allowed}")


def _at_least(key: str, value: Any, low: int | float) -> None:
    if value is not None and value < low:
        _fail(key, value, f"it must be >= {low}")


def _as_line(key: str, value: Any, check: Callable[[], Any]) -> Any:
    """Run ``check``; a WorkbookError or ValueError from it becomes one line naming ``key``."""
    try:
        return check()
    except SettingValueError:
        raise
    except (WorkbookError, ValueError) as error:
        _fail(key, value, str(error).splitlines()[0])


def check_settings(values: Mapping[str, Any]) -> None:
    """Raise :class:`SettingValueError` for the first setting of ``values`` (a resolved profile)
    whose value is out of range or names something unknown."""
    from data_prep.split import DEFAULT_RATIOS, RATIO_TOLERANCE
    from nbhelpers.experiments.ablation import load_grid
    from nbhelpers.models.registry import check_input_size, model_spec
    from nbhelpers.pipeline.preprocess import PreprocessConfig
    from nbhelpers.settings.device import pick_device
    from nbhelpers.training.config import config_from_preset

    get = values.get
    for key in ("per_class", "cam_images"):
        _at_least(key, get(key), 1)
    if get("balance") not in (None, "strict", "down"):
        _fail("balance", get("balance"), 'use "strict" or "down"')
    if get("min_age") is not None and not 0 <= get("min_age") <= 120:
        _fail("min_age", get("min_age"), "an age in years from 0 to 120, or none")
    split = get("split")
    if split is not None and (len(split) != 3 or any(r < 0 for r in split) or abs(sum(split) - 1) > RATIO_TOLERANCE):
        _fail("split", split, f"three non-negative train/val/test shares summing to 1, e.g. {list(DEFAULT_RATIOS)}")
    if get("image_size") is not None:
        _at_least("image_size", get("image_size"), 8)
    for key in ("clip_limit", "tile_grid"):
        if get(key) is not None:
            _as_line(key, get(key), lambda: PreprocessConfig(**{key: float(get(key)) if key == "clip_limit" else get(key)}))
    if get("device") is not None:
        _as_line("device", get("device"), lambda: pick_device(get("device"), verbose=False))
    if get("preset") is not None:
        _as_line("preset", get("preset"), lambda: config_from_preset(get("preset")))
    trained: dict[tuple, None] = {}
    for key in ("model", "models", "baselines"):
        names = get(key) if isinstance(get(key), list) else [get(key)] if get(key) else []
        for name in names:
            _as_line(key, name, lambda: model_spec(name))
            if key != "models":  # notebook 03 shows `models` at their papers' sizes, not image_size
                trained[(name, ())] = None
    if get("ablation_groups"):
        rows = _as_line("ablation_groups", get("ablation_groups"), lambda: load_grid(groups=get("ablation_groups")))
        trained.update({(row.model, tuple(sorted(row.options.items()))): None for row in rows})
    if get("image_size") is not None:
        for name, options in trained:
            _as_line("image_size", get("image_size"), lambda: check_input_size(name, get("image_size"), **dict(options)))
