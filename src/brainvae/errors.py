"""User-facing errors.

Anything a user can cause (a bad file, a missing column, an existing output)
raises a ``BrainVAEError``; the CLI prints its message and exits non-zero
without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path


class BrainVAEError(Exception):
    """An error caused by the user's input or environment, with a clear message."""


class InputFileError(BrainVAEError):
    """A specific input file is unreadable or invalid; the message names it."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable, so errors travel back from worker processes
        return (type(self), (self.path, self.problem))


class OutputExistsError(BrainVAEError):
    """An output already exists and ``--force`` was not given."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"{self.path} already exists; pass --force to replace it")

    def __reduce__(self):
        return (type(self), (self.path,))
