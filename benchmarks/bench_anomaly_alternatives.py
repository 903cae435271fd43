"""Alternatives to the dae's scores on BraTS T1 (issue 14; not a test), on the VALIDATION cases only: what
each changes against the dae's ``residual_neg`` and ``restoration_local``, post-processed as ``brainvae
anomaly --across 11`` does; per variant the validation cases' Dice at their own best threshold, AUPRC and
AUROC. No test case is scored.

Variants (each one idea, all label-free):
* ``score_atlas``: the post-processed score minus its mean at the same place of the MNI grid over the healthy
  store's validation subjects (``-mean``), or divided by its spread there (``z``): a sulcus or a ventricle rim
  that always scores high stops doing so;
* ``case_norm``: each case's score minus its median over its own eroded brain (a scanner's offset);
* ``histmatch``: each case's intensities mapped onto the healthy training histogram (quantile matching over
  the brain) before the dae sees them;
* ``intensity_atlas``: no model; how far below the healthy training subjects' mean intensity at that place a
  pixel is, in units of their spread;
* ``noised``: the dae's own training noise added (4 draws), then ``restore`` (3 passes), averaged;
* ``inpainting``: every 32 x 32 patch (stride 16) set to 0 and redrawn by the dae from its surroundings (a dae
  trained with ``hole = 32`` learns that: the option existed in commit 151fe05 only, reverted after this
  measurement), the redrawn patches averaged;
* ``pair``: the dae's score plus another model's (each divided by its 99th percentile), and their mean rank;
* ``ldm_patchwise``: the ldm's restoration with the latent prior one latent patch at a time (8 x 8 latent
  cells, 32 px): only the patch is moved towards noise; the rest is put back on the path at every step
  (RePaint-style), so the prior redraws the patch in its surroundings' context.

    python benchmarks/bench_anomaly_alternatives.py --run runs/dae-r8g3 --data datasets/brats-t1-mni \\
        --healthy datasets/ixi-t1-mni --inpainting-run runs/dae-hole32 --pair runs/fae-10m:feature_ssim \\
        --pair runs/ae-6m:residual_local --pair ixi-t1-128:restoration --ldm ixi-t1-128 \\
        --out benchmarks/results/anomaly/alternatives_val.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from brainvae import generate as G
from brainvae.data.dataset import SliceBatches
from brainvae.data.resize import resize_masks
from brainvae.data.store import SliceStore
from brainvae.evaluate.anomaly import AnomalyConfig, Ensemble, load_slices, score_model, select_cases
from brainvae.evaluate.anomaly_metrics import best_dice, pixel_auprc, pixel_auroc
from brainvae.evaluate.anomaly_scores import eroded_mask, postprocess, slice_runs
from brainvae.models.dae import coarse_noise
from brainvae.models.flow import randn
from brainvae.models.scoring import SMOOTH_SIGMA, gaussian_blur, local_residual
from brainvae.provenance import provenance

DAE_SCORES = ["residual_neg", "restoration_local"]


def batched(fn, x: torch.Tensor, size: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[s:s + size]) for s in range(0, len(x), size)])


@torch.no_grad()
def noised_restoration(model, x: torch.Tensor, draws: int = 4, seed: int = 0) -> torch.Tensor:
    """(N, 1, H, W): the mean over ``draws`` of ``restore`` (3 passes) of x plus the dae's training noise."""
    g, cfg = torch.Generator().manual_seed(seed), model.config
    return batched(lambda b: sum(model.restore(b + coarse_noise(b, cfg.noise_res, cfg.noise_std, g))
                                 for _ in range(draws)) / draws, x)


@torch.no_grad()
def inpainting(model, x: torch.Tensor, side: int = 32, stride: int = 16) -> torch.Tensor:
    """(N, 1, H, W): each side x side patch (every ``stride`` px) zeroed and redrawn by the dae; a pixel's value
    is the mean over the patches that covered it."""
    size = x.shape[-1]
    starts = range(0, size - side + 1, stride)

    def one(b: torch.Tensor) -> torch.Tensor:
        head, acc, count = b > 0, torch.zeros_like(b), torch.zeros_like(b)
        for r in starts:
            for c in starts:
                patch = torch.zeros(1, 1, size, size)
                patch[..., r:r + side, c:c + side] = 1
                acc += model.denoise(b * (1 - patch)) * head * patch
                count += patch
        return acc / count.clamp_min(1)
    return batched(one, x)


@torch.no_grad()
def ldm_patchwise(model, data: SliceBatches, rows: np.ndarray, levels=(0.3, 0.45, 0.6), cells: int = 8,
                  seed: int = 0) -> torch.Tensor:
    """(L, N, 1, H, W): ``LDM.restore`` one latent patch (cells x cells) at a time, the rest of the latent put
    back on the path z_t = (1 - t) z_0 + t eps at every Heun step; each patch's decoded pixels kept."""
    g, out = torch.Generator().manual_seed(seed), []
    for s in range(0, len(rows), 64):
        x, cond = data.batch(rows[s:s + 64])
        z0 = model._standardise(model.autoencoder.encode(x).mode().float())  # (B, C, s, s)
        eps = randn(z0.shape, g, z0.device)
        c = model.flow.cond_inputs(model.given_cond(len(x), cond), len(x), z0.device)
        side, scale = z0.shape[-1], x.shape[-1] // z0.shape[-1]
        per_level = []
        for t in levels:
            steps = max(1, int(np.ceil(t / model.config.restore_step - 1e-9)))
            ts = torch.linspace(t, 0, steps + 1).tolist()
            acc, count = torch.zeros_like(x), torch.zeros_like(x)
            for r in range(0, side - cells + 1, cells):
                for q in range(0, side - cells + 1, cells):
                    patch = torch.zeros(1, 1, side, side)
                    patch[..., r:r + cells, q:q + cells] = 1
                    z = (1 - t) * z0 + t * eps
                    for t0, t1 in zip(ts, ts[1:]):
                        v = model.flow.guided_velocity(z, t0, c, 1.0)
                        v = 0.5 * (v + model.flow.guided_velocity(z + (t1 - t0) * v, t1, c, 1.0))
                        z = patch * (z + (t1 - t0) * v) + (1 - patch) * ((1 - t1) * z0 + t1 * eps)
                    pixels = torch.nn.functional.interpolate(patch, scale_factor=scale)
                    acc += model.decode(model._unstandardise(z)).float() * pixels
                    count += pixels
            per_level.append(acc / count.clamp_min(1))
        out.append(torch.stack(per_level))
    return torch.cat(out, 1)


def place_stats(maps: np.ndarray, region: np.ndarray, slice_index: np.ndarray, sigma=(2, 2, 2)):
    """Per slice index of the MNI grid: the mean and spread (K, H, W) of ``maps`` over the subjects, inside
    their ``region``, smoothed (Gaussian, slices x px x px); and the slice indices (K,)."""
    ks = np.unique(slice_index)
    pos = np.searchsorted(ks, slice_index)
    total, total2, count = (np.zeros((len(ks), *maps.shape[1:])) for _ in range(3))
    np.add.at(total, pos, maps * region)
    np.add.at(total2, pos, maps ** 2 * region)
    np.add.at(count, pos, region)
    count = ndimage.gaussian_filter(count, sigma)
    mean = ndimage.gaussian_filter(total, sigma) / np.maximum(count, 1e-3)
    spread = np.sqrt(np.maximum(ndimage.gaussian_filter(total2, sigma) / np.maximum(count, 1e-3) - mean ** 2, 0))
    return mean, spread, count, ks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a dae run")
    ap.add_argument("--data", type=Path, required=True, help="store with lesion masks (e.g. BraTS)")
    ap.add_argument("--healthy", type=Path, required=True, help="healthy store (its val and train splits)")
    ap.add_argument("--inpainting-run", type=Path, help="a dae trained with hole > 0 (commit 151fe05)")
    ap.add_argument("--pair", action="append", default=[], help="RUN:SCORE combined with the dae's scores")
    ap.add_argument("--ldm", help="an ldm run (or shipped name) for the patch-wise restoration")
    ap.add_argument("--across", type=int, default=11)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg = AnomalyConfig()
    store, healthy = SliceStore(args.data), SliceStore(args.healthy)
    dae = G.load(args.run, device="cpu")
    rows, val, test, lesion = select_cases(store, cfg)
    d = load_slices(store, cfg, rows, val, test, lesion, dae)
    dae = dae.for_inference()
    v = np.flatnonzero(np.isin(d.cases, val))  # the validation cases' slices only: no test case is scored
    x = torch.from_numpy(d.images[v])[:, None]
    brain, region, runs, cases = d.brain[v], d.region[v], d.runs[v], d.cases[v]
    truth = (d.lesion[v] > 0) & brain
    slice_index = d.manifest["slice_index"].to_numpy()[v]
    data = SliceBatches(store, cfg.split, d.size, dae.device)
    rows_out = []

    def post(raw: np.ndarray) -> np.ndarray:
        return postprocess(raw, region, cfg.post.median, args.across, runs)

    def record(variant: str, name: str, s: np.ndarray, **extra) -> None:
        dice, _ = best_dice(s[brain], truth[brain])
        row = {"variant": variant, "score": name, "val_dice": round(float(dice), 4),
               "val_auprc": round(float(pixel_auprc(s[brain], truth[brain])), 4),
               "val_auroc": round(float(pixel_auroc(s[brain], truth[brain])), 4), **extra}
        rows_out.append(row)
        print(row, flush=True)

    def timed(fn, *a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        return out, round(time.perf_counter() - t, 1)

    raw, _ = score_model(dae, data, DAE_SCORES, rows=v, brain=brain)
    pp = {n: post(raw[n]) for n in DAE_SCORES}
    for n in DAE_SCORES:
        record("reference", n, pp[n])

    # score_atlas: the dae's scores of the healthy store's validation subjects, by place
    h_rows = healthy.indices("val")
    h_brain = resize_masks(healthy.array("brain")[h_rows], d.size)
    h_subjects = healthy.manifest["subject"].iloc[h_rows].astype(str).to_numpy()
    h_index = healthy.manifest["slice_index"].iloc[h_rows].to_numpy()
    h_region = eroded_mask(h_brain, cfg.post.erode)
    h_raw, _ = score_model(dae, SliceBatches(healthy, "val", d.size, dae.device), DAE_SCORES, brain=h_brain)
    for n in DAE_SCORES:
        h = postprocess(h_raw[n], h_region, cfg.post.median, args.across, slice_runs(h_subjects, h_index))
        mean, spread, count, ks = place_stats(h, h_region, h_index)
        at = np.clip(np.searchsorted(ks, slice_index), 0, len(ks) - 1)
        floor = float(np.median(spread[count > 5]))
        record("score_atlas", f"{n} - mean", np.where(region, pp[n] - mean[at], 0))
        record("score_atlas", f"{n} z", np.where(region, (pp[n] - mean[at]) / np.hypot(spread[at], floor), 0),
               spread_floor=round(floor, 5))

    # case_norm: minus each case's median over its eroded brain
    for n in DAE_SCORES:
        s = pp[n].copy()
        for c in np.unique(cases):
            k = cases == c
            s[k] -= np.median(s[k][region[k]])
        record("case_norm", f"{n} - case median", np.where(region, s, 0))

    # histmatch and intensity_atlas: the healthy training subjects' intensities
    t_rows = healthy.indices("train")
    t_images = np.asarray(healthy.array("images")[t_rows], np.float32)
    t_brain = np.asarray(healthy.array("brain")[t_rows]) > 0
    levels = np.linspace(0, 1, 201)
    reference = np.quantile(t_images[t_brain], levels)
    matched = d.images[v].copy()
    for c in np.unique(cases):
        k = cases == c
        source = np.quantile(matched[k][brain[k]], levels)
        matched[k] = np.where(matched[k] > 0, np.interp(matched[k], source, reference), 0)
    xm = torch.from_numpy(matched)[:, None]
    record("histmatch", "residual_neg", post(batched(lambda b: (dae.denoise(b) * (b > 0) - b).clamp_min(0), xm)[:, 0]
                                            .numpy()))
    record("histmatch", "restoration_local", post(batched(lambda b: local_residual(dae.restore(b), b), xm)[:, 0]
                                                 .numpy()))
    t_index = healthy.manifest["slice_index"].iloc[t_rows].to_numpy()
    mean, spread, count, ks = place_stats(t_images, t_brain, t_index, sigma=(0, 1, 1))
    at = np.clip(np.searchsorted(ks, slice_index), 0, len(ks) - 1)
    floor = float(np.median(spread[count > 40]))
    below = np.maximum(mean[at] - d.images[v], 0) / np.hypot(spread[at], floor / 4) * brain
    record("intensity_atlas", "darker than the healthy mean, in spreads", post(below))

    # noised restoration and inpainting
    r, seconds = timed(noised_restoration, dae, x)
    record("noised", "restoration_local", post(local_residual(r, x)[:, 0].numpy()), seconds=seconds)
    if args.inpainting_run:
        painter = G.load(args.inpainting_run, device="cpu").for_inference()
        record("inpainting", "residual_neg (plain, this dae)",
               post(batched(lambda b: (painter.denoise(b) * (b > 0) - b).clamp_min(0), x)[:, 0].numpy()))
        r, seconds = timed(inpainting, painter, x)
        record("inpainting", "redrawn - x, darker part", post((r - x).clamp_min(0)[:, 0].numpy()), seconds=seconds)
        record("inpainting", "local_residual", post(local_residual(r, x)[:, 0].numpy()))

    # pairs with other models
    for spec in args.pair:
        path, name = spec.rsplit(":", 1)
        other = G.load(path, device="cpu")
        s_other = post(score_model(other, data, [name], rows=v, brain=brain)[0][name])
        record("pair", f"{path}:{name} alone", s_other)
        for n in DAE_SCORES:
            maps = {n: pp[n], spec: s_other}
            record("pair", f"{n} + {spec} (each / p99)",
                   sum(m / np.percentile(m[region], 99) for m in maps.values()))
            record("pair", f"{n} + {spec} (mean rank)", Ensemble.fit([n, spec], maps, region)(maps, region))

    if args.ldm:
        ldm = G.load(args.ldm, device="cpu").eval()
        r, seconds = timed(ldm_patchwise, ldm, data, v)
        record("ldm_patchwise", "restoration_neg_smooth",
               post(torch.stack([gaussian_blur(q - x, SMOOTH_SIGMA) for q in r]).clamp_min(0).mean(0)[:, 0].numpy()),
               seconds=seconds)
        record("ldm_patchwise", "restoration", post((x - r).abs().mean(0)[:, 0].numpy()))
        record("ldm_patchwise", "restoration_local", post(torch.stack([local_residual(q, x) for q in r]).mean(0)
                                                         [:, 0].numpy()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "store": str(args.data), "healthy": str(args.healthy),
                                    "across": args.across, "validation_cases": val, "rows": rows_out,
                                    "provenance": provenance(command="benchmarks/bench_anomaly_alternatives.py")},
                                   indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
