#!/usr/bin/env bash
# Issue 14: anomaly localisation on the shared BraTS 2018 T1 cases (not a test). Serial on purpose (2 cores).
# Every scorer of the shipped ldm (ixi-t1-128: reconstruction residuals, KL scores, restoration with the latent
# prior), a denoising U-Net (dae), a feature autoencoder (fae) and a plain ae in ONE run: one table, the same 3 validation cases (seed 0)
# choose every threshold and the recommended score; healthy IXI subjects give the label-free thresholds (val
# split) and the negatives of case-level detection (test split). Results: benchmarks/results/anomaly/.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/stores.sh  # $B, $DATA and the stores

# The models of healthy brains: denoising U-Nets (20 minutes each), a feature autoencoder (10 minutes, its
# in-domain encoder then its feature autoencoder) and the plain autoencoder baseline (6 minutes).
# dae_cfg NAME NOISE_RES NOISE_STD GAMMA_STD: the shipped dae config with these training-noise settings.
mkdir -p runs/cfg
dae_cfg() {
    sed -e "s/^noise_res = .*/noise_res = $2/" -e "s/^noise_std = .*/noise_std = $3/" -e "s/^gamma_std = .*/gamma_std = $4/" \
        -e '/^\[tune\]/,$d' src/brainvae/configs/dae.toml > runs/cfg/dae-$1.toml
}
# Session 7: Kascenas et al.'s noise (16 x 16 grid, std 0.2), no contrast change.
dae_cfg 20m 16 0.2 0.0
[ -f runs/dae-20m/summary.json ] || $B train runs/cfg/dae-20m.toml --data datasets/ixi-t1-mni --out runs/dae-20m --budget 20m --quiet
# ... and 35 minutes more from its weights (a fresh cosine schedule at lr 5e-4): runs/dae-55m
sed -e 's/^lr = 1e-3/lr = 5e-4/' runs/cfg/dae-20m.toml > runs/cfg/dae-more.toml
printf '[init]\nfrom = "runs/dae-20m"\n' >> runs/cfg/dae-more.toml
[ -f runs/dae-55m/summary.json ] || $B train runs/cfg/dae-more.toml --data datasets/ixi-t1-mni --out runs/dae-55m --budget 35m --quiet
# Session 12: the dae's training noise and a random contrast (gamma_std), 20 minutes each, compared on the
# validation cases only (benchmarks/bench_anomaly_across.py): noise std 0.35 (dae-s35); noise on an 8 x 8 grid,
# std 0.3 (dae-r8); gamma_std 0.3 (dae-g3); both (dae-r8g3: now the shipped config's settings).
dae_cfg s35 16 0.35 0.0
dae_cfg r8 8 0.3 0.0
dae_cfg g3 16 0.2 0.3
dae_cfg r8g3 8 0.3 0.3
for v in s35 r8 g3 r8g3; do
    [ -f runs/dae-$v/summary.json ] || $B train runs/cfg/dae-$v.toml --data datasets/ixi-t1-mni --out runs/dae-$v --budget 20m --quiet
done
[ -f runs/fae-10m/summary.json ] || $B train src/brainvae/configs/fae.toml --data datasets/ixi-t1-mni --out runs/fae-10m --budget 10m --quiet
[ -f runs/ae-6m/summary.json ] || $B train src/brainvae/configs/ae.toml --data datasets/ixi-t1-mni --out runs/ae-6m --budget 6m --quiet

# The ldm's restoration levels, chosen on the validation cases only (the defaults in models/ldm.py come from here).
.venv/bin/python benchmarks/bench_restoration.py --data datasets/brats-t1-mni --out benchmarks/results/anomaly/restoration_val.json \
    --levels 0.2,0.3,0.4 0.3,0.45,0.6 0.5,0.6,0.7 0.6,0.7,0.8

$B anomaly ixi-t1-128 --data datasets/brats-t1-mni --baseline runs/dae-20m --baseline runs/dae-55m --baseline runs/fae-10m --baseline runs/ae-6m \
    --healthy datasets/ixi-t1-mni --out runs/anomaly-brats --force --quiet

# Session 12: every dae variant, and each pixel's score averaged over 11 neighbouring slices of its case
# (--across 11; chosen on the validation cases: results/anomaly/across_val.json).
.venv/bin/python benchmarks/bench_anomaly_across.py --data datasets/brats-t1-mni \
    --runs runs/dae-20m runs/dae-s35 runs/dae-r8 runs/dae-g3 runs/dae-r8g3 --out benchmarks/results/anomaly/across_val.json
$B anomaly ixi-t1-128 --data datasets/brats-t1-mni --baseline runs/dae-20m --baseline runs/dae-55m \
    --baseline runs/dae-s35 --baseline runs/dae-r8 --baseline runs/dae-g3 --baseline runs/dae-r8g3 \
    --baseline runs/fae-10m --baseline runs/ae-6m --across 11 --healthy datasets/ixi-t1-mni \
    --out runs/anomaly-brats-v2 --force --quiet

# The same dae on BraTS smoothed to IXI's 2 mm resolution before resampling.
$B anomaly runs/dae-20m --data datasets/brats-t1-mni-res2 --baseline runs/ae-6m --healthy datasets/ixi-t1-mni \
    --out runs/anomaly-brats-res2 --force --quiet

# Session 13 (a CPU without native bf16: the daes train in fp32, about 550 steps in 20 minutes): the dae's
# residual without its slow drift (residual_local) and after 3 passes (restoration_local), compared with
# residual_neg on the validation cases only; a dae with 4 x 4 training noise (dae-r4g3) beside dae-r8g3.
dae_cfg r4g3 4 0.3 0.3
[ -f runs/dae-r4g3/summary.json ] || $B train runs/cfg/dae-r4g3.toml --data datasets/ixi-t1-mni --out runs/dae-r4g3 --budget 20m --quiet
.venv/bin/python benchmarks/bench_anomaly_across.py --data datasets/brats-t1-mni --runs runs/dae-r8g3 runs/dae-r4g3 \
    --scores residual_neg residual_local restoration_local --across 1 11 --out benchmarks/results/anomaly/local_val.json
.venv/bin/python benchmarks/bench_local_residual.py --run runs/dae-r8g3 --data datasets/brats-t1-mni \
    --healthy datasets/ixi-t1-mni --out benchmarks/results/anomaly/local_grid_val.json
$B anomaly ixi-t1-128 --data datasets/brats-t1-mni --baseline runs/dae-r8g3 --baseline runs/dae-r4g3 \
    --baseline runs/fae-10m --baseline runs/ae-6m --across 11 --healthy datasets/ixi-t1-mni \
    --out runs/anomaly-brats-v3 --force --quiet

# Session 14 (same machine kind as 13): eight alternatives to the dae's scores on the validation cases only
# (none adopted), with a dae trained to inpaint (the hole option existed in commit 151fe05 only); then the
# shipped dae (ixi-t1-128-dae, exported from runs/dae-r8g3) measured with its float16 weights.
# git checkout 151fe05 -- src/brainvae/models/dae.py  (for dae-hole32; restore afterwards)
# sed -e 's/^gamma_std = 0.3/gamma_std = 0.3\nhole = 32/' runs/cfg/dae-r8g3.toml > runs/cfg/dae-hole32.toml
# $B train runs/cfg/dae-hole32.toml --data datasets/ixi-t1-mni --out runs/dae-hole32 --budget 20m --quiet
.venv/bin/python benchmarks/bench_anomaly_alternatives.py --run runs/dae-r8g3 --data datasets/brats-t1-mni \
    --healthy datasets/ixi-t1-mni --inpainting-run runs/dae-hole32 --pair runs/fae-10m:feature_ssim \
    --pair runs/ae-6m:residual_local --pair ixi-t1-128:restoration --ldm ixi-t1-128 \
    --out benchmarks/results/anomaly/alternatives_val.json
# The perceptual scores (--features: the fae's encoder), one test run of every scorer, then the shipped pair
# (ixi-t1-128-fae: exported from runs/fae-10m) measured with its float16 weights for the dae's card.
$B anomaly ixi-t1-128 --data datasets/brats-t1-mni --baseline ixi-t1-128-dae --baseline runs/fae-10m \
    --baseline runs/ae-6m --features runs/fae-10m --across 11 --healthy datasets/ixi-t1-mni \
    --out runs/anomaly-brats-v4 --force --quiet
$B anomaly ixi-t1-128-dae --data datasets/brats-t1-mni --features ixi-t1-128-fae --across 11 \
    --healthy datasets/ixi-t1-mni --out runs/dae-r8g3/anomaly --force --quiet

# Session 15 (same machine kind): the feature net of the perceptual scores trained longer. fae-30m (the shipped
# config, 30 min) and fae-60m (45 min of encoder training, 15 of autoencoder) against fae-10m, and three
# calibrations of the label-free threshold, on the validation cases only; fae-30m (best validation Dice) is
# shipped as ixi-t1-128-fae (export --half), then one test run of every scorer and the shipped pair for the cards.
[ -f runs/fae-30m/summary.json ] || $B train src/brainvae/configs/fae.toml --data datasets/ixi-t1-mni --out runs/fae-30m --budget 30m --quiet
[ -f runs/fae-60m/summary.json ] || $B train src/brainvae/configs/fae.toml --data datasets/ixi-t1-mni --out runs/fae-60m --budget 60m \
    --epochs 200 --set stages.autoencoder.share=0.25 --quiet
.venv/bin/python benchmarks/bench_anomaly_labelfree.py --run ixi-t1-128-dae --data datasets/brats-t1-mni \
    --healthy datasets/ixi-t1-mni --features runs/fae-10m --features runs/fae-30m --features runs/fae-60m \
    --out benchmarks/results/anomaly/labelfree_val.json
# $B export runs/fae-30m --out src/brainvae/pretrained/ixi-t1-128-fae --name ixi-t1-128-fae --half --force
$B anomaly ixi-t1-128 --data datasets/brats-t1-mni --baseline ixi-t1-128-dae --baseline ixi-t1-128-fae \
    --baseline runs/ae-6m --features ixi-t1-128-fae --across 11 --healthy datasets/ixi-t1-mni \
    --out runs/anomaly-brats-v5 --force --quiet
$B anomaly ixi-t1-128-dae --data datasets/brats-t1-mni --features ixi-t1-128-fae --across 11 \
    --healthy datasets/ixi-t1-mni --out runs/dae-r8g3/anomaly --force --quiet
