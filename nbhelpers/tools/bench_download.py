"""What ``workbook download --teach`` costs without the network: the same archives from a local server.

``workbook bench download --data-dir D [--out FOLDER]`` (the report goes to ``teach_download.txt``).

The teaching sources in ``--data-dir`` (ieee8023, Figure1, Actualmed and ``nih-cxr14-subset``, as
``--teach`` leaves them) are packed into the archives GitHub serves for their pinned commits (the
NIH films sorted into the vendoring repository's two class folders by NIH's labels), served by
Python's own HTTP server on 127.0.0.1, and fetched by :func:`data_prep.download.download` into a
temporary folder: archive bytes, seconds and MB/s per source, then the rerun (which must fetch
nothing).  What is left is the cost of checking and unpacking; a real transfer adds the network's
time for the same bytes (upstream files may be larger than a local copy's).
"""

from __future__ import annotations

import argparse
import csv
import functools
import http.server
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from data_prep.datadir import DataNotFoundError
from data_prep.datadir import data_dir as resolve_data_dir
from data_prep.download import GITHUB_ARCHIVE, NIH_METADATA, TEACH_SOURCES, downloads
from data_prep.options import add_data_dir, add_out
from data_prep.pins import SUBSETS
from data_prep.sources import SOURCES, pinned
from nbhelpers.tools.bench import emit, header

REPORT = "teach_download.txt"


def _pack(files: dict[str, Path], dest: Path) -> int:
    """Write a gzip'd tar of ``files`` (name in the archive -> file) to ``dest``; its size in bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz", dereference=True) as tar:
        for name, path in files.items():
            tar.add(path, arcname=name)
    return dest.stat().st_size


def _archive_files(name: str, data_dir: Path) -> tuple[str, str, dict[str, Path]]:
    """The repository, commit and archive members (``<repo>-<commit>/...``) of teaching source ``name``."""
    subset, pins = SUBSETS["nih"], pinned()
    folder = SOURCES[name].find(data_dir) if name in pins else data_dir / SOURCES["nih"].folders[1]
    if folder is None or not folder.is_dir():
        raise DataNotFoundError(f"{name}: not under {data_dir}; fetch the teaching sources first with "
                                "`workbook download --to FOLDER --teach`")
    if name in pins:
        repo, commit = pins[name].repo, pins[name].commit
        members = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    else:
        repo, commit = subset.repo, subset.commit
        with open(folder / NIH_METADATA, newline="") as rows:
            labels = {r["Image Index"]: r["Finding Labels"] for r in csv.DictReader(rows)}
        normal, pneumonia = subset.folders
        members = {f"{normal if labels[p.name] == 'No Finding' else pneumonia}/{p.name}": p
                   for p in sorted((folder / "images").iterdir())}
    top = f"{repo.split('/')[1]}-{commit}"
    return repo, commit, {f"{top}/{k}": v for k, v in members.items()}


def bench_download(data_dir: Path) -> list[str]:
    """Serve the teaching archives built from ``data_dir`` on 127.0.0.1, fetch them twice; the report lines."""
    with tempfile.TemporaryDirectory() as tmp:
        served, to = Path(tmp) / "served", Path(tmp) / "to"
        sizes = {}
        for name in TEACH_SOURCES:
            repo, commit, files = _archive_files(name, data_dir)
            url = GITHUB_ARCHIVE.format(repo=repo, commit=commit).removeprefix("https://")
            sizes[name] = _pack(files, served / url)
        handler = functools.partial(_QuietHandler, directory=str(served))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        mirror = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            lines = ["| source | archive MB | seconds | MB/s | rerun seconds |", "|---|---|---|---|---|"]
            for name in TEACH_SOURCES:
                started = time.perf_counter()
                downloads()[name](to, mirror)
                took = time.perf_counter() - started
                started = time.perf_counter()
                downloads()[name](to, mirror)
                again = time.perf_counter() - started
                lines.append(f"| {name} | {sizes[name] / 1e6:.1f} | {took:.1f} | {sizes[name] / 1e6 / took:.0f} | "
                             f"{again:.3f} |")
            total = sum(sizes.values()) / 1e6
        finally:
            server.shutdown()
            server.server_close()
    return [*lines, "", f"total: {total:.1f} MB in four archives"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook bench download``."""
    add_data_dir(parser)
    add_out(parser, f"the report, {REPORT}")


def run_command(args: argparse.Namespace) -> int:
    """``workbook bench download``: print the report (and write it with ``--out``); returns 0."""
    data_dir = resolve_data_dir(args.data_dir)
    notes = ["Archives built from the teaching sources in the data folder, served from 127.0.0.1 and fetched "
             "by `workbook download` (checked, unpacked, renamed into place); a real transfer adds the "
             "network's time for upstream's bytes.", ""]
    emit(header(args.command_line) + notes + bench_download(data_dir), args.out / REPORT if args.out else None)
    return 0
