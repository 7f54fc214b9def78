"""Settings in one place: where the data and results live, and the named run profiles.

The profiles themselves are data, in ``profiles.toml`` next to this module.  A notebook calls
:func:`setup` with its parameters; non-``None`` parameters override the profile's values.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
PROFILES_FILE = Path(__file__).with_name("profiles.toml")
REPORTED_FILE = Path(__file__).with_name("reported.toml")

#: The environment variable that says where the upstream sources live.
DATA_ENV = "CXR_DATA_DIR"
#: The Jupyter kernel the notebooks declare and the runner executes them with.
KERNEL_NAME = "cxr-workbook"


class DataNotFoundError(FileNotFoundError):
    """The source-data folder is not set or does not exist."""


class ProfileError(KeyError):
    """An unknown profile or profile setting was asked for."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the upstream sources, checked to exist.

    ``explicit`` wins; otherwise ``$CXR_DATA_DIR`` is used.  Raises :class:`DataNotFoundError`
    naming the setting and how to fix it when neither is set or the folder is missing.
    """
    raw = explicit if explicit is not None else os.environ.get(DATA_ENV)
    if not raw:
        raise DataNotFoundError(
            f"No source-data folder given: set the environment variable {DATA_ENV} "
            f"(e.g. `export {DATA_ENV}=/path/to/cxr-sources`) or pass data_dir=... to the notebook. "
            "The folder holds the upstream datasets in their own layouts "
            "(covid-chestxray-dataset/, Figure1-COVID-chestxray-dataset/, ...); "
            "`python -m data_prep.download` fetches them."
        )
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        origin = "data_dir parameter" if explicit is not None else f"${DATA_ENV}"
        raise DataNotFoundError(
            f"Source-data folder {path} (from the {origin}) does not exist. "
            f"Point {DATA_ENV} at the folder holding the upstream sources, "
            "or fetch them with `python -m data_prep.download`."
        )
    return path


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, dict[str, Any]]:
    """Read every profile from ``profiles.toml`` as ``{name: {setting: value}}``."""
    with open(path, "rb") as f:
        return tomllib.load(f)


def load_profile(name: str, path: Path = PROFILES_FILE) -> dict[str, Any]:
    """Return the settings of profile ``name``; raise :class:`ProfileError` listing the known ones."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; known profiles: {', '.join(profiles)} (in {path})")
    return dict(profiles[name])


@dataclass
class Settings:
    """The resolved settings of one notebook session: profile values plus overrides."""

    profile: str
    data_dir: Path | None
    run_dir: Path
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not dataclass fields: profile settings read as attributes.
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"setting {name!r} is not in profile {self.__dict__.get('profile')!r}")

    def as_dict(self) -> dict[str, Any]:
        """All settings as one flat dict (for printing and for writing next to results)."""
        return {"profile": self.profile, "data_dir": str(self.data_dir), "run_dir": str(self.run_dir), **self.values}


def resolve(
    profile: str,
    *,
    data_dir_: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    need_data: bool = True,
    **overrides: Any,
) -> Settings:
    """Merge profile ``profile`` with non-``None`` ``overrides`` into a :class:`Settings`.

    ``run_dir`` defaults to ``results/runs/<profile>``.  With ``need_data`` the data folder is
    resolved and checked (see :func:`data_dir`).  An override that names no setting of the
    profile raises :class:`ProfileError`, so a typo in a notebook parameter cannot pass unnoticed.
    """
    values = load_profile(profile)
    for key, value in overrides.items():
        if key not in values:
            raise ProfileError(f"{key!r} is not a setting of profile {profile!r}; known: {', '.join(values)}")
        if value is not None:
            values[key] = value
    out = Path(run_dir) if run_dir is not None else RESULTS_DIR / "runs" / profile
    return Settings(
        profile=profile,
        data_dir=data_dir(data_dir_) if need_data else None,
        run_dir=out.resolve(),
        values=values,
    )


def load_reported(path: Path = REPORTED_FILE) -> "pd.DataFrame":
    """The seed papers' reported results (on their data, in percent) as a table, one row each."""
    import pandas as pd

    with open(path, "rb") as f:
        return pd.DataFrame(tomllib.load(f)["result"])
