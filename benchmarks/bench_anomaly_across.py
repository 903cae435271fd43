"""Choose the through-plane mean (``brainvae anomaly --across K``) and compare models on the VALIDATION cases
only (issue 14; not a test): for each run, its residual scores of the store's slices, post-processed as
``brainvae anomaly`` does with each K, and the validation cases' Dice at their own best threshold (what chooses
the primary score), AUPRC and AUROC. No test case is scored.

    python benchmarks/bench_anomaly_across.py --data datasets/brats-t1-mni --runs runs/dae-20m runs/dae-g3 \
        --across 1 3 5 7 9 11 --out benchmarks/results/anomaly/across_val.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brainvae.data.dataset import SliceBatches
from brainvae.data.store import SliceStore
from brainvae.evaluate.anomaly import AnomalyConfig, load_sources, load_slices, score_model, select_cases
from brainvae.evaluate.anomaly_metrics import best_dice, pixel_auprc, pixel_auroc
from brainvae.evaluate.anomaly_scores import postprocess
from brainvae.provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="store with lesion masks (e.g. BraTS)")
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--scores", nargs="+", default=["residual_neg", "residual_neg_smooth"])
    ap.add_argument("--across", type=int, nargs="+", default=[1, 3, 5, 7, 9, 11])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = AnomalyConfig()
    store = SliceStore(args.data)
    rows, val, test, lesion = select_cases(store, cfg)
    results = []
    for run in args.runs:
        model = load_sources(run, cfg, "cpu")[0].model
        d = load_slices(store, cfg, rows, val, test, lesion, model)
        v = np.flatnonzero(np.isin(d.cases, val))  # the validation cases' slices only: no test case is scored
        raw, _ = score_model(model, SliceBatches(store, cfg.split, d.size, model.device), args.scores, rows=v,
                             brain=d.brain[v])
        inside = d.brain[v]
        truth = (d.lesion[v] > 0) & inside
        for name in args.scores:
            for k in args.across:
                s = postprocess(raw[name], d.region[v], cfg.post.median, k, d.runs[v])
                dice, _ = best_dice(s[inside], truth[inside])
                row = {"run": str(run), "score": name, "across": k, "val_dice": round(float(dice), 4),
                       "val_auprc": round(float(pixel_auprc(s[inside], truth[inside])), 4),
                       "val_auroc": round(float(pixel_auroc(s[inside], truth[inside])), 4)}
                results.append(row)
                print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"store": str(args.data), "validation_cases": val, "rows": results,
                                    "provenance": provenance(command="benchmarks/bench_anomaly_across.py")},
                                   indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
