"""Train every architecture on one store under the same wall-clock budget; measure test
reconstruction SSIM and save real-vs-sample grids. Not a test.

Part 1 (--archs): each architecture through the real training engine
(`brainvae.train.engine.train`), budget --budget each, then on --n-test random
test slices: SSIM of the mean reconstruction (whole image and inside the brain
mask), sampling speed, and benchmarks/results/grids/<arch>_real_vs_sample.png
(real test slices on the left, prior samples on the right).

Part 2 (--aekl): the default architecture(s) (--default, `vae` unless given) against MONAI's AutoencoderKL
(channels 32-64-64, 1 res block, no attention) trained by the same plain loop
for the same wall-clock time and precision; test SSIM and img/s of both.

    python benchmarks/bench_quality.py --data datasets/ixi-t1-axial128 --budget 8m --aekl 5m

Writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from brainvae import generate as G
from brainvae.config import RunConfig, TrainConfig, load_config, parse_duration, resolve_run_config
from brainvae.data.dataset import SliceBatches
from brainvae.data.store import SliceStore
from brainvae.models.registry import architectures
from brainvae.provenance import provenance
from brainvae.train.engine import new_optimiser, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def ssim_scores(real: np.ndarray, recon: np.ndarray, brain: np.ndarray) -> dict:
    """Mean SSIM over slices: whole image, and the SSIM map averaged inside the brain mask."""
    whole, inside = [], []
    for r, x, b in zip(real, recon, brain):
        s, smap = structural_similarity(r, x, data_range=1.0, full=True)
        whole.append(s)
        inside.append(float(smap[b > 0].mean()) if b.any() else np.nan)
    return {"ssim": float(np.mean(whole)), "ssim_brain": float(np.nanmean(inside))}


def test_slices(store: SliceStore, size: int, n: int, seed: int = 0):
    data = SliceBatches(store, "test", size)
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=min(n, len(data)), replace=False))
    x, cond = data.batch(idx)
    brain = torch.from_numpy(np.ascontiguousarray(store.array("brain")[data.rows[idx]])).float()[:, None]
    if brain.shape[-1] != size:
        brain = torch.nn.functional.interpolate(brain, size=(size, size), mode="nearest")
    return x, cond, brain[:, 0].numpy()


@torch.no_grad()
def reconstruct(model, x, cond, batch: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        c = {k: v[i:i + batch] for k, v in cond.items()} if model.config.conditions else None
        out.append(model.reconstruct(x[i:i + batch], c)[:, 0].float().clamp(0, 1).numpy())
    return np.concatenate(out)


def real_vs_sample_png(path: Path, real: np.ndarray, samples: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.4))
    for i, (imgs, name) in enumerate(((real, "real (test)"), (samples, "generated"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(G.grid(imgs[:16], 4), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def part_archs(store_path: Path, archs: list[str], budget: str, n_test: int, runs: Path) -> list[dict]:
    store = SliceStore(store_path)
    rows = []
    for arch in archs:
        run = runs / f"bench-{arch}"
        cfg_file = resolve_run_config(arch)  # a shipped config name or a path

        base = load_config(RunConfig, cfg_file)
        cfg = RunConfig(model={**base.model, "image_size": store.config.size},
                        train=TrainConfig(**{**base.train.__dict__, "budget": budget, "epochs": 10_000}))
        summary = train(run, store_path, cfg, force=True, progress=False)
        model = G.load(run)
        x, cond, brain = test_slices(store, model.config.image_size, n_test)
        scores = ssim_scores(x[:, 0].numpy(), reconstruct(model, x, cond), brain)
        # 16 test slices spread over subjects and positions; conditional models sample at the
        # same conditions, so the grids are matched in position, age and sex
        show = np.linspace(0, len(x) - 1, 16).astype(int)
        c = {k: v[show] for k, v in cond.items()} if model.config.conditions else None
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        samples = model.sample(16, c, g)[:, 0].float().clamp(0, 1).numpy()
        png = RESULTS / "grids" / f"{arch}_real_vs_sample.png"
        real_vs_sample_png(png, x[show, 0].numpy(), samples,
                           f"{arch}: {summary['steps']} steps in {summary['seconds']:.0f} s on IXI T1 (128 px)")
        row = {**summary, "arch": arch, **scores, "grid": str(png.relative_to(ROOT)),
               "sample_16_seconds": time.perf_counter() - t0}
        print(json.dumps(row))
        rows.append(row)
    return rows


def plain_loop(model, data: SliceBatches, seconds: float, batch: int, dtype) -> tuple[float, int]:
    lr = 1e-3 if not hasattr(model, "net") else 1e-4  # AutoencoderKL (model.net) at its usual rate
    opt = new_optimiser(model.parameters(), TrainConfig(lr=lr), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    steps, start = 0, time.perf_counter()
    model.train()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(data), (batch,), generator=g).numpy()
        x, cond = data.batch(idx)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(x, cond).losses["loss"].float().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return steps * batch / (time.perf_counter() - start), steps


def part_aekl(store_path: Path, seconds: float, n_test: int, defaults: list[str]) -> dict:
    from bench_train import make

    store = SliceStore(store_path)
    size = store.config.size
    data = SliceBatches(store, "train", size)
    x, cond, brain = test_slices(store, size, n_test)
    out = {"seconds_each": seconds, "precision": "bf16"}
    for name in (*defaults, "monai-aekl"):
        torch.manual_seed(0)
        model = make(name, size)  # the shipped config <name>, channels-last as the engine trains it
        rate, steps = plain_loop(model, data, seconds, 32, torch.bfloat16)
        model.eval()
        with torch.no_grad():
            if name == "monai-aekl":
                recon = np.concatenate([model.net.reconstruct(x[i:i + 64])[:, 0].float().clamp(0, 1).numpy()
                                        for i in range(0, len(x), 64)])
            else:
                recon = reconstruct(model, x, cond)
        out[name] = {"train_img_per_s": rate, "steps": steps, **ssim_scores(x[:, 0].numpy(), recon, brain)}
        print(name, json.dumps(out[name]))
    out["speedup"] = {name: out[name]["train_img_per_s"] / out["monai-aekl"]["train_img_per_s"] for name in defaults}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--archs", nargs="*", default=architectures())
    ap.add_argument("--budget", default="8m")
    ap.add_argument("--aekl", default=None, help="wall-clock per model for the AutoencoderKL comparison, e.g. 5m")
    ap.add_argument("--default", nargs="+", default=["vae"], help="architectures compared with AutoencoderKL")
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = ap.parse_args()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update({"store": str(args.data), "budget": args.budget, "provenance": provenance()})
    if args.archs:
        old = {r["arch"]: r for r in result.get("architectures", [])}
        old.update({r["arch"]: r for r in part_archs(args.data, args.archs, args.budget, args.n_test, args.runs)})
        result["architectures"] = list(old.values())
    if args.aekl:
        result["vs_autoencoderkl"] = part_aekl(args.data, parse_duration(args.aekl), args.n_test, args.default)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
