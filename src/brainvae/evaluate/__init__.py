"""Quantitative evaluation of a trained run: reconstruction, realism, memorisation, conditional fidelity."""
