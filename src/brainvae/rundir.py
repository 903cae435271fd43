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
    eval/, anomaly/, utility/  outputs of evaluate / anomaly / utility (each with its metrics.json and figures)
    samples*/, reconstructions*/, interpolation*/   outputs of sample / reconstruct / interpolate (grid.png)
    quiz*/                     a visual Turing test and its scored answers (*.score.json)

A shipped model (``src/brainvae/pretrained/NAME/``) has the same layout with only
``checkpoints/best.safetensors`` (EMA weights), ``config.toml``, ``provenance.json``,
``summary.json`` and a ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BrainVAEError, InputFileError

if TYPE_CHECKING:  # the CLI imports this module at start: pandas and torch only when used
    from .data.store import SliceStore

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
    def metrics_log(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def stage_cache(self) -> Path:
        """Costly data of a training stage kept for ``--resume`` (``BrainModel.stage_data``), removed at the end."""
        return self.path / "stage_cache"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        """Where training saves its latest weights (a run resumes from it); it may not exist yet."""
        return self.checkpoints / "last.safetensors"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def anomaly_dir(self) -> Path:
        return self.path / "anomaly"

    @property
    def utility_dir(self) -> Path:
        return self.path / "utility"

    @property
    def grid_dirs(self) -> list[Path]:
        """Folders written by sample / reconstruct / interpolate that hold a grid.png, in that order."""
        return [d for pattern in ("samples*", "reconstructions*", "interpolation*")
                for d in sorted(self.path.glob(pattern)) if (d / "grid.png").is_file()]

    @property
    def quiz_scores(self) -> list[Path]:
        """Scored answers of quizzes made from this run (``quiz*/*.score.json``)."""
        return sorted(self.path.glob("quiz*/*.score.json"))

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
        return _read_json(self.provenance_file)

    def summary(self) -> dict:
        """The run's summary.json ({} when there is none)."""
        return _read_json(self.summary_file)

    def trained_on(self, store: SliceStore) -> bool:
        """Whether ``store`` is the store this run trained on: the same fingerprint (runs of older versions,
        which did not record it: the same path; runs that recorded neither: assumed)."""
        prov = self.provenance()
        if "store_fingerprint" in prov:
            return prov["store_fingerprint"] == store.fingerprint()
        return Path(prov.get("store", store.path)).resolve() == store.path.resolve()

    def check_size(self, store: SliceStore, *, resize: bool = False) -> None:
        """Refuse a store whose slices differ in size from those the run trained on, unless ``resize``
        (``--resize``): its slices are then resampled to the model's input size."""
        from .train.checkpoint import read_metadata

        size = store.images.shape[-1]
        trained = self.provenance().get("store_config", {}).get("size") or \
            read_metadata(self.checkpoint())["brainvae_model"]["image_size"]
        if size != trained and not resize:
            raise BrainVAEError(f"{store.path}: its slices are {size} x {size} px, but {self.name} was trained on "
                                f"{trained} x {trained} px slices; prepare the store with --size {trained}, or pass "
                                f"--resize to resample its slices to the model's size")

    def age_warning(self, age: float | None) -> str | None:
        """A warning when ``age`` lies outside the ages of the subjects the model was trained on
        (``train_ages`` in its summary.json), else None: beyond them a conditional model extrapolates."""
        ages = self.summary().get("train_ages")
        if age is None or not ages or ages[0] <= age <= ages[1]:
            return None
        return (f"age {age:g} is outside the ages of {self.name}'s training subjects "
                f"({ages[0]:.0f}-{ages[1]:.0f} years): its samples there are extrapolation and can be implausible")

    def other_store_warning(self, store: SliceStore, split: str) -> str | None:
        """None for the store the run trained on; else a warning, and an error when volumes of the store's
        ``split`` were in the run's training split (same source checksum), so it cannot measure the run."""
        from .data.store import SliceStore

        if self.trained_on(store):
            return None
        prov = self.provenance()
        trained = Path(prov.get("store", ""))
        warning = (f"{store.path} is not the store {self.name} was trained on ({prov.get('store', 'not recorded')}): "
                   f"its {split} slices are measured against its own train split, not the run's training data")
        if not (trained / "manifest.csv").is_file():
            return warning + "; that store is not found, so whether they share subjects was not checked"
        old = SliceStore(trained).manifest
        seen = set(old.loc[old["split"] == "train", "checksum"])
        m = store.manifest[store.manifest["split"] == split]
        shared = sorted(set(m.loc[m["checksum"].isin(seen), "subject"]))
        if shared:
            raise BrainVAEError(f"{store.path}: {len(shared)} of its {split} subjects ({', '.join(shared[:5])}"
                                f"{', ...' if len(shared) > 5 else ''}) are volumes {self.name} trained on (the same "
                                f"source files as in {trained}'s train split); evaluate on {trained}, or on a store "
                                f"of other subjects")
        return warning


def _read_json(path: Path) -> dict:
    """A run folder's JSON record ({} when missing); invalid JSON is an InputFileError naming the file."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise InputFileError(path, "not valid JSON") from None
