"""Benchmark ``brainvae data prepare``: throughput (volumes/s), added cost of N4 and registration,
the effect of N4 on intensity uniformity and the quality of registration (normalised correlation of
the registered brains with the template, and the Dice overlap of their brain masks with the
template's). Not a test.

Baseline measured in the same run: a bare script (nibabel load -> RAS -> percentile
normalise -> axial slices -> resize to 128x128, one process).

    python benchmarks/bench_prepare.py [--ixi ../shared/data/ixi-t1-2mm] [--full-res 16]

Writes benchmarks/results/prepare.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from brainvae.config import PrepareConfig
from brainvae.data.prepare import prepare_dataset
from brainvae.data.preprocess import mni_template, prepare_volume, register_to_mni, to_sitk
from brainvae.io.nifti import load_mask, load_volume
from brainvae.io.phantom import simulate_cohort
from brainvae.io.scan import Inventory, find_scans
from brainvae.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
SHARED_IXI = ROOT.parent / "shared" / "data" / "ixi-t1-2mm"
FAST = PrepareConfig(n4=False, register=False)


def bare_baseline(paths: list[Path], size: int = 128) -> float:
    """Volumes/s of the simplest possible pipeline, one process."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    for p in paths:
        data = nib.as_closest_canonical(nib.load(p)).get_fdata(dtype=np.float32)
        fg = data[data > 0]
        lo, hi = np.percentile(fg, (1, 99))
        vol = np.clip((data - lo) / (hi - lo), 0, 1)
        slices = torch.from_numpy(np.ascontiguousarray(vol.transpose(2, 1, 0)))[:, None]  # (Z, 1, Y, X)
        F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False)
    return len(paths) / (time.perf_counter() - start)


def prepare_rate(inv: Inventory, cfg: PrepareConfig, workers: int, tmp: Path) -> float:
    start = time.perf_counter()
    prepare_dataset(inv, tmp / f"store-{time.monotonic_ns()}", cfg, workers=workers, progress=False)
    return len(inv.scans) / (time.perf_counter() - start)


def n4_uniformity(inv: Inventory, n: int) -> dict:
    """Top-to-mid-brain ratio of the 90th brain-intensity percentile (WM-dominated), with and without N4."""
    out = {}
    for n4 in (False, True):
        ratios = []
        for scan in inv.scans[:n]:
            pv = prepare_volume(scan, replace(FAST, n4=n4, min_brain=0.0))
            brain = pv.brain.astype(bool)

            def p90(lo, hi):
                sel = (pv.position >= lo) & (pv.position <= hi)
                return float(np.percentile(pv.slices[sel][brain[sel]], 90))

            ratios.append(p90(0.8, 0.95) / p90(0.45, 0.6))
        out["n4" if n4 else "no_n4"] = {"mean": float(np.mean(ratios)), "sd": float(np.std(ratios)), "n": len(ratios)}
    return out


def registration_quality(inv: Inventory, n: int) -> dict:
    """Mean (and min) normalised correlation of the first n registered brains with the template, inside its
    brain (``template_correlation``: the check ``prepare`` applies), and the Dice overlap of the registered
    brain masks with the template's."""
    fixed, fixed_mask, _ = mni_template()
    template = sitk.GetArrayFromImage(fixed_mask) > 0
    corr, dice = [], []
    for scan in inv.scans[:n]:
        vol = load_volume(scan.image)
        mask = to_sitk(load_mask(scan.mask, vol).astype(np.uint8), vol.affine)
        transform, _, c = register_to_mni(to_sitk(vol.data, vol.affine), mask)
        warped = sitk.GetArrayFromImage(sitk.Resample(mask, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
        corr.append(c)
        dice.append(2 * (warped & template).sum() / (warped.sum() + template.sum()))
    return {"template_correlation": {"mean": float(np.mean(corr)), "min": float(np.min(corr))},
            "mask_dice": {"mean": float(np.mean(dice)), "min": float(np.min(dice))}, "n": len(corr)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ixi", type=Path, default=SHARED_IXI)
    ap.add_argument("--full-res", type=int, default=16, help="simulated 256x256x150 volumes")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare.json")
    args = ap.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count()}, "workers": args.workers, "rows": []}

    def row(data: str, method: str, vps: float, n: int) -> None:
        results["rows"].append({"data": data, "method": method, "volumes_per_s": round(vps, 2), "volumes": n})
        print(f"{data:28s} {method:34s} {vps:8.2f} vol/s  ({n} volumes)")

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.ixi.exists():
            inv = find_scans(args.ixi)
            n = len(inv.scans)
            row("IXI T1 2 mm (shared)", "bare script, 1 process", bare_baseline([s.image for s in inv.scans]), n)
            row("IXI T1 2 mm (shared)", f"prepare, {args.workers} workers", prepare_rate(inv, FAST, args.workers, tmp), n)
            sub = Inventory(inv.root, inv.dataset, inv.scans[:16], masks=inv.masks)
            row("IXI T1 2 mm (shared)", f"prepare +N4, {args.workers} workers",
                prepare_rate(sub, replace(FAST, n4=True), args.workers, tmp), len(sub.scans))
            sub = Inventory(inv.root, inv.dataset, inv.scans[:16], masks=inv.masks)
            row("IXI T1 2 mm (shared)", f"prepare +registration, {args.workers} w",
                prepare_rate(sub, replace(FAST, register=True), args.workers, tmp), len(sub.scans))
            sub = Inventory(inv.root, inv.dataset, inv.scans[:32], masks=inv.masks)
            row("IXI T1 2 mm (shared)", f"prepare +N4 +registration, {args.workers} w",
                prepare_rate(sub, replace(FAST, n4=True, register=True), args.workers, tmp), len(sub.scans))
            results["registration_quality"] = registration_quality(inv, 24)
            print("registration quality:", results["registration_quality"])
            results["n4_top_mid_p90_ratio"] = n4_uniformity(inv, 12)
            print("N4 top/mid p90 ratio:", results["n4_top_mid_p90_ratio"])
        if args.full_res:
            cohort = tmp / "fullres"
            simulate_cohort(cohort, args.full_res, seed=1, shape=(256, 256, 150), spacing=(0.9375, 0.9375, 1.2),
                            progress=False)
            inv = find_scans(cohort)
            n = len(inv.scans)
            row("simulated 256x256x150", "bare script, 1 process", bare_baseline([s.image for s in inv.scans]), n)
            row("simulated 256x256x150", f"prepare, {args.workers} workers", prepare_rate(inv, FAST, args.workers, tmp), n)
            sub = Inventory(inv.root, inv.dataset, inv.scans[:6], masks=inv.masks)
            row("simulated 256x256x150", f"prepare +N4, {args.workers} workers",
                prepare_rate(sub, replace(FAST, n4=True), args.workers, tmp), len(sub.scans))
    results["provenance"] = provenance()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
