"""Download code paths that need no internet: local HTTP server, offline errors, missing credentials."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest

from data_prep import download as dl
from data_prep.pins import GitSnapshot
from data_prep.download import DownloadError, download_github, download_rsna, fetch
from nbhelpers.tools.cli import main


@pytest.fixture()
def server(tmp_path: Path):
    """Serve ``tmp_path/www`` over HTTP on localhost; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_fetch_downloads_and_verifies(server, tmp_path: Path) -> None:
    base, root = server
    payload = bytes(range(256)) * 4000
    (root / "blob.bin").write_bytes(payload)
    dest = fetch(f"{base}/blob.bin", tmp_path / "out" / "blob.bin", sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert not (tmp_path / "out" / "blob.bin.part").exists()


def test_fetch_restarts_when_server_ignores_range(server, tmp_path: Path) -> None:
    base, root = server
    payload = b"x-ray" * 50_000
    (root / "blob.bin").write_bytes(payload)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"stale partial")  # this server answers 200, not 206
    assert fetch(f"{base}/blob.bin", dest).read_bytes() == payload


def test_fetch_rejects_wrong_hash(server, tmp_path: Path) -> None:
    base, root = server
    (root / "blob.bin").write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch(f"{base}/blob.bin", tmp_path / "blob.bin", sha256="0" * 64)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_offline_fails_fast_with_clear_message(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DownloadError, match="could not download .*Check the network"):
        fetch(f"http://127.0.0.1:{_closed_port()}/x.tar.gz", tmp_path / "x.tar.gz", timeout=5)
    assert time.monotonic() - start < 5


def test_http_error_names_url(server, tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{base}/missing.tar.gz", tmp_path / "missing.tar.gz")


def _github_archive(root: Path, top: str, metadata: bytes) -> None:
    """A tarball laid out like GitHub's: everything under one ``<repo>-<commit>/`` folder."""
    with tarfile.open(root / "archive.tar.gz", "w:gz") as tar:
        for name, data in ((f"{top}/metadata.csv", metadata), (f"{top}/images/a.png", b"png")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_github_snapshot_is_extracted_and_verified(server, tmp_path: Path, monkeypatch) -> None:
    base, root = server
    metadata = b"patientid,finding\n1,COVID-19\n"
    _github_archive(root, "Figure1-COVID-chestxray-dataset-95bb569e", metadata)
    snap = GitSnapshot("agchung/Figure1-COVID-chestxray-dataset", "95bb569e", "metadata.csv",
                       hashlib.sha256(metadata).hexdigest())
    monkeypatch.setitem(dl.PINNED, "figure1", snap)
    folder = download_github("figure1", tmp_path / "data", url_template=f"{base}/archive.tar.gz")
    assert folder == tmp_path / "data" / "Figure1-COVID-chestxray-dataset"
    assert (folder / "metadata.csv").read_bytes() == metadata and (folder / "images" / "a.png").is_file()
    # A different version upstream is refused rather than silently used.
    monkeypatch.setitem(dl.PINNED, "figure1", GitSnapshot(snap.repo, snap.commit, "metadata.csv", "f" * 64))
    with pytest.raises(DownloadError, match="metadata.csv has SHA-256"):
        download_github("figure1", tmp_path / "other", url_template=f"{base}/archive.tar.gz")


def test_rsna_without_kaggle_client_or_credentials(tmp_path: Path, monkeypatch) -> None:
    real_find_spec = dl.importlib.util.find_spec
    monkeypatch.setattr(dl.importlib.util, "find_spec", lambda name: None if name == "kaggle" else real_find_spec(name))
    with pytest.raises(DownloadError, match="pip install kaggle"):
        download_rsna(tmp_path)
    monkeypatch.setattr(dl.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    with pytest.raises(DownloadError, match="kaggle.json"):
        download_rsna(tmp_path)


def test_command_line_reports_failure(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(dl, "GITHUB_ARCHIVE", f"http://127.0.0.1:{_closed_port()}/{{repo}}/{{commit}}.tar.gz")
    monkeypatch.setattr(dl.download_github, "__defaults__", (dl.GITHUB_ARCHIVE,))
    assert main(["download", "--to", str(tmp_path), "--sources", "actualmed"]) == 1
    assert "could not download" in capsys.readouterr().err
