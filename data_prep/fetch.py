"""HTTP downloads that resume, verify what they fetched, and unpack whole or not at all.

* :func:`fetch` writes ``dest.part`` and renames it to ``dest`` only when the transfer is
  complete.  A transfer cut off midway is resumed with an HTTP ``Range`` request from the size of
  the ``.part`` file, in the same run (up to :data:`ATTEMPTS` tries) and in the next one.  A server
  that ignores ``Range`` (answers 200) sends the file again from the start.  Progress goes to
  stderr through ``tqdm``.
* :func:`fetch_verified` checks the finished file (a SHA-256, or a whole-archive check such as
  :func:`check_tar`); a corrupt file is deleted and fetched once more, never unpacked.
* :func:`unpack_tar` / :func:`unpack_zip` extract into a staging folder beside the target and
  rename it into place, so an interrupted unpack leaves no half-filled source folder behind.
* :func:`mirrored` points every upstream URL at a mirror: with ``$CXR_DOWNLOAD_BASE`` (or
  ``--mirror``) set to ``http://host/base``, ``https://github.com/a/b/archive/c.tar.gz`` is read
  from ``http://host/base/github.com/a/b/archive/c.tar.gz`` (a plain file server laid out by host).

Credentials travel in headers that are not forwarded on a redirect, and they never appear in a
message: :func:`fetch` removes every string of ``secrets`` from what it reports.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from data_prep.progress import tqdm

from data_prep.errors import WorkbookError
from data_prep.fingerprint import sha256_file

#: The environment variable naming a mirror of the upstream hosts (see :func:`mirrored`).
MIRROR_ENV = "CXR_DOWNLOAD_BASE"
#: Seconds a connection or a single read may stall before the transfer counts as broken.
TIMEOUT_S = 30
CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"
#: Tries of one file within one run; each resumes from what the one before wrote.
ATTEMPTS = 3
USER_AGENT = "cxr-workbook data_prep.download"
REDACTED = "***"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


class DownloadError(WorkbookError, RuntimeError):
    """A file could not be fetched, resumed, verified or unpacked; the message names it and what
    to do.  ``status`` is the HTTP status when the server answered with an error, else None."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Broken(DownloadError):
    """A transfer that stopped before its end (the connection was cut or stalled); :func:`fetch`
    resumes it and reports the last one as a plain :class:`DownloadError`."""


def mirror_base(mirror: str | None = None) -> str:
    """The mirror in use: ``mirror``, else ``$CXR_DOWNLOAD_BASE``, without a trailing slash; "" for none."""
    return (os.environ.get(MIRROR_ENV, "") if mirror is None else mirror).rstrip("/")


def mirrored(url: str, mirror: str | None = None) -> str:
    """Return ``url`` as read from ``mirror`` (``$CXR_DOWNLOAD_BASE`` when None): the mirror's
    base, the upstream host, then the upstream path and query.  Without a mirror ``url`` is
    returned unchanged."""
    base = mirror_base(mirror)
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{base}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _range_of(headers: Mapping[str, str] | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range`` header; None where it says nothing."""
    match = _CONTENT_RANGE.match((headers or {}).get("Content-Range", "") or "")
    if match is None:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total and total != "*" else None)


def _transfer(url: str, part: Path, name: str, headers: Mapping[str, str], timeout: float) -> None:
    """Fetch ``url`` into ``part``, appending from its current size when the server honours
    ``Range``.  Raises :class:`_Broken` when the body ends early or stalls, urllib's errors
    when the request fails before any byte."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    for key, value in headers.items():
        request.add_unredirected_header(key, value)  # credentials stay with the host they are for
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # asked past the end: the part may already be whole
            if _range_of(err.headers)[1] == offset:
                return
            part.unlink()
            raise _Broken(f"the server refused to resume {part.name}; starting again") from err
        raise
    with response:
        first, _ = _range_of(response.headers)
        resumed = offset > 0 and response.status == 206 and first == offset
        if response.status == 206 and not resumed:
            part.unlink(missing_ok=True)
            raise _Broken(f"the server resumed {part.name} at byte {first}, not {offset}; starting again")
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        try:
            with open(part, "ab" if resumed else "wb") as out, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                file=sys.stderr, mininterval=1.0,
            ) as bar:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as err:
            raise _Broken(f"the connection broke after {part.stat().st_size} bytes ({type(err).__name__})") from err
    got = part.stat().st_size
    if total is not None and got != total:
        raise _Broken(f"the connection closed after {got} of {total} bytes")


def fetch(
    url: str,
    dest: Path,
    sha256: str | None = None,
    timeout: float = TIMEOUT_S,
    attempts: int = ATTEMPTS,
    headers: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
) -> Path:
    """Download ``url`` to ``dest`` (through ``dest.part``, resumed where a try stopped); return ``dest``.

    Returns at once when ``dest`` exists.  ``headers`` are sent to ``url``'s host only (not after a
    redirect); no string of ``secrets`` appears in a message.  With ``sha256`` the finished file
    is checked and deleted on a mismatch.  Raises :class:`DownloadError` naming the URL when the
    host cannot be reached (``timeout`` seconds), answers with an HTTP error (its ``status`` set),
    breaks off ``attempts`` times, or sends a file with the wrong hash.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, dest.name, headers or {}, timeout)
            break
        except _Broken as err:
            if attempt == attempts:
                raise DownloadError(
                    f"the transfer of {url} broke off {attempts} times ({err}); rerun the command to resume "
                    f"from {part}"
                ) from None
            print(f"{dest.name}: {err}; resuming (try {attempt + 1} of {attempts})", file=sys.stderr)
        except urllib.error.HTTPError as err:
            raise DownloadError(_redact(f"{url} answered HTTP {err.code} {err.reason}", secrets), err.code) from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(_redact(
                f"could not download {url}: {reason}; check the network connection (and any proxy) and rerun", secrets,
            )) from None
        except OSError as err:  # writing the part: a full disk, a read-only folder
            raise DownloadError(f"cannot write {part}: {err.strerror or err}; free some space or choose another "
                                "folder, then rerun (the transfer resumes)") from None
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            part.unlink()
            raise DownloadError(f"{url}: SHA-256 {got} != expected {sha256}; the file was deleted, rerun")
    part.replace(dest)
    return dest


def fetch_verified(url: str, dest: Path, problem: Callable[[Path], str | None], **fetch_options) -> Path:
    """:func:`fetch` ``url`` to ``dest`` and return it once ``problem(dest)`` finds nothing wrong.

    ``problem`` returns None for a good file, else what is wrong with it.  A bad file is deleted
    and fetched once more; raises :class:`DownloadError` naming the problem when the second copy is
    bad too (nothing is unpacked from a bad file), and whatever :func:`fetch` raises.
    """
    for attempt in (1, 2):
        path = fetch(url, dest, **fetch_options)
        found = problem(path)
        if found is None:
            return path
        path.unlink()
        if attempt == 1:
            print(f"{dest.name}: {found}; deleted, fetching it again", file=sys.stderr)
    raise DownloadError(f"{url} came twice as a bad file ({found}); it was deleted, rerun later or fetch it by hand")


def check_tar(archive: Path, check_file: str | None = None, sha256: str | None = None,
              strip_top: bool = True) -> str | None:
    """What is wrong with a gzip'd tar ``archive`` (None when nothing): the whole stream is read, so
    a truncated or corrupted archive fails its gzip check; with ``check_file`` (a path inside the
    archive, below its top folder when ``strip_top``) that member must exist and have ``sha256``."""
    try:
        with gzip.open(archive) as stream:
            while stream.read(CHUNK_BYTES):
                pass
        digest = None
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.partition("/")[2] if strip_top else member.name
                if check_file is not None and member.isfile() and name == check_file:
                    digest = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
        return f"corrupt archive ({type(err).__name__}: {err})"
    if check_file is None:
        return None
    if digest is None:
        return f"it holds no {check_file}"
    return None if sha256 is None or digest == sha256 else f"its {check_file} has SHA-256 {digest}, expected {sha256}"


def check_zip(archive: Path) -> str | None:
    """What is wrong with zip ``archive`` (None when nothing): every member's CRC is checked."""
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        return f"corrupt archive ({type(err).__name__}: {err})"
    return None if bad is None else f"corrupt archive (member {bad} fails its CRC check)"


def _staging(target: Path) -> Path:
    staging = target.with_name(f".{target.name}.unpacking")
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted earlier unpack left
    return staging


def _install(staging: Path, target: Path) -> Path:
    """Rename the finished ``staging`` folder to ``target`` (one atomic rename; ``target`` must not exist)."""
    try:
        os.replace(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"cannot move the unpacked files to {target}: {err.strerror or err}; "
                            "move that folder away and rerun") from None
    return target


def unpack_tar(archive: Path, target: Path, strip_top: bool = False,
               select: Callable[[str], str | None] | None = None, extra: Mapping[str, bytes] | None = None) -> Path:
    """Extract a verified tar ``archive`` so that it appears as folder ``target`` all at once.

    Members go into a staging folder beside ``target`` (safely: no absolute paths, ``..`` or links
    out), optionally without the archive's top folder; ``select`` maps a member's name to its
    path in ``target`` (None: left out); ``extra`` files (path -> bytes) are written beside them;
    the folder is then renamed to ``target``, which must not exist.  Returns ``target``; raises
    :class:`DownloadError`.
    """
    staging = _staging(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            if strip_top:
                for member in members:
                    member.name = member.name.partition("/")[2]
                members = [m for m in members if m.name]
            if select is not None:
                for member in members:
                    member.name = (select(member.name) or "") if member.isfile() else ""
                members = [m for m in members if m.name]
            for member in tqdm(members, desc=f"unpacking {archive.name}", unit="file", file=sys.stderr, mininterval=1.0):
                tar.extract(member, staging, filter="data")
        for name, data in (extra or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
    except (OSError, EOFError, tarfile.TarError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"cannot unpack {archive}: {err}; delete it and rerun") from None
    return _install(staging, target)


def unpack_zip(archive: Path, target: Path) -> Path:
    """Extract a verified zip ``archive`` so that it appears as folder ``target`` all at once (see
    :func:`unpack_tar`).  Returns ``target``; raises :class:`DownloadError`."""
    staging = _staging(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in tqdm(zf.infolist(), desc=f"unpacking {archive.name}", unit="file", file=sys.stderr,
                               mininterval=1.0):
                zf.extract(member, staging)  # ZipFile.extract drops absolute paths and '..'
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"cannot unpack {archive}: {err}; delete it and rerun") from None
    return _install(staging, target)
