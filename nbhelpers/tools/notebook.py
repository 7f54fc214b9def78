"""What every workbook notebook does first, and where it writes what it shows.

``start()`` resolves the profile and parameters, checks the data folder, seeds the random
generators, picks the device and prints the settings.  The returned :class:`Session` knows the
run folder's layout (one place, so notebooks agree on it) and saves tables and figures there,
so every number a notebook shows can be regenerated without opening Jupyter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from data_prep.atomic import write_text, write_with
from nbhelpers.settings import config
from nbhelpers.settings.device import pick_device, seed_everything

#: Rows a table shows inline; the full table is always written to disk.
SHOW_ROWS = 20


@dataclass
class Session:
    """The resolved settings of a notebook plus the run folder's layout."""

    settings: config.Settings
    device: torch.device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["settings"], name)

    # The run folder's layout, shared by all notebooks.
    @property
    def data_out(self) -> Path:
        """Curated manifest, dropped rows and summary (notebook 01)."""
        return self.run_dir / "data"

    @property
    def manifest_path(self) -> Path:
        return self.data_out / "manifest.csv"

    @property
    def cache_root(self) -> Path:
        """Preprocessed image arrays (notebook 02 builds, later notebooks reuse)."""
        return self.run_dir / "cache"

    @property
    def preprocess_options(self) -> dict[str, Any]:
        """The profile's preprocessing (CLAHE and its parameters) as ``PreprocessConfig`` fields,
        for every training, grid and probe of the run; the image size goes separately
        (``image_size=``), since presets carry one too."""
        return {"clahe": self.clahe, "clip_limit": float(self.clip_limit), "tile_grid": self.tile_grid}

    def grid_rows(self, groups: list[str] | None = None) -> list:
        """The ablation grid's rows of ``groups`` (default: the profile's), each with the profile's
        preprocessing under its own (a row that toggles CLAHE still wins)."""
        from dataclasses import replace

        from nbhelpers.experiments.ablation import load_grid

        return [replace(row, preprocess={**self.preprocess_options, **row.preprocess})
                for row in load_grid(groups=groups if groups is not None else self.ablation_groups)]

    def train_dir(self, model: str, tag: str = "") -> Path:
        """Checkpoints and logs of one training run of ``model`` (with an optional variant tag)."""
        return self.run_dir / "train" / (f"{model}-{tag}" if tag else model)

    def save_table(self, table: pd.DataFrame, name: str, show: bool = True) -> Path:
        """Write ``table`` to ``tables/<name>.csv`` and return the path; display it when ``show``."""
        path = write_with(self.run_dir / "tables" / f"{name}.csv", lambda p: table.to_csv(p, index=False))
        if show:
            _display(table.head(SHOW_ROWS))
        return path

    def save_figure(self, fig, name: str) -> Path:
        """Write matplotlib figure ``fig`` to ``figures/<name>.png`` and return the path."""
        return write_with(self.run_dir / "figures" / f"{name}.png",
                          lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))

    def save_json(self, data: dict[str, Any], name: str) -> Path:
        """Write ``data`` as ``<name>.json`` in the run folder and return the path."""
        return write_text(self.run_dir / f"{name}.json", json.dumps(data, indent=2, default=str) + "\n")


def _display(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:  # plain Python: printing is the best we can do
        print(obj)
    else:
        display(obj)


def start(profile: str, data_dir: str | None = None, run_dir: str | None = None, need_data: bool = True,
          settings_file: str | None = None, **overrides: Any) -> Session:
    """Begin a notebook: resolve ``profile`` (or the run's ``settings_file``, written by the
    runner) with the notebook's non-``None`` parameters, check the data folder (unless
    ``need_data`` is false), seed everything, pick the device, print it all.

    Raises :class:`data_prep.datadir.DataNotFoundError` or :class:`nbhelpers.settings.config.ProfileError`
    with a message saying which setting to fix.
    """
    settings = config.resolve(profile, data_dir_=data_dir, run_dir=run_dir, need_data=need_data,
                              settings_file=settings_file, **overrides)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    device = pick_device(settings.device)
    rows = [(k, v) for k, v in settings.as_dict().items() if k != "description"]
    print(f"profile {profile!r}: {settings.values.get('description', '')}")
    _display(pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting"))
    return Session(settings, device)
