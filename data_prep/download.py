"""Fetch the upstream sources into a data directory laid out like the mirror.

``workbook download --to DIR [--sources ieee8023 figure1 actualmed rsna nih]``

* ieee8023, Figure1, Actualmed: GitHub archives of pinned commits, resumable, with the metadata
  file checked against its known SHA-256 (byte-identical to the development mirror).
* RSNA Pneumonia Detection Challenge: through the Kaggle API (``pip install kaggle``, an API token
  in ``~/.kaggle/kaggle.json`` or ``$KAGGLE_USERNAME``/``$KAGGLE_KEY``, and the competition rules
  accepted on kaggle.com).
* NIH ChestX-ray14: the 12 image archives from the NIH Box links (about 45 GB); the metadata file
  ``Data_Entry_2017_v2020.csv`` must be downloaded by hand from the NIH Box folder.

Every network step has a timeout, so an offline machine fails fast with a message saying what
to do, rather than hanging.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from data_prep.pins import PINNED
from data_prep.sources import SOURCES
from data_prep.table import sha256_file
from data_prep.errors import WorkbookError

#: Seconds a connection or a single read may stall before the download gives up.
TIMEOUT_S = 30
CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"
DOWNLOADS_DIR = ".downloads"  # archives are kept here under the target folder, so a rerun resumes
GITHUB_ARCHIVE = "https://github.com/{repo}/archive/{commit}.tar.gz"
DEFAULT_SOURCES = ("ieee8023", "figure1", "actualmed", "rsna")  # the seed paper's four sources
USER_AGENT = "cxr-workbook data_prep.download"


class DownloadError(WorkbookError, RuntimeError):
    """A source could not be fetched or verified; the message says why and what to do.  The
    command exits with status 1: the network or the upstream failed, not the settings."""

    exit_status = 1


RSNA_COMPETITION = "rsna-pneumonia-detection-challenge"
NIH_PAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_METADATA = "Data_Entry_2017_v2020.csv"
#: The NIH-published download links of images_001.tar.gz ... images_012.tar.gz.
NIH_ARCHIVES: tuple[str, ...] = tuple(
    f"https://nihcc.box.com/shared/static/{key}.gz"
    for key in (
        "vfk49d74nhbxq3nqjg0900w5nvkorp5c", "i28rlmbvmfjbl8p2n3ril0pptcmcu9d1",
        "f1t00wrtdk94satdfb9olcolqx20z2jp", "0aowwzs5lhjrceb3qp67ahp0rd1l1etg",
        "v5e3goj22zr6h8tzualxfsqlqaygfbsn", "asi7ikud9jwnkrnkj99jnpfkjdes7l6l",
        "jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", "tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j",
        "upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", "l6nilvfa9cg3s28tqv1qc1olm3gnz54p",
        "hhq8fkdgvcari67vfhs7ppg2w6ni4jze", "ioqwiy20ihqwyr8pf4c24eazhh281pbu",
    )
)


def fetch(url: str, dest: Path, sha256: str | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, resuming a partial ``dest.part`` when the server allows.

    Returns ``dest`` (at once when it already exists).  With ``sha256`` the finished file is
    verified and a mismatch deletes it.  Raises :class:`DownloadError` naming the URL on network
    errors, timeouts (``timeout`` seconds without progress), HTTP errors and hash mismatches.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = offset > 0 and response.status == 206  # a 200 means the server sent it all again
            start = offset if resumed else 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length else None
            with open(part, "ab" if resumed else "wb") as out, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, desc=dest.name
            ) as bar:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}; the link may have moved") from err
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"could not download {url}: {reason}. Check the network connection (and any proxy); "
            f"a rerun resumes from {part.name}. Offline, point $CXR_DATA_DIR at a local mirror instead."
        ) from err
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            part.unlink()
            raise DownloadError(f"{url}: SHA-256 {got} != expected {sha256}; the partial file was deleted, rerun")
    part.replace(dest)
    return dest


def _extract_tar(archive: Path, target: Path, strip_top: bool) -> None:
    """Extract ``archive`` into ``target`` (safely: no absolute paths or ``..``), optionally dropping its top folder."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        if strip_top:
            for member in members:
                member.name = member.name.partition("/")[2]
            members = [m for m in members if m.name]
        for member in tqdm(members, desc=f"extracting {archive.name}", unit="file"):
            tar.extract(member, target, filter="data")


def download_github(name: str, to: Path, url_template: str = GITHUB_ARCHIVE) -> Path:
    """Fetch source ``name`` (ieee8023, figure1, actualmed) at its pinned commit into ``to/<folder>``.

    Skipped when the folder already holds the pinned metadata.  Raises :class:`DownloadError` on
    network problems or when the extracted metadata is not the pinned version.
    """
    snap = PINNED[name]
    folder = to / SOURCES[name].folders[0]
    check = folder / snap.check_file
    if check.is_file() and sha256_file(check) == snap.check_sha256:
        return folder
    url = url_template.format(repo=snap.repo, commit=snap.commit)
    archive = fetch(url, to / DOWNLOADS_DIR / f"{folder.name}-{snap.commit}.tar.gz")
    staging = to / DOWNLOADS_DIR / f"{folder.name}-{snap.commit}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _extract_tar(archive, staging, strip_top=True)
    except (tarfile.TarError, EOFError, OSError) as err:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"archive {archive} from {url} is corrupt ({err}); it was deleted, rerun") from err
    got = sha256_file(staging / snap.check_file) if (staging / snap.check_file).is_file() else "missing"
    if got != snap.check_sha256:
        raise DownloadError(
            f"{url}: {snap.check_file} has SHA-256 {got}, expected {snap.check_sha256}; "
            f"is commit {snap.commit} still in {snap.repo}?"
        )
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def _kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config / "kaggle.json").is_file()


def download_rsna(to: Path) -> Path:
    """Fetch the RSNA Pneumonia Detection Challenge through the Kaggle API into ``to/<rsna folder>``.

    Raises :class:`DownloadError` when the ``kaggle`` package or the API credentials are missing
    (checked before any network use), or when the download fails (network, rules not accepted).
    """
    folder = to / SOURCES["rsna"].folders[0]
    if (folder / "stage_2_detailed_class_info.csv").is_file() and (folder / "stage_2_train_images").is_dir():
        return folder
    if importlib.util.find_spec("kaggle") is None:
        raise DownloadError("RSNA comes from Kaggle: install its client with `pip install kaggle` and rerun")
    if not _kaggle_credentials():
        raise DownloadError(
            "RSNA needs Kaggle API credentials: create a token at https://www.kaggle.com/settings "
            "(API > Create New Token) and save it as ~/.kaggle/kaggle.json, or set KAGGLE_USERNAME "
            f"and KAGGLE_KEY; also accept the rules at https://www.kaggle.com/c/{RSNA_COMPETITION}/rules"
        )
    from kaggle.api.kaggle_api_extended import KaggleApi  # imported late: it reads credentials on import

    downloads = to / DOWNLOADS_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TIMEOUT_S)  # the client sets no timeout of its own: never hang offline
    try:
        api = KaggleApi()
        api.authenticate()
        api.competition_download_files(RSNA_COMPETITION, path=str(downloads), quiet=False)
    except Exception as err:  # the client raises its own and requests' errors: re-raise all with advice
        raise DownloadError(
            f"Kaggle download of {RSNA_COMPETITION} failed: {type(err).__name__}: {err}. Check the network, "
            f"the credentials, and that the competition rules are accepted on kaggle.com"
        ) from err
    finally:
        socket.setdefaulttimeout(previous)
    archive = downloads / f"{RSNA_COMPETITION}.zip"
    with zipfile.ZipFile(archive) as zf:
        for member in tqdm(zf.infolist(), desc=f"extracting {archive.name}", unit="file"):
            zf.extract(member, folder)
    return folder


def download_nih(to: Path) -> Path:
    """Fetch the 12 NIH ChestX-ray14 image archives into ``to/ChestX-ray14/images``.

    The metadata file must be fetched by hand (NIH publishes no direct link); raises
    :class:`DownloadError` with instructions when it is absent after the images are in place,
    or when a download fails.
    """
    folder = to / SOURCES["nih"].folders[0]
    for number, url in enumerate(NIH_ARCHIVES, start=1):
        done = folder / DOWNLOADS_DIR / f"images_{number:03d}.done"
        if done.is_file():
            continue
        archive = fetch(url, to / DOWNLOADS_DIR / f"images_{number:03d}.tar.gz")
        _extract_tar(archive, folder, strip_top=False)  # members are images/<name>.png
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
    if not (folder / NIH_METADATA).is_file():
        raise DownloadError(
            f"NIH images are in {folder / 'images'}; now download {NIH_METADATA} by hand from {NIH_PAGE} "
            f"and save it as {folder / NIH_METADATA}"
        )
    return folder


def download(to: Path, sources: Sequence[str] = DEFAULT_SOURCES) -> dict[str, Path]:
    """Fetch each of ``sources`` into ``to``; return their folders.  Raises :class:`DownloadError` at the first failure."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DownloadError(f"unknown source(s) {unknown}; known: {', '.join(SOURCES)}")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name in sources:
        if name in PINNED:
            folders[name] = download_github(name, to)
        elif name == "rsna":
            folders[name] = download_rsna(to)
        else:
            folders[name] = download_nih(to)
    return folders


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook download``."""
    parser.add_argument("--to", type=Path, required=True, metavar="FOLDER",
                        help="data directory to fill (becomes $CXR_DATA_DIR)")
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(DEFAULT_SOURCES))


def run_download_command(args: argparse.Namespace) -> int:
    """``workbook download``: fetch the sources into ``--to`` and print their folders; returns 0
    (a failed fetch raises :class:`DownloadError`, exit status 1)."""
    for name, folder in download(args.to, args.sources).items():
        print(f"{name}: {folder}")
    return 0
