"""Utility of synthetic data: does adding generated slices help a downstream classifier?

Two downstream tasks on single slices: **sex** (F / M) and **age band** (the
store's ``prepare.toml`` ``age_bands``, e.g. <40, 40-60, >=60). The same small
CNN (``classifier.SliceCNN``, one head per task) is trained, with the same
number of steps, on each arm:

* ``real``                 the real TRAINING slices;
* ``real+syn<r>``          real plus r x as many synthetic slices, for each ratio r;
* ``syn``                  as many synthetic slices as there are real ones, no real data

and tested on the real TEST subjects ("train on synthetic, test on real",
Esteban et al. 2017; data augmentation with synthetic images, Frid-Adar et al.
2018). Synthetic labels are the conditions the samples were asked for: (age,
sex, position) rows drawn from the training manifest, so synthetic labels follow
the real distribution. Scores are balanced accuracies with 95 % confidence
intervals from a cluster bootstrap over test SUBJECTS (slices of one subject are
not independent), and the paired difference to ``real`` on the same resamples.

    metrics = utility(model, store, UtilityConfig(steps=400))
    write_utility("runs/cvae", "datasets/ixi-t1-axial128")   # -> runs/cvae/utility/{metrics.json,utility.png}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..conditions import sex_classes
from ..data.resize import read_resized
from ..data.store import SliceStore
from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import atomic_dir
from ..rundir import RunDir
from .classifier import Head, TrainSettings, balanced_accuracy, predict, train_cnn
from .conditional import condition_rows, sample_rows
from .stats import bootstrap_ci

TASKS = ("sex", "age_band")


@dataclass(frozen=True)
class UtilityConfig:
    """The comparison's settings (all recorded in metrics.json)."""

    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # synthetic : real in the mixed arms
    steps: int = 400  # training steps of every arm (the fair, fixed budget)
    batch_size: int = 64
    image_size: int = 64
    width: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    repeats: int = 1  # classifier seeds seed, seed + 1, ... (the synthetic set is drawn once)
    seed: int = 0
    n_boot: int = 1000
    level: float = 0.95

    def __post_init__(self) -> None:
        if not self.ratios or any(not (r > 0 and math.isfinite(r)) for r in self.ratios):
            raise BrainVAEError(f"ratios must be positive numbers, got {self.ratios}")
        for name in ("steps", "batch_size", "repeats", "n_boot"):
            if getattr(self, name) < 1:
                raise BrainVAEError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.level < 1:
            raise BrainVAEError(f"level must be in (0, 1), got {self.level}")


def parse_ratios(text: str) -> tuple[float, ...]:
    """'0.5,1,2' -> (0.5, 1.0, 2.0)."""
    try:
        return tuple(float(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise BrainVAEError(f"--ratios must be comma-separated numbers like 0.5,1,2, got {text!r}") from None


# --- labels -----------------------------------------------------------------------------------------------------

def age_band_classes(age: np.ndarray, bands: tuple[float, ...]) -> np.ndarray:
    """Age (years) -> band index 0..len(bands) (band i: bands[i-1] <= age < bands[i]); NaN -> -1."""
    age = np.asarray(age, dtype=float)
    return np.where(np.isfinite(age), np.digitize(np.nan_to_num(age), bands), -1).astype(np.int64)


def age_band_names(bands: tuple[float, ...]) -> list[str]:
    """(40, 60) -> ['<40', '40-60', '>=60']."""
    if not bands:
        return ["all"]
    edges = [f"{b:g}" for b in bands]
    return [f"<{edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:])), f">={edges[-1]}"]


def task_labels(age: np.ndarray, sex: pd.Series, bands: tuple[float, ...]) -> dict[str, np.ndarray]:
    """{"sex": (N,) 0 = F / 1 = M, "age_band": (N,) band}; -1 = unknown."""
    return {"sex": sex_classes(sex), "age_band": age_band_classes(age, bands)}


# --- cluster bootstrap ------------------------------------------------------------------------------------------

def subject_bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, subjects: np.ndarray,
                         metric: Callable[[np.ndarray, np.ndarray], float] = balanced_accuracy, *,
                         n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Point estimate and percentile confidence interval, resampling SUBJECTS (not slices).

    y_true (N,); y_pred (N,) or (R, N) for R repeats (the metric is then the
    mean over repeats, on the same resample); subjects (N,). Returns
    {"value", "low", "high"}.
    """
    y_pred = np.atleast_2d(y_pred)  # (R, N)

    def stat(rows: np.ndarray) -> float:
        return float(np.mean([metric(y_true[rows], p[rows]) for p in y_pred]))

    return _subject_ci(stat, subjects, n_boot=n_boot, level=level, seed=seed)


def _subject_ci(stat: Callable[[np.ndarray], float], subjects: np.ndarray, *, n_boot: int, level: float,
                seed: int) -> dict:
    """{"value": stat over every row, "low", "high": its subject-bootstrap interval (``stats.bootstrap_ci``)}."""
    low, high = bootstrap_ci(stat, subjects, n_boot=n_boot, level=level, seed=seed)
    return {"value": stat(np.arange(len(subjects))), "low": low, "high": high}


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


# --- the comparison ---------------------------------------------------------------------------------------------

def _check_model(model) -> None:
    conds = tuple(model.config.conditions)
    if not {"age", "sex"} <= set(conds):
        raise BrainVAEError(f"utility needs a model conditioned on age and sex (to label its samples); "
                            f"this {model.arch} model is conditioned on {list(conds) or 'nothing'} "
                            f"-- train a conditional architecture such as cvae")


def arms_of(cfg: UtilityConfig, n_real: int) -> dict[str, tuple[int, int]]:
    """{arm: (real slices, synthetic slices)} in display order."""
    arms = {"real": (n_real, 0)}
    for r in cfg.ratios:
        arms[f"real+syn{r:g}"] = (n_real, int(round(r * n_real)))
    arms["syn"] = (0, n_real)
    return arms


def utility(model, store: SliceStore | str | Path, cfg: UtilityConfig = UtilityConfig(), *,
            progress: bool = True) -> dict:
    """Train the classifier on every arm (x repeats) and score it on the real test subjects.

    Returns a JSON-able dict::

        {"config": {ratios, steps, batch_size, image_size, width, lr, repeats, seeds, n_boot, level,
                    n_real_train, n_synthetic, selection},
         "tasks": {task: {"classes": [...], "chance": 1/k, "n_test_slices", "n_test_subjects"}},
         "arms": {arm: {"n_real", "n_synthetic",
                        task: {"balanced_accuracy", "ci_low", "ci_high", "per_seed": [...],
                               "delta_vs_real", "delta_ci_low", "delta_ci_high"}}}}
    """
    _check_model(model)
    store = store if isinstance(store, SliceStore) else SliceStore(store)
    m, bands = store.manifest, tuple(store.config.age_bands)
    train_rows, test_rows = store.indices("train"), store.indices("test")
    if len(train_rows) == 0 or len(test_rows) == 0:
        raise BrainVAEError(f"{store.path}: utility needs train and test subjects "
                            f"(has {len(train_rows)} train and {len(test_rows)} test slices)")
    S = cfg.image_size
    x_real = read_resized(store.images, train_rows, S)  # (n_real, S, S)
    y_real = task_labels(m["age"].to_numpy()[train_rows], m["sex"].iloc[train_rows], bands)
    x_test = read_resized(store.images, test_rows, S)
    y_test = task_labels(m["age"].to_numpy()[test_rows], m["sex"].iloc[test_rows], bands)
    subjects = m["subject"].to_numpy()[test_rows]
    for t in TASKS:
        if not (y_test[t] >= 0).any():
            raise BrainVAEError(f"{store.path}: no test slice has a known {'sex' if t == 'sex' else 'age'}; "
                                "utility scores sex and age-band classifiers on the test split")

    n_real = len(train_rows)
    arms = arms_of(cfg, n_real)
    n_pool = max(n for _, n in arms.values())
    rows = condition_rows(m, train_rows, tuple(model.config.conditions), n_pool, cfg.seed)
    x_syn = sample_rows(model, rows, cfg.seed, size=S, progress=progress, desc="synthetic slices")  # (n_pool, S, S)
    y_syn = task_labels(rows["age"].to_numpy(), rows["sex"], bands)

    heads = (Head("sex", 2), Head("age_band", len(bands) + 1))
    seeds = [cfg.seed + r for r in range(cfg.repeats)]
    preds: dict[str, dict[str, list[np.ndarray]]] = {arm: {t: [] for t in TASKS} for arm in arms}
    for seed in seeds:
        settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, seed=seed)
        for arm, (nr, ns) in arms.items():
            x = np.concatenate([x_real[:nr], x_syn[:ns]])
            y = {t: np.concatenate([y_real[t][:nr], y_syn[t][:ns]]) for t in TASKS}
            net, _ = train_cnn(x, y, heads, settings, width=cfg.width, progress=progress, desc=f"{arm} (seed {seed})")
            out = predict(net, x_test)
            for t in TASKS:
                preds[arm][t].append(out[t].argmax(1))

    result_arms: dict[str, dict] = {}
    for arm, (nr, ns) in arms.items():
        result_arms[arm] = {"n_real": nr, "n_synthetic": ns}
        for t in TASKS:
            keep = y_test[t] >= 0
            truth, subj = y_test[t][keep], subjects[keep]
            p = np.stack(preds[arm][t])[:, keep]  # (R, n)
            ref = np.stack(preds["real"][t])[:, keep]
            ci = subject_bootstrap_ci(truth, p, subj, n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)
            diff = _paired_delta(truth, p, ref, subj, cfg)  # same resamples as ``ci``: paired
            result_arms[arm][t] = _rounded({
                "balanced_accuracy": ci["value"], "ci_low": ci["low"], "ci_high": ci["high"],
                "delta_vs_real": diff["value"], "delta_ci_low": diff["low"], "delta_ci_high": diff["high"],
            }) | {"per_seed": [round(balanced_accuracy(truth, q), 4) for q in p]}
    classes = {"sex": ["F", "M"], "age_band": age_band_names(bands)}
    tasks = {t: {"classes": classes[t], "chance": round(1 / len(classes[t]), 4),
                 "n_test_slices": int((y_test[t] >= 0).sum()),
                 "n_test_subjects": int(len(np.unique(subjects[y_test[t] >= 0])))} for t in TASKS}
    config = {**asdict(cfg), "ratios": list(cfg.ratios), "seeds": seeds, "n_real_train": int(n_real),
              "n_synthetic": int(n_pool), "age_bands": list(bands), "conditions": list(model.config.conditions),
              "selection": "final weights (no early stopping)"}
    return {"config": config, "tasks": tasks, "arms": result_arms}


def _paired_delta(truth: np.ndarray, pred: np.ndarray, ref: np.ndarray, subjects: np.ndarray,
                  cfg: UtilityConfig) -> dict:
    """Balanced accuracy of ``pred`` minus that of ``ref`` (both (R, n)), on the same subject resamples."""

    def stat(rows: np.ndarray) -> float:
        return float(np.mean([balanced_accuracy(truth[rows], p[rows]) - balanced_accuracy(truth[rows], q[rows])
                              for p, q in zip(pred, ref)]))

    return _subject_ci(stat, subjects, n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)


# --- outputs ----------------------------------------------------------------------------------------------------

def utility_figure(metrics: dict):
    """Balanced accuracy per arm with CI bars, one panel per task, chance dashed."""
    from matplotlib.figure import Figure

    arms = list(metrics["arms"])
    colours = ["0.45" if a == "real" else "tab:orange" if a == "syn" else "tab:blue" for a in arms]
    fig = Figure(figsize=(4.2 * len(TASKS), 3.4), layout="constrained")
    for ax, t in zip(fig.subplots(1, len(TASKS), squeeze=False)[0], TASKS):
        v = np.array([metrics["arms"][a][t]["balanced_accuracy"] for a in arms], dtype=float)
        lo = np.array([metrics["arms"][a][t]["ci_low"] for a in arms], dtype=float)
        hi = np.array([metrics["arms"][a][t]["ci_high"] for a in arms], dtype=float)
        x = np.arange(len(arms))
        ax.bar(x, v, color=colours, yerr=np.vstack([v - lo, hi - v]).clip(0), capsize=4)
        ax.axhline(metrics["tasks"][t]["chance"], color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(x, arms, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("balanced accuracy (real test)")
        title = {"sex": "sex", "age_band": "age band " + " / ".join(metrics["tasks"][t]["classes"])}[t]
        ax.set_title(title, fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    level = int(round(100 * metrics["config"]["level"]))
    fig.suptitle(f"Synthetic-data utility ({metrics['config']['steps']} steps per arm, "
                 f"{level} % subject-bootstrap CI)", fontsize=10)
    return fig


def format_table(metrics: dict) -> str:
    """A small text table: one row per arm, balanced accuracy [CI] per task."""
    head = f"{'arm':<14}" + "".join(f"{t + ' bal. acc. [CI]':>30}" for t in TASKS)
    lines = [head]
    for arm, row in metrics["arms"].items():
        cells = "".join(f"{row[t]['balanced_accuracy']:>14.3f} [{row[t]['ci_low']:.3f}, {row[t]['ci_high']:.3f}]"
                        for t in TASKS)
        lines.append(f"{arm:<14}{cells}")
    return "\n".join(lines)


def write_utility(run: str | Path, store: str | Path, out: str | Path | None = None,
                  cfg: UtilityConfig = UtilityConfig(), *, device: str = "auto", force: bool = False,
                  progress: bool = True) -> tuple[Path, dict]:
    """Run ``utility`` for a run folder; write ``out`` (default RUN/utility)/metrics.json and utility.png atomically."""
    from ..generate import checkpoint_path, load
    from ..provenance import provenance
    from ..train.engine import resolve_device

    run = Path(run)
    out = Path(out) if out is not None else RunDir.resolve(run).output("utility")
    if out.exists() and not force:  # refuse before minutes of work, not after
        raise OutputExistsError(out)
    store = SliceStore(store)
    model = load(run, device=resolve_device(device))
    metrics = utility(model, store, cfg, progress=progress)
    metrics = {"provenance": provenance(run=str(run), checkpoint=str(checkpoint_path(run)), store=str(store.path),
                                        seed=cfg.seed), **metrics}
    fig = utility_figure(metrics)
    with atomic_dir(out, force=force) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        fig.savefig(tmp / "utility.png", dpi=120)
    return out, metrics
