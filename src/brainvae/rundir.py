"""The one place that knows a run folder's layout, and the pretrained models shipped in the package.

    run = RunDir.resolve("runs/cvae")     # a run folder, a checkpoint file, or a shipped name ("ixi-t1-128")
    run.checkpoint("best")                # RUN/checkpoints/best.safetensors
    run.output("eval")                    # RUN/eval (refused for a shipped model: it is read-only)

Layout (written by ``brainvae train``)::

    config.toml               resolved RunConfig (model + train [+ stages])
    provenance.json           versions, hardware, the store and its prepare config
    summary.json              final numbers (steps, seconds, img/s, best validation loss)
    metrics.jsonl, tb/        training curves
    checkpoints/{best,last}.safetensors (+ .state.pt: optimiser, counters, RNG)
    eval/, anomaly/, utility/, samples/, reconstructions/, interpolation/   outputs of later commands

A shipped model (``src/brainvae/pretrained/NAME/``) has the same layout with only
``checkpoints/best.safetensors`` (EMA weights), ``config.toml``, ``provenance.json``,
``summary.json`` and a ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import BrainVAEError

CHECKPOINTS = "checkpoints"


def pretrained_root() -> Path:
    return Path(str(resources.files("brainvae") / "pretrained"))


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every pretrained model shipped in the package."""
    root = pretrained_root()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CHECKPOINTS / "best.safetensors").exists()}


@dataclass(frozen=True)
class RunDir:
    path: Path
    shipped: bool = False  # a pretrained model inside the package: read-only
    file: Path | None = None  # set when the user named a checkpoint file rather than a folder

    @classmethod
    def resolve(cls, name_or_path: str | Path) -> "RunDir":
        """A run folder, a checkpoint file inside one, or the name of a shipped model."""
        path = Path(name_or_path)
        if path.is_file():
            folder = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
            return cls(folder, file=path)
        if path.is_dir():
            return cls(path)
        shipped = shipped_models()
        if str(name_or_path) in shipped:
            return cls(shipped[str(name_or_path)], shipped=True)
        hint = f"; shipped models: {', '.join(shipped)}" if shipped else ""
        raise BrainVAEError(f"{name_or_path}: no such run folder, checkpoint file or shipped model{hint}")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def provenance_file(self) -> Path:
        return self.path / "provenance.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, which: str = "best") -> Path:
        """The weights file (``which`` = best or last; a checkpoint the user named wins)."""
        if self.file is not None:
            return self.file
        path = self.checkpoints / f"{which}.safetensors"
        if not path.exists():
            raise BrainVAEError(f"{self.path}: no {which} checkpoint (is this a brainvae run folder?)")
        return path

    def output(self, kind: str) -> Path:
        """The default folder of a later command's output (eval, anomaly, samples, ...)."""
        if self.shipped:
            raise BrainVAEError(f"{self.name} is a shipped model (read-only): give --out for its {kind}")
        return self.path / kind

    def provenance(self) -> dict:
        return json.loads(self.provenance_file.read_text()) if self.provenance_file.exists() else {}
