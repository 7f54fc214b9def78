"""`workbook download` against a real HTTP server on 127.0.0.1 that lays files out as the upstream
hosts do (github.com archives, NIH Box links, Kaggle's API and its storage redirect), built from
real mirror files: resumed transfers, verified archives, one-line failures, progress, whole
unpacks, idempotent reruns, and a Kaggle key that never shows."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import logging
import re
import socket
import tarfile
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data_prep import download as dl
from data_prep import fetch
from data_prep.credentials import kaggle_credentials
from data_prep.pins import PACKAGED, SUBSETS, GitSnapshot
from data_prep.sources import SOURCES, Source, pinned
from nbhelpers.tools.cli import main

GITHUB = ("ieee8023", "figure1", "actualmed")
PINNED = pinned()
FAKE_USER, FAKE_KEY = "cxr-tester", "f4k3-k4ggl3-k3y-0123456789abcdef"
STORAGE = "/storage.googleapis.com/kaggle-competitions/rsna.zip"


@dataclass
class Upstream:
    """What the server holds (path -> bytes), the faults it injects, and every request it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    auth: dict[str, str] = field(default_factory=dict)  # path -> the Authorization it requires
    cuts: dict[str, int] = field(default_factory=dict)  # path -> how many more answers stop halfway
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> how many more answers are damaged
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # path, Range, Authorization

    def hits(self, path: str) -> list[tuple[str, str | None, str | None]]:
        return [r for r in self.requests if r[0] == path]


def _handler(up: Upstream) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _status(self, code: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in {"Content-Length": "0", **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            path = urllib.parse.urlsplit(self.path).path
            ranged, auth = self.headers.get("Range"), self.headers.get("Authorization")
            up.requests.append((path, ranged, auth))
            if path in up.auth and auth != up.auth[path]:
                return self._status(401)
            if path in up.redirects:
                return self._status(302, {"Location": up.redirects[path]})
            body = up.files.get(path)
            if body is None:
                return self._status(404)
            if up.corrupt.get(path, 0) > 0:
                up.corrupt[path] -= 1
                middle = len(body) // 2
                body = body[:middle] + bytes(b ^ 0x5A for b in body[middle:middle + 64]) + body[middle + 64:]
            start = int(re.fullmatch(r"bytes=(\d+)-", ranged).group(1)) if ranged else 0
            if start >= len(body) > 0:
                return self._status(416, {"Content-Range": f"bytes */{len(body)}"})
            payload = body[start:]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(len(payload)))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if up.cuts.get(path, 0) > 0:  # half the body, then the connection drops
                up.cuts[path] -= 1
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture()
def upstream(monkeypatch):
    """A server on 127.0.0.1 that ``$CXR_DOWNLOAD_BASE`` points at; yields its :class:`Upstream`."""
    up = Upstream()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(up))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv(fetch.MIRROR_ENV, f"http://127.0.0.1:{httpd.server_address[1]}")
    yield up
    httpd.shutdown()
    httpd.server_close()


def _url_path(url: str) -> str:
    """Where the mirror serves upstream ``url``: /<host>/<path>."""
    parts = urllib.parse.urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _real_files(data_dir: Path, name: str, images: int = 3) -> dict[str, bytes]:
    """A pinned source's real metadata and its first ``images`` images, by path in the source."""
    folder = data_dir / SOURCES[name].folders[0]
    files = {PINNED[name].check_file: (folder / PINNED[name].check_file).read_bytes()}
    for path in sorted((folder / "images").iterdir())[:images]:
        files[f"images/{path.name}"] = path.read_bytes()
    return files


def _github_path(name: str) -> str:
    snap = PINNED[name]
    return _url_path(dl.GITHUB_ARCHIVE.format(repo=snap.repo, commit=snap.commit))


def _serve_github(up: Upstream, data_dir: Path, name: str, files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Serve source ``name``'s archive as GitHub lays it out (one ``<repo>-<commit>/`` top folder)."""
    files = files if files is not None else _real_files(data_dir, name)
    top = f"{PINNED[name].repo.split('/')[1]}-{PINNED[name].commit}"
    up.files[_github_path(name)] = _tar_gz({f"{top}/{k}": v for k, v in files.items()})
    return files


def _offline(monkeypatch) -> None:
    """Point the mirror at a port that refuses connections (bound, then closed at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(fetch.MIRROR_ENV, f"http://127.0.0.1:{port}")


def _without_torchxrayvision(monkeypatch) -> None:
    real_find_spec = dl.importlib.util.find_spec
    monkeypatch.setattr(dl.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchxrayvision" else real_find_spec(name, *a))


def _error_line(err: str) -> str:
    """The one ``error:`` line on stderr (asserting there is exactly one line)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _error_of(err: str) -> str:
    """The one ``error:`` line on stderr after progress bars and notes."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_github_sources_from_a_mirror_with_progress_then_nothing_on_a_rerun(upstream, data_dir, tmp_path, capsys):
    served = {name: _serve_github(upstream, data_dir, name) for name in GITHUB}
    assert main(["download", "--to", str(tmp_path), "--sources", *GITHUB]) == 0
    out, err = capsys.readouterr()
    for name, files in served.items():
        folder = tmp_path / SOURCES[name].folders[0]
        assert f"{name}: {folder}" in out
        assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
        assert f"{folder.name}-{PINNED[name].commit}.tar.gz" in err  # the progress bar names the file
    assert "100%" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dl.DOWNLOADS_DIR, *(SOURCES[n].folders[0] for n in GITHUB)])
    assert list((tmp_path / dl.DOWNLOADS_DIR).iterdir()) == []  # archives deleted once unpacked
    before = len(upstream.requests)
    assert main(["download", "--to", str(tmp_path), "--sources", *GITHUB]) == 0
    assert len(upstream.requests) == before  # the rerun asks the server nothing


def test_a_source_added_in_one_place_is_downloaded_and_read(upstream, data_dir, tmp_path, capsys, monkeypatch):
    """A throwaway source, one entry in SOURCES (its reader, folder, fetch kind and pin): the
    download command offers and fetches it, and the source table reads it."""
    from data_prep.sources import _read_csv
    from data_prep.table import load_table

    def read(folder: Path, log=None) -> list[dict[str, object]]:
        frame = _read_csv(folder / "listing.csv", ("file", "finding", "patient"), log)
        return [{"row": r.Index, "path": f"films/{r.file}", "patient_id": str(r.patient), "label": r.finding,
                 "finding": r.finding, "view": "PA", "modality": "X-ray", "age": float("nan"), "sex": "",
                 "license": "CC0"} for r in frame.itertuples()]

    films = sorted((data_dir / SOURCES["ieee8023"].folders[0] / "images").glob("*.jp*g"))[:2]
    listing = "file,finding,patient\n" + "".join(f"{p.name},covid,{k}\n" for k, p in enumerate(films))
    pin = GitSnapshot("someone/thrown-away", "0123abcd", "listing.csv", hashlib.sha256(listing.encode()).hexdigest())
    monkeypatch.setitem(SOURCES, "thrown", Source("thrown", ("thrown-away",), "CC0", "https://example.org", read,
                                                  "github", pin))
    files = {"listing.csv": listing.encode(), **{f"films/{p.name}": p.read_bytes() for p in films}}
    upstream.files[_url_path(dl.GITHUB_ARCHIVE.format(repo=pin.repo, commit=pin.commit))] = _tar_gz(
        {f"thrown-away-{pin.commit}/{k}": v for k, v in files.items()})
    assert main(["download", "--to", str(tmp_path), "--sources", "thrown"]) == 0
    assert f"thrown: {tmp_path / 'thrown-away'}" in capsys.readouterr().out
    table, report = load_table(tmp_path, sources=["thrown"])
    assert list(table["source"]) == ["thrown", "thrown"] and report.warnings == []
    assert set(table["image_id"]) == {f"thrown:thrown-away/films/{p.name}" for p in films}


def test_a_transfer_cut_halfway_resumes_from_the_partial_file(upstream, data_dir, tmp_path, capsys):
    files = _serve_github(upstream, data_dir, "ieee8023")
    path = _github_path("ieee8023")
    size = len(upstream.files[path])
    upstream.cuts[path] = 1
    assert main(["download", "--to", str(tmp_path), "--sources", "ieee8023"]) == 0
    assert [r[1] for r in upstream.hits(path)] == [None, f"bytes={size // 2}-"]
    assert "resuming" in capsys.readouterr().err
    assert (tmp_path / "covid-chestxray-dataset" / "metadata.csv").read_bytes() == files["metadata.csv"]


def test_a_run_that_gives_up_leaves_the_part_and_the_next_run_resumes_it(upstream, data_dir, tmp_path, capsys, monkeypatch):
    _serve_github(upstream, data_dir, "figure1")
    path = _github_path("figure1")
    size = len(upstream.files[path])
    upstream.cuts[path] = fetch.ATTEMPTS
    assert main(["download", "--to", str(tmp_path), "--sources", "figure1"]) == 2
    line = _error_of(capsys.readouterr().err)
    assert line.startswith("error: figure1: the transfer of ") and "rerun the command to resume" in line
    part = tmp_path / dl.DOWNLOADS_DIR / f"Figure1-COVID-chestxray-dataset-{PINNED['figure1'].commit}.tar.gz.part"
    assert 0 < part.stat().st_size < size
    assert not (tmp_path / "Figure1-COVID-chestxray-dataset").exists()
    held = part.stat().st_size
    assert main(["download", "--to", str(tmp_path), "--sources", "figure1"]) == 0
    assert upstream.hits(path)[-1][1] == f"bytes={held}-"
    assert (tmp_path / "Figure1-COVID-chestxray-dataset" / "metadata.csv").is_file() and not part.exists()


def test_a_corrupt_archive_is_refused_and_fetched_again_never_unpacked(upstream, data_dir, tmp_path, monkeypatch):
    files = _serve_github(upstream, data_dir, "actualmed")
    path = _github_path("actualmed")
    good = hashlib.sha256(upstream.files[path]).hexdigest()
    upstream.corrupt[path] = 1
    unpacked: list[str] = []
    real_unpack = dl.unpack_tar
    monkeypatch.setattr(dl, "unpack_tar", lambda archive, *a, **k: (
        unpacked.append(hashlib.sha256(archive.read_bytes()).hexdigest()), real_unpack(archive, *a, **k))[1])
    assert main(["download", "--to", str(tmp_path), "--sources", "actualmed"]) == 0
    assert len(upstream.hits(path)) == 2 and unpacked == [good]
    assert (tmp_path / "Actualmed-COVID-chestxray-dataset" / "metadata.csv").read_bytes() == files["metadata.csv"]


def test_an_archive_without_the_pinned_metadata_is_refused_in_one_line(upstream, data_dir, tmp_path, capsys):
    files = _real_files(data_dir, "figure1")
    files["metadata.csv"] = files["metadata.csv"].replace(b"COVID-19", b"COVID-20", 1)  # another version upstream
    _serve_github(upstream, data_dir, "figure1", files)
    assert main(["download", "--to", str(tmp_path), "--sources", "figure1"]) == 2
    line = _error_of(capsys.readouterr().err)
    assert line.startswith("error: figure1: ") and "metadata.csv has SHA-256" in line and "By hand: download https://github.com/" in line
    assert len(upstream.hits(_github_path("figure1"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == [dl.DOWNLOADS_DIR]  # nothing unpacked
    assert list((tmp_path / dl.DOWNLOADS_DIR).iterdir()) == []


@pytest.mark.parametrize("fault", ["404", "refused"])
def test_a_missing_file_or_a_refused_connection_is_one_line_naming_the_manual_way(upstream, tmp_path, capsys, monkeypatch, fault):
    if fault == "refused":
        _offline(monkeypatch)
    assert main(["download", "--to", str(tmp_path), "--sources", "ieee8023"]) == 2
    line = _error_line(capsys.readouterr().err)
    folder = tmp_path / "covid-chestxray-dataset"
    assert line.startswith("error: ieee8023: ")
    assert ("HTTP 404" if fault == "404" else "Connection refused") in line
    assert "By hand: download https://github.com/ieee8023/covid-chestxray-dataset/archive/" in line
    assert f"unpack it as {folder}" in line and f"or check the mirror {fetch.mirror_base()}" in line
    assert not folder.exists()


def test_an_interrupted_unpack_leaves_no_half_filled_folder(upstream, data_dir, tmp_path, capsys, monkeypatch):
    _serve_github(upstream, data_dir, "figure1")
    folder = tmp_path / "Figure1-COVID-chestxray-dataset"
    stale = tmp_path / ".Figure1-COVID-chestxray-dataset.unpacking"
    stale.mkdir()
    (stale / "left-by-a-killed-run.jpg").write_bytes(b"half")
    real_extract, calls = tarfile.TarFile.extract, []

    def extract_then_fill_the_disk(self, member, *args, **kwargs):
        calls.append(member)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_extract(self, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract_then_fill_the_disk)
    assert main(["download", "--to", str(tmp_path), "--sources", "figure1"]) == 2
    assert "cannot unpack" in _error_of(capsys.readouterr().err)
    assert not folder.exists() and not stale.exists()
    monkeypatch.setattr(tarfile.TarFile, "extract", real_extract)
    assert main(["download", "--to", str(tmp_path), "--sources", "figure1"]) == 0
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(
        p.name for p in sorted((data_dir / "Figure1-COVID-chestxray-dataset" / "images").iterdir())[:3])


def test_a_folder_of_another_version_is_left_alone(upstream, data_dir, tmp_path, capsys):
    folder = tmp_path / "Actualmed-COVID-chestxray-dataset"
    folder.mkdir()
    (folder / "metadata.csv").write_text("patientid,finding\nmine,COVID-19\n")
    assert main(["download", "--to", str(tmp_path), "--sources", "actualmed"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{folder} exists but has another metadata.csv" in line and "move it away" in line
    assert (folder / "metadata.csv").read_text() == "patientid,finding\nmine,COVID-19\n" and upstream.requests == []


def _serve_nih(up: Upstream, data_dir: Path) -> list[str]:
    """Serve the 12 NIH archives (Box links), each with one or two real images as images/<name>."""
    names = sorted(p.name for p in (data_dir / "nih-cxr14-subset" / "images").iterdir())[:14]
    chunks = [names[:2], names[2:4], *[[n] for n in names[4:14]]]
    for url, chunk in zip(dl.NIH_ARCHIVES, chunks):
        up.files[_url_path(url)] = _tar_gz(
            {f"images/{n}": (data_dir / "nih-cxr14-subset" / "images" / n).read_bytes() for n in chunk})
    return names


def test_nih_images_from_box_and_metadata_from_the_torchxrayvision_wheel(upstream, data_dir, tmp_path, capsys):
    names = _serve_nih(upstream, data_dir)
    upstream.cuts[_url_path(dl.NIH_ARCHIVES[4])] = 1
    assert main(["download", "--to", str(tmp_path), "--sources", "nih"]) == 0
    folder = tmp_path / "ChestX-ray14"
    assert sorted(p.name for p in (folder / "images").iterdir()) == names
    metadata = (folder / dl.NIH_METADATA).read_bytes()
    assert hashlib.sha256(metadata).hexdigest() == PACKAGED["nih"].sha256
    assert metadata.count(b"\n") == PACKAGED["nih"].rows + 1
    lines = set(metadata.decode().splitlines())
    assert all(row in lines for row in (data_dir / "nih-cxr14-subset" / dl.NIH_METADATA).read_text().splitlines())
    origin = (folder / f"{dl.NIH_METADATA}.origin").read_text()
    assert f"torchxrayvision {PACKAGED['nih'].version}" in origin and "torchxrayvision 1.5.7" in capsys.readouterr().err
    downloads = sorted(p.name for p in (tmp_path / dl.DOWNLOADS_DIR).iterdir())
    assert downloads == [f"images_{n:03d}.done" for n in range(1, 13)]
    before = len(upstream.requests)
    assert main(["download", "--to", str(tmp_path), "--sources", "nih"]) == 0
    assert len(upstream.requests) == before


def test_nih_without_torchxrayvision_says_what_to_install(upstream, tmp_path, capsys, monkeypatch):
    _without_torchxrayvision(monkeypatch)
    assert main(["download", "--to", str(tmp_path), "--sources", "nih"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "pip install torchxrayvision==1.5.7" in line and dl.NIH_PAGE in line and upstream.requests == []


SUBSET = SUBSETS["nih"]


@pytest.fixture(scope="module")
def subset_archive(data_dir) -> bytes:
    """The teaching subset's GitHub archive as the repository lays it out, built from the mirror's
    1,000 real NIH films (sorted into its two class folders by NIH's labels) beside files that
    must not be unpacked (its COVID-19 folder, a notebook)."""
    mirror = data_dir / "nih-cxr14-subset"
    top = f"{SUBSET.repo.split('/')[1]}-{SUBSET.commit}"
    normal, pneumonia = SUBSET.folders
    labels = dict(line.split(",")[:2] for line in (mirror / dl.NIH_METADATA).read_text().splitlines()[1:])
    files = {f"{top}/{normal if labels[p.name] == 'No Finding' else pneumonia}/{p.name}": p.read_bytes()
             for p in sorted((mirror / "images").iterdir())}
    files[f"{top}/X-Ray Image DataSet/Covid-19/not-nih.jpeg"] = b"a COVID-19 film from another source"
    files[f"{top}/DarkCovidNet.ipynb"] = b"{}"
    return _tar_gz(files)


def _subset_path() -> str:
    return _url_path(dl.GITHUB_ARCHIVE.format(repo=SUBSET.repo, commit=SUBSET.commit))


def test_the_teaching_set_comes_without_credentials_resumes_and_a_rerun_fetches_nothing(
        upstream, data_dir, subset_archive, tmp_path, capsys, monkeypatch):
    for name in GITHUB:
        _serve_github(upstream, data_dir, name)
    upstream.files[_subset_path()] = subset_archive
    upstream.cuts[_subset_path()] = 1
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    assert main(["download", "--to", str(tmp_path), "--teach"]) == 0
    assert [r[1] for r in upstream.hits(_subset_path())] == [None, f"bytes={len(subset_archive) // 2}-"]
    mirror, folder = data_dir / "nih-cxr14-subset", tmp_path / "nih-cxr14-subset"
    assert f"nih-subset: {folder}" in capsys.readouterr().out
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    want = {p.relative_to(mirror).as_posix(): p.read_bytes() for p in mirror.rglob("*") if p.is_file()}
    origin = got.pop(f"{dl.NIH_METADATA}.origin").decode()
    assert got == want  # the 1,000 films byte for byte and NIH's rows for exactly them; nothing else
    assert f"{SUBSET.repo} at {SUBSET.commit}" in origin and f"torchxrayvision {PACKAGED['nih'].version}" in origin
    rows = SOURCES["nih"].read(folder, None)
    assert len(rows) == SUBSET.count and {r["label"] for r in rows} == {"normal", "pneumonia"}
    assert list((tmp_path / dl.DOWNLOADS_DIR).iterdir()) == []
    before = len(upstream.requests)
    assert main(["download", "--to", str(tmp_path), "--teach"]) == 0
    assert len(upstream.requests) == before


def test_a_subset_archive_without_the_pinned_films_is_refused_and_nothing_unpacked(upstream, tmp_path, capsys):
    top = f"{SUBSET.repo.split('/')[1]}-{SUBSET.commit}"
    upstream.files[_subset_path()] = _tar_gz({f"{top}/{SUBSET.folders[0]}/00000001_000.png": b"one film"})
    assert main(["download", "--to", str(tmp_path), "--sources", "nih-subset"]) == 2
    line = _error_of(capsys.readouterr().err)
    assert line.startswith("error: nih-subset: ") and "1 films whose names are not the pinned 1000" in line
    assert f"By hand: download https://github.com/{SUBSET.repo}/archive/{SUBSET.commit}.tar.gz" in line
    assert len(upstream.hits(_subset_path())) == 2 and not (tmp_path / "nih-cxr14-subset").exists()


def test_the_teaching_set_offline_or_without_torchxrayvision_is_one_line(upstream, tmp_path, capsys, monkeypatch):
    _offline(monkeypatch)
    assert main(["download", "--to", str(tmp_path), "--sources", "nih-subset"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: nih-subset: ") and "Connection refused" in line and "By hand: download" in line
    _without_torchxrayvision(monkeypatch)
    with pytest.raises(SystemExit) as usage:  # one or the other
        main(["download", "--to", str(tmp_path), "--teach", "--sources", "nih"])
    assert usage.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["download", "--to", str(tmp_path), "--sources", "nih-subset"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "pip install torchxrayvision==1.5.7" in line and not (tmp_path / "nih-cxr14-subset").exists()


def _rsna_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("stage_2_detailed_class_info.csv", "patientId,class\nabc,Normal\ndef,Lung Opacity\n")
        zf.writestr("stage_2_train_labels.csv", "patientId,x,y,width,height,Target\nabc,,,,,0\ndef,1,2,3,4,1\n")
        for pid in ("abc", "def"):
            zf.writestr(f"stage_2_train_images/{pid}.dcm", b"DICM" * 300)
    return buffer.getvalue()


def _serve_rsna(up: Upstream) -> str:
    api = _url_path(dl.KAGGLE_ARCHIVE.format(competition=dl.RSNA_COMPETITION))
    up.auth[api] = "Basic " + base64.b64encode(f"{FAKE_USER}:{FAKE_KEY}".encode()).decode()
    up.redirects[api] = STORAGE  # Kaggle answers with a redirect to cloud storage
    up.files[STORAGE] = _rsna_zip()
    return api


@pytest.mark.parametrize("where", ["environment", "kaggle.json"])
def test_rsna_through_kaggle_with_a_key_that_never_shows(upstream, tmp_path, capsys, caplog, monkeypatch, where):
    caplog.set_level(logging.DEBUG)
    api = _serve_rsna(upstream)
    upstream.cuts[STORAGE] = 1
    if where == "environment":
        monkeypatch.setenv("KAGGLE_USERNAME", FAKE_USER)
        monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
    else:
        monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
        monkeypatch.delenv("KAGGLE_KEY", raising=False)
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "kaggle.json").write_text(f'{{"username": "{FAKE_USER}", "key": "{FAKE_KEY}"}}')
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    data = tmp_path / "data"
    assert main(["download", "--to", str(data), "--sources", "rsna"]) == 0
    folder = data / dl.RSNA_COMPETITION
    assert (folder / "stage_2_detailed_class_info.csv").is_file() and len(list((folder / "stage_2_train_images").iterdir())) == 2
    storage = upstream.hits(STORAGE)
    assert len(upstream.hits(api)) == 2 and storage[1][1] is not None  # resumed through a fresh redirect
    assert all(auth is None for _, _, auth in storage)  # the token is not forwarded to the storage host
    first = capsys.readouterr()
    upstream.auth[api] = "Basic refused"  # now Kaggle refuses the token
    assert main(["download", "--to", str(tmp_path / "other"), "--sources", "rsna"]) == 2
    out, err = capsys.readouterr()
    line = _error_line(err)
    assert "HTTP 401" in line and ("$KAGGLE_USERNAME" if where == "environment" else "kaggle.json") in line
    encoded = base64.b64encode(f"{FAKE_USER}:{FAKE_KEY}".encode()).decode()
    for text in (first.out, first.err, out, err, caplog.text, repr(kaggle_credentials())):
        assert FAKE_KEY not in text and encoded not in text


def test_rsna_without_credentials_says_where_to_put_them(upstream, tmp_path, capsys, monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _serve_rsna(upstream)
    assert main(["download", "--to", str(tmp_path / "data"), "--sources", "rsna"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(tmp_path / "home" / ".kaggle" / "kaggle.json") in line and "KAGGLE_USERNAME and KAGGLE_KEY" in line
    assert upstream.requests == []


def test_the_download_benchmark_fetches_the_teaching_archives_from_a_local_server(data_dir, tmp_path, capsys):
    sources = tmp_path / "sources"
    for name in (*GITHUB, "nih"):
        real = SOURCES[name].find(data_dir) if name != "nih" else data_dir / "nih-cxr14-subset"
        copy = sources / real.name
        keep = {PINNED[name].check_file, *(f"images/{p.name}" for p in sorted((real / "images").iterdir())[:2])} \
            if name != "nih" else None
        for path in real.rglob("*"):
            rel = path.relative_to(real).as_posix()
            if path.is_file() and (keep is None or rel in keep):
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                (copy / rel).symlink_to(path)
    assert main(["bench", "download", "--data-dir", str(sources), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "teach_download.txt").read_text()
    assert report.startswith('$ workbook bench download --data-dir "$CXR_DATA_DIR"')
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].strip("| ") for r in rows] == list(dl.TEACH_SOURCES)
    assert all(float(r[4].strip(" |")) < 1.0 for r in rows)  # the rerun fetches nothing
    capsys.readouterr()
    next((sources / "nih-cxr14-subset" / "images").iterdir()).unlink()  # a film short: the pin refuses it
    assert main(["bench", "download", "--data-dir", str(sources)]) == 2
    line = _error_of(capsys.readouterr().err)
    assert "nih-subset: " in line and "999 films whose names are not the pinned 1000" in line


def test_the_readmes_teaching_download_numbers_are_the_benchmarks():
    import math

    from nbhelpers.settings import config

    report = (config.REPO_ROOT / "results" / "benchmarks" / "teach_download.txt").read_text()
    total = float(re.search(r"total: ([\d.]+) MB", report).group(1))
    seconds = sum(float(line.split("|")[3]) for line in report.splitlines()
                  if line.startswith("| ") and not line.startswith("| source"))
    readme = (config.REPO_ROOT / "README.md").read_text()
    said = re.search(r"the four archives total (\d+) MB and take (\d+) seconds", readme.replace("\n", " "))
    assert said and int(said.group(1)) == round(total) and int(said.group(2)) == math.ceil(seconds), (said, total, seconds)
