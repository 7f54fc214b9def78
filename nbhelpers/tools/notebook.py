"""What every workbook notebook does first, and where it writes what it shows.

``start()`` resolves the profile and parameters, checks the data folder (and that the sources
can supply the profile's set), seeds the random generators, picks the device and prints the
settings.  The returned :class:`Session` knows the run folder's layout (one place, so notebooks
agree on it) and saves tables and figures there, so every number a notebook shows can be
regenerated without opening Jupyter.  What it shows is made for reading: tables without a
meaningless index, rounded, dict columns unpacked, cut with a note; paths relative to the
repository; and in the ``smoke`` profile a banner on the notebook and on every figure saying
that its numbers are a wiring check only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from data_prep.atomic import write_text, write_with
from data_prep.errors import WorkbookError, one_line
from nbhelpers.settings import config
from nbhelpers.settings.device import pick_device, seed_everything

#: Rows a table shows inline; the full table is always written to disk.
SHOW_ROWS = 20
#: Decimals of the floats a table shows (the CSV keeps every digit).
SHOW_DECIMALS = 3
#: Profiles whose numbers mean nothing: every notebook and figure of theirs says so.
WIRING_ONLY = ("smoke",)
SMOKE_NOTE = "smoke profile: a wiring check on a few images, its numbers mean nothing"


class MissingStepError(WorkbookError, FileNotFoundError):
    """A notebook needs what an earlier notebook writes, and it is not there."""


class StaleStepError(WorkbookError, RuntimeError):
    """What an earlier notebook wrote was made with other settings than this run's."""


class SupplyError(WorkbookError, ValueError):
    """The sources cannot supply the set the profile asks for."""


@dataclass
class Session:
    """The resolved settings of a notebook plus the run folder's layout."""

    settings: config.Settings
    device: torch.device
    headers_shown: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["settings"], name)

    def show_header(self, header: str | None) -> None:
        """Print a committed table's provenance header the first time it appears in this notebook;
        a table made by the same command later says so in one line."""
        if header is None:
            return
        if header in self.headers_shown:
            print("(made by the same command as the table above)")
            return
        self.headers_shown.append(header)
        print(header)

    def takeaway(self, lines: list[str]) -> None:
        """Show what this run's own numbers say, as bullets under "In this run"."""
        _display_markdown("**In this run**\n\n" + "\n".join(f"* {line}" for line in lines))

    # The run folder's layout, shared by all notebooks.
    @property
    def data_out(self) -> Path:
        """Curated manifest, dropped rows and summary (notebook 01)."""
        return self.run_dir / "data"

    @property
    def manifest_path(self) -> Path:
        """The curated manifest; raises :class:`MissingStepError` when notebook 01 has not made it."""
        path = self.data_out / "manifest.csv"
        if not path.is_file():
            raise MissingStepError(f"no curated set in {config.display_path(self.run_dir)} (data/manifest.csv): run "
                                   f"notebook 01 first with profile={self.profile!r} and the same run_dir")
        self._check_curated_with_these_settings()
        return path

    #: The settings notebook 01's curated set depends on (``summary.json``'s ``params``).
    CURATION_KEYS = ("per_class", "balance", "views", "allow_ap", "min_age", "seed", "split")

    def _check_curated_with_these_settings(self) -> None:
        """Raise :class:`StaleStepError` when notebook 01 made the curated set with other settings
        than this run's (``-p per_class=5`` after a run of 12): its output is not used in silence."""
        summary = self.data_out / "summary.json"
        if not summary.is_file():
            return
        made = json.loads(summary.read_text()).get("params", {})
        now = self.curation_params().as_dict()
        differ = [k for k in self.CURATION_KEYS if k in made and made[k] != now[k]]
        if differ:
            said = ", ".join(f"{k}={made[k]!r} there, {now[k]!r} now" for k in differ)
            raise StaleStepError(f"the curated set in {config.display_path(self.data_out)} was made by notebook 01 with "
                                 f"other settings ({said}): rerun notebook 01 with these settings first "
                                 "(workbook run --only 01 02 ... with the same -p), or use another run folder")

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

    def curation_params(self, **extra: Any):
        """The profile's curation recipe as :class:`data_prep.recipe.CurationParams`, with
        ``extra`` fields (``image_folders=[...]``) set."""
        from data_prep.recipe import CurationParams

        return CurationParams(per_class=self.per_class, balance=self.balance, views=self.views, allow_ap=self.allow_ap,
                              min_age=self.min_age, seed=self.seed, split=tuple(self.split), **extra)

    def train_dir(self, model: str, tag: str = "") -> Path:
        """Checkpoints and logs of one training run of ``model`` (with an optional variant tag)."""
        return self.run_dir / "train" / (f"{model}-{tag}" if tag else model)

    @staticmethod
    def shown(path: Path | str | None) -> str:
        """``path`` as a notebook shows it (see :func:`nbhelpers.settings.config.display_path`)."""
        return config.display_path(path)

    @property
    def wiring_only(self) -> bool:
        """True for a profile whose numbers mean nothing (``smoke``)."""
        return self.profile in WIRING_ONLY

    def save_table(self, table: pd.DataFrame, name: str, show: bool = True,
                   columns: list[str] | None = None) -> None:
        """Write ``table`` to ``tables/<name>.csv``; when ``show``, display it for reading (only
        ``columns`` when given, see :func:`show_table`)."""
        write_with(self.run_dir / "tables" / f"{name}.csv", lambda p: table.to_csv(p, index=False))
        if show:
            show_table(table, columns=columns, where=f"tables/{name}.csv")

    def save_figure(self, fig, name: str) -> None:
        """Write matplotlib figure ``fig`` to ``figures/<name>.png`` (with the smoke note in a
        corner in the smoke profile); the notebook shows the figure itself."""
        if self.wiring_only:
            fig.text(0.995, 0.005, SMOKE_NOTE, ha="right", va="bottom", fontsize=7, color="#b00020", alpha=0.9)
        write_with(self.run_dir / "figures" / f"{name}.png",
                   lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))

    def save_json(self, data: dict[str, Any], name: str) -> None:
        """Write ``data`` as ``<name>.json`` in the run folder."""
        write_text(self.run_dir / f"{name}.json", json.dumps(data, indent=2, default=str) + "\n")


def readable(table: pd.DataFrame, columns: list[str] | None = None, decimals: int = SHOW_DECIMALS) -> pd.DataFrame:
    """``table`` as a reader wants it: dict columns unpacked into ``column.key`` columns, only
    ``columns`` (those present, in that order) when given, floats rounded to ``decimals``, paths
    shown relative to the repository, and a fresh 0..n-1 index."""
    flat = table.reset_index(drop=True)
    for col in [c for c in flat.columns if flat[c].map(lambda v: isinstance(v, dict)).any()]:
        unpacked = pd.json_normalize(flat[col].map(lambda v: v if isinstance(v, dict) else {}).tolist())
        unpacked.columns = [f"{col}.{c}" for c in unpacked.columns]
        at = list(flat.columns).index(col)
        flat = pd.concat([flat.iloc[:, :at], unpacked, flat.iloc[:, at + 1:]], axis=1)
    if columns is not None:  # a dict column named in ``columns`` keeps all its unpacked parts
        flat = flat[[c for name in columns for c in flat.columns if c == name or c.startswith(f"{name}.")]]
    for col in flat.columns:
        if flat[col].map(lambda v: isinstance(v, Path)).any():
            flat[col] = flat[col].map(lambda v: config.display_path(v) if isinstance(v, Path) else v)
        elif flat[col].dtype.kind == "f" and _whole(flat[col]):  # counts that a NaN or a merge made float
            flat[col] = flat[col].astype("Int64")
    return flat.round(decimals)


def _whole(values: pd.Series) -> bool:
    present = values.dropna()
    return len(present) > 0 and bool(((present % 1) == 0).all()) and bool((present.abs() < 2**53).all())


def show_table(table: pd.DataFrame, columns: list[str] | None = None, rows: int = SHOW_ROWS,
               where: str | None = None) -> None:
    """Display ``table`` made :func:`readable`, without its index, cut to ``rows`` rows with a
    note saying so (and where the whole table is, ``where``)."""
    shown = readable(table, columns)
    notes = []
    if len(shown) > rows:
        notes.append(f"showing {rows} of {len(shown)} rows")
    if columns is not None and len(shown.columns) < len(table.columns):
        notes.append(f"{len(shown.columns)} of {len(table.columns)} columns")
    if notes and where:
        notes.append(f"all in {where}")
    _display(_Table(shown.head(rows), "; ".join(notes)))


class _Table:
    """A table as notebooks show it: HTML without the index (with its note as caption), and the
    same as plain text for text viewers, never an object's address."""

    def __init__(self, table: pd.DataFrame, note: str = "") -> None:
        self.table, self.note = table, note

    def _repr_html_(self) -> str:
        styled = self.table.style.hide(axis="index").format(precision=SHOW_DECIMALS, na_rep="")
        return (styled.set_caption(self.note) if self.note else styled).to_html()

    def __repr__(self) -> str:
        text = self.table.to_string(index=False, na_rep="")
        return f"{text}\n({self.note})" if self.note else text


def _display(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:  # plain Python: printing is the best we can do
        print(obj)
    else:
        display(obj)


def check_supply(session: Session) -> dict[str, int]:
    """Before anything is hashed: stop with :class:`SupplyError` when the sources, after the
    recipe's filters (de-duplication can only remove more), hold fewer images of a class than
    the profile's ``per_class`` under ``balance="strict"``.  Returns the counts per class."""
    from data_prep.recipe import filter_reasons
    from data_prep.schema import CLASSES
    from data_prep.table import load_table

    params = session.curation_params()
    table, _ = load_table(session.data_dir, hash_images=False)
    kept = table[[reason == "" for reason, _ in filter_reasons(table, params)]]
    counts = {c: int((kept["label"] == c).sum()) for c in CLASSES}
    if params.balance == "strict" and min(counts.values()) < params.per_class:
        shown = ", ".join(f"{c} {n}" for c, n in counts.items())
        raise SupplyError(
            f"profile {session.profile!r} needs {params.per_class} images per class, but the sources in "
            f"{config.display_path(session.data_dir)} hold at most {shown} after the recipe's filters. Fix: use "
            f"profile = \"teach\", or set per_class = {min(counts.values())} or balance = \"down\" in the parameters "
            "cell, or add the missing sources (README: fetching the sources)")
    return counts


def _one_line_errors() -> None:
    """In IPython, show a :class:`WorkbookError` (bad input, a missing step) as its one line, not a
    traceback: the message names the problem and the fix.  Other errors keep their traceback."""
    try:
        shell = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        return

    def handler(self, etype, value, tb, tb_offset=None):
        # IPython drops what a custom handler returns, so the line is shown here: in a kernel
        # ``_showtraceback`` sends it as the cell's error output (JupyterLab, the executed notebook,
        # papermill's error), in a terminal it prints it.
        stb = [f"\033[0;31m{etype.__name__}\033[0m: {one_line(value)}"]
        self._showtraceback(etype, one_line(value), stb)
        return stb

    shell.set_custom_exc((WorkbookError,), handler)


def start(profile: str, data_dir: str | None = None, run_dir: str | None = None, need_data: bool = True,
          settings_file: str | None = None, curates: bool = False, **overrides: Any) -> Session:
    """Begin a notebook: resolve ``profile`` (or the run's ``settings_file``, written by the
    runner) with the notebook's non-``None`` parameters, check the data folder (unless
    ``need_data`` is false), seed everything, pick the device, print it all.

    With ``curates`` (notebook 01) it first checks that the sources can supply the profile's
    set (:func:`check_supply`).  From here on, a :class:`WorkbookError` shows as one line.

    Raises :class:`data_prep.datadir.DataNotFoundError`, :class:`nbhelpers.settings.config.ProfileError`
    or :class:`SupplyError` with a message saying which setting to fix.
    """
    _one_line_errors()
    settings = config.resolve(profile, data_dir_=data_dir, run_dir=run_dir, need_data=need_data,
                              settings_file=settings_file, **overrides)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    device = pick_device(settings.device)
    values = settings.as_dict()
    values.update(data_dir=config.display_path(settings.data_dir), run_dir=config.display_path(settings.run_dir))
    used = [k for k in values if k in (*ALWAYS_SHOWN, *overrides, *(CURATION_SETTINGS if curates else ()))]
    rows = [(k, _setting_value(values[k])) for k in used]
    others = [k for k in values if k not in used and k != "description"]
    session = Session(settings, device)
    if curates and need_data:
        check_supply(session)
    if session.wiring_only:
        _banner(f"**{SMOKE_NOTE}.** Run the `teach` profile (a laptop, about 10 minutes) or `full` (the paper "
                "protocol, a GPU) for results worth reading.")
    print(f"profile {profile!r}: {settings.values.get('description', '')}")
    show_table(pd.DataFrame(rows, columns=["setting", "value"]), rows=len(rows))
    if others:
        print(f"the profile's other settings, used by other notebooks: {', '.join(others)} "
              f"({config.display_path(settings.run_dir / 'settings.json')} when the runner ran it)")
    return session


#: Settings every notebook's table shows; the rest it shows only when the notebook takes them.
ALWAYS_SHOWN = ("profile", "data_dir", "run_dir", "seed", "device")
#: The settings the curating notebook reads.
CURATION_SETTINGS = ("per_class", "balance", "views", "allow_ap", "min_age", "split")


def _setting_value(value: Any) -> Any:
    """A setting as its table shows it: whole floats as integers (``min_age 18``), lists as text."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _display_markdown(text: str) -> None:
    try:
        from IPython.display import Markdown
    except ImportError:
        print(text)
    else:
        _display(Markdown(text))


def _banner(markdown: str) -> None:
    _display_markdown(f"> ⚠️ {markdown}")
