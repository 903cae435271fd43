# Sourced by the real-data suites (from the repository root): the brainvae command and the stores they share.
# Healthy IXI T1 and BraTS 2018 T1 on the same MNI-aligned 128 px, 1.5 mm grid; BraTS also smoothed to IXI's
# 2 mm resolution before resampling.
B=.venv/bin/brainvae
DATA=../shared/data
PREP="--register --positions 0.2 0.9 --min-brain 0.1"
[ -d datasets/ixi-t1-mni ] || $B data prepare $DATA/ixi-t1-2mm --out datasets/ixi-t1-mni $PREP
[ -d datasets/brats-t1-mni ] || $B data prepare $DATA/brats2018 --modality t1 --out datasets/brats-t1-mni $PREP
[ -d datasets/brats-t1-mni-res2 ] || $B data prepare $DATA/brats2018 --modality t1 --out datasets/brats-t1-mni-res2 $PREP --resolution-mm 2
