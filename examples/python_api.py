"""The Python API on the pretrained model shipped in the package: no data, no training.

    .venv/bin/python examples/python_api.py [OUT]        # OUT defaults to python_api_out/

Prints what the model is and the shape of a batch of samples, then writes
OUT/age30-F and OUT/age75-M as `brainvae sample` does (grid.png, one greyscale
PNG per slice, slices.nii.gz, slices.npy and meta.json with the conditions and
the checkpoint). About ten seconds on two CPU cores.
"""

import sys
from pathlib import Path

import torch

import brainvae
from brainvae import generate as G

MODEL = "ixi-t1-128"  # a shipped model (`brainvae models`); a run folder or a checkpoint file works the same way


def main(out: Path) -> None:
    model = brainvae.load(MODEL)  # EMA weights, eval mode, on the CPU (device="cuda" on a GPU)
    print(f"{MODEL}: {model.arch}, {model.config.image_size} px, conditioned on {', '.join(model.config.conditions)}")

    # Tensors in, tensors out: (n, 1, H, W) in [0, 1]. Age in years, sex "M" / "F", position 0 (bottom) to 1
    # (top of the brain); one value for all samples or one per sample. The model samples with its distilled
    # student (2 network passes); sampler="prior" gives the prior's own sampler (steps=..., guidance=...).
    g = torch.Generator().manual_seed(0)
    x = model.generate(4, {"age": torch.tensor([20.0, 40.0, 60.0, 80.0]), "sex": "F", "position": 0.5}, g)
    print(f"generate: {tuple(x.shape)}, values {x.min():.2f}..{x.max():.2f}")

    # Files on disk, as `brainvae sample ixi-t1-128 -n 8 --age 30 --sex F --position 0.5 --out OUT/age30-F` writes.
    for age, sex in ((30, "F"), (75, "M")):
        cond = G.conditions(model, age, sex, 0.5)  # validated: an unknown key or an age of 300 is an error
        images = G.sample_images(model, 8, cond, seed=0)  # (8, H, W) numpy
        meta = G.sample_meta(MODEL, model, 8, 0, cond, None)
        path = G.export_samples(images, out / f"age{age}-{sex}", G.spacing_of(MODEL), meta, force=True)
        print(f"age {age}, sex {sex} -> {path / 'grid.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("python_api_out"))
