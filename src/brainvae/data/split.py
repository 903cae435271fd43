"""Subject-level train/val/test splits, stratified by sex and age band."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def stratum(sex: str | None, age: float | None, age_bands: tuple[float, ...]) -> str:
    """``"F:40-60"``-style label; unknown sex or age form their own strata."""
    s = sex if sex in ("M", "F") else "?"
    if age is None or pd.isna(age):
        return f"{s}:?"
    edges = (-np.inf, *age_bands, np.inf)
    k = int(np.searchsorted(age_bands, age, side="right"))
    return f"{s}:{edges[k]:g}-{edges[k + 1]:g}"


def assign_splits(subjects: pd.DataFrame, ratios: tuple[float, float, float], age_bands: tuple[float, ...],
                  seed: int) -> pd.Series:
    """Split subjects (index = subject id; columns ``sex``, ``age``) into train/val/test.

    Within each stratum, subjects are shuffled with ``seed`` and dealt to the
    splits so that every split's running share stays closest to its ratio
    (a largest-deficit rule, so small strata still spread across splits).
    Every split with a positive ratio gets at least one subject when there are
    enough subjects. The result depends only on the subjects, ratios and seed.
    """
    rng = np.random.default_rng(seed)
    ratios_arr = np.asarray(ratios, dtype=float)
    counts = np.zeros(3)
    out = pd.Series(index=subjects.index, dtype=object, name="split")
    strata = subjects.apply(lambda r: stratum(r.get("sex"), r.get("age"), age_bands), axis=1)
    for label in sorted(strata.unique()):
        members = np.array(sorted(strata.index[strata == label]))
        rng.shuffle(members)
        for subject in members:
            deficit = ratios_arr * (counts.sum() + 1) - counts
            k = int(np.argmax(deficit))
            out[subject] = SPLITS[k]
            counts[k] += 1
    for k in np.flatnonzero((ratios_arr > 0) & (counts == 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            subject = sorted(out.index[out == SPLITS[donor]])[-1]
            out[subject] = SPLITS[k]
            counts[donor] -= 1
            counts[k] += 1
    return out
