"""Choose the ldm's restoration settings on VALIDATION cases only (issue 14): restoration_neg_smooth's
pooled Dice (at its own best threshold) and AUPRC on the validation cases of a lesion store, for several
sets of path times. Test cases are never loaded.

    python benchmarks/bench_restoration.py --data datasets/brats-t1-mni --levels 0.3,0.45,0.6 0.5,0.6,0.7
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from brainvae import generate as G
from brainvae.data.dataset import SliceBatches
from brainvae.data.resize import resize_masks
from brainvae.data.store import SliceStore
from brainvae.evaluate.anomaly import AnomalyConfig, score_model, select_cases
from brainvae.evaluate.anomaly_metrics import best_dice, pixel_auprc, pixel_auroc
from brainvae.evaluate.anomaly_scores import eroded_mask, postprocess
from brainvae.hardware import git_commit, hardware


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="ixi-t1-128")
    ap.add_argument("--data", required=True)
    ap.add_argument("--levels", nargs="+", required=True, help="comma-separated path times, one set per value")
    ap.add_argument("--step", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    store = SliceStore(args.data)
    cfg = AnomalyConfig()
    rows, val, _, lesion = select_cases(store, cfg)  # the same seeded validation cases as `brainvae anomaly`
    cases = store.manifest["subject"].iloc[rows].astype(str).to_numpy()
    keep = np.isin(cases, val)
    model = G.load(args.run)
    size = model.config.image_size
    data = SliceBatches(store, None, size, model.device)
    brain = resize_masks(store.array("brain")[rows[keep]], size)
    truth = resize_masks(lesion[keep], size) & brain
    region = eroded_mask(brain, cfg.post.erode)
    results = []
    for spec in args.levels:
        levels = tuple(float(t) for t in spec.split(","))
        model.config = replace(model.config, restore_levels=levels,
                               **({"restore_step": args.step} if args.step else {}))
        start = time.perf_counter()
        raw, _ = score_model(model, data, ["restoration", "restoration_neg_smooth"], rows=np.flatnonzero(keep))
        seconds = time.perf_counter() - start
        for name in ("restoration", "restoration_neg_smooth"):
            s = postprocess(raw[name], region, cfg.post.median)
            d, _ = best_dice(s[brain], truth[brain])
            results.append({"levels": levels, "step": model.config.restore_step, "score": name,
                            "val_dice": round(d, 4), "val_auprc": round(pixel_auprc(s[brain], truth[brain]), 4),
                            "val_auroc": round(pixel_auroc(s[brain], truth[brain]), 4),
                            "seconds": round(seconds, 1), "slices": int(keep.sum())})
            print(json.dumps(results[-1]), flush=True)
    out = {"validation_cases": val, "hardware": hardware(), "git_commit": git_commit(), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
