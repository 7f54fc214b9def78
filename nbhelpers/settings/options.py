"""The command-line options of the ``workbook`` subcommands that train or run models, defined once.

``--device`` defaults to ``auto`` everywhere (CUDA, then Apple MPS, then the CPU:
:func:`nbhelpers.settings.device.pick_device`).  ``--set KEY=VALUE`` takes any number of items,
once or repeated (``--set epochs=6 batch_size=16`` and ``--set epochs=6 --set batch_size=16`` are
the same); the items are read by :mod:`nbhelpers.settings.keyvalue`, so a value has the type of
the setting it changes.  ``--data-dir`` and ``--out`` are :mod:`data_prep.options`' (the
curation commands share them).
"""

from __future__ import annotations

import argparse

from nbhelpers.settings.device import DEVICE_CHOICES

DEFAULT_DEVICE = "auto"


def add_device(parser: argparse.ArgumentParser, what: str = "the models") -> None:
    """``--device NAME``: where ``what`` run (default ``auto``)."""
    parser.add_argument("--device", default=DEFAULT_DEVICE, metavar="NAME",
                        help=f"device for {what}: {', '.join(DEVICE_CHOICES)} or cuda:N (default: {DEFAULT_DEVICE})")


def add_assignments(parser: argparse.ArgumentParser, flag: str, what: str, example: str) -> None:
    """A ``KEY=VALUE`` option named ``flag`` (``--set``, ``--preprocess``, ``--option``), once or
    repeated, each time with one or more items."""
    parser.add_argument(flag, action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"{what}, e.g. {flag} {example} (repeatable)")


def add_set(parser: argparse.ArgumentParser, what: str = "preset settings") -> None:
    """``--set KEY=VALUE ...``: overrides of ``what`` (typed by :mod:`nbhelpers.settings.keyvalue`)."""
    add_assignments(parser, "--set", f"override {what}", "epochs=3 pretrained=false")
