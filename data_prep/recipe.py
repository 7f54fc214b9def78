"""The curation recipe: every choice (:class:`CurationParams`), the seed paper's defaults, and the row filters.

The seed paper (section 4.1) takes every PA COVID-19 X-ray of ieee8023, "all the data" of Figure1
and Actualmed (that those all count as COVID-19 is our reading: the paper does not say how it
labelled them), and random RSNA pneumonia and normal films: 475 per class.  Its choices are the
defaults where they are clear.  :func:`filter_reasons` names the first filter a row fails
(X-ray only, frontal views only, a finding that maps to a class, the classes taken from each
source, adults only), and :func:`paper_labels` gives the class the paper's literal recipe
would have given each row, to count its mislabels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath

import pandas as pd

from data_prep.copies import HASH_COPY
from data_prep.errors import WorkbookError
from data_prep.schema import CLASSES
from data_prep.split import DEFAULT_RATIOS

#: Frontal chest X-ray views as the sources spell them (compared case-insensitively).
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine", "AP erect", "AP semi erect")
AP_VIEWS: tuple[str, ...] = tuple(v for v in FRONTAL_VIEWS if v != "PA")
#: Views per source in the paper: PA only for ieee8023; "all data" (any frontal view) elsewhere.
PAPER_VIEWS: dict[str, tuple[str, ...]] = {"ieee8023": ("PA",)}
#: Which classes the paper takes from each source: only COVID-19 from ieee8023, pneumonia and
#: normal from RSNA (and its parent archive NIH); Figure1 and Actualmed gave "all data", which we
#: keep but label by their findings.
PAPER_SOURCE_CLASSES: dict[str, tuple[str, ...]] = {
    "ieee8023": ("covid",),
    "figure1": CLASSES,
    "actualmed": CLASSES,
    "rsna": ("pneumonia", "normal"),
    "nih": ("pneumonia", "normal"),
}


def every_class_from(sources: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The paper's ``source_classes``, except that ``sources`` supply every class they hold (e.g.
    ieee8023's pneumonias and 'No Finding' films, for tests within one source)."""
    return {**PAPER_SOURCE_CLASSES, **{source: CLASSES for source in sources}}


PAPER_PER_CLASS = 475
#: The youngest patient age kept where the age is known (the seed papers study adults).
PAPER_MIN_AGE = 18
PAPER_SPLIT_SIZES = {"train": 993, "val": 144, "test": 288}
#: Near-duplicate threshold in bits of the 256-bit perceptual hash.  On the mirror, re-saved and
#: re-encoded copies differ by at most 22 bits; distinct films of different patients by 54+.
DEFAULT_PHASH_DISTANCE = HASH_COPY
BALANCE_MODES = ("strict", "down")


class CurationSettingError(WorkbookError, ValueError):
    """A curation choice out of range: an unknown balance mode or class, fewer than one image per class."""


@dataclass
class CurationParams:
    """Every curation choice; the defaults are the seed paper's where it is clear.

    ``views`` maps a source to the views kept for it; sources not named keep any frontal view
    (and a blank view when ``keep_unknown_view``).  A plain list (as in the run profiles) is the
    view list of ieee8023, the only source the paper restricts.  ``allow_ap`` adds the AP views
    to every restricted source.  ``source_classes`` says which classes each source may supply.
    ``phash_distance`` is in bits of a 256-bit perceptual hash.  ``balance="strict"`` stops when a
    class is short of ``per_class``; ``"down"`` balances every class to the smallest one.
    ``image_folders`` are the user's own folders of images, one subfolder per class
    (:mod:`data_prep.folders`), curated with the sources; ``folder_classes`` maps subfolder names
    that no alias covers to a class (``{"Lung_Opacity": "pneumonia"}``).
    """

    per_class: int = PAPER_PER_CLASS
    views: dict[str, tuple[str, ...]] | Sequence[str] = field(default_factory=lambda: dict(PAPER_VIEWS))
    allow_ap: bool = False
    keep_unknown_view: bool = True
    min_age: float | None = PAPER_MIN_AGE
    xray_only: bool = True
    source_classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(PAPER_SOURCE_CLASSES))
    check_images: bool = True
    dedup: bool = True
    keypoints: bool = True
    phash_distance: int = DEFAULT_PHASH_DISTANCE
    balance: str = "strict"
    seed: int = 0
    split: tuple[float, float, float] = DEFAULT_RATIOS
    image_folders: Sequence[str] = ()
    folder_classes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.image_folders, (str, PurePath)):
            self.image_folders = (self.image_folders,)
        self.image_folders = tuple(str(Path(f).expanduser()) for f in self.image_folders)
        self.folder_classes = {str(k): str(v) for k, v in dict(self.folder_classes).items()}
        bad_map = {k: v for k, v in self.folder_classes.items() if v not in CLASSES or not k.strip()}
        if bad_map:
            raise CurationSettingError(f"folder_classes {bad_map}: each entry maps a subfolder name to one of {CLASSES}, "
                                       "e.g. --map-folder Lung_Opacity=pneumonia")
        if not isinstance(self.views, dict):
            self.views = {source: tuple(self.views) for source in PAPER_VIEWS}
        self.views = {s: tuple(v) for s, v in sorted(self.views.items())}
        self.source_classes = {s: tuple(c) for s, c in sorted(self.source_classes.items())}
        self.split = tuple(float(x) for x in self.split)  # type: ignore[assignment]
        if self.balance not in BALANCE_MODES:
            raise CurationSettingError(f"balance={self.balance!r}; expected one of {BALANCE_MODES}")
        if self.per_class < 1:
            raise CurationSettingError(f"per_class={self.per_class} must be at least 1")
        for source, classes in self.source_classes.items():
            bad = set(classes) - set(CLASSES)
            if bad:
                raise CurationSettingError(f"source_classes[{source!r}] has unknown class(es) {sorted(bad)}; use {CLASSES}")

    def allowed_views(self, source: str) -> tuple[str, ...] | None:
        """The views kept for ``source`` (None: any frontal view), with AP added when ``allow_ap``."""
        views = self.views.get(source)
        if views is None:
            return None
        return tuple(dict.fromkeys(views + AP_VIEWS)) if self.allow_ap else views

    def as_dict(self) -> dict[str, object]:
        """JSON-able form (tuples become lists) for the summary."""
        return json.loads(json.dumps(asdict(self)))


def _view_problem(source: str, view: str, params: CurationParams) -> str:
    """Why ``view`` is not kept for ``source`` ("" when it is kept)."""
    allowed = params.allowed_views(source)
    key = view.strip().lower()
    if not key:
        if allowed is None and params.keep_unknown_view:
            return ""
        return f"view is blank upstream ({source} keeps {allowed or 'known views only'})"
    if key not in {v.lower() for v in FRONTAL_VIEWS}:
        return f"view {view!r} is not frontal"
    if allowed is not None and key not in {v.lower() for v in allowed}:
        return f"view {view!r} not in {source} views {list(allowed)} (allow_ap={params.allow_ap})"
    return ""


def filter_reasons(table: pd.DataFrame, params: CurationParams) -> list[tuple[str, str]]:
    """The first filter each row fails, as (reason, detail), or ("", "") when it passes them all."""
    out = []
    for row in table.itertuples(index=False):
        if params.xray_only and row.modality.strip().lower() != "x-ray":
            out.append(("not_xray", f"modality {row.modality!r}"))
        elif problem := _view_problem(row.source, row.view, params):
            out.append(("view", problem))
        elif row.label == "":
            out.append(("unmapped_finding", f"finding {row.finding!r} maps to no class"))
        elif row.label not in params.source_classes.get(row.source, CLASSES):
            out.append(("class_not_taken", f"{row.label} is not taken from {row.source}"))
        elif params.min_age is not None and row.age < params.min_age:  # NaN (unknown) compares False
            out.append(("age", f"age {row.age:g} < min_age {params.min_age:g}"))
        else:
            out.append(("", ""))
    return out


def paper_labels(table: pd.DataFrame) -> pd.Series:
    """The class the seed paper's literal recipe gives each row, or "" when it does not take the row.

    ieee8023: COVID-19 PA X-rays -> covid; Figure1 and Actualmed: every row -> covid ("all data");
    RSNA/NIH: pneumonia and normal as labelled; the user's image folders: none (the paper has none).
    Compare with ``table.label`` to count mislabels.
    """
    def one(row: pd.Series) -> str:
        if row["source"] not in PAPER_SOURCE_CLASSES:
            return ""
        if row["source"] == "ieee8023":
            pa_xray = row["view"] == "PA" and row["modality"] == "X-ray"
            return "covid" if row["label"] == "covid" and pa_xray else ""
        if row["source"] in ("figure1", "actualmed"):
            return "covid"
        return row["label"]

    return table.apply(one, axis=1).rename("paper_label") if len(table) else pd.Series(dtype=str, name="paper_label")

