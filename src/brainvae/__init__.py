"""brainvae: synthetic brain MR slices and anomaly detection with VAEs."""

import types
from importlib import metadata

try:
    __version__ = metadata.version("brainvae")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"


def load(run, which: str = "best", device: str = "cpu"):
    """The trained model of a run folder, checkpoint file or shipped model name:
    ``brainvae.load("runs/cvae").sample(8, {"age": 70, "sex": "F"})``.

    Its ``sample(n, cond, generator)`` checks ``cond`` first (``brainvae.generate.check_conditions``): sex as
    "M" / "F" (or +1 / -1), age in 0..120 years, position in 0..1, and no key the model is not conditioned
    on. Returns (n, 1, H, W) in [0, 1]."""
    from .generate import load as _load

    model = _load(run, which, device)
    # Per instance, as a bound method, so copies (for_inference's deepcopy) rebind it to themselves.
    model.sample = types.MethodType(_checked_sample, model)
    return model


def _checked_sample(self, n: int, cond: dict | None = None, generator=None, **options):
    from .generate import check_conditions

    cond = check_conditions(cond, tuple(self.config.conditions), self.arch)
    return type(self).sample(self, n, cond, generator, **options)
