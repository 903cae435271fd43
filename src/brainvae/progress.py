"""Progress of long commands: a live bar on a terminal, plain periodic lines in a log.

Under a scheduler stderr is a file, where tqdm's carriage-return redraws pile up
into one line of many kilobytes. :func:`bar` then prints one whole line at most
every ``LOG_SECONDS`` (and one at the end). :func:`say` prints the start and
summary lines that ``--quiet`` keeps; inside :func:`log_to` (``--log-file``)
both are also appended to a file, progress lines included even under ``--quiet``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer
from tqdm import tqdm

from .errors import BrainVAEError

LOG_SECONDS = 30.0
_logs: list = []  # files opened by log_to


class _Lines:
    """A file for tqdm that writes each redraw as one whole line, without carriage returns."""

    def __init__(self, targets: list):
        self.targets = targets

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            for target in self.targets:
                target.write(line + "\n")
                target.flush()

    def flush(self) -> None:
        for target in self.targets:
            target.flush()


def bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``; ``disable`` hides it from the console (a log file still gets its lines).

    On a terminal (and without a log file): tqdm's live bar. Else plain lines, one per ``LOG_SECONDS``."""
    if sys.stderr.isatty() and not _logs:
        return tqdm(iterable, disable=disable, **kwargs)
    targets = ([] if disable else [sys.stderr]) + _logs
    # position 0: nested bars (a feature net trained inside evaluate) would otherwise move the cursor (ESC[A)
    kwargs.update(leave=True, ascii=True, mininterval=LOG_SECONDS, maxinterval=LOG_SECONDS, position=0)
    return tqdm(iterable, file=_Lines(targets), disable=not targets, **kwargs)


def say(text: str, *, err: bool = False, fg: str | None = None) -> None:
    """A line on the console (stdout, or stderr with ``err``; coloured ``fg`` on a terminal), and in the log
    file inside ``log_to`` (plain)."""
    if fg:
        typer.secho(text, err=err, fg=fg)
    else:
        typer.echo(text, err=err)
    for log in _logs:
        log.write(text + "\n")
        log.flush()


@contextlib.contextmanager
def log_to(path: Path | None, output: Path):
    """Append the lines of :func:`say` and :func:`bar` to ``path`` (nothing when None) while inside; ``path``
    may not lie inside the command's ``output`` folder, which is replaced as a whole."""
    if path is None:
        yield
        return
    path = Path(path)
    if Path(output).resolve() in path.resolve().parents:
        raise BrainVAEError(f"{path}: the log file may not lie inside the output folder {output}, which is "
                            "replaced as a whole; give a path outside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        _logs.append(log)
        try:
            yield
        finally:
            _logs.remove(log)
