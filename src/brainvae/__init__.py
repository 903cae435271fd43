"""brainvae: synthetic brain MR slices and anomaly detection with VAEs."""

__version__ = "0.1.0"


def load(run, which: str = "best", device: str = "cpu"):
    """The trained model of a run folder: ``brainvae.load("runs/vae").sample(8)``."""
    from .generate import load as _load

    return _load(run, which, device)
