"""Label-free thresholds and feature nets for the dae's perceptual scores on BraTS T1 (issue 14; not a test),
on the VALIDATION cases only. No test case is scored.

The session-14 primary (the rank-mean ensemble of the dae's ``perceptual_neg``, ``restoration_perceptual`` and
``perceptual``) missed the label-free Dice goal because its threshold, fixed on healthy IXI validation slices
at 1 % false positives, flags far more of BraTS's normal tissue (19 %): the two stores' score levels differ.
Per feature net (``--features``, repeatable), this measures on the validation cases:

* each score's Dice at its own best threshold, AUPRC and pooled pixel AUROC (as ``brainvae anomaly``);
* its label-free Dice at the 1 % healthy-validation threshold, with three calibrations of the score:
  ``global`` (as now: the raw post-processed score), ``case / median`` (each volume's scores divided by their
  median over its eroded brain, the healthy subjects' likewise) and ``case robust z`` ((score - median) / IQR).
  A per-volume calibration needs no label either: it removes a scanner's or a protocol's level.

    python benchmarks/bench_anomaly_labelfree.py --run ixi-t1-128-dae --data datasets/brats-t1-mni \\
        --healthy datasets/ixi-t1-mni --features runs/fae-10m --features runs/fae-30m --features runs/fae-60m \\
        --out benchmarks/results/anomaly/labelfree_val.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from brainvae import generate as G
from brainvae.data.dataset import SliceBatches
from brainvae.data.store import SliceStore
from brainvae.evaluate.anomaly import (AnomalyConfig, Ensemble, feature_net, healthy_split, load_slices, score_model,
                                       select_cases)
from brainvae.evaluate.anomaly_metrics import best_dice, dice_at, label_free_threshold, pixel_auprc, pixel_auroc
from brainvae.evaluate.anomaly_scores import PostProcess, postprocess
from brainvae.provenance import provenance

SCORES = ["perceptual_neg", "restoration_perceptual", "perceptual"]


def calibrate(s: np.ndarray, region: np.ndarray, volumes: np.ndarray, how: str) -> np.ndarray:
    """(N, H, W) scores with each volume's level removed (``how``: global, median or robust_z), 0 outside region."""
    if how == "global":
        return s
    out = np.zeros_like(s)
    for v in np.unique(volumes):
        k = volumes == v
        inside = s[k][region[k]]
        med = float(np.median(inside))
        if how == "median":
            out[k] = s[k] / max(med, 1e-12)
        else:
            q25, q75 = np.percentile(inside, [25, 75])
            out[k] = (s[k] - med) / max(float(q75 - q25), 1e-12)
    return np.where(region, out, 0).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a dae run (or shipped name)")
    ap.add_argument("--data", type=Path, required=True, help="store with lesion masks (e.g. BraTS)")
    ap.add_argument("--healthy", type=Path, required=True, help="healthy store (its val split)")
    ap.add_argument("--features", action="append", required=True, help="a fae run; repeat to compare")
    ap.add_argument("--across", type=int, default=11)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg = AnomalyConfig(post=PostProcess(across=args.across))
    store, healthy = SliceStore(args.data), SliceStore(args.healthy)
    dae = G.load(args.run, device="cpu")
    rows, val, test, lesion = select_cases(store, cfg)
    d = load_slices(store, cfg, rows, val, test, lesion, dae)
    v = np.flatnonzero(np.isin(d.cases, val))  # the validation cases' slices only: no test case is scored
    brain, region, runs, cases = d.brain[v], d.region[v], d.runs[v], d.cases[v]
    lesions = d.lesion[v]
    truth = (lesions > 0) & brain
    data = SliceBatches(store, cfg.split, d.size, dae.device)

    h = healthy_split(healthy, "val", d.size, cfg)  # the slices brainvae anomaly --healthy scores
    h_data = SliceBatches(healthy, "val", d.size, dae.device)

    out_rows = []
    for fpath in args.features:
        t0 = time.perf_counter()
        feats = feature_net(fpath, dae.device, d.size)
        raw, scales = score_model(dae, data, SCORES, rows=v, brain=brain, features=feats, seed=cfg.seed)
        h_raw, _ = score_model(dae, h_data, SCORES, rows=h.pick, brain=h.brain, features=feats, scales=scales,
                               seed=cfg.seed)
        maps = {n: postprocess(raw[n], region, cfg.post.median, cfg.post.across, runs) for n in SCORES}
        h_maps = {n: postprocess(h_raw[n], h.region, cfg.post.median, cfg.post.across, h.runs) for n in SCORES}
        ens = Ensemble.fit(SCORES, maps, region)
        maps["ensemble"], h_maps["ensemble"] = ens(maps, region), ens(h_maps, h.region)
        seconds = round(time.perf_counter() - t0, 1)
        for n in maps:
            for how in ("global", "median", "robust_z"):
                s, hs = calibrate(maps[n], region, cases, how), calibrate(h_maps[n], h.region, h.subjects, how)
                threshold = label_free_threshold(hs, h.brain, cfg.fpr)
                free = dice_at(s, lesions, brain, cases, val, threshold, min_area=cfg.post.min_area)
                row = {"features": str(fpath), "score": n, "calibration": how,
                       "val_dice": round(best_dice(s[brain], truth[brain])[0], 4),
                       "val_auprc": round(float(pixel_auprc(s[brain], truth[brain])), 4),
                       "val_auroc": round(float(pixel_auroc(s[brain], truth[brain])), 4),
                       "label_free_dice": free["dice"], "fpr_normal_tissue": free["fpr_normal_tissue"],
                       "tpr_lesion": free["tpr_lesion"], "seconds": seconds}
                out_rows.append(row)
                print(row, flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "store": str(args.data), "healthy": str(args.healthy),
                                    "across": args.across, "fpr": cfg.fpr, "validation_cases": val,
                                    "healthy_val_slices": int(len(h.pick)), "rows": out_rows,
                                    "provenance": provenance(command="benchmarks/bench_anomaly_labelfree.py")},
                                   indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
