"""Atomic writes: write to a temporary name in the same folder, then rename.

Temporary files and folders get the permissions the umask allows (``tempfile``
and safetensors make them private, 0600/0700), so a colleague on a shared
machine can read every output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import BrainVAEError, OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: 0666 (files) or 0777 (folders) less the umask."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        usual_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path`` (with the usual permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path, force: bool = False, backup: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block succeeds.

    An existing ``path`` is an error unless ``force``; with ``force`` the old
    folder is removed only after the new one is complete (or renamed to
    ``backup``, which must not exist), so an interrupted run never leaves a
    half-written output under the final name. Temporary folders left by a
    killed process (``.NAME.PID.*.tmp``) are removed first.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    usual_mode(tmp)
    try:
        yield tmp
        if path.exists():
            old = backup or path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            if backup is None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temps(path: Path) -> None:
    """Remove ``.NAME.PID.*.tmp`` folders beside ``path`` whose process is gone (it was killed)."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix):].split(".")[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def refuse_overlap(out: Path, inputs: Iterable[Path | None], *, inside_ok: bool = False) -> None:
    """Refuse an output that is an input, holds one (``--force`` would delete it), or lies inside one.

    ``inside_ok``: an output inside an input is allowed (``sample`` writes RUN/samples by default).
    """
    out_r = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        in_r = Path(item).resolve()
        if out_r == in_r:
            raise BrainVAEError(f"{out}: the output is the input {item}; choose another output folder")
        if out_r in in_r.parents:
            raise BrainVAEError(f"{out}: the output folder holds the input {item} (replacing it would delete "
                                "the input); choose another output folder")
        if not inside_ok and in_r in out_r.parents:
            raise BrainVAEError(f"{out}: the output lies inside the input {item}; choose a folder outside it")
