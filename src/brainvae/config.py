"""Frozen, validated configuration dataclasses and their TOML round trip.

Every prepared dataset and every run saves its resolved config as TOML beside
its outputs; ``load_config`` rebuilds the exact dataclass, rejecting unknown
keys so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TypeVar

import tomli_w

from .errors import BrainVAEError

T = TypeVar("T")

AXES = ("axial", "coronal", "sagittal")
NORMALISATIONS = ("percentile", "zscore")


@dataclass(frozen=True)
class PrepareConfig:
    """How 3-D volumes become a 2-D slice store (``brainvae data prepare``)."""

    modality: str = "T1"
    axis: str = "axial"
    size: int = 128  # output slices are size x size pixels
    # In-plane and through-plane spacing in mm; None -> fov_mm / size.
    spacing: float | None = None
    fov_mm: float = 192.0
    # Slice selection (all conditions must hold):
    #   position_range: fraction of the brain's extent along the axis, 0 = inferior/posterior/left end
    #   index_range: slice indices in the output grid (None = all)
    #   min_brain: minimum fraction of the slice covered by brain
    position_range: tuple[float, float] = (0.0, 1.0)
    index_range: tuple[int, int] | None = None
    min_brain: float = 0.05
    skull_strip: bool = True  # apply brain masks when they are given
    # N4 bias-field correction (SimpleITK). On by default: on the shared IXI T1 it lifts the
    # top-to-mid-brain ratio of the 90th intensity percentile from 0.63 to 0.78
    # (benchmarks/results/prepare.json).
    n4: bool = True
    register: bool = False  # affine registration to the MNI152 template
    # Smooth each volume (Gaussian) to this effective resolution in mm (FWHM) before
    # resampling, so that scans of different resolutions look alike (e.g. 1 mm BraTS
    # scored by a model of 2 mm IXI: --resolution-mm 2). None = no smoothing.
    resolution_mm: float | None = None
    normalisation: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)
    # Subject-level split, stratified by sex and age band.
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    age_bands: tuple[float, ...] = (40.0, 60.0)
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.axis in AXES, f"axis must be one of {AXES}, got {self.axis!r}")
        check(8 <= self.size <= 1024, f"size must be in [8, 1024], got {self.size}")
        check(self.spacing is None or self.spacing > 0, "spacing must be positive")
        check(self.fov_mm > 0, "fov_mm must be positive")
        check(self.resolution_mm is None or self.resolution_mm > 0, "resolution_mm must be positive")
        lo, hi = self.position_range
        check(0.0 <= lo < hi <= 1.0, f"position_range must satisfy 0 <= lo < hi <= 1, got {self.position_range}")
        if self.index_range is not None:
            check(0 <= self.index_range[0] < self.index_range[1], f"bad index_range {self.index_range}")
        check(0.0 <= self.min_brain < 1.0, "min_brain must be in [0, 1)")
        check(self.normalisation in NORMALISATIONS, f"normalisation must be one of {NORMALISATIONS}")
        plo, phi = self.percentiles
        check(0.0 <= plo < phi <= 100.0, f"bad percentiles {self.percentiles}")
        check(len(self.split_ratios) == 3 and all(r >= 0 for r in self.split_ratios)
              and abs(sum(self.split_ratios) - 1.0) < 1e-6, "split_ratios must be 3 non-negative numbers summing to 1")
        check(list(self.age_bands) == sorted(self.age_bands), "age_bands must be increasing")

    @property
    def voxel_mm(self) -> float:
        return self.spacing if self.spacing is not None else self.fov_mm / self.size



PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (``brainvae train``)."""

    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100  # linear learning-rate warm-up
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    ema_decay: float = 0.999  # exponential moving average of weights (0 = off)
    kl_warmup_steps: int = 500  # KL weight ramps 0 -> 1 over these steps
    epochs: int = 30
    steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    budget: str | None = None  # wall-clock budget such as "20m", "90s", "1.5h"
    patience: int = 8  # early stopping after this many epochs without validation improvement (0 = off)
    val_batches: int = 20  # validation batches per epoch (0 = whole split)
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512-BF16/AMX), else fp32 (fp16 on old GPUs)
    compile: bool = False  # torch.compile the model
    log_every: int = 25  # steps between logged training scalars
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.batch_size > 0 and self.lr > 0, "batch_size and lr must be positive")
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}")
        check(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        check(self.steps is None or self.steps > 0, "steps must be positive")
        check(self.patience >= 0, "patience must be >= 0 (0 = no early stopping)")
        if self.budget is not None:
            parse_duration(self.budget)

    @property
    def budget_seconds(self) -> float | None:
        return None if self.budget is None else parse_duration(self.budget)



@dataclass(frozen=True)
class RunConfig:
    """One TOML file per experiment: ``[model]`` (``arch`` + that architecture's fields),
    ``[train]`` (TrainConfig) and an optional ``[tune]`` search space for ``brainvae tune``."""

    model: dict = field(default_factory=lambda: {"arch": "vae"})
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: dict = field(default_factory=dict)
    # Two-stage models: ``[stages.NAME]`` overrides [train] for one stage, and ``share`` (0..1) is that stage's
    # part of the run's steps, epochs and budget (default: the stages after the first get 0.5 between them).
    stages: dict = field(default_factory=dict)
    # Start from another model's weights: ``[init] from`` = a run folder, checkpoint file or shipped model of the
    # same architecture and config (its EMA weights are loaded before training); ``start`` = the stage to begin
    # at, the earlier ones taken as they are from ``from`` (e.g. train only an ldm's prior on a finished autoencoder).
    init: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check("arch" in self.model, "[model] needs an 'arch' key")
        self.model_config()  # validates the architecture and its fields
        names = self.stage_names()
        self.stage_plan()  # validates [stages]
        unknown = sorted(set(self.init) - {"from", "start"})
        check(not unknown, f"[init] takes 'from' and 'start', not {unknown}")
        start = self.init.get("start", names[0])
        check(start in names, f"[init] start = {start!r} is not a stage of this {self.arch} run (its stages: "
              f"{list(names)})")
        check(start == names[0] or self.init.get("from"),
              f"[init] start = {start!r} skips earlier stages: give [init] from, the model they come from")

    @property
    def arch(self) -> str:
        return self.model["arch"]

    def model_config(self):
        """The validated config dataclass of the [model] section (its architecture's registered class)."""
        config_cls = architecture(self.arch)[0]
        return from_dict(config_cls, {k: v for k, v in self.model.items() if k != "arch"}, "[model]")

    def stage_names(self) -> tuple[str, ...]:
        """The stages this run trains, in order: the architecture's, less optional ones without ``[stages.NAME]``."""
        _, names, optional = architecture(self.arch)
        unknown = sorted(set(self.stages) - set(names))
        check(not unknown, f"[stages] names {unknown} are not stages of {self.arch} (its stages: {list(names)})")
        return tuple(n for n in names if n not in optional or n in self.stages)

    def stage_plan(self) -> list[tuple[str, TrainConfig]]:
        """(stage name, its TrainConfig) in training order: [train] with the stage's overrides, and the run's
        steps / epochs / budget split by the stages' shares."""
        names = self.stage_names()
        if len(names) == 1:
            return [(names[0], self._stage_train(names[0], 1.0))]
        later = {n: self.stages.get(n, {}).get("share", 0.5 / (len(names) - 1)) for n in names[1:]}
        check("share" not in self.stages.get(names[0], {}),
              f"the first stage ({names[0]}) takes what the others leave: give later stages a share")
        shares = {names[0]: 1.0 - sum(later.values()), **later}
        check(all(0 < v < 1 for v in shares.values()), f"stage shares must be in (0, 1) and leave the first "
              f"stage a part; got {shares}")
        return [(n, self._stage_train(n, shares[n])) for n in names]

    def start_stage(self) -> int:
        """Index in ``stage_plan()`` of the stage training begins at (``[init] start``; 0 by default)."""
        names = self.stage_names()
        return names.index(self.init.get("start", names[0]))

    def _stage_train(self, name: str, share: float) -> TrainConfig:
        base, over = self.train, {k: v for k, v in self.stages.get(name, {}).items() if k != "share"}
        split = {}
        if base.steps is not None and "steps" not in over:
            split["steps"] = max(1, round(base.steps * share))
        if base.budget is not None and "budget" not in over:
            split["budget"] = f"{base.budget_seconds * share:.3f}s"
        if "epochs" not in over:
            split["epochs"] = max(1, round(base.epochs * share))
        return from_dict(TrainConfig, {**to_dict(base), **split, **over}, f"[stages.{name}]")


def parse_duration(text: str) -> float:
    """"20m" -> 1200.0; accepts s, m, h suffixes (or plain seconds)."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = str(text).strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise BrainVAEError(f"invalid duration {text!r}; use e.g. 90s, 20m, 1.5h") from None


def check(ok: bool, message: str) -> None:
    """Validation helper of every config's ``__post_init__``: BrainVAEError "invalid config: MESSAGE" unless ok."""
    if not ok:
        raise BrainVAEError(f"invalid config: {message}")


# Architectures: RunConfig validates its [model] section with the classes ``brainvae.models.registry``
# registers here when it is imported (brainvae/__init__.py imports it), so this module imports no model.
# arch -> (its config class, its training stages, the optional ones among them)
ArchitectureLookup = Callable[[str], tuple[type, tuple[str, ...], tuple[str, ...]]]
_architecture_lookup: ArchitectureLookup | None = None


def set_architecture_lookup(lookup: ArchitectureLookup) -> None:
    global _architecture_lookup
    _architecture_lookup = lookup


def architecture(arch: str) -> tuple[type, tuple[str, ...], tuple[str, ...]]:
    """(config class, training stages, optional stages) of a registered architecture; unknown names are a BrainVAEError."""
    if _architecture_lookup is None:
        raise RuntimeError("no architecture registry: import brainvae.models.registry first")
    return _architecture_lookup(arch)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A TOML-serialisable dict (None values dropped: TOML has no null)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = {k: list(x) if isinstance(x, tuple) else x for k, x in v.items() if x is not None}
        if v is not None:
            out[f.name] = v
    return out


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a dict, converting lists to tuples and refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BrainVAEError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{source}[{key}]")
        elif isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        if not _fits(value, hint):
            raise BrainVAEError(f"{source}: {key} = {value!r} is {type(value).__name__}, expected "
                                f"{_type_name(hint)}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong types reach the constructor
        raise BrainVAEError(f"{source}: {exc}") from exc
    except BrainVAEError as exc:  # a failed validation: name the file (nested tables already name it)
        if source in str(exc):
            raise
        raise BrainVAEError(f"{source}: {exc}") from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from TOML or code) has the type ``hint`` asks for: a bool is not a number
    (``lr = true`` must not train at 1.0), an int is a float, a float is not an int."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if origin is not None:  # dict[str, X], list[X]...: the container's type only
        return isinstance(value, origin)
    return hint in (Any, object) or not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and typing.get_origin(hint) is None else str(hint)


def _is_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(hint))
    return False


def save_config(cfg: Any, path: Path) -> None:
    """Write ``cfg`` as TOML atomically."""
    from .io.atomic import atomic_write_bytes

    atomic_write_bytes(path, tomli_w.dumps(to_dict(cfg)).encode())


def load_config(cls: type[T], path: Path) -> T:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BrainVAEError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise BrainVAEError(f"{path}: not valid TOML ({exc})") from None
    return from_dict(cls, data, str(path))


def shipped_configs() -> dict[str, Path]:
    """Name -> file of the run configs shipped inside the package (``brainvae/configs/NAME.toml``)."""
    folder = resources.files("brainvae") / "configs"  # a real folder for any pip-installed package
    return {f.name.removesuffix(".toml"): Path(str(f))
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".toml")}


def config_description(path: Path) -> str:
    """The first comment line of a config TOML (its one-line summary), or ''."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            return ""
    return ""


def resolve_run_config(name_or_path: str | Path) -> Path:
    """An existing TOML path as given, else the shipped config of that name (``vae``, ``ldm``...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = str(name_or_path).removesuffix(".toml")
    if name in shipped:
        return shipped[name]
    raise BrainVAEError(f"{name_or_path}: no such config file, and not a shipped config name "
                        f"(shipped: {', '.join(shipped)}; `brainvae configs` describes them)")


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:+-]*|[0-9.]+[smh]")  # unquoted strings --set accepts


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.beta=0.5"`` -> (["model", "beta"], 0.5). The value is read as a TOML value
    (``[32, 64]``, ``true``, ``"x"``, ``3e-4``); a bare word (``heun``, ``cuda:0``) or a duration (``20m``)
    is also read as a string."""
    key, sep, raw = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise BrainVAEError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. model.beta=0.5")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if not _BARE.fullmatch(raw):
            raise BrainVAEError(f"--set {text!r}: {raw!r} is not a TOML value (e.g. 0.5, true, [32, 64], \"text\")") from None
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of a raw TOML dict with each ``KEY=VALUE`` set (missing tables are created; unknown keys are
    left for ``from_dict`` to refuse, which names them)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        table = data
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise BrainVAEError(f"--set {text!r}: {'.'.join(parts[:i + 1])} is a value, not a table")
        old = table.get(parts[-1])
        if isinstance(old, (int, float)) and not isinstance(old, bool) and not isinstance(value, (int, float)):
            raise BrainVAEError(f"--set {text!r}: {'.'.join(parts)} must be a number (the config has {old!r})")
        table[parts[-1]] = value
    return data


def load_run_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from a shipped config name or a TOML path, with ``--set KEY=VALUE`` overrides applied."""
    path = resolve_run_config(name_or_path)
    if not overrides:
        return load_config(RunConfig, path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BrainVAEError(f"{path}: not valid TOML ({exc})") from None
    data, source = apply_overrides(data, overrides), f"{name_or_path} with --set {' '.join(overrides)}"
    try:
        return from_dict(RunConfig, data, source)
    except BrainVAEError as exc:  # errors of nested tables name only the table ([model]): add the overrides
        raise BrainVAEError(str(exc) if source in str(exc) else f"{source}: {exc}") from None


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that ignores None (unset CLI options)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


__all__ = ["PrepareConfig", "TrainConfig", "RunConfig", "load_config", "save_config", "to_dict", "from_dict", "replace", "field",
           "check", "set_architecture_lookup", "architecture", "shipped_configs", "config_description",
           "resolve_run_config", "apply_overrides", "load_run_config"]
