"""Conditional fidelity: do samples show the age and sex they were asked for?

An age regressor and a sex classifier (one small CNN with two heads,
``classifier.SliceCNN``) are trained once per store on real TRAINING slices,
selected on the VALIDATION split, and cached. They are then applied

* to real TEST slices: the ceiling (how well age and sex can be read from one
  slice at all);
* to ``n`` conditional samples whose requested (age, sex, position) are drawn
  from the test manifest rows: how well the requested values can be read back.

The ratio sample / real for age Pearson r and for sex accuracy says how much of
the readable signal the generator reproduces (the goal: >= 0.9), provided the
ceiling itself is significantly above chance with test SUBJECTS as the unit
(``ceiling_tests``); on a few subjects it is not, and the verdict is "not
measurable" rather than a ratio of noise. This is the
"classifier-based conditional evaluation" used for conditional GANs (e.g.
Ravuri & Vinyals 2019, "Classification Accuracy Score for Conditional
Generative Models", who train on real data and score samples).

    from brainvae.evaluate.conditional import conditional_fidelity
    result = conditional_fidelity(model, "datasets/ixi-t1-axial128", n=1000)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from ..progress import bar as progress_bar

from ..conditions import SEX_CODE, conditions_of, sex_classes
from ..data.resize import read_resized, resize_images
from ..data.store import SliceStore
from ..io.atomic import atomic_write_bytes
from .classifier import Head, SliceCNN, TrainSettings, predict, train_cnn
from .features import cache_dir, home_cache_dir
from .stats import ALPHA, p_accuracy, p_correlation

PREDICTOR_VERSION = 2  # bump when SliceCNN or the training recipe changes: invalidates caches
HEADS = (Head("age"), Head("sex", classes=2))  # sex classes: conditions.SEX_CLASS (0 = F, 1 = M)
GOAL = 0.9


@dataclass(frozen=True)
class PredictorConfig:
    """How the age / sex predictor is trained; part of its cache key."""

    image_size: int = 64
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    eval_every: int = 50
    width: int = 16
    seed: int = 0


# --- labels -----------------------------------------------------------------------------------------------------

def _targets(manifest: pd.DataFrame, rows: np.ndarray) -> dict[str, np.ndarray]:
    m = manifest.iloc[rows]
    return {"age": m["age"].to_numpy(dtype=float), "sex": sex_classes(m["sex"])}


# --- the cached predictor ---------------------------------------------------------------------------------------

def _store_key(store: SliceStore) -> str:
    """Content key of a store: its manifest and the size of its image array (stores are written once)."""
    h = hashlib.sha256((store.path / "manifest.csv").read_bytes())
    h.update(str((store.path / "images.npy").stat().st_size).encode())
    return h.hexdigest()


def predictor_name(store: SliceStore, cfg: PredictorConfig) -> str:
    key = json.dumps({"store": _store_key(store), "config": asdict(cfg), "version": PREDICTOR_VERSION}, sort_keys=True)
    return f"predictors-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def _save_predictor(net: SliceCNN, path: Path, meta: dict) -> None:
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={"brainvae_predictor": json.dumps(meta)}))


def _load_predictor(path: Path) -> tuple[SliceCNN, dict] | None:
    """The cached predictor, or None when the file is missing or unreadable (it is then retrained)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["brainvae_predictor"])
        net = SliceCNN(tuple(Head(**h) for h in meta["heads"]), width=meta["config"]["width"])
        net.load_state_dict(tensors)
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError):
        return None
    return net.eval(), meta


def load_or_train_predictor(store: SliceStore | str | Path, cfg: PredictorConfig = PredictorConfig(), *,
                            progress: bool = True) -> tuple[SliceCNN, dict]:
    """The age/sex predictor of a store: read from the cache, or trained and cached.

    Cache: ``<store>/features/predictors-<hash>.safetensors``, or
    ``features.home_cache_dir()`` when the store folder is not writable; the
    hash covers the store's manifest and ``cfg``. Returns (net, info) with info
    {"path", "cached", "config", "train": {...}, "val": {...}}.
    """
    store = store if isinstance(store, SliceStore) else SliceStore(store)
    name = predictor_name(store, cfg)
    candidates = [store.path / "features" / name, home_cache_dir() / name]
    for path in candidates:
        if path.exists() and (loaded := _load_predictor(path)) is not None:
            net, meta = loaded
            return net, {"path": str(path), "cached": True, **{k: meta[k] for k in ("config", "train", "val")}}

    m = store.manifest
    train_rows, val_rows = store.indices("train"), store.indices("val")
    size = cfg.image_size
    x_train, x_val = read_resized(store.images, train_rows, size), read_resized(store.images, val_rows, size)
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             eval_every=cfg.eval_every, seed=cfg.seed)
    net, train_info = train_cnn(x_train, _targets(m, train_rows), HEADS, settings, x_val, _targets(m, val_rows),
                                width=cfg.width, progress=progress, desc="age/sex predictor")
    val = _scores(predict(net, x_val), _targets(m, val_rows)) if len(val_rows) else {}
    meta = {"config": asdict(cfg), "heads": [asdict(h) for h in HEADS], "version": PREDICTOR_VERSION,
            "store": str(store.path), "train": {**train_info, "n_slices": int(len(train_rows))}, "val": val}
    path = cache_dir(store) / name
    _save_predictor(net, path, meta)
    return net, {"path": str(path), "cached": False,
                 **{k: meta[k] for k in ("config", "train", "val")}}


# --- scores -----------------------------------------------------------------------------------------------------

def _finite(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _scores(pred: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> dict:
    """Age Pearson r and MAE (years), sex accuracy and balanced accuracy, over slices with known labels."""
    from scipy.stats import pearsonr
    from sklearn.metrics import balanced_accuracy_score

    out: dict = {}
    if "age" in target:
        age, keep = target["age"], np.isfinite(target["age"])
        ok = keep.sum() >= 2 and np.ptp(age[keep]) > 0 and np.ptp(pred["age"][keep]) > 0
        out["age_r"] = _finite(pearsonr(age[keep], pred["age"][keep])[0]) if ok else None
        out["age_mae"] = _finite(np.abs(age[keep] - pred["age"][keep]).mean()) if keep.any() else None
        out["n_age"] = int(keep.sum())
    if "sex" in target:
        sex, keep = target["sex"], target["sex"] >= 0
        guess = pred["sex"].argmax(1)
        out["sex_accuracy"] = _finite((guess[keep] == sex[keep]).mean()) if keep.any() else None
        out["sex_balanced_accuracy"] = (_finite(balanced_accuracy_score(sex[keep], guess[keep]))
                                        if len(np.unique(sex[keep])) > 1 else None)
        out["n_sex"] = int(keep.sum())
    return out


def ceiling_tests(pred: dict[str, np.ndarray], target: dict[str, np.ndarray], subjects: np.ndarray) -> dict:
    """Is the real-data ceiling significantly above chance, with SUBJECTS as the unit (their slices are not
    independent)? One-sided tests at ``stats.ALPHA``:

    * age: Pearson r between each subject's age and the mean age predicted over its slices, t-test of r > 0
      (``stats.p_correlation``);
    * sex: each subject's sex read as the majority vote of its slices (a tie counts as wrong), binomial test of
      the share of subjects read right > 0.5 (``stats.p_accuracy``).

    pred / target as in ``_scores``, over slices whose subjects are ``subjects`` (N,). Returns
    {"age_r" | "sex_accuracy": {"subject_value", "n_subjects", "p", "above_chance"}}.
    """
    from scipy.stats import pearsonr

    slices = pd.DataFrame({"subject": subjects, "age": target["age"], "predicted_age": pred["age"],
                           "sex": target["sex"], "sex_right": pred["sex"].argmax(1) == target["sex"]})
    ages = slices[np.isfinite(slices["age"])].groupby("subject")[["age", "predicted_age"]].mean()  # (subjects, 2)
    age_r = (pearsonr(ages["age"], ages["predicted_age"])[0]
             if len(ages) >= 3 and np.ptp(ages["age"]) > 0 and np.ptp(ages["predicted_age"]) > 0 else None)
    sex_right = slices[slices["sex"] >= 0].groupby("subject")["sex_right"].mean() > 0.5  # (subjects,) majority
    sex_accuracy = float(sex_right.mean()) if len(sex_right) else None
    tests = {"age_r": (age_r, len(ages), p_correlation), "sex_accuracy": (sex_accuracy, len(sex_right), p_accuracy)}
    out = {}
    for key, (value, n, test) in tests.items():
        p = 1.0 if value is None else test(value, n)
        out[key] = {"subject_value": _finite(value), "n_subjects": int(n), "p": p, "above_chance": p < ALPHA}
    return out


def _ratio(sample: float | None, real: float | None) -> float | None:
    return None if sample is None or real is None or real <= 0 else round(sample / real, 4)


# --- conditional samples ----------------------------------------------------------------------------------------

def condition_rows(manifest: pd.DataFrame, rows: np.ndarray, keys: tuple[str, ...], n: int, seed: int) -> pd.DataFrame:
    """n manifest rows drawn with replacement from ``rows`` whose ``keys`` are all known (age, sex, position)."""
    m = manifest.iloc[rows]
    known = np.ones(len(m), bool)
    if "age" in keys:
        known &= np.isfinite(m["age"].to_numpy(dtype=float))
    if "sex" in keys:
        known &= m["sex"].isin(list(SEX_CODE)).to_numpy()
    m = m[known]
    if len(m) == 0:
        from ..errors import BrainVAEError

        raise BrainVAEError(f"no slices with known {list(keys)} to draw conditions from")
    pick = np.random.default_rng(seed).integers(0, len(m), size=n)
    return m.iloc[pick].reset_index(drop=True)


def sample_rows(model, rows: pd.DataFrame, seed: int, *, size: int | None = None, batch_size: int = 256,
                progress: bool = False, desc: str = "sampling") -> np.ndarray:
    """One conditional sample per row (conditions the model takes, in user units): (n, H, W) float32.

    With ``size``, each batch is resized to (size, size) as it comes (thousands of
    128 px samples would otherwise take gigabytes). Batch b uses seed ``seed + b``,
    so the result is reproducible for a given batch size.
    """
    from ..generate import sample_images

    keys = tuple(model.config.conditions)
    values = conditions_of(rows)  # {key: (n,)}
    model = model.for_inference()  # once: sample_images then reuses it for every batch
    out = []
    batches = range(0, len(rows), batch_size)
    for b, start in enumerate(progress_bar(batches, desc=desc, disable=not progress, leave=False)):
        stop = min(start + batch_size, len(rows))
        cond = {k: values[k][start:stop] for k in keys}  # (b,) per condition
        images = sample_images(model, stop - start, cond or None, seed + b, batch_size=batch_size)  # (b, H, W)
        out.append(images if size is None else resize_images(images, size)[:, 0].numpy())
    side = size or model.config.image_size
    return np.concatenate(out) if out else np.empty((0, side, side), np.float32)


def conditional_fidelity(model, store: SliceStore | str | Path, *, n: int = 1000, seed: int = 0,
                         progress: bool = True, predictor: PredictorConfig = PredictorConfig(),
                         split: str = "test") -> dict:
    """Age r / MAE and sex accuracy of real test slices (ceiling) and of ``n`` conditional samples
    (``split="val"``: the validation slices, to tune without looking at the test subjects).

    JSON-able result::

        {"n": n, "seed": seed, "conditions": [...], "goal": 0.9,
         "predictor": {"path", "cached", "config", "train", "val"},
         "real":    {"n_slices", "n_subjects", "age_r", "age_mae", "n_age", "sex_accuracy",
                     "sex_balanced_accuracy", "n_sex"},
         "samples": {"n_slices", same scores (only for the conditions the model takes)},
         "ratio":   {"age_r": samples / real, "sex_accuracy": samples / real},
         "ratio_above_chance": {"sex_accuracy": (samples - 0.5) / (real - 0.5)},
         "ceiling_test": {"age_r" | "sex_accuracy": {"subject_value", "n_subjects", "p", "above_chance"}},
         "meets_goal": {"age_r": bool | None, "sex_accuracy": bool | None},
         "not_measurable": {key: why}}   # the keys whose meets_goal is None

    Scores are None where undefined (a condition the model lacks, a single class). ``meets_goal`` is None
    (not measurable) where the real-data ceiling is not significantly above chance (``ceiling_tests``).
    """
    store = store if isinstance(store, SliceStore) else SliceStore(store)
    net, info = load_or_train_predictor(store, predictor, progress=progress)
    m = store.manifest
    test_rows = store.indices(split)
    real_pred = predict(net, read_resized(store.images, test_rows, predictor.image_size))
    real_target = _targets(m, test_rows)
    real = {"n_slices": int(len(test_rows)), "n_subjects": int(m["subject"].iloc[test_rows].nunique()),
            **_scores(real_pred, real_target)}
    ceiling = ceiling_tests(real_pred, real_target, m["subject"].to_numpy()[test_rows])

    keys = tuple(model.config.conditions)
    asked = tuple(k for k in ("age", "sex") if k in keys)
    rows = condition_rows(m, test_rows, keys, n, seed)
    images = sample_rows(model, rows, seed, size=predictor.image_size, progress=progress,
                         desc="conditional samples")  # (n, S, S)
    pred = predict(net, images)
    target = {k: v for k, v in {"age": rows["age"].to_numpy(dtype=float), "sex": sex_classes(rows["sex"])}.items()
              if k in asked}
    samples = {"n_slices": int(len(images)), **_scores(pred, target)}
    ratio = {"age_r": _ratio(samples.get("age_r"), real.get("age_r")),
             "sex_accuracy": _ratio(samples.get("sex_accuracy"), real.get("sex_accuracy"))}
    # accuracy is 0.5 by chance, so the plain ratio flatters; the ratio of the margins above chance does not
    margin = {"sex_accuracy": _ratio(None if samples.get("sex_accuracy") is None else samples["sex_accuracy"] - 0.5,
                                     None if real.get("sex_accuracy") is None else real["sex_accuracy"] - 0.5)}
    not_measurable = {k: f"the real-data ceiling is not significantly above chance over {t['n_subjects']} test "
                         f"subjects (one-sided p = {t['p']:.2g}, needs < {ALPHA})"
                      for k, t in ceiling.items() if not t["above_chance"]}
    return {"n": int(n), "seed": int(seed), "conditions": list(keys), "goal": GOAL, "predictor": info,
            "real": real, "samples": samples, "ratio": ratio, "ratio_above_chance": margin, "ceiling_test": ceiling,
            "meets_goal": {k: None if k in not_measurable else (v is not None and v >= GOAL) for k, v in ratio.items()},
            "not_measurable": not_measurable}
