"""Figures the report draws itself, from a slice store or a run's logs (nothing is recomputed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..data.store import SliceStore
from ..io.atomic import atomic_write_bytes
from .html import png_bytes

# Letters at the (top, bottom, left, right) edges of a slice in brainvae's display convention
# (``brainvae.data.preprocess``): radiological, the patient's right on the image's left.
ORIENTATION = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
TRAIN_EXTRA = {"img_per_s", "grad_norm", "kl_scale"}  # logged but not losses: not plotted as curves


def orientation_letters(ax, axis: str) -> None:
    """Write the orientation letters at the edges of one image panel (axes coordinates)."""
    style = dict(transform=ax.transAxes, color="yellow", fontsize=6, fontweight="bold")
    top, bottom, left, right = ORIENTATION[axis]
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)


def store_montage(store: SliceStore, *, subjects: list[str] | None = None, n_subjects: int = 4,
                  per_subject: int = 6, positions: tuple[float, float] = (0.1, 0.9)) -> Figure:
    """A grid of slices: one row per subject, columns at evenly spaced positions in the brain.

    The brain mask is outlined in cyan and lesion masks (when the store has them)
    in red, so alignment and lesion placement can be checked by eye. Slices are
    shown in the store's display convention (see ``brainvae.data.preprocess``).
    """
    m = store.manifest
    chosen = subjects or list(dict.fromkeys(m["subject"]))[:n_subjects]
    missing = sorted(set(chosen) - set(m["subject"]))
    if missing:
        from ..errors import BrainVAEError

        raise BrainVAEError(f"{store.path}: no slices for subject(s) {missing}")
    images, brain = store.images, store.array("brain")
    lesion = store.array("lesion") if store.has_lesions else None
    targets = np.linspace(*positions, per_subject)
    fig = Figure(figsize=(1.6 * per_subject, 1.75 * len(chosen)))
    axes = fig.subplots(len(chosen), per_subject, squeeze=False)
    for r, subject in enumerate(chosen):
        rows = m.index[m["subject"] == subject].to_numpy()
        pos = m.loc[rows, "position"].to_numpy()
        for c, t in enumerate(targets):
            i = rows[int(np.argmin(np.abs(pos - t)))]
            ax = axes[r, c]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
            ax.contour(brain[i], levels=[0.5], colors="cyan", linewidths=0.5)
            if lesion is not None and lesion[i].any():
                ax.contour(lesion[i], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{subject[-12:]} k={m.at[i, 'slice_index']}", fontsize=6)
            ax.axis("off")
    cfg = store.config
    if cfg.axis in ORIENTATION:
        orientation_letters(axes[0, 0], cfg.axis)
    fig.suptitle(f"{store.path.name}: {cfg.axis}, {cfg.size} px at {cfg.voxel_mm:g} mm"
                 f"{', MNI-registered' if cfg.register else ''} (cyan: brain mask, red: lesion)", fontsize=8)
    fig.tight_layout()
    return fig


def save_store_montage(store: SliceStore, out: Path, **kwargs) -> Path:
    atomic_write_bytes(Path(out), png_bytes(store_montage(store, **kwargs), dpi=110))
    return Path(out)


def training_curves(log: pd.DataFrame) -> Figure | None:
    """Loss components (train and validation) and the learning rate against the step."""
    if log is None or log.empty or "step" not in log:
        return None
    names: list[str] = []
    for col in log.columns:
        for split in ("train/", "val/"):
            if col.startswith(split) and (n := col[len(split):]) not in TRAIN_EXTRA and n not in names:
                names.append(n)
    names.sort(key=lambda n: (n != "loss", n))
    panels = names[:5] + (["lr"] if "lr" in log else [])
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.0 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, name in zip(axes, panels):
        for split, style in (("train/", dict(lw=1, alpha=0.8)), ("val/", dict(lw=2, marker="o", ms=3))):
            col = name if name == "lr" and split == "train/" else f"{split}{name}"
            if name == "lr" and split == "val/":
                continue
            if col in log:
                s = log[["step", col]].dropna()
                if not s.empty:
                    ax.plot(s["step"], s[col], label=split.rstrip("/") if name != "lr" else "lr", **style)
        _robust_ylim(ax, [log[c].dropna().to_numpy() for c in (f"train/{name}", f"val/{name}") if c in log])
        ax.set_title(name if name != "lr" else "learning rate", fontsize=10)
        ax.set_xlabel("step")
        if name != "lr":
            ax.set_ylabel("nats / pixel")
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _robust_ylim(ax, series: list[np.ndarray]) -> None:
    """Keep the first few steps' large losses from flattening the rest of the curve."""
    tails = [v[len(v) // 10:] for v in series if len(v) >= 10]
    if not tails:
        return
    allv = np.concatenate([v for v in series if len(v)])
    tail = np.concatenate(tails)
    lo, hi = float(allv.min()), float(np.percentile(tail, 99))
    if np.isfinite([lo, hi]).all() and hi > lo and float(allv.max()) > hi + (hi - lo):
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.3 * (hi - lo))


def age_figure(manifest: pd.DataFrame) -> Figure | None:
    subj = manifest.drop_duplicates("subject")
    if "age" not in subj or subj["age"].notna().sum() == 0:
        return None
    fig = Figure(figsize=(6, 2.8))
    ax = fig.subplots()
    splits = [s for s in ("train", "val", "test") if s in set(subj["split"])]
    ages = [subj.loc[subj["split"] == s, "age"].dropna() for s in splits]
    bins = np.histogram_bin_edges(subj["age"].dropna(), bins=12)
    ax.hist(ages, bins=bins, label=splits, stacked=True)
    ax.set_xlabel("age (years)")
    ax.set_ylabel("subjects")
    ax.set_title("Age of the subjects, by split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
