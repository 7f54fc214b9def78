"""Settings in one place: where the data and results live, and the named run profiles.

The profiles themselves are data, in ``profiles.toml`` next to this module.  A notebook calls
:func:`setup` with its parameters; non-``None`` parameters override the profile's values.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from data_prep.datadir import data_dir
from nbhelpers.settings import keyvalue
from data_prep.errors import WorkbookError

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "results"
PROFILES_FILE = Path(__file__).with_name("profiles.toml")
REPORTED_FILE = Path(__file__).with_name("reported.toml")

#: The Jupyter kernel the notebooks declare and the runner executes them with.
KERNEL_NAME = "cxr-workbook"
#: The file in a run folder holding the settings the runner resolved once for every notebook.
SETTINGS_FILE = "settings.json"
#: Profile settings that may be set to None (``-p min_age=none``: keep every age); any other
#: setting needs a value.
OPTIONAL_SETTINGS = ("min_age",)
#: Parameters every notebook declares; they are the runner's own options, not overrides.
RUN_PARAMETERS = ("profile", "data_dir", "run_dir", "settings_file")
#: The type of each notebook parameter whose default does not tell it (``None``, ``[]``); a
#: parameter with a literal default (``errors = 8``, ``methods = ["gradcam"]``) is typed by it.  A
#: contract test keeps every declared parameter typed, so a runner override can be checked.
NOTEBOOK_PARAMETERS: dict[str, Any] = {
    "image_folders": (list, str),   # 01: the user's own folders of images, one subfolder per class
    "epochs": int,             # 04, 06: preset's epochs overridden
    "pretrained": bool,        # 04: preset's ImageNet weights overridden
    "groups": (list, str),     # 06: ablation groups run
    "probe_epochs": int,            # 08: the probe's epochs
}


class ProfileError(WorkbookError, KeyError):
    """An unknown profile or profile setting was asked for, or a setting of the wrong type."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


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


def profile_schema(values: Mapping[str, Any]) -> dict[str, Any]:
    """What each setting of a profile holds, read off its values (see :mod:`nbhelpers.settings.keyvalue`);
    ``min_age`` may also be None (keep every age) and a number where the profile has an integer."""
    schema = {key: keyvalue.expected_type(value) for key, value in values.items()}
    for key, kind in list(schema.items()):
        if kind is int and key in ("min_age", "clip_limit"):
            schema[key] = float
    return schema


def check_overrides(profile: str, values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``overrides`` against the settings of ``profile`` (``values``): every key must be a
    setting and every non-None value of its type.  Returns the checked values (an integer where
    a number is expected becomes a float).  Raises :class:`ProfileError` naming the key, close
    matches or the expected type and the value given."""
    schema = profile_schema(values)
    out = {}
    for key, value in overrides.items():
        if key not in values:
            raise ProfileError(keyvalue.unknown_key_message(key, values, f"a setting of profile {profile!r}"))
        try:
            out[key] = keyvalue.check_value(key, value, schema[key])
        except keyvalue.AssignmentError as err:
            raise ProfileError(f"setting {err} (profile {profile!r})") from None
    return out


def write_settings(run_dir: Path, profile: str, values: Mapping[str, Any], overrides: Mapping[str, Any]) -> Path:
    """Write the settings resolved once for a whole run (profile values with the overrides
    applied) to ``run_dir/settings.json``, which every notebook of the run then reads."""
    from data_prep.atomic import write_text

    payload = {"profile": profile, "overrides": dict(overrides), "values": dict(values)}
    return write_text(Path(run_dir) / SETTINGS_FILE, json.dumps(payload, indent=2, default=str) + "\n")


def read_settings(path: str | os.PathLike, profile: str) -> dict[str, Any]:
    """The values of a settings file written by :func:`write_settings`, checked to belong to
    ``profile``.  Raises :class:`ProfileError` naming the file when it is missing, unreadable or
    written for another profile."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        values = payload["values"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProfileError(f"settings file {path} is missing or unreadable ({err}); rerun the workbook "
                           "(workbook run) or pass settings_file=None") from None
    if payload.get("profile") != profile:
        raise ProfileError(f"settings file {path} was written for profile {payload.get('profile')!r}, not {profile!r}; "
                           "pass settings_file=None or the matching profile")
    return dict(values)


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
    settings_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> Settings:
    """Merge profile ``profile`` with non-``None`` ``overrides`` into a :class:`Settings`.

    ``settings_file`` (written by the runner, :func:`write_settings`) replaces the profile's
    values with those resolved once for the whole run, so an override reaches every notebook,
    also those that do not declare it.  ``run_dir`` defaults to ``results/runs/<profile>``.
    With ``need_data`` the data folder is resolved and checked (see :func:`data_dir`).  An
    override that names no setting of the profile, or has the wrong type, raises
    :class:`ProfileError`, so a typo in a notebook parameter cannot pass unnoticed.
    """
    declared = load_profile(profile)
    values = dict(declared)
    if settings_file is not None:
        values.update(check_overrides(profile, declared, read_settings(settings_file, profile)))
    for key, value in check_overrides(profile, declared, overrides).items():
        if value is not None:
            values[key] = value
    out = Path(run_dir) if run_dir is not None else RESULTS_DIR / "runs" / profile
    return Settings(
        profile=profile,
        data_dir=data_dir(data_dir_) if need_data else None,
        run_dir=out.resolve(),
        values=values,
    )


def display_path(path: str | os.PathLike | None) -> str:
    """``path`` as a notebook should show it, without this machine's folders: relative to the
    repository when inside it, ``$CXR_DATA_DIR/...`` inside the data folder named by that
    variable, ``~/...`` inside the home folder, else the last two parts after ``.../``."""
    if path is None:
        return ""
    path = Path(path).expanduser().resolve()
    from data_prep.datadir import DATA_ENV

    anchors = [(REPO_ROOT, "")]
    if os.environ.get(DATA_ENV):
        anchors.insert(0, (Path(os.environ[DATA_ENV]).expanduser().resolve(), f"${DATA_ENV}"))
    anchors.append((Path.home().resolve(), "~"))
    for root, name in anchors:
        if path == root or root in path.parents:
            rel = path.relative_to(root).as_posix()
            if not name:
                return rel if rel != "." else "."
            return name if rel == "." else f"{name}/{rel}"
    return ".../" + "/".join(path.parts[-2:])


def load_reported(path: Path = REPORTED_FILE) -> "pd.DataFrame":
    """The seed papers' reported results (on their data, in percent) as a table, one row each."""
    import pandas as pd

    with open(path, "rb") as f:
        return pd.DataFrame(tomllib.load(f)["result"])
