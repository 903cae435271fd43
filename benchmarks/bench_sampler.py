"""Quality and speed of a learned-prior model (ldm) against its sampler settings. Not a test.

For each (guide, guidance, solver, steps) setting: n samples at the conditions of n
real slices of the split (as ``brainvae evaluate`` draws them), their Fréchet distance
in the store's feature net and in PCA-64 (each as a ratio to the real-train vs
real-split floor of the same n), the classifier two-sample test accuracy against
the real slices (floor: real train vs real split), and sampling speed
(slices/s through ``brainvae.generate.sample_images``, bf16 where native).
Choose settings on ``--split val``; measure the chosen ones on test.

    python benchmarks/bench_sampler.py runs/ldm --data datasets/ixi-t1-mni --steps 2 4 8 16 [--guidance 1 2] \
        [--guides unconditional weak] [--split val] [--n 1000] [--student]

``--student`` adds a row for the model's distilled few-step student (``sampler = "student"``); ``--steps 0``
measures no prior sampler settings (the student alone).

Writes benchmarks/results/sampler_<run name>.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from brainvae import generate as G
from brainvae.conditions import conditions_of
from brainvae.data.resize import read_resized
from brainvae.data.store import SliceStore
from brainvae.evaluate import features as Fe
from brainvae.evaluate import realism as R
from brainvae.evaluate.c2st import c2st
from brainvae.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--student", action="store_true", help="also the distilled student sampler")
    ap.add_argument("--solvers", nargs="+", default=["heun", "euler"])
    ap.add_argument("--guidance", type=float, nargs="+", default=[None], help="default: the model's")
    ap.add_argument("--guides", nargs="+", default=[None], help="unconditional and/or weak (default: the model's)")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    store = SliceStore(args.data)
    model = G.load(args.run, which="best")
    size = model.config.image_size
    rng = np.random.default_rng(args.seed)
    test_rows, train_rows = store.indices(args.split), store.indices("train")
    m = min(args.n, len(test_rows), len(train_rows))
    test_sel = np.sort(rng.choice(test_rows, m, replace=False))
    train_sel = np.sort(rng.choice(train_rows, m, replace=False))
    real, train = read_resized(store.images, test_sel, size), read_resized(store.images, train_sel, size)
    subject = store.manifest["subject"].to_numpy()
    cond = {k: v for k, v in conditions_of(store.manifest.iloc[test_sel]).items()
            if k in model.config.conditions} or None

    net, _ = Fe.load_or_train_featnet(store, Fe.FeatNetConfig(), progress=False)
    pca = Fe.fit_pca(train, seed=args.seed)
    f_real, f_train = Fe.featnet_features(net, real)[0], Fe.featnet_features(net, train)[0]
    p_real, p_train = Fe.pca_features(pca, real), Fe.pca_features(pca, train)
    floor = {"fd_featnet": R.frechet_distance(f_real, f_train), "fd_pca64": R.frechet_distance(p_real, p_train),
             "c2st_acc": c2st(train, real, seed=args.seed, groups_a=subject[train_sel], groups_b=subject[test_sel])["accuracy"]}
    print(f"floor: {floor}")

    rows = []
    settings = [{"sampler": "prior", "steps": steps, "solver": solver, "guidance": w, "guide": g}
                for g in args.guides for w in args.guidance for solver in args.solvers for steps in args.steps if steps]
    settings += [{"sampler": "student"}] if args.student else []
    for sampler in settings:
        G.sample_images(model, 64, cond and {k: v[:64] for k, v in cond.items()}, args.seed, sampler=sampler)
        t = time.perf_counter()
        samples = G.sample_images(model, m, cond, args.seed, sampler=sampler)
        speed = m / (time.perf_counter() - t)
        fd = R.frechet_distance(f_real, Fe.featnet_features(net, samples)[0])
        fd_pca = R.frechet_distance(p_real, Fe.pca_features(pca, samples))
        acc = c2st(samples, real, seed=args.seed, groups_b=subject[test_sel])["accuracy"]
        used = model.sampler_settings(**sampler)
        if sampler["sampler"] == "student":  # K Euler steps of one network
            passes = used["steps"]
        else:  # velocity evaluations; guidance other than 0 and 1 evaluates two networks
            passes = used["steps"] * (2 if used["solver"] == "heun" else 1)
            passes *= 2 if used["guidance"] not in (0.0, 1.0) else 1
        row = {**used, "network_passes": passes,
               "slices_per_s": round(speed, 1), "fd_featnet_ratio": fd / floor["fd_featnet"],
               "fd_pca64_ratio": fd_pca / floor["fd_pca64"], "c2st_acc": acc}
        rows.append(row)
        print(json.dumps(row))
    out = args.out or ROOT / "benchmarks" / "results" / f"sampler_{args.run.name}.json"
    out.write_text(json.dumps({"run": str(args.run), "store": str(args.data), "split": args.split, "n": m,
                               "floor": floor, "rows": rows, "provenance": provenance()}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
