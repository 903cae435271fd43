"""What every output folder records about how it was made."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata

from .hardware import git_commit, hardware

_PACKAGES = ("brainvae", "numpy", "scipy", "nibabel", "isal", "SimpleITK", "torch", "torchio", "monai", "pandas",
             "scikit-image", "scikit-learn", "nilearn")


def provenance(**extra) -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": git_commit(),
        "hardware": hardware(),
        **extra,
    }
