"""The common vocabulary shared by curation, preprocessing, training and evaluation."""

from __future__ import annotations

# Class order is fixed everywhere (label index = position): models, metrics and plots rely on it.
CLASSES: tuple[str, ...] = ("covid", "pneumonia", "normal")

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Columns of the common source table (one row per image) and of the curated manifest
# (the same columns plus ``split``).  ``path`` is relative to the data directory, POSIX style,
# so a manifest stays valid when the data folder moves.
TABLE_COLUMNS: tuple[str, ...] = (
    "image_id",  # unique and stable: "<source>:<path>" (an image folder: "<source>:<path in the folder>")
    "source",  # adapter name: ieee8023, figure1, actualmed, nih, rsna; folder-<name> for an image folder
    "path",  # image file relative to the data directory (absolute for an image folder outside it)
    "patient_id",  # namespaced "<source>:<upstream id>" so ids never collide across sources
    "label",  # one of CLASSES, or "" when the upstream finding maps to none of them
    "finding",  # the upstream finding text, unchanged
    "view",  # upstream view (PA, AP, AP Supine, L, ...); "" when blank upstream
    "modality",  # X-ray, CT, ...
    "age",  # years as float; NaN when unknown
    "sex",  # M, F or ""
    "license",
    "sha256",  # of the image file bytes; "" until hashed
)
MANIFEST_COLUMNS: tuple[str, ...] = TABLE_COLUMNS + ("split",)
#: Prefix of the source name of each of the user's own image folders (``folder-kaggle_radiography``);
#: a hyphen, not a colon, since ids are read as ``<source>:<rest>``.
FOLDER_PREFIX = "folder-"


def label_index(label: str) -> int:
    """Return the integer class index of ``label``; raise ValueError naming the valid labels."""
    try:
        return CLASSES.index(label)
    except ValueError:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}") from None
