#!/usr/bin/env bash
# The issue-5 / issue-6 measurements on the real scans in ../shared/data (not a test).
# Serial on purpose: on 2 cores, two training jobs at once ruin every timing.
# Results are copied into benchmarks/results/{compare-mni,anomaly-brats,utility-cvae}.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/stores.sh  # $B, $DATA and the stores

# Issue 5: every registered architecture, same seed, 6 minutes each, then evaluate (n = 1000).
$B compare vae ae cevae cvae resvae vqvae \
    --data datasets/ixi-t1-mni --out runs/compare-mni --budget 6m --quiet
$B utility runs/compare-mni/cvae-s0 --data datasets/ixi-t1-mni --quiet

# Issue 6: each model of healthy brains scores BraTS; 3 validation cases pick the threshold (seed 0),
# the plain autoencoder is the baseline in the same run.
for arch in vae cevae cvae resvae vqvae; do
    $B anomaly runs/compare-mni/$arch-s0 --data datasets/brats-t1-mni --baseline runs/compare-mni/ae-s0 \
        --score residual_neg_smooth --out runs/compare-mni/$arch-s0/anomaly --quiet --force
done

# BraTS smoothed to IXI's 2 mm resolution first; synthetic anomalies in the healthy test split.
$B anomaly runs/compare-mni/cevae-s0 --data datasets/brats-t1-mni-res2 --baseline runs/compare-mni/ae-s0 \
    --score residual_neg_smooth --out runs/compare-mni/cevae-s0/anomaly-res2 --quiet --force
[ -d datasets/ixi-t1-mni-anomalies ] || $B data anomalies datasets/ixi-t1-mni --out datasets/ixi-t1-mni-anomalies --split test
$B anomaly runs/compare-mni/cevae-s0 --data datasets/ixi-t1-mni-anomalies --baseline runs/compare-mni/ae-s0 \
    --out runs/compare-mni/cevae-s0/anomaly-synthetic --quiet --force

$B report runs/compare-mni/*-s0 --compare runs/compare-mni --out runs/compare-mni/report.html --force

# Issue 4, after the speed changes (channels-last, fused AdamW, vqvae patch 4 + 3-layer prior):
# the same 6-minute compare again (the vqvae row of benchmarks/README.md came from a separate
# run, runs/compare-mni-s5, after the prior went to 3 layers), and AutoencoderKL vs vae/resvae.
$B compare vqvae vae resvae --data datasets/ixi-t1-mni --out runs/compare-mni-s3 --budget 6m --quiet
.venv/bin/python benchmarks/bench_quality.py --data datasets/ixi-t1-axial128 --archs --aekl 4m --default vae resvae
