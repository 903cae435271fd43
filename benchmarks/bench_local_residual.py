"""The settings of ``residual_local`` / ``restoration_local`` (issue 14; not a test), on the VALIDATION cases
only: for one dae run, the signed residual of its restoration after k passes (``DAE.restore``), without its
slow drift at Gaussian scale sigma (``scoring.local_residual``; 0 = kept), darker part + w x brighter part,
post-processed as ``brainvae anomaly --across 11`` does. Per setting: the validation cases' Dice at their own
best threshold, AUPRC and AUROC, and the label-free threshold's Dice (it flags 1 % of the healthy store's
validation pixels) with its false-positive rate on the cases' normal tissue. No test case is scored.

    python benchmarks/bench_local_residual.py --run runs/dae-r8g3 --data datasets/brats-t1-mni \
        --healthy datasets/ixi-t1-mni --out benchmarks/results/anomaly/local_grid_val.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from brainvae import generate as G
from brainvae.data.dataset import SliceBatches
from brainvae.data.resize import resize_masks
from brainvae.data.store import SliceStore
from brainvae.evaluate.anomaly import AnomalyConfig, load_slices, select_cases, slice_images
from brainvae.evaluate.anomaly_metrics import best_dice, dice_at, label_free_threshold, pixel_auprc, pixel_auroc
from brainvae.evaluate.anomaly_scores import eroded_mask, postprocess, slice_runs
from brainvae.models.scoring import local_residual
from brainvae.provenance import provenance

# (passes k, drift sigma px (0: kept), brighter-part weight w): one change at a time from plain residual_neg,
# then the combinations around the chosen one (3, 32, 0.25)
SETTINGS = [(1, 0, 0.0), (2, 0, 0.0), (3, 0, 0.0), (4, 0, 0.0), (1, 8, 0.0), (1, 16, 0.0), (1, 32, 0.0),
            (1, 64, 0.0), (1, 0, 0.25), (1, 0, 0.5), (1, 32, 0.25), (3, 32, 0.0), (3, 32, 0.25), (3, 32, 0.5),
            (2, 32, 0.25), (4, 32, 0.25), (3, 16, 0.25), (3, 64, 0.25)]


@torch.no_grad()
def restorations(model, images: np.ndarray, passes: int) -> np.ndarray:
    """(N, H, W) -> (passes, N, H, W): the restoration after 1..passes passes."""
    out = []
    for s in range(0, len(images), 64):
        x, steps = torch.from_numpy(images[s:s + 64])[:, None].float(), []
        for _ in range(passes):
            x = model.restore(x, passes=1)  # one pass more (restore feeds its output back the same way)
            steps.append(x[:, 0].numpy())
        out.append(np.stack(steps))
    return np.concatenate(out, 1)


def local_score(images, restored, sigma: float, w: float) -> np.ndarray:
    """(N, H, W) ``local_residual`` with these settings."""
    x, r = torch.from_numpy(images)[:, None], torch.from_numpy(restored)[:, None]
    return local_residual(r, x, sigma, w)[:, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a dae run")
    ap.add_argument("--data", type=Path, required=True, help="store with lesion masks (e.g. BraTS)")
    ap.add_argument("--healthy", type=Path, required=True, help="healthy store: its val split fixes the threshold")
    ap.add_argument("--across", type=int, default=11)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = AnomalyConfig()
    model = G.load(args.run, device="cpu")
    store = SliceStore(args.data)
    rows, val, test, lesion = select_cases(store, cfg)
    d = load_slices(store, cfg, rows, val, test, lesion, model)
    model = model.for_inference()
    v = np.isin(d.cases, val)  # the validation cases' slices only: no test case is scored
    images, brain, cases, runs = d.images[v], d.brain[v], d.cases[v], d.runs[v]
    truth, region = (d.lesion[v] > 0) & brain, d.region[v]
    healthy = SliceStore(args.healthy)
    h_rows = healthy.indices("val")
    h_images = slice_images(SliceBatches(healthy, "val", d.size, model.device))
    h_brain = resize_masks(healthy.array("brain")[h_rows], d.size)
    h_subjects = healthy.manifest["subject"].iloc[h_rows].astype(str).to_numpy()
    h_runs = slice_runs(h_subjects, healthy.manifest["slice_index"].iloc[h_rows].to_numpy())
    h_region = eroded_mask(h_brain, cfg.post.erode)
    k_max = max(k for k, _, _ in SETTINGS)
    rest, h_rest = restorations(model, images, k_max), restorations(model, h_images, k_max)
    results = []
    for k, sigma, w in SETTINGS:
        s = postprocess(local_score(images, rest[k - 1], sigma, w), region, cfg.post.median, args.across, runs)
        hs = postprocess(local_score(h_images, h_rest[k - 1], sigma, w), h_region, cfg.post.median, args.across,
                         h_runs)
        dice, _ = best_dice(s[brain], truth[brain])
        free = dice_at(s, truth, brain, cases, val, label_free_threshold(hs, h_brain, cfg.fpr),
                       min_area=cfg.post.min_area)
        row = {"passes": k, "drift_sigma": sigma, "bright_weight": w, "val_dice": round(float(dice), 4),
               "val_auprc": round(float(pixel_auprc(s[brain], truth[brain])), 4),
               "val_auroc": round(float(pixel_auroc(s[brain], truth[brain])), 4),
               "val_label_free_dice": free["dice"], "val_label_free_fpr_normal": free["fpr_normal_tissue"]}
        results.append(row)
        print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "store": str(args.data), "healthy": str(args.healthy),
                                    "across": args.across, "validation_cases": val, "rows": results,
                                    "provenance": provenance(command="benchmarks/bench_local_residual.py")},
                                   indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
