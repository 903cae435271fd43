"""Probe: autoguidance of a trained ldm prior with an external weak prior. Not a test.

Before the ldm had a ``guide`` stage, this asked whether autoguidance (Karras et
al. 2024) could help at all: the shipped prior (v3: 9,140 steps) guided by an
earlier prior of the same network on the same latents (the v1 run's prior,
3,000 steps; its latent standardisation agrees with v3's to 4 decimals), against
classifier-free guidance, on the **validation** split: n samples at the
conditions of n real val slices, FD in the store's feature net (ratio to the
real-train vs real-val floor) and C2ST accuracy against the real slices.

    python benchmarks/probe_autoguidance.py ixi-t1-128 runs/ldm-mni/checkpoints/best.safetensors \\
        --data datasets/ixi-t1-mni --weak 1.5 2 --cfg 1 1.5 2

Prints one JSON row per setting.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from brainvae import generate as G
from brainvae.conditions import conditions_of
from brainvae.data.resize import read_resized
from brainvae.data.store import SliceStore
from brainvae.evaluate import features as Fe
from brainvae.evaluate import realism as R
from brainvae.evaluate.c2st import c2st
from brainvae.models.flow import FlowPrior
from brainvae.train.checkpoint import ema_tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="the ldm to sample (run folder or shipped name)")
    ap.add_argument("weak", help="checkpoint whose EMA prior (flow.*) is the weak network")
    ap.add_argument("--data", required=True)
    ap.add_argument("--weak-guidance", dest="weak_w", type=float, nargs="*", default=[1.5, 2.0])
    ap.add_argument("--cfg", type=float, nargs="*", default=[1.0, 1.5, 2.0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    store, model = SliceStore(args.data), G.load(args.model, which="best")
    rng = np.random.default_rng(args.seed)  # the draws of bench_sampler.py --split val
    sel = np.sort(rng.choice(store.indices("val"), args.n, replace=False))
    tsel = np.sort(rng.choice(store.indices("train"), args.n, replace=False))
    size = model.config.image_size
    real, train = read_resized(store.images, sel, size), read_resized(store.images, tsel, size)
    subject = store.manifest["subject"].to_numpy()
    cond = {k: v for k, v in conditions_of(store.manifest.iloc[sel]).items() if k in model.config.conditions}
    net, _ = Fe.load_or_train_featnet(store, Fe.FeatNetConfig(), progress=False)
    f_real = Fe.featnet_features(net, real)[0]
    floor = R.frechet_distance(f_real, Fe.featnet_features(net, train)[0])

    weak = FlowPrior(model.flow.cfg, model.flow.latent_shape, model.flow.keys)
    weak.load_state_dict({k[len("flow."):]: v for k, v in ema_tensors(args.weak).items() if k.startswith("flow.")})
    model.guide = weak.eval()  # the external prior as the model's weak network, for this probe only
    model.register_buffer("guide_trained", torch.tensor(True))

    settings = [("weak", w) for w in args.weak_w] + [("unconditional", w) for w in args.cfg]
    for guide, w in settings:
        samples = G.sample_images(model, args.n, cond, args.seed, sampler={"guidance": w, "guide": guide})
        fd = R.frechet_distance(f_real, Fe.featnet_features(net, samples)[0]) / floor
        acc = c2st(samples, real, seed=args.seed, groups_b=subject[sel])["accuracy"]
        print(json.dumps({"guide": guide, "guidance": w, "fd_featnet_ratio": round(fd, 3), "c2st_acc": round(acc, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
