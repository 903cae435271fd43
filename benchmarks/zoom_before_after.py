"""Zoomed crops of the same samples (same seed and conditions) from two models, each with its default sampler (e.g.
ixi-t1-128 v3 and v4), beside real slices at the same positions (validation split). Not a test: a figure to look at.

    python benchmarks/zoom_before_after.py runs/ldm-dec runs/ldm-v4 --data datasets/ixi-t1-mni --out FIG.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from brainvae import generate as G
from brainvae.conditions import conditions_of
from brainvae.data.resize import read_resized
from brainvae.data.store import SliceStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--positions", type=float, nargs="+", default=[0.45, 0.55, 0.65, 0.75])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    store = SliceStore(args.data)
    man = store.manifest
    val = store.indices("val")
    rows = [int(val[np.argmin(np.abs(man["position"].to_numpy()[val] - p))]) for p in args.positions]
    real = read_resized(store.images, np.array(rows), 128)
    cond = conditions_of(man.iloc[rows])
    sets = [("real (val)", real)]
    for label, run in (("before: " + args.before, args.before), ("after: " + args.after, args.after)):
        sets.append((label, G.sample_images(G.load(run), len(rows), cond, args.seed)))
    crop = slice(24, 104)  # the central 80 x 80 px of each 128 px slice
    fig, axes = plt.subplots(len(sets), len(rows), figsize=(3.2 * len(rows), 3.3 * len(sets)))
    for i, (label, images) in enumerate(sets):
        for j, image in enumerate(images):
            ax = axes[i, j]
            ax.imshow(image[crop, crop], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"pos {man['position'].iloc[rows[j]]:.2f}, age {man['age'].iloc[rows[j]]:.0f}")
            if j == 0:
                ax.set_ylabel(label)
    fig.suptitle("central 80 x 80 px, same seed and conditions (a real slice's position, age and sex)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)


if __name__ == "__main__":
    main()
