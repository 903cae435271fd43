"""brainvae: synthetic brain MR slices and anomaly detection with VAEs."""

from importlib import metadata

# The registry hands config.py the architectures RunConfig validates against (config.py imports no model);
# the registry module itself is light (no torch): the model modules load on first lookup.
from .models import registry as _registry  # noqa: F401

try:
    __version__ = metadata.version("brainvae")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"


def load(run, which: str = "best", device: str = "cpu"):
    """The trained model of a run folder, checkpoint file or shipped model name, with EMA weights, in eval mode:
    ``brainvae.load("runs/cvae").generate(8, {"age": 70, "sex": "F"})`` (``BrainModel.generate`` checks the
    conditions) returns (8, 1, H, W) in [0, 1]."""
    from .generate import load as _load

    return _load(run, which, device)
