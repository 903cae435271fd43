"""Tests for brainvae.io.download against a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from brainvae.errors import BrainVAEError, InputFileError
from brainvae.io import download
from brainvae.io.download import download_file, download_ixi, safe_extract

T1_NAMES = ("IXI012-HH-1211-T1.nii.gz", "IXI013-HH-1212-T1.nii.gz")


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; records Range headers."""

    root: Path
    ignore_range: bool = False
    no_length: bool = False  # send no Content-Length (the body ends when the connection closes)
    cut_after: int | None = None  # close the next response after this many body bytes
    ranges: list[str | None] = field(default_factory=list)


class RangeHandler(BaseHTTPRequestHandler):
    """Serves files from ``server.state.root`` with support for ``Range: bytes=N-``."""

    def do_GET(self) -> None:
        state: ServerState = self.server.state
        requested = self.headers.get("Range")
        state.ranges.append(requested)
        path = state.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if requested and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if not state.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cut_after is not None:
            body, state.cut_after = body[: state.cut_after], None  # HTTP/1.0: returning closes the socket
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def server(tmp_path: Path):
    """A local server over ``tmp_path/served``; yields (state, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState(root)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RETRY_DELAY_S", 0.0)


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    """Write a tar with the given regular files."""
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def add_special(path: Path, info: tarfile.TarInfo) -> None:
    """Append a member without data (link, device) to an existing tar."""
    with tarfile.open(path, "a") as tar:
        tar.addfile(info)


def t1_members() -> dict[str, bytes]:
    return {name: bytes(range(256)) * (20 + i) for i, name in enumerate(T1_NAMES)}


@pytest.fixture
def payload(server) -> tuple[bytes, str]:
    """A 300 kB file ``data.bin`` on the server; returns (bytes, URL)."""
    state, base = server
    data = bytes(range(256)) * 1200
    (state.root / "data.bin").write_bytes(data)
    return data, base + "data.bin"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_verifies_sha256(tmp_path, server, payload):
    data, url = payload
    dest = tmp_path / "out" / "data.bin"
    assert download_file(url, dest, sha256=sha(data), expected_size=len(data), progress=True) == dest
    assert dest.read_bytes() == data
    assert not dest.with_name("data.bin.part").exists()


def test_existing_complete_file_is_not_downloaded_again(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    dest = tmp_path / "data.bin"
    dest.write_bytes(data)
    download_file(url, dest, sha256=sha(data), progress=False)
    assert state.ranges == []


def test_resume_from_part_sends_range(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(data[:1000])
    download_file(url, dest, sha256=sha(data), progress=False)
    assert state.ranges == ["bytes=1000-"]
    assert dest.read_bytes() == data


def test_complete_part_is_finished_on_416(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(data)
    download_file(url, dest, sha256=sha(data), progress=False)
    assert state.ranges == [f"bytes={len(data)}-"]
    assert dest.read_bytes() == data


def test_part_larger_than_file_restarts_from_zero(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"X" * (len(data) + 10))
    download_file(url, dest, sha256=sha(data), progress=False)
    assert state.ranges == [f"bytes={len(data) + 10}-", None]
    assert dest.read_bytes() == data


def test_dropped_connection_is_retried_and_resumed(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    state.cut_after = 5000
    dest = tmp_path / "data.bin"
    download_file(url, dest, sha256=sha(data), progress=False, timeout=5)
    assert state.ranges == [None, "bytes=5000-"]
    assert dest.read_bytes() == data


def test_retries_exhausted_keeps_part_for_later(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    state.cut_after = 5000
    dest = tmp_path / "data.bin"
    with pytest.raises(BrainVAEError, match="after 1 attempts"):
        download_file(url, dest, progress=False, retries=0)
    assert not dest.exists()
    assert dest.with_name("data.bin.part").read_bytes() == data[:5000]


def test_http_404_fails_without_retry(tmp_path, server):
    state, base = server
    with pytest.raises(BrainVAEError, match="HTTP 404"):
        download_file(base + "missing.tar", tmp_path / "missing.tar", progress=False)
    assert state.ranges == [None]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [({"expected_size": 123}, "expected size is 123 bytes"), ({"sha256": "0" * 64}, "SHA-256"), ({"md5": "0" * 32}, "MD5")],
)
def test_mismatch_raises_and_keeps_nothing(tmp_path, server, payload, kwargs, problem):
    _, url = payload
    dest = tmp_path / "data.bin"
    with pytest.raises(InputFileError, match=problem) as caught:
        download_file(url, dest, progress=False, **kwargs)
    assert caught.value.path == dest
    assert not dest.exists()
    assert not dest.with_name("data.bin.part").exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    state.ignore_range = True
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"X" * 700)  # would corrupt the file if appended to
    download_file(url, dest, sha256=sha(data), progress=False)
    assert state.ranges == ["bytes=700-"]
    assert dest.read_bytes() == data


def test_safe_extract_good_archive(tmp_path):
    members = {**t1_members(), "sub/notes.txt": b"hello"}
    tar = make_tar(tmp_path / "good.tar.gz", members, mode="w:gz")
    again = make_tar(tmp_path / "again.tar", {"sub/more.txt": b"more"})

    dest = tmp_path / "images"
    extracted = safe_extract(tar, dest)
    assert extracted == [dest / name for name in members]
    assert all((dest / name).read_bytes() == data for name, data in members.items())

    # A second archive extracted into the now-existing folder is merged in.
    assert safe_extract(again, dest) == [dest / "sub" / "more.txt"]
    assert (dest / "sub" / "notes.txt").read_bytes() == b"hello"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_extracted_files_and_folders_are_readable_by_others(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        dest = tmp_path / "images"
        safe_extract(make_tar(tmp_path / "t.tar", {"sub/a.txt": b"a"}), dest)
    finally:
        os.umask(mask)
    assert dest.stat().st_mode & 0o777 == 0o755  # mkdtemp made the folder 0700


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("../evil", "path traversal"),
        ("/tmp/evil", "absolute path"),
        (_symlink("link", "../../outside"), "symbolic link"),
        (_symlink("sub/link", "/etc/passwd"), "symbolic link"),
        (_symlink("alias.nii.gz", T1_NAMES[0]), "symbolic link"),  # even one that stays inside
        (_hardlink("hard", "../outside"), "hard link"),
        (_hardlink("hard", T1_NAMES[0]), "hard link"),
        (_device("dev"), "device"),
    ],
)
def test_safe_extract_refuses_unsafe_member(tmp_path, bad, problem):
    tar = make_tar(tmp_path / "bad.tar", {T1_NAMES[0]: b"fine"})
    if isinstance(bad, str):
        with tarfile.open(tar, "a") as archive:
            info = tarfile.TarInfo(bad)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"evil"))
        name = bad
    else:
        add_special(tar, bad)
        name = bad.name
    box = tmp_path / "box"
    box.mkdir()

    with pytest.raises(InputFileError, match=re.escape(f"unsafe member '{name}'") + f".*{problem}"):
        safe_extract(tar, box / "dest")
    assert list(box.iterdir()) == []  # not even the safe member, and no temporary folder
    assert not (tmp_path / "evil").exists()


def symlink_chain_tar(path: Path, climb: str) -> Path:
    """CVE-2025-4517: nested folders with 247-character names, each reached through a one-letter link, so
    a link's own path stays short while its resolved path grows past PATH_MAX, where Python < 3.11.13's
    ``filter="data"`` stops checking; a last link then climbs out through the chain, and a file is
    written through it."""
    comp, steps, inner = "d" * 247, "abcdefghijklmnop", ""
    with tarfile.open(path, "w") as tar:
        for step in steps:
            folder = tarfile.TarInfo(f"{inner}{comp}")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            tar.addfile(_symlink(f"{inner}{step}", comp))
            inner += comp + "/"
        deep = "/".join(steps) + "/" + "l" * 254
        tar.addfile(_symlink(deep, "../" * len(steps)))
        tar.addfile(_symlink("escape", f"{deep}/{climb}"))  # lexically inside: '<deep>/..' is '<chain>'
        info = tarfile.TarInfo("escape/evil.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"pwned"))
    return path


def test_symlink_chain_past_path_max_cannot_escape(tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    tar = symlink_chain_tar(tmp_path / "chain.tar", "../")
    with pytest.raises(InputFileError, match="chain.tar: unsafe member '[^']*': symbolic link"):
        safe_extract(tar, box / "dest")
    assert list(box.iterdir()) == []  # the old check let evil.txt land in box/, beside the destination
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "chain.tar"]


def test_link_inside_an_existing_destination_cannot_redirect_members(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)  # made by someone else, or by an older extraction
    tar = make_tar(tmp_path / "t.tar", {"ok.txt": b"fine", "sub/evil.txt": b"evil"})
    with pytest.raises(InputFileError, match="t.tar: member 'sub/evil.txt' would be written to .*outside"):
        safe_extract(tar, dest)
    assert list(outside.iterdir()) == []
    assert not (dest / "ok.txt").exists()  # checked before anything was moved


@pytest.mark.parametrize(("suffix", "cut"), [(".tar", "half"), (".tar.gz", "half"), (".tar", "garbage")])
def test_safe_extract_unreadable_archive(tmp_path, suffix, cut):
    tar = make_tar(tmp_path / f"t1{suffix}", t1_members(), mode="w:gz" if suffix == ".tar.gz" else "w")
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2] if cut == "half" else b"not a tar at all" * 100)
    with pytest.raises(InputFileError, match="not a readable tar archive"):
        safe_extract(tar, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_server_without_content_length_is_refused(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    state.no_length, state.cut_after = True, 5000  # a truncated body looks complete without a length
    dest = tmp_path / "data.bin"
    with pytest.raises(InputFileError, match="data.bin: the server sent no size"):
        download_file(url, dest, progress=False)
    assert not dest.exists() and not dest.with_name("data.bin.part").exists()
    # with a size or checksum to check against, the same server is fine
    state.no_length = False
    download_file(url, dest, sha256=sha(data), progress=False)
    assert dest.read_bytes() == data


def test_existing_file_that_cannot_be_verified_is_downloaded_again(tmp_path, server, payload):
    state, _ = server
    data, url = payload
    dest = tmp_path / "data.bin"
    dest.write_bytes(data[:1000])  # cut short under its final name by an older version
    download_file(url, dest, progress=False)
    assert dest.read_bytes() == data
    download_file(url, dest, sha256=sha(data), progress=False)  # verified: kept
    assert state.ranges == [None]
    download_file(url, dest, force=True, progress=False)  # force: downloaded again
    assert state.ranges == [None, None] and dest.read_bytes() == data


def test_download_ixi_end_to_end(tmp_path, server):
    state, base = server
    make_tar(state.root / "IXI-T1.tar", t1_members())
    (state.root / "IXI.xls").write_bytes(b"fake spreadsheet")
    dest = tmp_path / "ixi"
    pins = {name: hashlib.md5((state.root / name).read_bytes()).hexdigest() for name in ("IXI-T1.tar", "IXI.xls")}

    result = download_ixi("t1", dest, base_url=base.rstrip("/"), md5=pins, progress=False)
    assert result == {
        "archive": dest / "IXI-T1.tar",
        "spreadsheet": dest / "IXI.xls",
        "images": dest / "IXI-T1",
        "manifest": dest / "download.json",
    }
    assert sorted(p.name for p in (dest / "IXI-T1").iterdir()) == list(T1_NAMES)
    files = json.loads(result["manifest"].read_text())["files"]
    for name in ("IXI-T1.tar", "IXI.xls"):
        served = (state.root / name).read_bytes()
        assert files[name]["url"] == base + name
        assert files[name]["size"] == len(served)
        assert files[name]["sha256"] == sha(served)
        assert files[name]["date"]

    # Run again: nothing is downloaded, the extracted folder is left alone unless forced.
    (dest / "IXI-T1" / T1_NAMES[0]).unlink()
    requests = len(state.ranges)
    download_ixi("T1", dest, base_url=base, md5=pins, progress=False)
    assert len(state.ranges) == requests
    assert not (dest / "IXI-T1" / T1_NAMES[0]).exists()
    download_ixi("T1", dest, base_url=base, md5=pins, force=True, progress=False)
    assert (dest / "IXI-T1" / T1_NAMES[0]).exists()
    assert len(state.ranges) == requests + 2  # force downloads again

    # A file that no longer matches its record (cut short under its final name) is downloaded again.
    archive = dest / "IXI-T1.tar"
    archive.write_bytes(archive.read_bytes()[:1000])
    download_ixi("T1", dest, base_url=base, md5=pins, progress=False)
    assert archive.read_bytes() == (state.root / "IXI-T1.tar").read_bytes()
    assert len(state.ranges) == requests + 3


def test_download_ixi_refuses_an_archive_without_the_published_md5(tmp_path, server):
    state, base = server
    make_tar(state.root / "IXI-T1.tar", t1_members())  # not the real IXI-T1.tar
    (state.root / "IXI.xls").write_bytes(b"fake spreadsheet")
    with pytest.raises(InputFileError, match="MD5 of the download .* expected 34901a0593b41dd19c1a1f746eac2d58"):
        download_ixi("T1", tmp_path / "ixi", base_url=base, progress=False)  # the official pins (IXI_MD5)
    assert not (tmp_path / "ixi" / "IXI-T1.tar").exists() and not (tmp_path / "ixi" / "IXI-T1").exists()
    assert not (tmp_path / "ixi" / "IXI-T1.tar.part").exists()


def test_download_ixi_unknown_modality(tmp_path):
    with pytest.raises(BrainVAEError, match="T1, T2, PD, MRA, DTI"):
        download_ixi("FLAIR", tmp_path / "ixi")
    assert not (tmp_path / "ixi").exists()
