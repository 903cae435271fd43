"""Benchmark training throughput, FLOPs and sampling speed of every architecture. Not a test.

For each shipped configuration (brainvae/configs/<arch>.toml, at 64 and 128 px): training
img/s as the engine trains (channels-last weights, fused AdamW, autocast; one
step per batch of random data: throughput does not depend on content), forward
FLOPs per image (torch.utils.flop_counter), the achieved training FLOP/s (3x
forward) as a fraction of a matmul peak of the same dtype measured just before
the row (the best of 1024^2, 2048^2 and 4096^2 products), and sampling slices/s through
``brainvae.generate.sample_images`` (the path of ``brainvae sample``: the
inference copy with BatchNorm folded, 1,024 slices in batches of 256, median of
3 repeats). MONAI's AutoencoderKL (channels 32-64-64, 1 res block, no
attention) is measured in the same run, the same way, as the reference.

    python benchmarks/bench_train.py [--sizes 64 128] [--precisions fp32 bf16] [--seconds 12] [--batch 32]

Writes benchmarks/results/train_throughput.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from brainvae.config import RunConfig, TrainConfig, load_config, shipped_configs
from brainvae.generate import sample_images
from brainvae.models.base import Output
from brainvae.models.registry import architectures, build
from brainvae.provenance import provenance
from brainvae.train.engine import new_optimiser

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.0) -> float:
    """The best FLOP/s of square matrix products over a few sizes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


class AEKLAdapter(torch.nn.Module):
    """MONAI AutoencoderKL behind the brainvae forward signature (L1 + small KL), for timing only."""

    def __init__(self, size: int):
        super().__init__()
        from monai.networks.nets import AutoencoderKL

        self.net = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 64),
                                 latent_channels=3, num_res_blocks=1, attention_levels=(False, False, False),
                                 with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)

    def forward(self, x, cond=None, kl_scale=1.0):
        recon, mu, sigma = self.net(x)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).flatten(1).sum(1)
        rec = (recon.float() - x).abs().flatten(1).sum(1)
        return Output(recon, None, {"loss": rec + 1e-6 * kl})


def make(arch: str, size: int) -> torch.nn.Module:
    """The shipped config <arch> model at ``size`` px, channels-last as the engine trains it.

    AutoencoderKL keeps PyTorch's default layout: channels-last makes its GroupNorms slower
    here (measured bf16 at 128 px: 14.9 vs 20 img/s), and the reference should run at its best.
    """
    if arch == "monai-aekl":
        return AEKLAdapter(size)
    path = shipped_configs().get(arch)
    values = load_config(RunConfig, path).model if path else {}
    values = {k: v for k, v in values.items() if k != "arch"}
    return build(arch, {**values, "image_size": size}).to(memory_format=torch.channels_last)


def cond_batch(n: int):
    return {"age": torch.rand(n) * 60 + 20, "sex": torch.randint(0, 2, (n,)).float() * 2 - 1, "position": torch.rand(n)}


def forward_flops(model, size: int, batch: int = 8) -> float:
    x = torch.rand(batch, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x, cond_batch(batch))
    return counter.get_total_flops() / batch


def train_rate(model, size: int, dtype, batch: int, seconds: float) -> float:
    model.train()
    opt = new_optimiser(model.parameters(), TrainConfig(lr=1e-4), torch.device("cpu"))
    x = torch.rand(batch, 1, size, size)
    cond = cond_batch(batch)

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(x, cond).losses["loss"].float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start)


def sample_rate(model, precision: str, n: int = 1024, repeats: int = 3) -> float:
    """Slices/s of ``brainvae sample``'s path (median of ``repeats``); NaN for a model without ``sample``."""
    if not hasattr(model, "sample"):
        return float("nan")
    model.eval()
    cond = {"age": 50.0, "sex": 1.0, "position": 0.5} if model.config.conditions else None
    sample_images(model, 16, cond, seed=0, precision=precision)
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        sample_images(model, n, cond, seed=r, precision=precision)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--archs", nargs="*", default=architectures() + ["monai-aekl"])
    ap.add_argument("--sizes", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    # The machine's speed drifts (a shared VM: the bf16 peak read 823 to 956 GFLOP/s within
    # an hour), so each row is divided by a peak measured just before it.
    print(f"threads={torch.get_num_threads()}")
    rows = []
    print(f"{'arch':11s} {'px':>4s} {'prec':5s} {'MFLOP/img':>10s} {'train img/s':>12s} {'peak GF/s':>9s} {'% peak':>7s} "
          f"{'sample/s':>9s}")
    for size in args.sizes:
        for arch in args.archs:
            model = make(arch, size)
            flops = forward_flops(model, size)
            for prec in args.precisions:
                peak = matmul_peak(DTYPES[prec] or torch.float32)
                rate = train_rate(model, size, DTYPES[prec], args.batch, args.seconds)
                srate = sample_rate(model, prec)
                frac = 3 * flops * rate / peak
                rows.append({"arch": arch, "size": size, "precision": prec, "forward_mflop_per_image": flops / 1e6,
                             "train_img_per_s": rate, "matmul_peak_flops": peak, "fraction_of_matmul_peak": frac,
                             "sample_per_s": srate, "params": sum(p.numel() for p in model.parameters())})
                print(f"{arch:11s} {size:4d} {prec:5s} {flops / 1e6:10.1f} {rate:12.1f} {peak / 1e9:9.0f} "
                      f"{100 * frac:6.1f}% {srate:9.0f}")
    result = {"batch": args.batch, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "rows": rows, "provenance": provenance()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
