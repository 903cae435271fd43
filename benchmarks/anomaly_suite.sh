#!/usr/bin/env bash
# Issue 14: anomaly localisation on the shared BraTS 2018 T1 cases (not a test). Serial on purpose (2 cores).
# Every scorer of the shipped ldm (ixi-t1-128: reconstruction residuals, KL scores, restoration with the latent
# prior), a denoising U-Net (dae), a feature autoencoder (fae) and a plain ae in ONE run: one table, the same 3 validation cases (seed 0)
# choose every threshold and the recommended score; healthy IXI subjects give the label-free thresholds (val
# split) and the negatives of case-level detection (test split). Results: benchmarks/results/anomaly/.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/stores.sh  # $B, $DATA and the stores

# The models of healthy brains: a denoising U-Net (20 minutes), a feature autoencoder (10 minutes, its in-domain
# encoder then its feature autoencoder) and the plain autoencoder baseline (6 minutes).
[ -f runs/dae-20m/summary.json ] || $B train src/brainvae/configs/dae.toml --data datasets/ixi-t1-mni --out runs/dae-20m --budget 20m --quiet
# ... and 35 minutes more from its weights (a fresh cosine schedule at lr 5e-4): runs/dae-55m
mkdir -p runs/cfg
sed -e 's/^lr = 1e-3/lr = 5e-4/' src/brainvae/configs/dae.toml | sed -e '/^\[tune\]/,$d' > runs/cfg/dae-more.toml
printf '[init]\nfrom = "runs/dae-20m"\n' >> runs/cfg/dae-more.toml
[ -f runs/dae-55m/summary.json ] || $B train runs/cfg/dae-more.toml --data datasets/ixi-t1-mni --out runs/dae-55m --budget 35m --quiet
[ -f runs/fae-10m/summary.json ] || $B train src/brainvae/configs/fae.toml --data datasets/ixi-t1-mni --out runs/fae-10m --budget 10m --quiet
[ -f runs/ae-6m/summary.json ] || $B train src/brainvae/configs/ae.toml --data datasets/ixi-t1-mni --out runs/ae-6m --budget 6m --quiet

# The ldm's restoration levels, chosen on the validation cases only (the defaults in models/ldm.py come from here).
.venv/bin/python benchmarks/bench_restoration.py --data datasets/brats-t1-mni --out benchmarks/results/anomaly/restoration_val.json \
    --levels 0.2,0.3,0.4 0.3,0.45,0.6 0.5,0.6,0.7 0.6,0.7,0.8

$B anomaly ixi-t1-128 --data datasets/brats-t1-mni --baseline runs/dae-20m --baseline runs/dae-55m --baseline runs/fae-10m --baseline runs/ae-6m \
    --healthy datasets/ixi-t1-mni --out runs/anomaly-brats --force --quiet

# The same dae on BraTS smoothed to IXI's 2 mm resolution before resampling.
$B anomaly runs/dae-20m --data datasets/brats-t1-mni-res2 --baseline runs/ae-6m --healthy datasets/ixi-t1-mni \
    --out runs/anomaly-brats-res2 --force --quiet
