"""The data-directory setting: where the upstream sources live."""

from __future__ import annotations

import os
from pathlib import Path
from data_prep.errors import WorkbookError

#: The environment variable that says where the upstream sources live.
DATA_ENV = "CXR_DATA_DIR"


class DataNotFoundError(WorkbookError, FileNotFoundError):
    """The source-data folder is not set or does not exist."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the upstream sources, checked to exist.

    ``explicit`` wins; otherwise ``$CXR_DATA_DIR`` is used.  Raises :class:`DataNotFoundError`
    naming the setting and how to fix it when neither is set or the folder is missing.
    """
    raw = explicit if explicit is not None else os.environ.get(DATA_ENV)
    if not raw:
        raise DataNotFoundError(
            f"No source-data folder given: set the environment variable {DATA_ENV} "
            f"(e.g. `export {DATA_ENV}=/path/to/cxr-sources`), or pass --data-dir to the command "
            "(data_dir=... to a notebook). "
            "The folder holds the upstream datasets in their own layouts "
            "(covid-chestxray-dataset/, Figure1-COVID-chestxray-dataset/, ...); "
            "`workbook download` fetches them."
        )
    path = Path(raw).expanduser().resolve()
    origin = "data_dir parameter" if explicit is not None else f"${DATA_ENV}"
    if path.is_file():
        raise DataNotFoundError(
            f"Source-data folder {path} (from the {origin}) is a file, not a folder. "
            f"Point {DATA_ENV} at the folder that holds covid-chestxray-dataset/, "
            "Figure1-COVID-chestxray-dataset/, ... (the parent of each source folder)."
        )
    if not path.is_dir():
        raise DataNotFoundError(
            f"Source-data folder {path} (from the {origin}) does not exist. "
            f"Point {DATA_ENV} at the folder holding the upstream sources, "
            "or fetch them with `workbook download`."
        )
    return path
