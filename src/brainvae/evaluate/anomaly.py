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

Scores and post-processing: ``anomaly_scores`` (An & Cho 2015; Zimmerer et al.
2018/2019; Baur et al. 2021; StRegA, Chatterjee et al. 2022). Metrics:
``anomaly_metrics``. Cases are subjects: a seeded ~30 % of them (or
``val_cases``) choose the threshold, the others are the test cases; the two
never overlap and no test label reaches the threshold.

Output ``OUT/`` (atomic): ``metrics.json``, ``slice_scores.csv`` and
``overlay_<case>.png`` per test case (input, reconstruction, score,
thresholded map, ground-truth outline on the slices with the largest lesions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..data.dataset import SliceBatches
from ..data.store import SliceStore
from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import atomic_dir
from ..rundir import RunDir
from .anomaly_metrics import evaluate_score, slice_scores
from .anomaly_scores import (SCORE_HELP, PostProcess, available_scores, brightness_hyper,
                             brightness_hypo, eroded_mask, is_stochastic, likelihood_kind, model_score_batch,
                             postprocess, segment)


# -- data -------------------------------------------------------------------------------------------
def require_lesions(store: SliceStore) -> None:
    if not store.has_lesions:
        raise BrainVAEError(
            f"{store.path} has no lesion masks (lesion.npy): anomaly localisation needs ground truth. "
            f"For a healthy store, add synthetic anomalies first: "
            f"`brainvae data anomalies {store.path} --out {store.path}-anomalies`")


def _resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) binary masks -> (N, size, size) by area averaging (>= 0.5), as images are resized."""
    if masks.shape[-1] == size:
        return np.asarray(masks) > 0
    t = torch.from_numpy(np.asarray(masks, np.float32))[:, None]
    return (F.interpolate(t, size=(size, size), mode="area")[:, 0] >= 0.5).numpy()


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
                desc: str = "score") -> dict[str, np.ndarray]:
    """Raw score maps (N, H, W) float32 of every name for all slices of ``data``, plus ``"recon"``.

    ``kl_additive``'s two terms are scaled by the 99th percentile of each over the in-brain
    pixels of all slices (no labels involved) and added.
    """
    gen = torch.Generator(device=model.device).manual_seed(seed)
    use_cond = bool(model.config.conditions)
    chunks: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        x, cond = data.batch(np.arange(start, min(start + batch_size, len(data))))
        maps = model_score_batch(model, x, cond if use_cond else None, names, n_samples, gen)
        for k, v in maps.items():
            chunks.setdefault(k, []).append(v[:, 0].float().cpu().numpy())
    out = {k: np.concatenate(v) for k, v in chunks.items()}
    if "_kl_residual" in out:
        r, g = out.pop("_kl_residual"), out.pop("_kl_grad")
        inside = brain if brain is not None else np.ones(r.shape, bool)
        s_r = max(float(np.percentile(r[inside], 99)), 1e-12) if inside.any() else 1.0
        s_g = max(float(np.percentile(g[inside], 99)), 1e-12) if inside.any() else 1.0
        out["kl_additive"] = r / s_r + g / s_g
        out["_kl_additive_scales"] = np.array([s_r, s_g])
    return out


# -- figures ----------------------------------------------------------------------------------------
def overlay_figure(case: str, images, recon, score, binary, lesion, brain, slice_ids, title: str):
    """Columns: slices; rows: input + truth, reconstruction, score, thresholded map + truth."""
    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(1.9 * n, 7.6))
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
    fig.suptitle(f"{case}: {title} (green: ground truth)", fontsize=8)
    fig.tight_layout()
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# -- the command ------------------------------------------------------------------------------------
def evaluate_anomaly(run: Path | str, data: Path | str, out: Path | str | None = None, *,
                     baseline: Path | str | None = None, val_cases: list[str] | None = None,
                     val_fraction: float = 0.3, primary: str = "residual", split: str | None = None,
                     n_samples: int = 8, post: PostProcess = PostProcess(), batch_size: int = 64,
                     overlay_slices: int = 4, seed: int = 0, device: str | torch.device = "cpu",
                     force: bool = False, progress: bool = True) -> dict:
    """Score ``data`` with the model of ``run`` (and the baselines); write metrics and overlays to ``out``."""
    from .. import generate as G
    from ..provenance import provenance
    from ..report.html import png_bytes

    run = Path(run)
    store = SliceStore(data)
    require_lesions(store)  # the data first: its error says how to make a store with lesions
    out = Path(out) if out is not None else RunDir.resolve(run).output("anomaly")
    if out.exists() and not force:
        raise OutputExistsError(out)
    rows = store.indices(split)
    if len(rows) == 0:
        raise BrainVAEError(f"{store.path}: split {split!r} has no slices")
    manifest = store.manifest.iloc[rows].reset_index(drop=True)
    cases = manifest["subject"].astype(str).to_numpy()
    val, test = split_cases(list(cases), val_cases, val_fraction, seed, store.path)
    lesion_store = np.asarray(store.array("lesion")[rows])
    for role, group in (("validation", val), ("test", test)):
        if not lesion_store[np.isin(cases, group)].any():
            raise BrainVAEError(f"{store.path}: the {role} cases {group} have no lesion pixels; "
                                "choose other --val-cases or another --seed")

    model = G.load(run, device=device)
    if available_scores(model).get(primary, "unknown score") is not None:
        ok = [n for n, why in available_scores(model).items() if why is None]
        raise BrainVAEError(f"--score {primary!r} is not available for this {model.arch} model; choose from {ok}")
    size = model.config.image_size
    base_model = G.load(baseline, device=device) if baseline is not None else None
    if base_model is not None and base_model.config.image_size != size:
        raise BrainVAEError(f"{baseline}: image size {base_model.config.image_size} differs from {run}'s {size}; "
                            "a baseline must score the same pixels")
    data_b = SliceBatches(store, split, size, model.device)
    images = np.concatenate([data_b.batch(np.arange(s, min(s + 256, len(data_b))))[0][:, 0].cpu().numpy()
                             for s in range(0, len(data_b), 256)])
    brain = _resize_masks(np.asarray(store.array("brain")[rows]), size)
    lesion = _resize_masks(lesion_store, size)
    region = eroded_mask(brain, post.erode)

    def measure(raw: np.ndarray) -> tuple[np.ndarray, dict]:
        s = postprocess(raw, region, post.median)
        m = evaluate_score(s, lesion, brain, cases, val, test, min_area=post.min_area, seed=seed)
        return s, m

    results: dict[str, dict] = {}
    unavailable: dict[str, str] = {}
    keep: dict[str, np.ndarray] = {}  # post-processed maps of the primary score (for the overlays)
    slice_cols: dict[str, np.ndarray] = {}
    recon = None
    sources = [("model", run, model)] + ([("baseline", Path(baseline), base_model)] if base_model is not None else [])
    notes = []
    for source, path, m in sources:
        avail = available_scores(m)
        names = [n for n, why in avail.items() if why is None]
        for n, why in avail.items():
            if why is not None:
                unavailable[f"{source}/{n}"] = why
        if not is_stochastic(m):
            notes.append(f"{source} ({m.arch}) is deterministic: recon_prob uses its single code and is "
                         f"r^2 / (2 sigma^2) + const, a monotone function of the residual (same ranking)")
        raw = score_model(m, SliceBatches(store, split, size, m.device), names, n_samples=n_samples,
                          batch_size=batch_size, seed=seed, brain=brain, progress=progress, desc=f"score {source}")
        scales = raw.pop("_kl_additive_scales", None)
        rec = raw.pop("recon")
        if source == "model":
            recon = rec
        for n in names:
            key = f"{source}/{n}"
            s, metrics = measure(raw.pop(n))
            results[key] = {"source": source, "run": str(path), "arch": m.arch, "score": n,
                            "description": SCORE_HELP.get(n, n), **metrics}
            if n == "recon_prob":
                results[key]["likelihood"] = likelihood_kind(m)
                results[key]["samples"] = n_samples if is_stochastic(m) else 1
            if n == "kl_additive" and scales is not None:
                results[key]["term_scales"] = {"residual": float(scales[0]), "kl_gradient": float(scales[1])}
            slice_cols[key] = slice_scores(s, brain)
            if source == "model" and n == primary:
                keep["primary"] = s
    for n, fn in (("hyper", brightness_hyper), ("hypo", brightness_hypo)):
        key = f"brightness/{n}"
        s, metrics = measure(fn(torch.from_numpy(images), torch.from_numpy(brain)).numpy())
        results[key] = {"source": "brightness", "run": None, "arch": None, "score": f"brightness_{n}",
                        "description": SCORE_HELP[f"brightness_{n}"], **metrics}
        slice_cols[key] = slice_scores(s, brain)

    primary_key = f"model/{primary}"
    threshold = results[primary_key]["threshold"]
    summary = {
        "run": str(run), "arch": model.arch, "store": str(store.path), "baseline_run": str(baseline) if baseline else None,
        "split": split or "all", "image_size": size, "n_slices": int(len(rows)),
        "cases": {"validation": val, "test": test},
        "validation_selection": ("given (--val-cases)" if val_cases else
                                 f"seeded random {val_fraction:g} of the cases (seed {seed})"),
        "postprocess": {**post.to_dict(), "order": "median filter, zero outside the eroded brain mask; "
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
        "primary_score": primary_key,
        "scores": results,
        "unavailable": unavailable,
        "notes": notes,
        "score_descriptions": SCORE_HELP,
    }
    summary["provenance"] = provenance(seed=seed, n_samples=n_samples, device=str(model.device))

    with atomic_dir(out, force=force) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2))
        table = manifest[["subject", "slice_index"]].copy()
        table.insert(0, "store_row", rows)
        table["role"] = np.where(np.isin(cases, val), "validation", "test")
        table["lesion_pixels"] = (lesion & brain).reshape(len(rows), -1).sum(1)
        table = pd.concat([table, pd.DataFrame({k: np.round(v, 6) for k, v in slice_cols.items()})], axis=1)
        table.to_csv(tmp / "slice_scores.csv", index=False)
        binary = segment(keep["primary"], threshold, post.min_area) & brain
        for case in test:
            idx = np.flatnonzero(cases == case)
            area = (lesion[idx] & brain[idx]).reshape(len(idx), -1).sum(1)
            pick = np.sort(idx[np.argsort(-area, kind="stable")[:overlay_slices]])
            fig = overlay_figure(case, images[pick], np.clip(recon[pick], 0, 1), keep["primary"][pick],
                                 binary[pick], lesion[pick], brain[pick], manifest["slice_index"].to_numpy()[pick],
                                 f"{model.arch} {primary}, threshold {threshold:.4g} from validation cases")
            (tmp / f"overlay_{_safe(case)}.png").write_bytes(png_bytes(fig, dpi=100))
    summary["out"] = str(out)
    return summary


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
