"""brainvae: synthetic brain MR slices and anomaly detection with VAEs."""

__version__ = "0.1.0"
