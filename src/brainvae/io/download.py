"""Download and unpack the official IXI dataset archives.

Downloads use only :mod:`urllib`. A file is written to ``<name>.part`` first,
resumed with an HTTP ``Range`` request after an interruption, checked against
the server's size (and an optional SHA-256 or MD5), and only then renamed to its
final name, so a file under its final name is always complete. A download
whose size cannot be checked (no Content-Length, nothing expected) is refused:
a truncated file would look complete.

Archives are unpacked by :func:`safe_extract`, which accepts only regular files
and folders inside the destination: any link, device or escaping path refuses
the whole archive before anything is extracted.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError
from urllib.parse import urljoin
from urllib.request import Request, urlopen


from .. import __version__
from ..errors import BrainVAEError, InputFileError
from ..progress import bar as progress_bar
from .atomic import atomic_write_bytes, usual_mode

IXI_BASE_URL = "https://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/"
IXI_MODALITIES = ("T1", "T2", "PD", "MRA", "DTI")
IXI_SPREADSHEET = "IXI.xls"
# The MD5 digests published for the official files (as TorchIO's and MONAI's IXI loaders pin them): a download
# that differs is refused, whatever mirror served it.
IXI_MD5 = {
    "IXI-T1.tar": "34901a0593b41dd19c1a1f746eac2d58",
    "IXI-T2.tar": "e3140d78730ecdd32ba92da48c0a9aaa",
    "IXI-PD.tar": "88ecd9d1fa33cb4a2278183b42ffd749",
    "IXI-MRA.tar": "29be7d2fee3998f978a55a9bdaf3407e",
    "IXI-DTI.tar": "636573825b1c8b9e8c78f1877df3ee66",
    "IXI.xls": "066002afe250e4375d132266fcfceac5",
}
MANIFEST_NAME = "download.json"

_CHUNK_BYTES = 1 << 20
_DIGEST_NAMES = {"sha256": "SHA-256", "md5": "MD5"}
_RETRY_DELAY_S = 1.0  # waits 1 s, 2 s, 3 s ... between attempts
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")

log = logging.getLogger(__name__)


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    expected_size: int | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    An existing ``dest`` is kept without downloading when it matches
    ``expected_size``, ``sha256`` and ``md5`` (at least one given; without any it
    cannot be checked and is downloaded again, as it is with ``force``); a file
    under the final name is only ever created by a verified download, and an
    existing one is replaced only by one. Data goes to ``dest.part`` first; a
    leftover ``.part`` is resumed with a ``Range`` request, and a dropped
    connection is retried (resuming) up to ``retries`` times.

    Raises:
        InputFileError: the download does not match the server's
            Content-Length, ``expected_size``, ``sha256`` or ``md5``, or its size
            cannot be checked at all; the data is deleted.
        BrainVAEError: the server refuses the request (HTTP 4xx) or the
            download still fails after ``retries`` retries.
    """
    dest = Path(dest)
    digests = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value is not None}
    checkable = expected_size is not None or bool(digests)
    if dest.exists() and not force:
        if checkable and _matches(dest, expected_size, **digests):
            log.info("%s already downloaded; skipping", dest)
            return dest
        log.warning("%s %s; downloading again", dest,
                    "does not match the expected size or checksum" if checkable else "cannot be verified")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    attempt = 0
    while True:
        try:
            server_size = _fetch(url, part, timeout=timeout, progress=progress, desc=dest.name)
            break
        except HTTPError as exc:
            if exc.code < 500:
                raise BrainVAEError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
            error: Exception = exc
        except (OSError, http.client.HTTPException) as exc:
            error = exc
        attempt += 1
        if attempt > retries:
            raise BrainVAEError(
                f"could not download {url} after {attempt} attempts: {error}; "
                f"run again to resume from {part}"
            ) from error
        log.warning("download of %s interrupted (%s); retry %d of %d", url, error, attempt, retries)
        time.sleep(_RETRY_DELAY_S * attempt)

    size = part.stat().st_size
    if server_size is None and not checkable:
        part.unlink()
        raise InputFileError(dest, f"the server sent no size for {url}, so a truncated download cannot be "
                                   f"told from a complete one ({size} bytes received); deleted the download")
    checks = (("the server's Content-Length", server_size), ("the expected size", expected_size))
    for label, expected in checks:
        if expected is not None and size != expected:
            part.unlink()
            problem = f"downloaded {size} bytes from {url} but {label} is {expected} bytes"
            raise InputFileError(dest, problem + "; deleted the download")
    for name, expected in digests.items():
        actual = file_digest(part, name)
        if actual != expected:
            part.unlink()
            problem = f"{_DIGEST_NAMES[name]} of the download from {url} is {actual}, expected {expected}"
            raise InputFileError(dest, problem + "; deleted the download")
    os.replace(part, dest)
    return dest


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Return the hex digest (``hashlib`` algorithm name) of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 digest of a file."""
    return file_digest(path, "sha256")


def _matches(path: Path, size: int | None, **digests: str) -> bool:
    """Whether ``path`` has the given size and digests (``sha256=``, ``md5=``; each only if given)."""
    if size is not None and path.stat().st_size != size:
        return False
    return all(file_digest(path, name) == value.lower() for name, value in digests.items())


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, desc: str) -> int | None:
    """Make one request that appends the rest of ``url`` to ``part``.

    Returns the full size the server announced (None if it did not say).
    Raises ``ConnectionError`` when the connection ends early, so that the
    caller retries and resumes.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"brainvae/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Range not satisfiable: the .part already holds the whole file, or is bogus.
        _, total = _parse_content_range(exc.headers.get("Content-Range"))
        if total is None or total == offset:
            return offset
        part.unlink()
        raise ConnectionError(f"partial download is larger than the file on the server ({total} B); restarting")

    with response:
        if offset and response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise ConnectionError(f"server sent bytes from {start} instead of {offset}; restarting")
            mode = "ab"
        else:
            if offset:
                log.info("server ignored the Range request for %s; downloading from the start", url)
                offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        bar = progress_bar(
            total=total,
            initial=offset,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
        )
        with open(part, mode) as fh, bar:
            while chunk := response.read(_CHUNK_BYTES):
                fh.write(chunk)
                bar.update(len(chunk))

    received = part.stat().st_size
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")
    return total


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into (start, total)."""
    match = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def safe_extract(tar_path: Path, dest: Path) -> list[Path]:
    """Extract a ``.tar`` or ``.tar.gz`` into ``dest`` and return the extracted files.

    Only regular files and folders are accepted: every symbolic link, hard
    link, device or other special member is refused (IXI archives have none),
    as are absolute paths and ``..`` components, all before anything is
    written. Without links nothing can redirect a write, which also closes the
    ``filter="data"`` bypass through symlink chains longer than PATH_MAX
    (CVE-2025-4517, unfixed in Python < 3.11.13). Extraction goes to a
    temporary sibling folder; a new ``dest`` is then created by one rename, and
    members are moved into an existing ``dest`` one by one after checking that
    each resolved target stays inside ``dest``, so no half-written file ever
    appears under its final name and nothing lands outside ``dest``.

    Returns:
        The paths of the extracted regular files, in archive order.

    Raises:
        InputFileError: the archive is missing, unreadable or truncated, or
            holds an unsafe member.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    if not tar_path.is_file():
        raise InputFileError(tar_path, "no such file")
    unreadable = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe_reason(member)
                if reason:
                    raise InputFileError(tar_path, f"unsafe member '{member.name}': {reason}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extracting"))
            usual_mode(tmp)
            try:
                try:
                    tar.extractall(tmp, members=members, filter="data")
                except tarfile.FilterError as exc:
                    raise InputFileError(tar_path, f"unsafe member '{exc.tarinfo.name}': {exc}") from exc
                except OSError as exc:  # e.g. a name too long for the file system, a file where a folder is
                    raise InputFileError(tar_path, f"cannot extract ({exc})") from exc
                _move_into(tar_path, tmp, dest, members)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except unreadable as exc:
        raise InputFileError(tar_path, f"not a readable tar archive ({exc})") from exc
    return [dest / member.name for member in members if member.isfile()]


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` may not be extracted, or None: only plain files and folders inside the destination pass."""
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return "absolute path"
    if ".." in path.parts:
        return "path traversal ('..')"
    if member.issym():
        return f"symbolic link to '{member.linkname}' (archives with links are refused)"
    if member.islnk():
        return f"hard link to '{member.linkname}' (archives with links are refused)"
    if member.isdev() or not (member.isfile() or member.isdir()):
        return "device or special file"
    return None


def _move_into(tar_path: Path, tmp: Path, dest: Path, members: list[tarfile.TarInfo]) -> None:
    """Move the extracted tree ``tmp`` to ``dest``: one rename if ``dest`` is new, else member by member.

    In an existing ``dest`` a folder may be a symbolic link made by someone else: every target is
    resolved and must stay inside ``dest``.
    """
    if not dest.exists():
        os.replace(tmp, dest)
        return
    root = dest.resolve()
    names = list(dict.fromkeys(member.name for member in members))
    for name in names:  # check every target before moving any
        target = (dest / name).resolve()
        if target != root and root not in target.parents:
            raise InputFileError(tar_path, f"member '{name}' would be written to {target}, outside {dest} "
                                           f"(through a link inside {dest})")
    for name in names:
        source, target = tmp / name, dest / name
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)


def download_ixi(
    modality: str,
    dest: Path,
    *,
    base_url: str = IXI_BASE_URL,
    md5: dict[str, str] | None = None,
    extract: bool = True,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Download ``IXI-<MOD>.tar`` and ``IXI.xls`` into ``dest`` and unpack the archive.

    Each download must have the published MD5 of its file (``md5``, by file
    name; default ``IXI_MD5``), whichever ``base_url`` (a mirror) serves it.
    ``dest/download.json`` records the URL, size and SHA-256 of each file
    right after its verified download. A file that still matches its record
    is kept; any other file (and every file with ``force``) is downloaded
    again, replacing the old one only once the new one is verified. The
    archive is extracted to ``dest/IXI-<MOD>/`` unless that folder exists;
    ``force`` extracts again (over it).

    Returns:
        ``{"archive", "spreadsheet", "manifest"}`` paths, plus ``"images"``
        (the extracted folder) when ``extract`` is true.

    Raises:
        BrainVAEError: ``modality`` is not an IXI modality, or a download fails.
    """
    mod = modality.upper()
    if mod not in IXI_MODALITIES:
        raise BrainVAEError(f"unknown IXI modality {modality!r}; choose one of {', '.join(IXI_MODALITIES)}")
    dest = Path(dest)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    urls = {name: urljoin(base_url, name) for name in (f"IXI-{mod}.tar", IXI_SPREADSHEET)}
    pinned = IXI_MD5 if md5 is None else md5
    manifest = dest / MANIFEST_NAME
    recorded = _read_manifest(manifest)
    paths = {}
    for name, url in urls.items():
        path, entry = dest / name, recorded.get(name)
        known = isinstance(entry, dict) and entry.get("size") is not None and entry.get("sha256") is not None
        if not force and path.exists() and known and _matches(path, entry["size"], sha256=entry["sha256"]):
            log.info("%s already downloaded (size and SHA-256 as recorded in %s); skipping", path, manifest.name)
        else:  # a file not recorded after a verified download is not trusted
            download_file(url, path, md5=pinned.get(name), force=True, progress=progress)
            _record_download(manifest, name, url, path)
        paths[name] = path

    result = {"archive": paths[f"IXI-{mod}.tar"], "spreadsheet": paths[IXI_SPREADSHEET]}
    if extract:
        images = dest / f"IXI-{mod}"
        if images.exists() and not force:
            log.info("%s already extracted; skipping (use force to extract again)", images)
        else:
            safe_extract(result["archive"], images)
        result["images"] = images
    result["manifest"] = manifest
    return result


def _read_manifest(manifest: Path) -> dict:
    """The ``files`` entries of ``download.json`` ({} when it is missing or unreadable)."""
    if not manifest.exists():
        return {}
    try:
        entries = json.loads(manifest.read_text()).get("files", {})
    except (ValueError, AttributeError):
        log.warning("%s is not valid JSON; rewriting it", manifest)
        return {}
    return entries if isinstance(entries, dict) else {}


def _record_download(manifest: Path, name: str, url: str, path: Path) -> None:
    """Add one verified file to ``manifest`` (JSON, written atomically), keeping the other entries."""
    entries = _read_manifest(manifest)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries[name] = {"url": url, "size": path.stat().st_size, "sha256": file_sha256(path), "date": now}
    atomic_write_bytes(manifest, (json.dumps({"files": entries}, indent=2) + "\n").encode())
