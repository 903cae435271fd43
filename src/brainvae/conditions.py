"""The conditions a model can take (age, sex, slice position): their units, valid ranges and encodings.

    check_conditions({"age": 70, "sex": "F"}, ("age", "sex"))  # {"age": 70.0, "sex": -1.0}
    conditions_of(store.manifest.iloc[rows])                   # {"age": (n,), "sex": (n,), "position": (n,)}

User units everywhere a model or a sampler sees them: age in years (NaN =
unknown), sex +1 male / -1 female / 0 unknown, position 0..1 from the bottom
to the top of the brain. Manifests write sex as "M" / "F". The bottom layer:
models, data and evaluation import it; it imports none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import BrainVAEError

if TYPE_CHECKING:  # pandas only for the annotations: models import this module
    import pandas as pd

CONDITIONS = ("age", "sex", "position")
SEX_CODE = {"M": 1.0, "F": -1.0}  # manifest letter -> model value; anything else is 0 (unknown)
SEX_CLASS = {"F": 0, "M": 1}  # manifest letter -> class of the sex classifiers; anything else is -1 (no label)
SEX_WORDS = {"m": "M", "male": "M", "f": "F", "female": "F"}  # written sex (any case) -> manifest letter
# user input -> model value: the words, and the model's own numbers (data files need their numeric coding stated)
SEX_SPELLINGS = {**{word: SEX_CODE[letter] for word, letter in SEX_WORDS.items()}, "+1": 1.0, "1": 1.0, "-1": -1.0}
RANGES = {"age": (0.0, 120.0), "position": (0.0, 1.0)}  # valid values, ends included (sex: +1, -1 or 0)
NEUTRAL = {"age": 50.0, "sex": 0.0, "position": 0.5}  # the value of a condition left out, where one is needed


def parse_sex(sex: str | float | None) -> float | None:
    """M / male / +1 -> +1.0, F / female / -1 -> -1.0 (any case); numbers pass through (see check_conditions)."""
    if sex is None or not isinstance(sex, str):
        return sex
    value = SEX_SPELLINGS.get(sex.strip().lower())
    if value is None:
        raise BrainVAEError(f"sex must be M or F (also male / female, +1 / -1), got {sex!r}")
    return value


def sex_codes(sex: pd.Series) -> np.ndarray:
    """Manifest sex 'M' / 'F' -> +1 / -1, anything else -> 0 (unknown): (N,) float64."""
    return np.array(sex.map(SEX_CODE).fillna(0.0), dtype=float)


def sex_classes(sex: pd.Series) -> np.ndarray:
    """Manifest sex 'M' / 'F' -> 1 / 0, anything else -> -1 (missing): (N,) int64."""
    return sex.map(SEX_CLASS).fillna(-1).to_numpy(dtype=np.int64)


def conditions_of(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The conditions of manifest rows in user units, each (n,) float64: age (NaN unknown), sex, position.
    Writable copies (pandas hands out read-only arrays, which torch warns about)."""
    return {"age": np.array(rows["age"], dtype=float), "sex": sex_codes(rows["sex"]),
            "position": np.array(rows["position"], dtype=float)}


def check_conditions(cond: dict | None, allowed: tuple[str, ...], arch: str = "model") -> dict | None:
    """Validated sampling conditions in user units; keys the model is not conditioned on are refused.

    Values are scalars or (n,) arrays / tensors (sample i gets the i-th; NaN = unknown, allowed only in
    arrays, which come from data). Age in 0..120 years, position in 0..1, sex "M" / "F" (-> +1 / -1) or
    +1 / -1 / 0. None values are dropped; returns None when nothing is left."""
    if cond is None:
        return None
    if not isinstance(cond, dict):
        raise BrainVAEError(f"conditions must be a dict such as {{'age': 70, 'sex': 'F'}}, got {cond!r}")
    given = {k: v for k, v in cond.items() if v is not None}
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise BrainVAEError(f"this {arch} model is not conditioned on {extra} "
                            f"(its conditions: {list(allowed) or 'none'})")
    out = {}
    for key, value in given.items():
        if key == "sex":
            value = parse_sex(value)
        try:
            arr = value.detach().double().cpu().numpy() if isinstance(value, torch.Tensor) \
                else np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise BrainVAEError(f"{key} must be a number or an array of numbers, got {value!r}") from None
        if key == "sex":
            ok, what = np.isin(arr, (-1.0, 0.0, 1.0)), "M or F (+1 male, -1 female, 0 unknown)"
        else:
            lo, hi = RANGES[key]
            ok, what = (arr >= lo) & (arr <= hi), f"within {lo:g}..{hi:g}" + (" years" if key == "age" else "")
        ok |= np.isnan(arr) & (arr.ndim > 0)
        if not ok.all():
            raise BrainVAEError(f"{key} must be {what}, got {arr[~ok].flat[0].item() if arr.ndim else value!r}")
        out[key] = float(arr) if arr.ndim == 0 else value
    return out or None
