"""The command-line options every command shares, defined once: where the sources are and where
the results go.  ``data_prep``'s commands use them, and so does every ``workbook`` subcommand.

``--data-dir`` defaults to ``$CXR_DATA_DIR`` (resolved by :func:`data_prep.datadir.data_dir` when
the command runs, so the error names the setting); ``--out`` is always a folder, inside which a
command writes files of fixed names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.datadir import DATA_ENV


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """``--data-dir FOLDER``: the folder of the upstream sources (default: ``$CXR_DATA_DIR``)."""
    parser.add_argument("--data-dir", type=Path, default=None, metavar="FOLDER",
                        help=f"folder of the upstream sources (default: ${DATA_ENV})")


def add_out(parser: argparse.ArgumentParser, what: str, default: Path | str | None = None,
            required: bool = False, default_text: str | None = None) -> None:
    """``--out FOLDER``: the folder a command writes ``what`` into.  ``default`` is used when the
    option is not given; ``default_text`` describes a default the command works out itself
    (``results/runs/<profile>``); with neither, and not ``required``, the command only prints."""
    shown = default_text or (str(default) if default is not None else None)
    suffix = f" (default: {shown})" if shown else "" if required else " (default: print only)"
    parser.add_argument("--out", type=Path, default=None if default is None else Path(default), required=required,
                        metavar="FOLDER", help=f"folder for {what}{suffix}")
