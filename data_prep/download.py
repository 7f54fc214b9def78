"""Fetch the upstream sources into a data directory laid out like the mirror.

``workbook download --to DIR [--sources ieee8023 figure1 actualmed rsna nih] [--mirror URL]``

* ieee8023, Figure1, Actualmed: the GitHub archive of each pinned commit (each entry's ``pin`` in
  :data:`data_prep.sources.SOURCES`),
  checked before it is unpacked (the whole gzip stream, and the SHA-256 of the metadata file
  inside, which is byte-identical to the development mirror's).
* RSNA Pneumonia Detection Challenge: the competition archive from Kaggle's API with the user's
  API token (:mod:`data_prep.credentials`); the competition rules must be accepted on kaggle.com.
* NIH ChestX-ray14 (not in the default set: about 45 GB): the 12 image archives from the NIH Box
  links; ``Data_Entry_2017_v2020.csv``, which NIH offers only behind its web page, is unpacked
  from the torchxrayvision wheel (:data:`data_prep.pins.PACKAGED`) and its origin recorded in
  ``Data_Entry_2017_v2020.csv.origin``.
* ``nih-subset``: 1,000 NIH ChestX-ray14 films (500 'No Finding', 500 'Pneumonia') that a public
  GitHub repository vendors (:data:`data_prep.pins.SUBSETS`), with NIH's own rows for them cut
  from that same file; no credentials.  ``--teach`` fetches it with the three GitHub sources: the
  teaching profile's data.

Transfers resume where they broke off and unpack whole or not at all (:mod:`data_prep.fetch`);
archives are deleted once unpacked; a source already in place is not fetched again, and a folder
of another version is never overwritten.  Every network step has a timeout.  A failure is one
line naming the source, what went wrong and how to fetch it by hand (exit status 2);
``$CXR_DOWNLOAD_BASE`` (or ``--mirror``) reads every file from a mirror instead.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

from data_prep.atomic import atomic_path, write_text
from data_prep.credentials import kaggle_credentials
from data_prep.fetch import (
    MIRROR_ENV, DownloadError, check_tar, check_zip, fetch_verified, mirror_base, mirrored, unpack_tar, unpack_zip,
)
from data_prep.pins import PACKAGED, SUBSETS
from data_prep.sources import SOURCES
from data_prep.fingerprint import sha256_file

__all__ = ["DownloadError", "download", "download_github", "download_nih", "download_nih_subset", "download_rsna",
           "nih_metadata"]

DOWNLOADS_DIR = ".downloads"  # archives and partial transfers, under the target folder
GITHUB_ARCHIVE = "https://github.com/{repo}/archive/{commit}.tar.gz"
DEFAULT_SOURCES = ("ieee8023", "figure1", "actualmed", "rsna")  # the seed paper's four sources
#: What ``--teach`` fetches: every film the teaching profile needs, without credentials.
TEACH_SOURCES = ("ieee8023", "figure1", "actualmed", "nih-subset")
RSNA_COMPETITION = "rsna-pneumonia-detection-challenge"
#: Kaggle's REST endpoint for a competition's whole data archive (what ``kaggle competitions
#: download -c NAME`` requests); it answers with a redirect to the archive in cloud storage.
KAGGLE_ARCHIVE = "https://www.kaggle.com/api/v1/competitions/data/download-all/{competition}"
RSNA_DONE = ("stage_2_detailed_class_info.csv", "stage_2_train_images")
NIH_PAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_METADATA = "Data_Entry_2017_v2020.csv"
ORIGIN_SUFFIX = ".origin"
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


def _failed(name: str, error: DownloadError, by_hand: str, mirror: str | None) -> DownloadError:
    """``error`` as one line naming source ``name`` and how to fetch it without this command."""
    message = str(error).rstrip(".")
    base = mirror_base(mirror)
    other = f"or check the mirror {base}" if base else f"or set ${MIRROR_ENV} to a mirror of the upstream hosts"
    return DownloadError(f"{name}: {message}. By hand: {by_hand}; {other}", error.status)


def _refuse_other_version(name: str, folder: Path, what: str) -> DownloadError:
    return DownloadError(f"{name}: {folder} exists but {what}; it is left as it is: move it away (or delete it) "
                         "and rerun to fetch the pinned version")


def download_github(name: str, to: Path, mirror: str | None = None) -> Path:
    """Fetch source ``name`` (ieee8023, figure1, actualmed) at its pinned commit into ``to/<folder>``.

    Returns at once, without network, when the folder holds the pinned metadata.  ``mirror``
    replaces ``$CXR_DOWNLOAD_BASE``.  Raises :class:`DownloadError` naming the source and the
    manual way when the folder holds another version, the archive cannot be fetched, or it comes
    twice without the pinned metadata.
    """
    snap = SOURCES[name].pin
    folder = to / SOURCES[name].folders[0]
    check = folder / snap.check_file
    if folder.exists():
        if check.is_file() and sha256_file(check) == snap.check_sha256:
            return folder
        state = "has another " + snap.check_file if check.is_file() else "has no " + snap.check_file
        raise _refuse_other_version(name, folder, f"{state} than commit {snap.commit} of {snap.repo}")
    url = GITHUB_ARCHIVE.format(repo=snap.repo, commit=snap.commit)
    by_hand = (f"download {url} (or clone https://github.com/{snap.repo} and check out {snap.commit}) and "
               f"unpack it as {folder}")
    archive = to / DOWNLOADS_DIR / f"{folder.name}-{snap.commit}.tar.gz"
    try:
        fetch_verified(mirrored(url, mirror), archive, lambda p: check_tar(p, snap.check_file, snap.check_sha256))
        unpack_tar(archive, folder, strip_top=True)
    except DownloadError as err:
        raise _failed(name, err, by_hand, mirror) from None
    archive.unlink()
    return folder


def packaged_file(source: str) -> tuple[Path, str] | None:
    """The file that a library ships for ``source`` (:data:`PACKAGED`) and the library's installed
    version, or None when the library is not installed.  The library is located, not imported
    (torchxrayvision takes seconds to import)."""
    pin = PACKAGED[source]
    spec = importlib.util.find_spec(pin.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / pin.member
    return (path, importlib.metadata.version(pin.package)) if path.is_file() else None


def _packaged_nih(state: str = "is needed") -> tuple[Path, str]:
    """The installed torchxrayvision copy of NIH's metadata (gzip'd) and the library's version;
    raises :class:`DownloadError` saying what to install when it is absent."""
    pin = PACKAGED["nih"]
    found = packaged_file("nih")
    if found is None:
        raise DownloadError(f"nih: {pin.name} {state}; {pin.package}, whose wheel ships it, is not installed: "
                            f"`pip install {pin.package}=={pin.version}` and rerun, or download {pin.name} "
                            f"from {NIH_PAGE}")
    return found


def nih_metadata(folder: Path) -> Path:
    """Put ``Data_Entry_2017_v2020.csv`` into the NIH ``folder``: kept when it is there, else
    unpacked from the installed torchxrayvision wheel, checked against its pinned SHA-256, with a
    ``.origin`` file saying where it came from.  Returns its path.

    Raises :class:`DownloadError` saying what to install or fetch by hand when torchxrayvision is
    not installed or its copy is not the pinned file.
    """
    pin = PACKAGED["nih"]
    dest = folder / pin.name
    if dest.is_file():
        return dest
    by_hand = f"download {pin.name} from {NIH_PAGE} and save it as {dest}"
    source, version = _packaged_nih(f"is not in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        with gzip.open(source) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        got = sha256_file(tmp)
        if got != pin.sha256:
            raise DownloadError(f"nih: {source} ({pin.package} {version}) unpacks to SHA-256 {got}, not the pinned "
                                f"{pin.sha256} of {pin.package} {pin.version}: install that version, or {by_hand}")
    write_text(folder / f"{pin.name}{ORIGIN_SUFFIX}",
               f"{pin.name}: unpacked from {pin.package} {version} ({pin.package}/{pin.member}), SHA-256 {got}\n")
    print(f"nih: {pin.name} unpacked from {pin.package} {version}", file=sys.stderr)
    return dest


def download_nih(to: Path, mirror: str | None = None) -> Path:
    """Fetch NIH ChestX-ray14 into ``to/ChestX-ray14``: its metadata (:func:`nih_metadata`) and
    the 12 image archives into ``images/``.

    Each archive is checked whole, unpacked beside the folder, its images moved in (each file
    whole), marked done and deleted, so a rerun continues with the next one.  Raises
    :class:`DownloadError` naming the source and the manual way when a step fails.
    """
    folder = to / SOURCES["nih"].folders[0]
    nih_metadata(folder)
    images = folder / "images"
    downloads = to / DOWNLOADS_DIR
    by_hand = f"download images_001.tar.gz ... images_012.tar.gz from {NIH_PAGE} and unpack them into {folder}"
    for number, url in enumerate(NIH_ARCHIVES, start=1):
        stem = f"images_{number:03d}"
        done = downloads / f"{stem}.done"
        if done.is_file():
            continue
        archive, unpacked = downloads / f"{stem}.tar.gz", downloads / stem
        shutil.rmtree(unpacked, ignore_errors=True)  # an earlier run stopped while moving its images
        try:
            fetch_verified(mirrored(url, mirror), archive, lambda p: check_tar(p, strip_top=False))
            unpack_tar(archive, unpacked)
        except DownloadError as err:
            raise _failed("nih", err, by_hand, mirror) from None
        images.mkdir(parents=True, exist_ok=True)
        for path in sorted((unpacked / "images").glob("*")):
            os.replace(path, images / path.name)
        shutil.rmtree(unpacked)
        archive.unlink()
        done.touch()
    return folder


def _names_in(archive: Path, folders: Sequence[str]) -> list[str] | str:
    """The sorted file names directly inside ``folders`` of a GitHub archive (below its top
    folder), or what is wrong with the archive."""
    problem = check_tar(archive)
    if problem is not None:
        return problem
    names = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parent, _, name = member.name.partition("/")[2].rpartition("/")
            if member.isfile() and parent in folders:
                names.append(name)
    return sorted(names)


def _names_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{n}\n" for n in names).encode()).hexdigest()


def download_nih_subset(to: Path, mirror: str | None = None) -> Path:
    """Fetch the pinned NIH ChestX-ray14 teaching subset (:data:`SUBSETS`) into
    ``to/nih-cxr14-subset``: its films in ``images/`` and NIH's rows for them in
    ``Data_Entry_2017_v2020.csv`` (cut from torchxrayvision's copy of NIH's file), the layout the
    ``nih`` source reads.

    Returns at once, without network, when the folder holds the pinned rows.  The archive must
    hold exactly the pinned film names (their SHA-256) and the rows cut for them must have the
    pinned SHA-256, else nothing is unpacked.  Raises :class:`DownloadError` naming the problem and
    the manual way (torchxrayvision missing is found before any network use).
    """
    subset, pin = SUBSETS["nih"], PACKAGED["nih"]
    folder = to / SOURCES["nih"].folders[1]
    rows_file = folder / pin.name
    if folder.exists():
        if rows_file.is_file() and sha256_file(rows_file) == subset.rows_sha256:
            return folder
        raise _refuse_other_version("nih-subset", folder, f"does not hold the {pin.name} rows of the {subset.count} "
                                    f"films of {subset.repo} at {subset.commit}")
    packaged, version = _packaged_nih()
    url = GITHUB_ARCHIVE.format(repo=subset.repo, commit=subset.commit)
    by_hand = (f"download {url}, copy the files of {' and '.join(subset.folders)} into {folder / 'images'} and "
               f"NIH's {pin.name} rows for them into {rows_file}")
    archive = to / DOWNLOADS_DIR / f"{folder.name}-{subset.commit}.tar.gz"

    def problem(path: Path) -> str | None:
        names = _names_in(path, subset.folders)
        if isinstance(names, str):
            return names
        if len(names) != subset.count or _names_digest(names) != subset.names_sha256:
            return f"it holds {len(names)} films whose names are not the pinned {subset.count}"
        return None

    try:
        fetch_verified(mirrored(url, mirror), archive, problem)
    except DownloadError as err:
        raise _failed("nih-subset", err, by_hand, mirror) from None
    names = set(_names_in(archive, subset.folders))
    with gzip.open(packaged) as src:
        lines = src.read().splitlines(keepends=True)
    rows = b"".join([lines[0], *(line for line in lines[1:] if line.split(b",", 1)[0].decode() in names)])
    got = hashlib.sha256(rows).hexdigest()
    if got != subset.rows_sha256:
        raise DownloadError(f"nih-subset: the {pin.name} rows of {pin.package} {version} for these films have "
                            f"SHA-256 {got}, not the pinned {subset.rows_sha256}: install {pin.package}=={pin.version}")
    origin = (f"{pin.name}: the rows of the {subset.count} films of {subset.repo} at {subset.commit} "
              f"({', '.join(subset.folders)}), cut from {pin.package} {version} ({pin.package}/{pin.member}); "
              f"SHA-256 {got}\n")

    def select(name: str) -> str | None:
        parent, _, base = name.rpartition("/")
        return f"images/{base}" if parent in subset.folders else None

    unpack_tar(archive, folder, strip_top=True, select=select,
               extra={pin.name: rows, f"{pin.name}{ORIGIN_SUFFIX}": origin.encode()})
    archive.unlink()
    return folder


def download_rsna(to: Path, mirror: str | None = None) -> Path:
    """Fetch the RSNA Pneumonia Detection Challenge from Kaggle into ``to/<rsna folder>``.

    Returns at once when the folder holds the class table and the training images.  Raises
    :class:`~data_prep.credentials.CredentialsError` saying where to put a Kaggle token when
    there is none (before any network use), and :class:`DownloadError` for a token Kaggle
    refuses, competition rules not accepted, or a failed transfer.  The key never appears in a
    message.
    """
    folder = to / SOURCES["rsna"].folders[0]
    if folder.exists():
        if all((folder / name).exists() for name in RSNA_DONE):
            return folder
        raise _refuse_other_version("rsna", folder, f"lacks {' or '.join(RSNA_DONE)}")
    token = kaggle_credentials()
    url = KAGGLE_ARCHIVE.format(competition=RSNA_COMPETITION)
    page = f"https://www.kaggle.com/c/{RSNA_COMPETITION}"
    by_hand = (f"download the data at {page}/data (or `kaggle competitions download -c {RSNA_COMPETITION}`) and "
               f"unzip it into {folder}")
    archive = to / DOWNLOADS_DIR / f"{RSNA_COMPETITION}.zip"
    try:
        fetch_verified(mirrored(url, mirror), archive, check_zip,
                       headers={"Authorization": token.authorization()}, secrets=token.secrets())
        unpack_zip(archive, folder)
    except DownloadError as err:
        if err.status == 401:
            raise DownloadError(f"rsna: Kaggle refused the API token from {token.origin} (HTTP 401); create a new "
                                f"one at https://www.kaggle.com/settings and save it there", 401) from None
        if err.status == 403:
            raise DownloadError(f"rsna: Kaggle refused the download (HTTP 403); accept the competition rules at "
                                f"{page}/rules with the account of the token from {token.origin}, then rerun",
                                403) from None
        raise _failed("rsna", err, by_hand, mirror) from None
    archive.unlink()
    return folder


def download(to: Path, sources: Sequence[str] = DEFAULT_SOURCES, mirror: str | None = None) -> dict[str, Path]:
    """Fetch each of ``sources`` into ``to``, from ``mirror`` when given (else ``$CXR_DOWNLOAD_BASE``
    or upstream); return their folders.  Raises :class:`DownloadError` at the first failure."""
    known = downloads()
    unknown = [s for s in sources if s not in known]
    if unknown:
        raise DownloadError(f"unknown source(s) {unknown}; known: {', '.join(known)}")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    return {name: known[name](to, mirror) for name in sources}


#: How each kind of source (``Source.fetch``) is fetched: ``(name, to, mirror) -> folder``.
FETCHERS: dict[str, Callable[[str, Path, str | None], Path]] = {
    "github": download_github,
    "kaggle": lambda name, to, mirror: download_rsna(to, mirror),
    "nih-box": lambda name, to, mirror: download_nih(to, mirror),
}
#: Downloadable sets that are part of a source rather than a source: ``(to, mirror) -> folder``.
PART_DOWNLOADS: dict[str, Callable[[Path, str | None], Path]] = {"nih-subset": download_nih_subset}


def downloads() -> dict[str, Callable[[Path, str | None], Path]]:
    """Every downloadable set by name: each source of :data:`SOURCES` that names its ``fetch``
    (read when called, so a source added there is downloadable at once), then :data:`PART_DOWNLOADS`."""
    out = {}
    for name, source in SOURCES.items():
        if source.fetch:
            if source.fetch not in FETCHERS:
                raise ValueError(f"source {name!r}: fetch {source.fetch!r} is none of {', '.join(FETCHERS)}")
            out[name] = functools.partial(FETCHERS[source.fetch], name)
    return {**out, **PART_DOWNLOADS}


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``workbook download``."""
    parser.add_argument("--to", type=Path, required=True, metavar="FOLDER",
                        help="data directory to fill (becomes $CXR_DATA_DIR)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sources", nargs="+", choices=list(downloads()), default=list(DEFAULT_SOURCES),
                       help=f"default: {' '.join(DEFAULT_SOURCES)} (nih is about 45 GB; nih-subset is 1,000 of its "
                            "films, no credentials)")
    which.add_argument("--teach", action="store_const", dest="sources", const=list(TEACH_SOURCES),
                       help=f"the teaching profile's data, no credentials: {' '.join(TEACH_SOURCES)}")
    parser.add_argument("--mirror", metavar="URL", default=None,
                        help=f"read every file from URL/<upstream host>/<path> (default: ${MIRROR_ENV}, else upstream)")


def run_download_command(args: argparse.Namespace) -> int:
    """``workbook download``: fetch the sources into ``--to`` and print their folders; returns 0
    (a failed fetch raises :class:`DownloadError`, exit status 2)."""
    for name, folder in download(args.to, args.sources, args.mirror).items():
        print(f"{name}: {folder}")
    return 0
