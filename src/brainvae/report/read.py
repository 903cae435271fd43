"""What the report reads: a run folder (through :class:`~brainvae.rundir.RunDir`) and the store it trained on.

Nothing is recomputed and nothing here raises for a damaged file: unreadable
files are listed in ``problems`` and rendered as absent.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import BrainVAEError
from ..rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Output folders of later commands: (key, title in the report, the command that writes it).
PARTS = (
    ("eval", "Evaluation", "brainvae evaluate"),
    ("anomaly", "Anomaly detection", "brainvae anomaly"),
    ("utility", "Downstream utility", "brainvae utility"),
)
SPLITS = ("train", "val", "test")


def read_json(path: Path, problems: list[str]):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable JSON ({exc})")
        return None


def read_toml(path: Path, problems: list[str]) -> dict | None:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"{path}: unreadable TOML ({exc})")
        return None


def read_png(path: Path, problems: list[str]) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: unreadable ({exc})")
        return None
    if not data.startswith(PNG_MAGIC):
        problems.append(f"{path}: not a PNG file; not shown")
        return None
    return data


def read_metrics_log(path: Path, problems: list[str]) -> pd.DataFrame:
    """``metrics.jsonl`` as one row per record (train and validation records interleaved)."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1  # e.g. the last line of an interrupted run
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            bad += 1
    if bad:
        problems.append(f"{path}: {bad} line(s) could not be read and were skipped")
    return pd.DataFrame(records)


@dataclass
class Grid:
    """A ``grid.png`` of ``brainvae sample`` / ``reconstruct`` / ``interpolate`` and its ``meta.json``."""

    name: str  # the folder's name, e.g. samples-age30-F
    png: bytes
    meta: dict


@dataclass
class Run:
    """What one run folder holds (``None`` where a file is absent)."""

    dir: RunDir
    config: dict | None = None
    summary: dict | None = None
    log: pd.DataFrame | None = None
    provenance: dict | None = None
    parts: dict[str, dict | None] = field(default_factory=dict)  # eval/anomaly/utility -> metrics.json
    images: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)  # part -> [(file stem, png)]
    grids: list[Grid] = field(default_factory=list)
    quiz: list[tuple[str, dict]] = field(default_factory=list)  # (file relative to the run, score JSON)
    problems: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def axis(self) -> str | None:
        """The store's slicing axis (axial, coronal, sagittal) as recorded in provenance.json."""
        return ((self.provenance or {}).get("store_config") or {}).get("axis")


def read_run(name_or_path: str | Path) -> Run:
    """Read everything a run folder (or a shipped model) holds; missing files stay ``None``."""
    rd = RunDir.resolve(name_or_path)
    run = Run(rd)
    p = run.problems
    if rd.config_file.exists():
        run.config = read_toml(rd.config_file, p)
    if rd.summary_file.exists():
        run.summary = read_json(rd.summary_file, p)
    if rd.metrics_log.exists():
        run.log = read_metrics_log(rd.metrics_log, p)
    if rd.provenance_file.exists():
        run.provenance = read_json(rd.provenance_file, p)
    for key, folder in (("eval", rd.eval_dir), ("anomaly", rd.anomaly_dir), ("utility", rd.utility_dir)):
        if folder.is_dir():
            metrics = folder / "metrics.json"  # the command's own output layout
            run.parts[key] = read_json(metrics, p) if metrics.exists() else None
            run.images[key] = [(f.stem, data) for f in sorted(folder.glob("*.png")) if (data := read_png(f, p))]
    for folder in rd.grid_dirs:
        if (data := read_png(folder / "grid.png", p)) is not None:
            meta = read_json(folder / "meta.json", p) if (folder / "meta.json").exists() else None
            run.grids.append(Grid(folder.name, data, meta if isinstance(meta, dict) else {}))
    for f in rd.quiz_scores:
        if (score := read_json(f, p)) is not None:
            run.quiz.append((str(f.relative_to(rd.path)), score))
    if run.config is None and run.summary is None and run.log is None and not run.parts:
        raise BrainVAEError(f"{rd.path}: not a brainvae run folder (no config.toml, summary.json, "
                            "metrics.jsonl or eval/)")
    return run


# ----------------------------------------------------------------------------- the store


@dataclass
class Store:
    """The manifest and preparation settings of a slice store (``None`` where unreadable)."""

    path: Path
    manifest: pd.DataFrame | None
    prepare: dict | None
    problems: list[str]

    @property
    def simulated(self) -> bool:
        """Phantoms of ``brainvae data simulate`` (hospital ``SIM``), not scans of real people."""
        m = self.manifest
        return m is not None and "hospital" in m and bool((m["hospital"] == "SIM").any())

    def subjects(self, split: str | None = None) -> int:
        """Number of distinct subjects (of one split)."""
        m = self.manifest
        if m is None or (split is not None and "split" not in m):
            return 0
        return int((m if split is None else m[m["split"] == split])["subject"].nunique())


def resolve_store(store: str, run: Path) -> Path | None:
    """The store a run's provenance names: as given (relative to the working folder), else beside the run."""
    p = Path(store)
    candidates = [p] if p.is_absolute() else [p, run / p, run.parent / p, run.parent.parent / p]
    return next((c for c in candidates if (c / "manifest.csv").exists()), None)


def read_store(path: Path) -> Store:
    problems: list[str] = []
    try:
        manifest = pd.read_csv(path / "manifest.csv", dtype={"subject": str})
    except (OSError, ValueError) as exc:
        manifest = None
        problems.append(f"{path / 'manifest.csv'}: unreadable ({exc})")
    prepare = read_toml(path / "prepare.toml", problems) if (path / "prepare.toml").exists() else None
    return Store(path, manifest, prepare, problems)
