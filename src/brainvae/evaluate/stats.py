"""Statistics with subjects (or cases) as the unit: slices of one subject are not independent.

    low, high = bootstrap_ci(lambda rows: np.mean(x[rows]), subjects)  # 95 % percentile interval
    p = p_accuracy(0.9, n=20)   # one-sided: is an accuracy over 20 subjects above chance?
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

ALPHA = 0.05  # one-sided significance level of the tests against chance


def cluster_bootstrap(stat: Callable[[np.ndarray], float], groups: np.ndarray, *, n_boot: int = 1000,
                      seed: int = 0) -> np.ndarray:
    """``stat(rows)`` on ``n_boot`` cluster-bootstrap resamples: (n_boot,).

    Each resample draws as many groups (subjects) as there are, with
    replacement, and takes all the rows of every drawn group (a group drawn
    twice counts twice), so rows of one group stay together (e.g. Field & Welsh
    2007, "Bootstrapping clustered data"). ``groups`` (N,) names each row's group.
    """
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for b in range(n_boot):
        out[b] = stat(np.concatenate([members[g] for g in rng.integers(0, len(names), size=len(names))]))
    return out


def bootstrap_ci(stat: Callable[[np.ndarray], float], groups: np.ndarray, *, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat`` over cluster-bootstrap resamples of ``groups`` (``cluster_bootstrap``);
    resamples where it is not finite are left out, (NaN, NaN) when none is."""
    boots = cluster_bootstrap(stat, groups, n_boot=n_boot, seed=seed)
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return math.nan, math.nan
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def p_accuracy(accuracy: float, n: int, chance: float = 0.5) -> float:
    """One-sided binomial test of accuracy > chance with n independent units: round(accuracy * n) successes."""
    from scipy.stats import binomtest

    if n < 1:
        return 1.0
    return float(binomtest(round(accuracy * n), n, chance, alternative="greater").pvalue)


def p_correlation(r: float, n: int) -> float:
    """One-sided test of a Pearson r > 0 over n units (Student t with n - 2 degrees of freedom)."""
    from scipy.stats import t

    if n < 3:
        return 1.0
    if r >= 1:
        return 0.0
    return float(t.sf(r * math.sqrt((n - 2) / (1 - r * r)), n - 2))
