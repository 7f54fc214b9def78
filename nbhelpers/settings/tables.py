"""One writer for the committed result tables: CSV beside Markdown, under a header saying how
the table was made.

Every table in ``results/tables`` (ablation grid, CAM diagnostics, shortcut audit, per-source
audit, model complexity) is written by :func:`write_table`: ``<name>.csv`` and ``<name>.md``
are moved into place together (:func:`data_prep.atomic.replace_together`), so a killed command
leaves the previous pair, never a CSV from one run beside the Markdown of another.  The
Markdown file starts with :func:`provenance_header`: the command exactly as typed
(``workbook grid --manifest ...``), the data (the manifest's path, the first 12 hex digits of
its SHA-256 and its images per split), the seeds, the device and the date, so a number in a
table can be traced to the run that made it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from data_prep.atomic import replace_together

#: Hex digits of the manifest's SHA-256 quoted in a header (enough to tell two manifests apart).
HASH_DIGITS = 12


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """Render ``table`` as a GitHub Markdown table, floats to ``digits`` significant digits, NaN blank."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.{digits}g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def describe_manifest(manifest: Path | str) -> str:
    """``manifest M (SHA-256 0123456789ab; train 210, val 30, test 60 images)``: which curated
    set a table was made from.  The split counts are left out for a manifest without a ``split``
    column."""
    from data_prep.fingerprint import sha256_file

    path = Path(manifest)
    digest = sha256_file(path)[:HASH_DIGITS]
    table = pd.read_csv(path, keep_default_na=False)
    if "split" not in table.columns:
        return f"manifest {path} (SHA-256 {digest}; {len(table)} images)"
    counts = table["split"].value_counts()
    order = [s for s in ("train", "val", "test") if s in counts.index] + \
        sorted(s for s in counts.index if s not in ("train", "val", "test"))
    return f"manifest {path} (SHA-256 {digest}; {', '.join(f'{s} {counts[s]}' for s in order)} images)"


def provenance_header(command: str, manifest: Path | str | None = None, seeds: Sequence[int] | None = None,
                      device: str | None = None, notes: str | None = None) -> str:
    """The paragraph on top of a result table: ``Made by `<command>` on <date>``, then the data
    (:func:`describe_manifest`, when a manifest is given), the seeds and the device where the
    table depends on them, then ``notes`` (what the columns and the statistics mean)."""
    parts = [f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d}"]
    if manifest is not None:
        parts.append(f"data: {describe_manifest(manifest)}")
    if seeds is not None:
        parts.append(f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}")
    if device is not None:
        parts.append(f"device {device}")
    header = "; ".join(parts) + "."
    return f"{header} {notes}" if notes else header


def write_table(table: pd.DataFrame, out_dir: Path | str, name: str, header: str, digits: int = 3,
                float_format: str | None = None) -> tuple[Path, Path]:
    """Write ``table`` as ``out_dir/<name>.csv`` and ``out_dir/<name>.md`` (``header``, usually
    from :func:`provenance_header`, above the Markdown table, floats to ``digits`` significant
    digits; ``float_format`` for the CSV's floats, full precision by default), both moved into
    place together.  Returns the two paths.  Raises :class:`data_prep.atomic.WriteError` naming
    the file when the folder cannot be written."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    markdown = f"{header}\n\n{markdown_table(table, digits)}\n"

    def write_markdown(tmp: Path) -> None:
        tmp.write_text(markdown, encoding="utf-8")

    replace_together({csv_path: lambda tmp: table.to_csv(tmp, index=False, float_format=float_format),
                      md_path: write_markdown})
    return csv_path, md_path


def committed_table(name: str, folder: Path | str | None = None) -> pd.DataFrame | None:
    """A committed result table, ``<name>.csv`` in ``folder`` (default ``results/tables``), or
    None when it is absent (not made yet on this checkout)."""
    from nbhelpers.settings.config import RESULTS_DIR

    path = Path(folder or RESULTS_DIR / "tables") / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def committed_header(name: str, folder: Path | str | None = None) -> str | None:
    """The provenance header of a committed table (the first paragraph of ``<name>.md``: the
    command, data, seeds, device and date), or None when it is absent."""
    from nbhelpers.settings.config import RESULTS_DIR

    path = Path(folder or RESULTS_DIR / "tables") / f"{name}.md"
    return path.read_text().split("\n\n", 1)[0] if path.is_file() else None
