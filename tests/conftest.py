"""Shared fixtures: the real source mirror, found the way users point the workbook at data."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from data_prep.datadir import DATA_ENV
from nbhelpers.settings.config import REPO_ROOT

# Developers and CI keep the real-source mirror beside the project checkout.
MIRROR = REPO_ROOT.parent / "shared" / "data" / "cxr-sources"


def _find_data_dir() -> Path | None:
    raw = os.environ.get(DATA_ENV)
    path = Path(raw) if raw else MIRROR
    return path if path.is_dir() else None


@pytest.fixture(scope="session", autouse=True)
def fingerprint_store(tmp_path_factory):
    """The session's fingerprint store, in its temporary folder: tests never write the user's cache."""
    from data_prep.fingerprint import STORE_ENV

    patch = pytest.MonkeyPatch()
    patch.setenv(STORE_ENV, str(tmp_path_factory.mktemp("fingerprints") / "fingerprints.sqlite"))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of real upstream sources; tests that need it fail in CI and skip elsewhere."""
    path = _find_data_dir()
    if path is None:
        message = f"real source mirror not found: set {DATA_ENV} or place it at {MIRROR}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Train with one torch thread: on a shared 2-core machine two threads that wait on each other
    run up to 100x slower when another process holds a core.  Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def real_manifest(data_dir: Path, per_class: int = 4, splits=("train", "train", "train", "val")) -> pd.DataFrame:
    """``per_class`` real mirror images per class (ieee8023 COVID-19, NIH normal and pneumonia) as
    a training manifest, the classes in that order, each class's images given ``splits`` in turn."""
    nih = pd.read_csv(data_dir / "nih-cxr14-subset" / "Data_Entry_2017_v2020.csv")
    covid = sorted((data_dir / "covid-chestxray-dataset" / "images").glob("*.jp*g"))[:per_class]
    rows = [("covid", p.relative_to(data_dir).as_posix()) for p in covid]
    for label, finding in (("normal", "No Finding"), ("pneumonia", "Pneumonia")):
        names = nih.loc[nih["Finding Labels"] == finding, "Image Index"].head(per_class)
        rows += [(label, f"nih-cxr14-subset/images/{n}") for n in names]
    return pd.DataFrame(rows, columns=["label", "path"]).assign(
        image_id=lambda d: d["path"], split=list(splits)[:per_class] * 3)
