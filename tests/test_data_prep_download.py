"""Download building blocks that need no internet: fetch against a plain local server, offline
errors, mirror URLs, Kaggle credentials (the whole command: tests/test_download_server.py)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest

from data_prep.credentials import CredentialsError, kaggle_credentials
from data_prep.download import DownloadError, download_github
from data_prep.fetch import MIRROR_ENV, fetch, mirrored
from data_prep.pins import GitSnapshot
from data_prep.sources import SOURCES
from nbhelpers.tools.cli import main


@pytest.fixture()
def server(tmp_path: Path):
    """Serve ``tmp_path/www`` over HTTP on localhost; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
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
    with pytest.raises(DownloadError, match="could not download .*check the network"):
        fetch(f"http://127.0.0.1:{_closed_port()}/x.tar.gz", tmp_path / "x.tar.gz", timeout=5)
    assert time.monotonic() - start < 5


def test_http_error_names_url(server, tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{base}/missing.tar.gz", tmp_path / "missing.tar.gz")


def _github_archive(root: Path, path: str, top: str, metadata: bytes) -> None:
    """A tarball laid out like GitHub's (everything under one ``<repo>-<commit>/`` folder) at ``root/path``."""
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / path, "w:gz") as tar:
        for name, data in ((f"{top}/metadata.csv", metadata), (f"{top}/images/a.png", b"png")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_github_snapshot_is_extracted_and_verified(server, tmp_path: Path, monkeypatch) -> None:
    base, root = server
    metadata = b"patientid,finding\n1,COVID-19\n"
    snap = GitSnapshot("agchung/Figure1-COVID-chestxray-dataset", "95bb569e", "metadata.csv",
                       hashlib.sha256(metadata).hexdigest())
    _github_archive(root, f"github.com/{snap.repo}/archive/{snap.commit}.tar.gz",
                    "Figure1-COVID-chestxray-dataset-95bb569e", metadata)
    monkeypatch.setitem(SOURCES, "figure1", dataclasses.replace(SOURCES["figure1"], pin=snap))
    folder = download_github("figure1", tmp_path / "data", mirror=base)
    assert folder == tmp_path / "data" / "Figure1-COVID-chestxray-dataset"
    assert (folder / "metadata.csv").read_bytes() == metadata and (folder / "images" / "a.png").is_file()
    # A different version upstream is refused rather than silently used.
    monkeypatch.setitem(SOURCES, "figure1", dataclasses.replace(
        SOURCES["figure1"], pin=GitSnapshot(snap.repo, snap.commit, "metadata.csv", "f" * 64)))
    with pytest.raises(DownloadError, match="metadata.csv has SHA-256"):
        download_github("figure1", tmp_path / "other", mirror=base)
    assert not (tmp_path / "other" / "Figure1-COVID-chestxray-dataset").exists()


def test_mirrored_urls_keep_the_upstream_host_and_path(monkeypatch) -> None:
    url = "https://github.com/a/b/archive/c.tar.gz"
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert mirrored(url) == url
    assert mirrored(url, "http://m:8/base/") == "http://m:8/base/github.com/a/b/archive/c.tar.gz"
    monkeypatch.setenv(MIRROR_ENV, "file-server")
    assert mirrored("https://h/x?y=1") == "file-server/h/x?y=1" and mirrored(url, "") == url


def test_kaggle_credentials_are_found_where_the_client_looks(tmp_path: Path, monkeypatch) -> None:
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CredentialsError, match=re.escape(str(tmp_path / ".kaggle" / "kaggle.json"))):
        kaggle_credentials()
    (tmp_path / ".config" / "kaggle").mkdir(parents=True)
    (tmp_path / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "u1", "key": "k1"}')
    assert kaggle_credentials().username == "u1"  # the XDG place
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "u2", "key": "secret-2"}')
    found = kaggle_credentials()
    assert (found.username, found.key) == ("u2", "secret-2") and "secret-2" not in repr(found)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "kaggle.json").write_text("{not json: secret-3}")
    with pytest.raises(CredentialsError, match="cannot read the Kaggle token") as caught:
        kaggle_credentials()
    assert "secret-3" not in str(caught.value)
    monkeypatch.setenv("KAGGLE_USERNAME", "u4")
    monkeypatch.setenv("KAGGLE_KEY", "k4")
    assert kaggle_credentials().origin == "$KAGGLE_USERNAME/$KAGGLE_KEY"  # the environment comes first


def test_command_line_reports_failure(tmp_path: Path, capsys) -> None:
    mirror = f"http://127.0.0.1:{_closed_port()}"
    assert main(["download", "--to", str(tmp_path), "--sources", "actualmed", "--mirror", mirror]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: actualmed: could not download") and err.count("\n") == 1
