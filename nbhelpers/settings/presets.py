"""Training protocol presets, read from ``presets.toml`` next to this module.

A preset is a plain table of settings (see the comments at the top of ``presets.toml``);
:func:`nbhelpers.training.config.config_from_preset` turns one into a :class:`~nbhelpers.training.config.TrainConfig`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Iterable
from data_prep.errors import WorkbookError

PRESETS_FILE = Path(__file__).with_name("presets.toml")


class PresetError(WorkbookError, KeyError):
    """An unknown preset, or a setting a preset does not have, was asked for."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def load_presets(path: Path = PRESETS_FILE) -> dict[str, dict[str, Any]]:
    """Read every preset from ``path`` as ``{name: {setting: value}}``.

    Raises FileNotFoundError naming the file when it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} not found; it ships with nbhelpers (reinstall the package)")
    with open(path, "rb") as f:
        return tomllib.load(f)


def list_presets(path: Path = PRESETS_FILE) -> list[str]:
    """The preset names in file order."""
    return list(load_presets(path))


def load_preset(
    name: str, path: Path = PRESETS_FILE, allowed: Iterable[str] = (), **overrides: Any
) -> dict[str, Any]:
    """Return the settings of preset ``name`` with non-``None`` ``overrides`` applied.

    An override must name a setting of the preset or one of ``allowed`` (e.g. every
    ``TrainConfig`` field).  Raises :class:`PresetError` listing the known presets for an
    unknown name, and naming the valid settings for any other override (so a typo cannot pass
    unnoticed).
    """
    presets = load_presets(path)
    if name not in presets:
        raise PresetError(f"unknown training preset {name!r}; known presets: {', '.join(presets)} (in {path})")
    values = dict(presets[name])
    known = set(allowed)
    for key, value in overrides.items():
        if key not in values and key not in known:
            valid = ", ".join(sorted(set(values) | known))
            raise PresetError(f"{key!r} is not a setting of preset {name!r}; valid settings: {valid}")
        if value is not None:
            values[key] = value
    return values
