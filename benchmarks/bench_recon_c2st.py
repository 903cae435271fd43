"""How real do a model's reconstructions look? The autoencoder's bound on sample realism. Not a test.

A two-stage model (ldm) decodes its samples with its autoencoder, so its
samples can look no more real than its reconstructions. For n real slices of a
split (validation by default: this is a tuning tool) this measures the
classifier two-sample test (``evaluate.c2st``) of the reconstructions against
the real slices, its floor (real training vs real slices of the split) and the
in-brain SSIM / PSNR of the reconstructions, with the same draws and C2ST
settings as ``brainvae evaluate`` (so the figures compare with its sample C2ST).

    python benchmarks/bench_recon_c2st.py runs/ldm-dec --data datasets/ixi-t1-mni [--split val] [--n 1000]

Writes the figures as JSON to --out (default: stdout only), with the CPU model and capability.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from brainvae import generate as G
from brainvae.data.store import SliceStore
from brainvae.evaluate.run_eval import c2st_section, load_sets, reconstruction_section
from brainvae.provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--which", default="best", choices=["best", "last"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    store = SliceStore(args.data)
    model = G.load(args.run, which=args.which)
    sets = load_sets(store, args.split, args.n, args.seed, model.config.image_size)
    cond = {k: v for k, v in sets.cond.items() if k in model.config.conditions} or None
    t0 = time.perf_counter()
    recon, _, rec = reconstruction_section(model, sets, cond)  # recon: (m, S, S)
    seconds = time.perf_counter() - t0
    subject = store.manifest["subject"].to_numpy()
    c2st = c2st_section(recon, sets.real, sets.train, subject[sets.eval_sel], subject[sets.train_sel], args.seed)
    result = {"run": str(args.run), "checkpoint": args.which, "split": args.split, "n": len(recon),
              "c2st_reconstructions": c2st, "reconstruction": rec, "reconstruct_seconds": round(seconds, 1),
              "provenance": provenance()}
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"{args.run} ({args.which}, {args.split}, n={len(recon)}): C2ST reconstructions vs real "
          f"{c2st['accuracy']['value']:.3f} (floor {c2st['accuracy']['floor']:.3f}); in-brain SSIM "
          f"{rec['brain']['ssim']['mean']:.3f}")


if __name__ == "__main__":
    main()
