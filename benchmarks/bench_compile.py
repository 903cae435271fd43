"""torch.compile vs eager training img/s of one shipped config (bf16 autocast, CPU). Not a test.

    python benchmarks/bench_compile.py [--size 128] [--seconds 15]

Compilation time is reported separately (first steps). Uses a private
TORCHINDUCTOR_CACHE_DIR so results do not depend on an earlier cache.
Writes benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench_train import make, train_rate
from brainvae.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="vae")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile.json")
    args = ap.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    torch.manual_seed(0)
    eager = make(args.arch, args.size)  # the shipped config <arch>, channels-last, as the engine trains it
    rate_eager = train_rate(eager, args.size, torch.bfloat16, 32, args.seconds)
    model = make(args.arch, args.size)
    compiled = torch.compile(model)
    compiled.config = model.config
    start = time.perf_counter()
    rate_compiled = train_rate(compiled, args.size, torch.bfloat16, 32, args.seconds)
    total = time.perf_counter() - start
    result = {"arch": args.arch, "size": args.size, "precision": "bf16", "eager_img_per_s": rate_eager,
              "compiled_img_per_s": rate_compiled, "speedup": rate_compiled / rate_eager,
              "compiled_run_seconds_including_compilation": total, "threads": torch.get_num_threads(),
              "provenance": provenance()}
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=1))
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
