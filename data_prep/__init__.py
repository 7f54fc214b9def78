"""Curation of the balanced COVID-19 / pneumonia / normal chest X-ray set from public sources."""

from data_prep.curate import CurationResult, build, curate
from data_prep.recipe import CurationParams
from data_prep.schema import CLASSES, MANIFEST_COLUMNS, SPLITS, TABLE_COLUMNS

__all__ = [
    "CLASSES", "MANIFEST_COLUMNS", "SPLITS", "TABLE_COLUMNS",
    "CurationParams", "CurationResult", "build", "curate",
]
