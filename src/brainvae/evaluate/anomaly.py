"""Anomaly detection and localisation: ``brainvae anomaly RUN --data TEST_STORE``.

A model trained on healthy brains scores every pixel of a store with lesion
masks (real, e.g. BraTS, or synthetic from ``brainvae data anomalies``); each
score is post-processed and measured the same way, beside two baselines scored
in the same run:

* the brightness baseline (intensity for hyperintense, 1 - intensity inside the
  brain for hypointense lesions): a detector that any model must beat (Meissen
  et al. 2021, "Challenging current semi-supervised anomaly segmentation
  methods for brain MRI", showed it beats many autoencoders on FLAIR);
* optionally a second run (``--baseline``, e.g. a plain ``ae``: Baur et al. 2021)
  through the identical pipeline.

Scores: what the model offers (``model.scores()``, ``brainvae.models.scoring``: An &
Cho 2015; Zimmerer et al. 2018/2019; Baur et al. 2021). Post-processing and the
brightness baselines: ``anomaly_scores`` (StRegA, Chatterjee et al. 2022). Metrics:
``anomaly_metrics``. Cases are subjects: a seeded ~30 % of them (or ``val_cases``)
choose the threshold, the others are the test cases; the two never overlap and no
test label reaches the threshold.

Output ``OUT/`` (atomic): ``metrics.json``, ``slice_scores.csv`` and
``overlay_<case>.png`` per test case (input, reconstruction, score,
thresholded map, ground-truth outline on the slices with the largest lesions).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from ..progress import bar as progress_bar

from ..data.dataset import SliceBatches
from ..data.resize import resize_masks
from ..data.store import SliceStore
from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import atomic_dir
from ..models.scoring import ScoreBatch
from ..rundir import RunDir
from .anomaly_metrics import evaluate_score, slice_scores
from .anomaly_scores import BRIGHTNESS, PostProcess, eroded_mask, postprocess, segment


# -- options and state ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnomalyConfig:
    """What ``brainvae anomaly`` measures, and how (beyond the run, the store and the output folder)."""

    baseline: Path | str | None = None  # a second run scored through the same pipeline (e.g. an ae)
    val_cases: tuple[str, ...] | None = None  # validation cases; None: a seeded random val_fraction of them
    val_fraction: float = 0.3
    primary: str = "residual"  # the model's score shown in the overlays
    split: str | None = None  # only this split of the store (None: all slices)
    n_samples: int = 8  # posterior samples of the reconstruction probability
    post: PostProcess = PostProcess()
    batch_size: int = 64
    overlay_slices: int = 4  # per test case: those with the largest lesions
    seed: int = 0


class Source(NamedTuple):
    """A scored run: "model" or "baseline", its folder and its loaded model."""

    name: str
    run: Path
    model: object


@dataclass
class Slices:
    """The scored slices of the store, their cases, and images and masks at the model's size."""

    store: SliceStore
    rows: np.ndarray  # (N,) store rows
    manifest: pd.DataFrame  # their manifest rows, indexed 0..N-1
    cases: np.ndarray  # (N,) case (subject) of each slice
    val: list[str]  # validation cases: they choose the threshold
    test: list[str]  # test cases: they are measured
    images: np.ndarray  # (N, H, W) float32, as the model sees them
    brain: np.ndarray  # (N, H, W) bool
    lesion: np.ndarray  # (N, H, W) bool
    region: np.ndarray  # (N, H, W) bool: the eroded brain, where post-processed scores live

    @property
    def size(self) -> int:
        return self.images.shape[-1]


@dataclass
class Scored:
    """What scoring produced, in report order."""

    results: dict[str, dict] = field(default_factory=dict)  # "source/score" -> metrics and description
    unavailable: dict[str, str] = field(default_factory=dict)  # "source/score" -> why the model cannot compute it
    slice_cols: dict[str, np.ndarray] = field(default_factory=dict)  # "source/score" -> (N,) slice scores
    notes: list[str] = field(default_factory=list)
    recon: np.ndarray | None = None  # (N, H, W) the model's mean reconstructions
    primary: np.ndarray | None = None  # (N, H, W) the model's post-processed primary score


# -- data -------------------------------------------------------------------------------------------
def require_lesions(store: SliceStore) -> None:
    if not store.has_lesions:
        raise BrainVAEError(
            f"{store.path} has no lesion masks (lesion.npy): anomaly localisation needs ground truth. "
            f"For a healthy store, add synthetic anomalies first: "
            f"`brainvae data anomalies {store.path} --out {store.path}-anomalies`")


def split_cases(cases: list[str], val_cases: list[str] | None = None, val_fraction: float = 0.3,
                seed: int = 0, store: Path | str = "") -> tuple[list[str], list[str]]:
    """(validation cases, test cases): the named ones, or a seeded random ``val_fraction`` of the cases."""
    cases = sorted(dict.fromkeys(str(c) for c in cases))
    if val_cases:
        missing = sorted(set(val_cases) - set(cases))
        if missing:
            raise BrainVAEError(f"{store}: validation case(s) {missing} not in the store "
                                f"(cases: {', '.join(cases[:20])}{' ...' if len(cases) > 20 else ''})")
        val = sorted(set(val_cases))
    else:
        if not 0 < val_fraction < 1:
            raise BrainVAEError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        if len(cases) < 2:
            raise BrainVAEError(f"{store}: {len(cases)} case(s); need at least 2 (validation and test)")
        n_val = min(max(1, int(round(val_fraction * len(cases)))), len(cases) - 1)
        rng = np.random.default_rng(seed)
        val = sorted(rng.choice(cases, size=n_val, replace=False).tolist())
    test = [c for c in cases if c not in set(val)]
    if not test:
        raise BrainVAEError(f"{store}: every case is a validation case; leave some for testing")
    return val, test


# -- scoring ----------------------------------------------------------------------------------------
@torch.no_grad()
def score_model(model, data: SliceBatches, names: list[str], *, n_samples: int = 8, batch_size: int = 64,
                seed: int = 0, brain: np.ndarray | None = None, progress: bool = False,
                desc: str = "score") -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Raw maps (N, H, W) float32 of the model's scores ``names`` for all slices of ``data``, plus ``"recon"``;
    and the term scales of the additive scores (``Score.terms``: see ``add_terms``)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    use_cond = bool(model.config.conditions)
    offered = model.scores()
    recon, chunks = [], {n: [] for n in names}
    starts = range(0, len(data), batch_size)
    for start in progress_bar(starts, desc=desc, unit="batch", disable=not progress):
        x, cond = data.batch(np.arange(start, min(start + batch_size, len(data))))
        batch = ScoreBatch(model, x, cond if use_cond else None, n_samples, gen)
        recon.append(batch.x_hat[:, 0].cpu().numpy())
        for n in names:
            chunks[n].append(offered[n].compute(batch).float().cpu().numpy())  # (B, 1 or k terms, H, W)
    out, scales = {"recon": np.concatenate(recon)}, {}
    for n, parts in chunks.items():
        maps = np.concatenate(parts)
        if offered[n].terms:
            out[n], scales[n] = add_terms(maps, offered[n].terms, brain)
        else:
            out[n] = maps[:, 0]
    return out, scales


def add_terms(terms: np.ndarray, names: tuple[str, ...], brain: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """An additive score from its terms (N, k, H, W): each divided by its 99th percentile over the in-brain
    pixels of all slices (label-free, so no test label leaks), then added: (N, H, W), and name -> scale."""
    inside = brain if brain is not None else np.ones(terms[:, 0].shape, bool)
    scales = {n: max(float(np.percentile(terms[:, i][inside], 99)), 1e-12) if inside.any() else 1.0
              for i, n in enumerate(names)}
    return sum(terms[:, i] / s for i, s in enumerate(scales.values())), scales


def measure(raw: np.ndarray, d: Slices, cfg: AnomalyConfig) -> tuple[np.ndarray, dict]:
    """Post-process a raw score (N, H, W) and measure it: (post-processed score, metrics)."""
    s = postprocess(raw, d.region, cfg.post.median)
    return s, evaluate_score(s, d.lesion, d.brain, d.cases, d.val, d.test, min_area=cfg.post.min_area, seed=cfg.seed)


def score_source(scored: Scored, src: Source, d: Slices, cfg: AnomalyConfig, progress: bool) -> None:
    """Every score ``src``'s model offers, measured; added to ``scored``."""
    model = src.model
    offered = model.scores()
    scored.unavailable.update({f"{src.name}/{n}": why for n, why in model.unavailable_scores().items()})
    if not model.stochastic:
        scored.notes.append(f"{src.name} ({model.arch}) is deterministic: recon_prob uses its single code and is "
                            f"r^2 / (2 sigma^2) + const, a monotone function of the residual (same ranking)")
    raw, scales = score_model(model, SliceBatches(d.store, cfg.split, d.size, model.device), list(offered),
                              n_samples=cfg.n_samples, batch_size=cfg.batch_size, seed=cfg.seed, brain=d.brain,
                              progress=progress, desc=f"score {src.name}")
    if src.name == "model":
        scored.recon = raw["recon"]
    for n, score in offered.items():
        key = f"{src.name}/{n}"
        s, metrics = measure(raw.pop(n), d, cfg)
        entry = {"source": src.name, "run": str(src.run), "arch": model.arch, "score": n,
                 "description": score.description, **metrics}
        if score.details is not None:
            entry.update(score.details(model, cfg.n_samples))
        if n in scales:
            entry["term_scales"] = scales[n]
        scored.results[key] = entry
        scored.slice_cols[key] = slice_scores(s, d.brain)
        if src.name == "model" and n == cfg.primary:
            scored.primary = s


def score_brightness(scored: Scored, d: Slices, cfg: AnomalyConfig) -> None:
    """The brightness baselines (``anomaly_scores.BRIGHTNESS``), measured; added to ``scored``."""
    for n, (fn, description) in BRIGHTNESS.items():
        key = f"brightness/{n}"
        s, metrics = measure(fn(torch.from_numpy(d.images), torch.from_numpy(d.brain)).numpy(), d, cfg)
        scored.results[key] = {"source": "brightness", "run": None, "arch": None, "score": f"brightness_{n}",
                               "description": description, **metrics}
        scored.slice_cols[key] = slice_scores(s, d.brain)


# -- figures ----------------------------------------------------------------------------------------
def overlay_figure(case: str, images, recon, score, binary, lesion, brain, slice_ids, title: str,
                   axis: str | None = None):
    """Columns: slices; rows: input + truth, reconstruction, score (with its colour bar), thresholded map + truth.
    ``axis``: the store's slicing axis, for orientation letters on the first input panel."""
    from matplotlib.figure import Figure

    from ..report.figures import ORIENTATION, orientation_letters

    n = len(images)
    fig = Figure(figsize=(1.9 * n + 0.6, 7.6), layout="compressed")  # square panels without gaps
    axes = fig.subplots(4, n, squeeze=False)
    vmax = float(np.percentile(score[brain > 0], 99.5)) if (brain > 0).any() else float(score.max() or 1)
    for j in range(n):
        panels = [(images[j], "gray", 1.0, "input"), (recon[j], "gray", 1.0, "reconstruction"),
                  (score[j], "inferno", vmax or 1.0, "score"), (binary[j].astype(float), "gray", 1.0, "thresholded")]
        for i, (img, cmap, vm, name) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=vm)
            if i in (0, 3) and lesion[j].any():
                ax.contour(lesion[j], levels=[0.5], colors="lime", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
        axes[0, j].set_title(f"slice {slice_ids[j]}", fontsize=7)
    # one colour bar for the score row: its panels share 0..vmax; larger scores are drawn in vmax's colour
    bar = fig.colorbar(axes[2, -1].images[0], ax=axes[2, :].tolist(), extend="max", shrink=0.9)
    bar.ax.tick_params(labelsize=6)
    if axis in ORIENTATION:
        orientation_letters(axes[0, 0], axis)
    fig.suptitle(f"{case}: {title} (green: ground truth)", fontsize=8)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# -- the command ------------------------------------------------------------------------------------
def evaluate_anomaly(run: Path | str, data: Path | str, out: Path | str | None = None,
                     cfg: AnomalyConfig = AnomalyConfig(), *, device: str | torch.device = "cpu",
                     force: bool = False, progress: bool = True) -> dict:
    """Score ``data`` with the model of ``run`` (and the baselines); write metrics and overlays to ``out``."""
    from ..provenance import provenance

    run, store = Path(run), SliceStore(data)
    require_lesions(store)  # the data first: its error says how to make a store with lesions
    out = Path(out) if out is not None else RunDir.resolve(run).output("anomaly")
    if out.exists() and not force:
        raise OutputExistsError(out)
    rows, val, test, lesion = select_cases(store, cfg)
    sources = load_sources(run, cfg, device)
    model = sources[0].model
    d = load_slices(store, cfg, rows, val, test, lesion, model)
    scored = Scored()
    for src in sources:
        score_source(scored, src, d, cfg, progress)
    score_brightness(scored, d, cfg)
    summary = make_summary(run, model, d, scored, cfg)
    summary["provenance"] = provenance(seed=cfg.seed, n_samples=cfg.n_samples, device=str(model.device))
    write_outputs(out, summary, d, scored, cfg, force)
    summary["out"] = str(out)
    return summary


def select_cases(store: SliceStore, cfg: AnomalyConfig) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """(store rows scored, validation cases, test cases, their lesion masks (N, H, W) at the store's size);
    both groups of cases must hold lesion pixels."""
    rows = store.indices(cfg.split)
    if len(rows) == 0:
        raise BrainVAEError(f"{store.path}: split {cfg.split!r} has no slices")
    cases = store.manifest["subject"].iloc[rows].astype(str).to_numpy()
    val, test = split_cases(list(cases), cfg.val_cases, cfg.val_fraction, cfg.seed, store.path)
    lesion = np.asarray(store.array("lesion")[rows])
    for role, group in (("validation", val), ("test", test)):
        if not lesion[np.isin(cases, group)].any():
            raise BrainVAEError(f"{store.path}: the {role} cases {group} have no lesion pixels; "
                                "choose other --val-cases or another --seed")
    return rows, val, test, lesion


def load_sources(run: Path, cfg: AnomalyConfig, device) -> list[Source]:
    """The run's model (which must offer the primary score) and the baseline's, of the same image size."""
    from .. import generate as G

    model = G.load(run, device=device)
    if cfg.primary not in model.scores():
        raise BrainVAEError(f"--score {cfg.primary!r} is not available for this {model.arch} model; "
                            f"choose from {list(model.scores())}")
    sources = [Source("model", run, model)]
    if cfg.baseline is not None:
        base = G.load(cfg.baseline, device=device)
        size = model.config.image_size
        if base.config.image_size != size:
            raise BrainVAEError(f"{cfg.baseline}: image size {base.config.image_size} differs from {run}'s {size}; "
                                "a baseline must score the same pixels")
        sources.append(Source("baseline", Path(cfg.baseline), base))
    return sources


def load_slices(store: SliceStore, cfg: AnomalyConfig, rows: np.ndarray, val: list[str], test: list[str],
                lesion: np.ndarray, model) -> Slices:
    """The scored slices with their images, brain and lesion masks at the model's size (as it sees them)."""
    size = model.config.image_size
    data = SliceBatches(store, cfg.split, size, model.device)
    images = np.concatenate([data.batch(np.arange(s, min(s + 256, len(data))))[0][:, 0].cpu().numpy()
                             for s in range(0, len(data), 256)])
    brain = resize_masks(store.array("brain")[rows], size)
    manifest = store.manifest.iloc[rows].reset_index(drop=True)
    return Slices(store, rows, manifest, manifest["subject"].astype(str).to_numpy(), val, test, images, brain,
                  resize_masks(lesion, size), eroded_mask(brain, cfg.post.erode))


def make_summary(run: Path, model, d: Slices, scored: Scored, cfg: AnomalyConfig) -> dict:
    """metrics.json: what was scored and how, and every score's results."""
    return {
        "run": str(run), "arch": model.arch, "store": str(d.store.path),
        "baseline_run": str(cfg.baseline) if cfg.baseline else None,
        "split": cfg.split or "all", "image_size": d.size, "n_slices": int(len(d.rows)),
        "cases": {"validation": d.val, "test": d.test},
        "validation_selection": ("given (--val-cases)" if cfg.val_cases else
                                 f"seeded random {cfg.val_fraction:g} of the cases (seed {cfg.seed})"),
        "postprocess": {**cfg.post.to_dict(), "order": "median filter, zero outside the eroded brain mask; "
                        "components below min_area removed after thresholding (Dice only)"},
        "evaluation": {
            "pixels": "inside the (uneroded) brain mask of the test cases, pooled",
            "threshold": "maximises pooled Dice of the post-processed score on the validation cases' pixels "
                         "(before component removal); `dice` applies it to the test cases with components "
                         "removed",
            "best_dice_upper_bound": "max Dice over thresholds chosen ON THE TEST CASES: an upper bound, not a result",
            "dice_all_brain": "Dice of labelling the whole brain abnormal (a trivial reference: 2p / (1 + p))",
            "slice_score": "mean of the top 1 % of in-brain post-processed scores; label = lesion pixels in the brain",
            "per_case_mean": "mean over test cases with a 95 % percentile bootstrap interval (2000 resamples)",
        },
        "primary_score": f"model/{cfg.primary}",
        "scores": scored.results,
        "unavailable": scored.unavailable,
        "notes": scored.notes,
        "score_descriptions": {r["score"]: r["description"] for r in scored.results.values()},
    }


def write_outputs(out: Path, summary: dict, d: Slices, scored: Scored, cfg: AnomalyConfig, force: bool) -> None:
    """metrics.json, slice_scores.csv and one overlay figure per test case, written atomically to ``out``."""
    with atomic_dir(out, force=force) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2))
        table = d.manifest[["subject", "slice_index"]].copy()
        table.insert(0, "store_row", d.rows)
        table["role"] = np.where(np.isin(d.cases, d.val), "validation", "test")
        table["lesion_pixels"] = (d.lesion & d.brain).reshape(len(d.rows), -1).sum(1)
        table = pd.concat([table, pd.DataFrame({k: np.round(v, 6) for k, v in scored.slice_cols.items()})], axis=1)
        table.to_csv(tmp / "slice_scores.csv", index=False)
        write_overlays(tmp, summary, d, scored, cfg)


def write_overlays(folder: Path, summary: dict, d: Slices, scored: Scored, cfg: AnomalyConfig) -> None:
    """``overlay_<case>.png`` per test case: its ``overlay_slices`` slices with the largest lesions."""
    from ..report.html import png_bytes

    threshold = summary["scores"][summary["primary_score"]]["threshold"]
    binary = segment(scored.primary, threshold, cfg.post.min_area) & d.brain
    title = f"{summary['arch']} {cfg.primary}, threshold {threshold:.4g} from validation cases"
    for case in d.test:
        idx = np.flatnonzero(d.cases == case)
        area = (d.lesion[idx] & d.brain[idx]).reshape(len(idx), -1).sum(1)
        pick = np.sort(idx[np.argsort(-area, kind="stable")[:cfg.overlay_slices]])
        fig = overlay_figure(case, d.images[pick], np.clip(scored.recon[pick], 0, 1), scored.primary[pick],
                             binary[pick], d.lesion[pick], d.brain[pick], d.manifest["slice_index"].to_numpy()[pick],
                             title, d.store.config.axis)
        (folder / f"overlay_{_safe(case)}.png").write_bytes(png_bytes(fig, dpi=100))


def summary_lines(summary: dict) -> list[str]:
    """A short text table of the headline numbers of every score."""
    lines = [f"{'score':28s} {'AUROC':>6s} {'AUPRC':>6s} {'Dice':>6s} {'best':>6s} {'sliceAUC':>8s}  "
             f"(Dice at the validation threshold; best = upper bound on test)"]

    def f(x):
        return "   n/a" if x is None else f"{x:6.3f}"

    for key, r in summary["scores"].items():
        lines.append(f"{key:28s} {f(r['pixel_auroc'])} {f(r['pixel_auprc'])} {f(r['dice'])} "
                     f"{f(r['best_dice_upper_bound'])} {f(r['slice_auroc']):>8s}")
    first = next(iter(summary["scores"].values()), None)
    if first is not None:
        lines.append(f"(trivial Dice of calling the whole brain abnormal: {f(first['dice_all_brain']).strip()})")
    return lines
