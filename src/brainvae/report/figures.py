"""Figures drawn from a slice store (never recomputed from volumes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..data.store import SliceStore
from ..io.atomic import atomic_write_bytes
from .html import png_bytes


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
    fig.suptitle(f"{store.path.name}: {cfg.axis}, {cfg.size} px at {cfg.voxel_mm:g} mm"
                 f"{', MNI-registered' if cfg.register else ''} (cyan: brain mask, red: lesion)", fontsize=8)
    fig.tight_layout()
    return fig


def save_store_montage(store: SliceStore, out: Path, **kwargs) -> Path:
    atomic_write_bytes(Path(out), png_bytes(store_montage(store, **kwargs), dpi=110))
    return Path(out)
