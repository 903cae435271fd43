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

With ``--features FAE_RUN`` every reconstruction model also offers the perceptual
scores (``Score.needs_features``): its reconstruction compared with the slice in the
first level of that fae's encoder, trained in-domain on healthy slices.

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
from ..data.resize import resize_images, resize_masks
from ..data.store import SliceStore
from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import atomic_dir
from ..models.scoring import ScoreBatch
from ..rundir import RunDir
from .anomaly_metrics import case_scores, dice_at, evaluate_score, label_free_threshold, slice_scores
from .anomaly_scores import BRIGHTNESS, PostProcess, eroded_mask, postprocess, segment, slice_runs


# -- options and state ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnomalyConfig:
    """What ``brainvae anomaly`` measures, and how (beyond the run, the store and the output folder)."""

    baselines: tuple[Path | str, ...] = ()  # other runs scored through the same pipeline (e.g. an ae, a dae)
    val_cases: tuple[str, ...] | None = None  # validation cases; None: a seeded random val_fraction of them
    val_fraction: float = 0.3
    # The recommended score (``primary_score``, shown in the overlays and written as NIfTI): "auto", the score
    # of the model or a baseline (or the ensemble) with the highest Dice on the validation cases; or one named:
    # a model score ("residual"), a baseline's ("baseline/residual"), or "ensemble".
    primary: str = "auto"
    ensemble: int = 3  # the ensemble: mean rank-normalised maps of the k scores best on validation (0: off)
    healthy: Path | str | None = None  # a store of healthy subjects: label-free thresholds and case-level detection
    features: Path | str | None = None  # a fae run: its encoder's first level feeds the perceptual scores
    fpr: float = 0.01  # label-free threshold: this share of the healthy validation slices' brain pixels flagged
    healthy_slices: int = 300  # at most this many evenly spaced slices of each healthy split are scored
    nifti: bool = True  # write each case's primary score and mask as NIfTI on its source scan (maps/)
    split: str | None = None  # only this split of the store (None: all slices)
    n_samples: int = 8  # posterior samples of the reconstruction probability
    precision: str = "auto"  # autocast while scoring: auto (bf16 where native, else fp32), fp32, bf16, fp16
    post: PostProcess = PostProcess()
    batch_size: int = 64
    overlay_slices: int = 4  # per test case: those with the largest lesions
    seed: int = 0


class Source(NamedTuple):
    """A scored run: "model", or a baseline ("baseline"; with several, "baseline-<run folder name>"), its folder
    and its loaded model."""

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
    runs: np.ndarray  # (N,) runs of consecutive slices of one case (slice_runs): the through-plane mean's reach

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
    sources: list[Source] = field(default_factory=list)
    # source -> (N, H, W) its mean reconstructions; "source:restoration" -> its restorations (ldm)
    recons: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # "source/score" -> (N, H, W) post-processed map
    term_scales: dict[str, dict] = field(default_factory=dict)  # source -> its additive scores' term scales
    ensemble: "Ensemble | None" = None
    primary: str | None = None  # "model/<score>": the recommended score


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
                seed: int = 0, brain: np.ndarray | None = None, progress: bool = False, desc: str = "score",
                rows: np.ndarray | None = None, scales: dict[str, dict[str, float]] | None = None,
                precision: str = "auto", features=None) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Raw maps (N, H, W) float32 of the model's scores ``names`` for the slices ``rows`` of ``data`` (default:
    all), plus ``"recon"`` (and ``"restored"`` when its scores restore the slices); and the term scales of the
    additive scores (``Score.terms``: see ``add_terms``; ``scales`` given: those are used). ``precision``: autocast
    as in training (``auto``: bf16 where native). ``features``: the feature net of the perceptual scores
    (``offered_scores``)."""
    from ..hardware import autocast, autocast_dtype

    gen = torch.Generator(device=model.device).manual_seed(seed)
    use_cond = bool(model.config.conditions)
    model = model.for_inference()  # BatchNorm folded: the same maps up to rounding, faster
    offered = offered_scores(model, features)
    dtype = autocast_dtype(precision, model.device)
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    recon, restored, chunks = [], [], {n: [] for n in names}
    starts = range(0, len(rows), batch_size)
    for start in progress_bar(starts, desc=desc, unit="batch", disable=not progress):
        x, cond = data.batch(rows[start:start + batch_size])
        batch = ScoreBatch(model, x, cond if use_cond else None, n_samples, gen, features)
        with autocast(model.device, dtype):
            recon.append(batch.x_hat[:, 0].cpu().numpy())
            for n in names:
                chunks[n].append(offered[n].compute(batch).float().cpu().numpy())  # (B, 1 or k terms, H, W)
        if "restorations" in batch.shared:  # ldm: the healthy restorations its scores compared x with
            restored.append(batch.shared["restorations"].float().mean(0)[:, 0].cpu().numpy())
    out, used = {"recon": np.concatenate(recon)}, {}
    if restored:
        out["restored"] = np.concatenate(restored)  # (N, H, W): mean over the restoration levels
    for n, parts in chunks.items():
        maps = np.concatenate(parts)
        if offered[n].terms:
            out[n], used[n] = add_terms(maps, offered[n].terms, brain, (scales or {}).get(n))
        else:
            out[n] = maps[:, 0]
    return out, used


def offered_scores(model, features=None) -> dict:
    """The model's scores (``model.scores()``) that can be computed: the perceptual ones only with ``features``."""
    return {n: s for n, s in model.scores().items() if features is not None or not s.needs_features}


def feature_net(run: Path | str | None, device, size: int):
    """``--features``: the frozen first encoder level of a ``fae`` run trained on ``size`` px slices, (B, 1, H, W)
    -> (B, C, H/2, W/2); None without one."""
    if run is None:
        return None
    from .. import generate as G

    fae = G.load(run, device=device)
    if not hasattr(fae, "perceptual_features"):
        raise BrainVAEError(f"--features {run}: a {fae.arch} run; the perceptual scores need a fae run (its encoder "
                            "trained in-domain on healthy slices)")
    if fae.config.image_size != size:
        raise BrainVAEError(f"--features {run}: trained on {fae.config.image_size} px slices; the scored model "
                            f"sees {size} px")
    return fae.for_inference().perceptual_features


def add_terms(terms: np.ndarray, names: tuple[str, ...], brain: np.ndarray | None,
              scales: dict[str, float] | None = None) -> tuple[np.ndarray, dict]:
    """An additive score from its terms (N, k, H, W): each divided by its 99th percentile over the in-brain
    pixels of all slices (label-free, so no test label leaks), or by the given ``scales``, then added:
    (N, H, W), and name -> scale."""
    inside = brain if brain is not None else np.ones(terms[:, 0].shape, bool)
    if scales is None:
        scales = {n: max(float(np.percentile(terms[:, i][inside], 99)), 1e-12) if inside.any() else 1.0
                  for i, n in enumerate(names)}
    return sum(terms[:, i] / s for i, s in enumerate(scales.values())), scales


def measure(raw: np.ndarray, d: Slices, cfg: AnomalyConfig) -> tuple[np.ndarray, dict]:
    """Post-process a raw score (N, H, W) and measure it: (post-processed score, metrics)."""
    s = postprocess(raw, d.region, cfg.post.median, cfg.post.across, d.runs)
    return s, evaluate_score(s, d.lesion, d.brain, d.cases, d.val, d.test, min_area=cfg.post.min_area, seed=cfg.seed)


def score_source(scored: Scored, src: Source, d: Slices, cfg: AnomalyConfig, progress: bool, features=None) -> None:
    """Every score ``src``'s model offers, measured; added to ``scored`` (the perceptual ones with ``features``)."""
    model = src.model
    offered = offered_scores(model, features)
    scored.unavailable.update({f"{src.name}/{n}": why for n, why in model.unavailable_scores().items()})
    scored.unavailable.update({f"{src.name}/{n}": "a perceptual score: needs --features (a fae run)"
                               for n in model.scores() if n not in offered})
    if not model.stochastic:
        scored.notes.append(f"{src.name} ({model.arch}) is deterministic: recon_prob uses its single code and is "
                            f"r^2 / (2 sigma^2) + const, a monotone function of the residual (same ranking)")
    raw, scales = score_model(model, SliceBatches(d.store, cfg.split, d.size, model.device), list(offered),
                              n_samples=cfg.n_samples, batch_size=cfg.batch_size, seed=cfg.seed, brain=d.brain,
                              progress=progress, desc=f"score {src.name}", precision=cfg.precision,
                              features=features)
    scored.recons[src.name], scored.term_scales[src.name] = raw["recon"], scales
    if "restored" in raw:
        scored.recons[f"{src.name}:restoration"] = raw.pop("restored")
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
        scored.maps[key] = s


def score_brightness(scored: Scored, d: Slices, cfg: AnomalyConfig) -> None:
    """The brightness baselines (``anomaly_scores.BRIGHTNESS``), measured; added to ``scored``."""
    for n, (fn, description) in BRIGHTNESS.items():
        key = f"brightness/{n}"
        s, metrics = measure(fn(torch.from_numpy(d.images), torch.from_numpy(d.brain)).numpy(), d, cfg)
        scored.results[key] = {"source": "brightness", "run": None, "arch": None, "score": f"brightness_{n}",
                               "description": description, **metrics}
        scored.slice_cols[key] = slice_scores(s, d.brain)


# -- the ensemble and the recommended score ---------------------------------------------------------
@dataclass
class Ensemble:
    """Mean of the rank-normalised maps of ``members``: each map's values replaced by their quantile among the
    scored slices' pixels inside the eroded brain (``reference``: sorted, label-free, at most 100k values)."""

    members: list[str]
    reference: dict[str, np.ndarray]

    @classmethod
    def fit(cls, members: list[str], maps: dict[str, np.ndarray], region: np.ndarray, n: int = 100_000):
        reference = {}
        for m in members:
            ref = np.sort(maps[m][region])
            reference[m] = ref[np.linspace(0, len(ref) - 1, min(n, len(ref))).astype(int)] if len(ref) else ref
        return cls(members, reference)

    def __call__(self, maps: dict[str, np.ndarray], region: np.ndarray) -> np.ndarray:
        """(N, H, W) in [0, 1], 0 outside ``region``."""
        ranks = [(np.searchsorted(self.reference[m], maps[m], side="left")  # mid-ranks: ties (the many zeros
                  + np.searchsorted(self.reference[m], maps[m], side="right")) / (2 * max(len(self.reference[m]), 1))
                 for m in self.members]  # of a rectified score) share the middle of their range
        return np.where(region, np.mean(ranks, 0), 0.0).astype(np.float32)


ENSEMBLE = "ensemble/rank_mean"  # the ensemble's key among the scores


def add_ensemble(scored: Scored, d: Slices, cfg: AnomalyConfig) -> None:
    """``ENSEMBLE``: the ``cfg.ensemble`` scores (of the model and the baselines) with the highest validation
    Dice, combined."""
    ranked = sorted(scored.maps, key=lambda k: -(scored.results[k]["val_dice"] or 0.0))
    members = ranked[:cfg.ensemble]
    if cfg.ensemble < 2 or len(members) < 2:
        return
    scored.ensemble = Ensemble.fit(members, scored.maps, d.region)
    s = scored.ensemble(scored.maps, d.region)
    metrics = evaluate_score(s, d.lesion, d.brain, d.cases, d.val, d.test, min_area=cfg.post.min_area,
                             seed=cfg.seed)
    scored.results[ENSEMBLE] = {
        "source": "ensemble", "run": None, "arch": None, "score": "rank_mean", "members": members,
        "description": f"mean of the rank-normalised maps of the {len(members)} scores with the highest "
                       f"validation Dice: {', '.join(members)}", **metrics}
    scored.slice_cols[ENSEMBLE] = slice_scores(s, d.brain)
    scored.maps[ENSEMBLE] = s


def choose_primary(scored: Scored, cfg: AnomalyConfig) -> str:
    """The recommended score: the one named, or ("auto") the score of the model, a baseline or the ensemble
    with the highest Dice on the validation cases (never a test case's number)."""
    if cfg.primary != "auto":
        key = {"ensemble": ENSEMBLE}.get(cfg.primary, cfg.primary if "/" in cfg.primary else f"model/{cfg.primary}")
        if key not in scored.results:
            raise BrainVAEError(f"--score {cfg.primary!r} was not computed; scores: {list(scored.results)}")
        return key
    keys = [k for k in scored.results if not k.startswith("brightness/")]
    return max(keys, key=lambda k: scored.results[k]["val_dice"] or 0.0)


# -- healthy slices: label-free thresholds and case-level detection ---------------------------------
def require_healthy(store: SliceStore, cfg: AnomalyConfig) -> None:
    """A healthy store has validation and test slices and no lesion masks; the FPR is a share."""
    if not 0 < cfg.fpr < 1:
        raise BrainVAEError(f"--fpr must be in (0, 1), got {cfg.fpr}")
    if store.has_lesions:
        raise BrainVAEError(f"{store.path} has lesion masks; --healthy takes a store of healthy subjects")
    for split in ("val", "test"):
        if len(store.indices(split)) == 0:
            raise BrainVAEError(f"{store.path}: no {split!r} slices; --healthy needs the val split (label-free "
                                "thresholds) and the test split (case-level detection)")


def score_healthy(scored: Scored, d: Slices, cfg: AnomalyConfig, progress: bool, features=None) -> dict:
    """With a store of healthy subjects (``cfg.healthy``): for every score of the model and the baselines (and
    the ensemble), the threshold that flags ``cfg.fpr`` of the brain pixels of the store's validation split (no
    lesion mask involved) and its Dice on the test cases, and the AUROC of a volume score (``case_scores``)
    telling the store's test subjects from the test cases."""
    from sklearn.metrics import roc_auc_score

    store = SliceStore(cfg.healthy)
    maps, brains, subjects = {}, {}, {}
    for split in ("val", "test"):
        h = healthy_split(store, split, d.size, cfg)
        brains[split], subjects[split] = h.brain, h.subjects
        batches = SliceBatches(store, split, d.size, scored.sources[0].model.device)
        maps[split] = {}
        for src in scored.sources:
            names = [k.split("/", 1)[1] for k in scored.maps if k.startswith(f"{src.name}/")]
            raw, _ = score_model(src.model, batches, names, n_samples=cfg.n_samples, batch_size=cfg.batch_size,
                                 seed=cfg.seed, brain=h.brain, progress=progress,
                                 desc=f"score healthy {split} ({src.name})", rows=h.pick,
                                 scales=scored.term_scales[src.name], precision=cfg.precision,
                                 features=features)
            maps[split].update({f"{src.name}/{n}": postprocess(raw[n], h.region, cfg.post.median, cfg.post.across,
                                                               h.runs)
                                for n in names})
        if scored.ensemble is not None:
            maps[split][ENSEMBLE] = scored.ensemble(maps[split], h.region)
    test_set = set(d.test)
    for key in scored.maps:
        threshold = label_free_threshold(maps["val"][key], brains["val"], cfg.fpr)
        label_free = dice_at(scored.maps[key], d.lesion, d.brain, d.cases, d.test, threshold,
                             min_area=cfg.post.min_area)
        healthy = case_scores(maps["test"][key], brains["test"], subjects["test"])
        sick = {c: v for c, v in case_scores(scored.maps[key], d.brain, d.cases).items() if c in test_set}
        y = np.r_[np.zeros(len(healthy)), np.ones(len(sick))]
        auroc = float(roc_auc_score(y, [*healthy.values(), *sick.values()])) if len(set(y)) == 2 else None
        scored.results[key]["label_free"] = {**label_free, "fpr_healthy_val": cfg.fpr}
        scored.results[key]["case_detection"] = {
            "auroc": None if auroc is None else round(auroc, 4), "healthy_test_subjects": len(healthy),
            "test_cases": len(sick), "healthy_scores": healthy, "case_scores": sick}
    return {"store": str(store.path), "fpr": cfg.fpr, "threshold_split": "val", "detection_split": "test",
            "slices": {split: int(len(b)) for split, b in brains.items()},
            "subjects": {split: int(len(set(s))) for split, s in subjects.items()},
            "case_score": "mean of the top 1 % of the volume's in-brain post-processed pixel scores",
            "caveat": "healthy subjects from another store differ from the cases in more than lesions (scanner, "
                      "resolution, preprocessing): case-level AUROC also measures that difference"}


class HealthySplit(NamedTuple):
    """The scored slices of one split of a healthy store (``healthy_picks``), at the model's size."""

    pick: np.ndarray  # (N,) positions among the split's slices (``rows`` of ``score_model``)
    brain: np.ndarray  # (N, H, W) bool
    subjects: np.ndarray  # (N,) subject of each slice
    runs: np.ndarray  # (N,) runs of consecutive slices of one subject (``slice_runs``)
    region: np.ndarray  # (N, H, W) bool: the eroded brain, where post-processed scores live


def healthy_split(store: SliceStore, split: str, size: int, cfg: AnomalyConfig) -> HealthySplit:
    """``cfg.healthy_slices`` slices of ``split`` in windows of ``cfg.post.across``, with their masks and runs."""
    pick = healthy_picks(store, split, cfg.healthy_slices, cfg.post.across)
    rows = store.indices(split)[pick]
    brain = resize_masks(store.array("brain")[rows], size)
    subjects = store.manifest["subject"].iloc[rows].astype(str).to_numpy()
    runs = slice_runs(subjects, store.manifest["slice_index"].iloc[rows].to_numpy())
    return HealthySplit(pick, brain, subjects, runs, eroded_mask(brain, cfg.post.erode))


def healthy_picks(store: SliceStore, split: str, n: int, across: int) -> np.ndarray:
    """About ``n`` positions in ``split``'s slices, evenly spread, in windows of ``across`` consecutive slices
    of one subject (so the through-plane mean sees a volume's neighbours, as on the cases): sorted, unique."""
    rows = store.indices(split)
    if len(rows) == 0:
        return np.array([], dtype=int)
    m = store.manifest.iloc[rows]
    runs = slice_runs(m["subject"].astype(str).to_numpy(), m["slice_index"].to_numpy())
    half = max(across, 1) // 2
    centres = np.unique(np.linspace(0, len(rows) - 1, max(1, min(n, len(rows)) // max(across, 1))).astype(int))
    picks = [j for c in centres for j in range(c - half, c + half + 1) if 0 <= j < len(rows) and runs[j] == runs[c]]
    return np.unique(picks)


# -- figures ----------------------------------------------------------------------------------------
def overlay_figure(case: str, images, recon, score, binary, lesion, brain, slice_ids, title: str,
                   axis: str | None = None, recon_label: str = "reconstruction"):
    """Columns: slices; rows: input + truth, reconstruction, score (with its colour bar), thresholded map + truth.
    ``axis``: the store's slicing axis, for orientation letters on the first input panel."""
    from matplotlib.figure import Figure

    from ..report.figures import ORIENTATION, orientation_letters

    n = len(images)
    fig = Figure(figsize=(1.9 * n + 0.6, 7.6), layout="compressed")  # square panels without gaps
    axes = fig.subplots(4, n, squeeze=False)
    vmax = float(np.percentile(score[brain > 0], 99.5)) if (brain > 0).any() else float(score.max() or 1)
    for j in range(n):
        panels = [(images[j], "gray", 1.0, "input"), (recon[j], "gray", 1.0, recon_label),
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
    if cfg.primary == "ensemble" and cfg.ensemble < 2:
        raise BrainVAEError("--score ensemble needs --ensemble >= 2 (the number of scores it combines)")
    if cfg.healthy is not None:
        require_healthy(SliceStore(cfg.healthy), cfg)
    sources = load_sources(run, cfg, device)
    model = sources[0].model
    features = feature_net(cfg.features, device, model.config.image_size)
    d = load_slices(store, cfg, rows, val, test, lesion, model)
    scored = Scored(sources=sources)
    for src in sources:
        score_source(scored, src, d, cfg, progress, features)
    score_brightness(scored, d, cfg)
    add_ensemble(scored, d, cfg)
    scored.primary = choose_primary(scored, cfg)
    healthy = score_healthy(scored, d, cfg, progress, features) if cfg.healthy is not None else None
    summary = make_summary(run, model, d, scored, cfg)
    summary["healthy"] = healthy
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
    """The run's model (which must offer the primary score) and the baselines', of the same image size."""
    from .. import generate as G

    model = G.load(run, device=device)
    if "/" not in cfg.primary and cfg.primary not in (*model.scores(), "auto", "ensemble"):
        raise BrainVAEError(f"--score {cfg.primary!r} is not available for this {model.arch} model; "
                            f"choose from {['auto', 'ensemble', *model.scores()]}")
    sources = [Source("model", run, model)]
    for path in cfg.baselines:
        base = G.load(path, device=device)
        size = model.config.image_size
        if base.config.image_size != size:
            raise BrainVAEError(f"{path}: image size {base.config.image_size} differs from {run}'s {size}; "
                                "a baseline must score the same pixels")
        name = "baseline" if len(cfg.baselines) == 1 else f"baseline-{Path(path).name}"
        while name in {s.name for s in sources}:  # two run folders of one name
            name += "'"
        sources.append(Source(name, Path(path), base))
    return sources


def load_slices(store: SliceStore, cfg: AnomalyConfig, rows: np.ndarray, val: list[str], test: list[str],
                lesion: np.ndarray, model) -> Slices:
    """The scored slices with their images, brain and lesion masks at the model's size (as it sees them)."""
    size = model.config.image_size
    images = slice_images(SliceBatches(store, cfg.split, size, model.device))
    brain = resize_masks(store.array("brain")[rows], size)
    manifest = store.manifest.iloc[rows].reset_index(drop=True)
    cases = manifest["subject"].astype(str).to_numpy()
    return Slices(store, rows, manifest, cases, val, test, images, brain, resize_masks(lesion, size),
                  eroded_mask(brain, cfg.post.erode), slice_runs(cases, manifest["slice_index"].to_numpy()))


def slice_images(data: SliceBatches, chunk: int = 256) -> np.ndarray:
    """Every slice of ``data`` as the model sees it: (N, H, W) float32, read ``chunk`` slices at a time."""
    return np.concatenate([data.batch(np.arange(s, min(s + chunk, len(data))))[0][:, 0].cpu().numpy()
                           for s in range(0, len(data), chunk)])


def make_summary(run: Path, model, d: Slices, scored: Scored, cfg: AnomalyConfig) -> dict:
    """metrics.json: what was scored and how, and every score's results."""
    return {
        "run": str(run), "arch": model.arch, "store": str(d.store.path),
        "baseline_runs": {s.name: str(s.run) for s in scored.sources[1:]},
        "features": None if cfg.features is None else str(cfg.features),
        "split": cfg.split or "all", "image_size": d.size, "n_slices": int(len(d.rows)),
        "cases": {"validation": d.val, "test": d.test},
        "validation_selection": ("given (--val-cases)" if cfg.val_cases else
                                 f"seeded random {cfg.val_fraction:g} of the cases (seed {cfg.seed})"),
        "postprocess": {**cfg.post.to_dict(), "order": "median filter, mean over `across` neighbouring slices "
                        "of the case, zero outside the eroded brain mask; "
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
        "primary_score": scored.primary,
        "primary_selection": ("highest Dice on the validation cases among the scores of the model, the baselines "
                              "and their ensemble" if cfg.primary == "auto" else "given (--score)"),
        "scores": scored.results,
        "unavailable": scored.unavailable,
        "notes": scored.notes,
        "score_descriptions": {r["score"]: r["description"] for r in scored.results.values()},
    }


def write_outputs(out: Path, summary: dict, d: Slices, scored: Scored, cfg: AnomalyConfig, force: bool) -> None:
    """metrics.json, slice_scores.csv, one overlay figure per test case and (``cfg.nifti``) the primary score's
    NIfTI maps, written atomically to ``out``."""
    primary = scored.maps[summary["primary_score"]]  # (N, H, W) post-processed; and thresholded:
    binary = segment(primary, summary["scores"][summary["primary_score"]]["threshold"], cfg.post.min_area) & d.brain
    with atomic_dir(out, force=force) as tmp:
        table = d.manifest[["subject", "slice_index"]].copy()
        table.insert(0, "store_row", d.rows)
        table["role"] = np.where(np.isin(d.cases, d.val), "validation", "test")
        table["lesion_pixels"] = (d.lesion & d.brain).reshape(len(d.rows), -1).sum(1)
        table = pd.concat([table, pd.DataFrame({k: np.round(v, 6) for k, v in scored.slice_cols.items()})], axis=1)
        table.to_csv(tmp / "slice_scores.csv", index=False)
        write_overlays(tmp, summary, d, scored, cfg, binary)
        if cfg.nifti:
            summary["nifti"] = write_source_maps(tmp / "maps", summary, d, primary, binary)
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2))


def write_source_maps(folder: Path, summary: dict, d: Slices, primary: np.ndarray, binary: np.ndarray) -> dict:
    """Per case, the primary score (N, H, W) and its thresholded map ``binary`` on the case's source scan: ``maps/<case>_score.nii.gz``
    (post-processed score, float32) and ``maps/<case>_mask.nii.gz`` (uint8, the validation threshold), on the
    scan's own grid (``data.to_source``), to open over the original in a viewer. Cases whose store predates the
    recorded geometry, or whose source file is gone or changed, are listed with the reason instead."""
    import nibabel as nib

    from ..data.to_source import to_source
    from ..io.download import file_sha256

    subjects = d.store.subjects.set_index("subject")
    side = d.store.array("images").shape[-1]  # maps at the model's size -> the store's grid
    primary, binary = resize_images(primary, side)[:, 0].numpy(), resize_masks(binary, side)
    written, skipped = [], {}
    folder.mkdir()
    for case in sorted(set(d.cases)):
        row = subjects.loc[case] if case in subjects.index else None
        if row is None or "grid" not in subjects.columns or not isinstance(row["grid"], str):
            skipped[case] = "the store does not record its grid geometry (an older store): prepare it again"
            continue
        source = Path(row["source"])
        if not source.exists() or file_sha256(source) != row["checksum"]:
            skipped[case] = f"source scan {source} is missing or changed since prepare"
            continue
        idx = np.flatnonzero(d.cases == case)
        slice_index = d.manifest["slice_index"].to_numpy()[idx]
        nib.save(to_source(primary[idx], slice_index, row["grid"], source), folder / f"{_safe(case)}_score.nii.gz")
        nib.save(to_source(binary[idx].astype(np.float32), slice_index, row["grid"], source, nearest=True),
                 folder / f"{_safe(case)}_mask.nii.gz")
        written.append(case)
    return {"folder": "maps", "score": summary["primary_score"],
            "threshold": summary["scores"][summary["primary_score"]]["threshold"], "cases": written,
            "skipped": skipped, "grid": "each case's source scan (its shape, affine and axis order)"}


def write_overlays(folder: Path, summary: dict, d: Slices, scored: Scored, cfg: AnomalyConfig,
                   binary: np.ndarray) -> None:
    """``overlay_<case>.png`` per test case: its ``overlay_slices`` slices with the largest lesions."""
    from ..report.html import png_bytes

    threshold = summary["scores"][summary["primary_score"]]["threshold"]
    primary = scored.maps[summary["primary_score"]]
    source, name = summary["primary_score"].split("/", 1)
    if source == "ensemble":  # show the reconstructions of its best member's model
        source, name = summary["scores"][summary["primary_score"]]["members"][0].split("/", 1)
    label = "restoration" if name.startswith("restoration") and f"{source}:restoration" in scored.recons \
        else "reconstruction"
    recon = scored.recons.get(f"{source}:restoration" if label == "restoration" else source, scored.recons["model"])
    title = f"{summary['primary_score']}, threshold {threshold:.4g} from validation cases"
    for case in d.test:
        idx = np.flatnonzero(d.cases == case)
        area = (d.lesion[idx] & d.brain[idx]).reshape(len(idx), -1).sum(1)
        pick = np.sort(idx[np.argsort(-area, kind="stable")[:cfg.overlay_slices]])
        fig = overlay_figure(case, d.images[pick], np.clip(recon[pick], 0, 1), primary[pick],
                             binary[pick], d.lesion[pick], d.brain[pick], d.manifest["slice_index"].to_numpy()[pick],
                             title, d.store.config.axis, label)
        (folder / f"overlay_{_safe(case)}.png").write_bytes(png_bytes(fig, dpi=100))


def summary_lines(summary: dict) -> list[str]:
    """A short text table of the headline numbers of every score (* = the recommended primary score)."""
    lines = [f"{'score':30s} {'AUROC':>6s} {'AUPRC':>6s} {'Dice':>6s} {'valDice':>7s} {'best':>6s} {'sliceAUC':>8s} "
             f"{'freeDice':>8s} {'caseAUC':>7s}",
             "(Dice at the validation threshold; best = upper bound on test; freeDice = Dice at the label-free "
             "threshold from healthy slices; caseAUC = healthy test subjects vs test cases)"]

    def f(x, w=6):
        return f"{'n/a':>{w}s}" if x is None else f"{x:{w}.3f}"

    for key, r in summary["scores"].items():
        mark = "*" if key == summary.get("primary_score") else " "
        lines.append(f"{mark}{key:29s} {f(r['pixel_auroc'])} {f(r['pixel_auprc'])} {f(r['dice'])} "
                     f"{f(r.get('val_dice'), 7)} {f(r['best_dice_upper_bound'])} {f(r['slice_auroc'], 8)} "
                     f"{f((r.get('label_free') or {}).get('dice'), 8)} "
                     f"{f((r.get('case_detection') or {}).get('auroc'), 7)}")
    first = next(iter(summary["scores"].values()), None)
    if first is not None:
        lines.append(f"(trivial Dice of calling the whole brain abnormal: {f(first['dice_all_brain']).strip()}; "
                     f"* primary score: {summary.get('primary_selection')})")
    return lines
