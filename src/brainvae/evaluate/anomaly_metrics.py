"""Anomaly-segmentation metrics: pure functions of score maps, lesion masks and case ids.

Conventions (Baur et al. 2021, "Autoencoders for unsupervised anomaly
segmentation in brain MR images: a comparative study"; StRegA, Chatterjee et
al. 2022):

* pixel AUROC / AUPRC over the pixels inside the brain mask of the test cases,
  pooled (lesion pixels outside the brain mask are not scored);
* Dice at ONE threshold chosen on the validation cases only (the honest number)
  as the maximiser of pooled validation Dice; Dice for every threshold at once
  from the precision-recall curve (Dice = 2PR / (P + R)), no Python loop over
  thresholds. The best Dice on the test cases themselves is reported as an
  upper bound, never as the result;
* slice-level AUROC: slice score = mean of the top 1 % of in-brain scores,
  label = slice has lesion pixels in the brain;
* per-case AUROC / AUPRC / Dice with bootstrap 95 % intervals of their mean
  over cases (cases are the independent unit, not pixels).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from .stats import bootstrap_ci


def _xy(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel() > 0
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores for {y.shape[0]} labels")
    return s, y


def pixel_auroc(scores, labels) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    s, y = _xy(scores, labels)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


def pixel_auprc(scores, labels) -> float | None:
    """Average precision (area under the precision-recall curve); None without positives."""
    s, y = _xy(scores, labels)
    if not y.any():
        return None
    return float(average_precision_score(y, s))


def dice(pred, truth) -> float | None:
    """2 |P & T| / (|P| + |T|); None when both are empty (undefined)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    return None if denom == 0 else 2.0 * int((p & t).sum()) / denom


def dice_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Dice of ``score >= t`` for every distinct threshold t: (thresholds, dice), from the PR curve."""
    s, y = _xy(scores, labels)
    if not y.any():
        return np.array([np.inf]), np.array([0.0])
    precision, recall, thresholds = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last point (P=1, R=0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return thresholds, d


def best_dice(scores, labels) -> tuple[float, float]:
    """(max Dice, its threshold) over all thresholds ``score >= t``."""
    thresholds, d = dice_curve(scores, labels)
    i = int(np.argmax(d))
    return float(d[i]), float(thresholds[i])


def slice_scores(score: np.ndarray, brain: np.ndarray, top: float = 0.01) -> np.ndarray:
    """(N,) mean of the top ``top`` fraction of in-brain scores of each (H, W) slice (0 for empty brains)."""
    score, brain = np.asarray(score, np.float32), np.asarray(brain) > 0
    n = len(score)
    flat = np.where(brain, score, -np.inf).reshape(n, -1)
    counts = brain.reshape(n, -1).sum(1)
    k = np.maximum(np.ceil(top * counts).astype(int), 1)
    kmax = int(k.max()) if n else 1
    part = -np.partition(-flat, kmax - 1, axis=1)[:, :kmax]  # (N, kmax), unordered largest values
    part = -np.sort(-part, axis=1)
    keep = np.arange(kmax)[None] < k[:, None]
    vals = np.where(keep & np.isfinite(part), part, 0.0)
    return np.where(counts > 0, vals.sum(1) / k, 0.0)


def case_mean_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of the finite ``values`` (one per case) with a percentile bootstrap interval over cases."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    low, high = bootstrap_ci(lambda rows: v[rows].mean(), np.arange(len(v)), n_boot=n_boot, level=level, seed=seed)
    return {"mean": float(v.mean()), "ci95": [low, high], "n": int(len(v))}


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def evaluate_score(score: np.ndarray, lesion: np.ndarray, brain: np.ndarray, cases: np.ndarray,
                   val_cases, test_cases, *, min_area: int = 0, segment=None, n_boot: int = 2000,
                   seed: int = 0) -> dict:
    """All metrics of one post-processed score map (N, H, W) given lesion and brain masks (N, H, W).

    ``cases`` (N,) names the case of each slice. The threshold is computed from
    the slices of ``val_cases`` alone; every reported number except
    ``threshold`` comes from ``test_cases``. ``segment(score, t, min_area)``
    turns scores into the final binary map (default: ``score >= t`` with
    components smaller than ``min_area`` removed).
    """
    if segment is None:
        from .anomaly_scores import segment
    val_cases, test_cases = list(val_cases), list(test_cases)
    if set(val_cases) & set(test_cases):
        raise ValueError(f"cases in both validation and test: {sorted(set(val_cases) & set(test_cases))}")
    cases = np.asarray(cases)
    brain = np.asarray(brain) > 0
    truth = (np.asarray(lesion) > 0) & brain
    val = np.isin(cases, val_cases)
    test = np.isin(cases, test_cases)

    # threshold from validation pixels only
    vb = brain[val]
    val_dice, threshold = best_dice(np.asarray(score)[val][vb], truth[val][vb])

    s_test, b_test, t_test = np.asarray(score)[test], brain[test], truth[test]
    px_s, px_y = s_test[b_test], t_test[b_test]
    pred = segment(s_test, threshold, min_area) & b_test
    pred_raw = (s_test >= threshold) & b_test
    upper, upper_t = best_dice(px_s, px_y)

    sl_scores = slice_scores(s_test, b_test)
    sl_labels = t_test.reshape(len(t_test), -1).any(1)

    per_case = {}
    test_case_ids = cases[test]
    for c in test_cases:
        k = test_case_ids == c
        b = b_test[k]
        per_case[str(c)] = {
            "auroc": _r(pixel_auroc(s_test[k][b], t_test[k][b])),
            "auprc": _r(pixel_auprc(s_test[k][b], t_test[k][b])),
            "dice": _r(dice(pred[k], t_test[k])) if t_test[k].any() else None,
            "lesion_pixels": int(t_test[k].sum()),
            "slices": int(k.sum()),
        }
    means = {m: case_mean_ci([v[m] for v in per_case.values()], n_boot, seed) for m in ("auroc", "auprc", "dice")}
    for m in means.values():
        m["mean"] = _r(m["mean"])
        m["ci95"] = [_r(x) for x in m["ci95"]]
    return {
        "pixel_auroc": _r(pixel_auroc(px_s, px_y)),
        "pixel_auprc": _r(pixel_auprc(px_s, px_y)),
        "threshold": float(threshold),
        "val_dice": _r(val_dice),  # the validation cases' Dice at their own threshold: what chooses a primary score
        "dice": _r(dice(pred, t_test)),
        "dice_before_component_removal": _r(dice(pred_raw, t_test)),
        "best_dice_upper_bound": _r(upper),
        "best_dice_threshold_on_test": float(upper_t),
        # the Dice of calling the whole brain abnormal, 2p / (1 + p) for lesion prevalence p: a Dice
        # near it means the threshold degenerated to "everything" (weak scores, large lesions)
        "dice_all_brain": _r(dice(b_test, t_test)),
        "slice_auroc": _r(pixel_auroc(sl_scores, sl_labels)),
        "per_case_mean": means,
        "per_case": per_case,
        "test_pixels": int(b_test.sum()),
        "test_lesion_pixels": int(px_y.sum()),
        "val_pixels": int(vb.sum()),
        "val_lesion_pixels": int(truth[val][vb].sum()),
    }


def label_free_threshold(healthy_scores: np.ndarray, healthy_brain: np.ndarray, fpr: float) -> float:
    """The threshold that flags a share ``fpr`` of the in-brain pixels of healthy slices (N, H, W): their
    (1 - fpr) quantile. No lesion mask is involved: what a deployment without annotations can use."""
    values = np.asarray(healthy_scores)[np.asarray(healthy_brain) > 0]
    if len(values) == 0:
        raise ValueError("no healthy brain pixels to fix a label-free threshold on")
    return float(np.quantile(values, 1 - fpr))


def dice_at(score: np.ndarray, lesion: np.ndarray, brain: np.ndarray, cases: np.ndarray, test_cases,
            threshold: float, *, min_area: int = 0, segment=None) -> dict:
    """Dice of the test cases' slices at a threshold fixed elsewhere (e.g. on healthy slices), and the share of
    their normal in-brain pixels it flags (its false-positive rate there)."""
    if segment is None:
        from .anomaly_scores import segment
    test = np.isin(np.asarray(cases), list(test_cases))
    brain = np.asarray(brain)[test] > 0
    truth = (np.asarray(lesion)[test] > 0) & brain
    pred = segment(np.asarray(score)[test], threshold, min_area) & brain
    normal = brain & ~truth
    return {"threshold": float(threshold), "dice": _r(dice(pred, truth)),
            "fpr_normal_tissue": _r(float(pred[normal].mean()) if normal.any() else None),
            "tpr_lesion": _r(float(pred[truth].mean()) if truth.any() else None)}


def case_scores(score: np.ndarray, brain: np.ndarray, cases: np.ndarray, top: float = 0.01) -> dict[str, float]:
    """Volume-level score of each case: the mean of the top ``top`` fraction of its in-brain pixel scores over
    all its slices: case -> score."""
    score, brain, cases = np.asarray(score), np.asarray(brain) > 0, np.asarray(cases)
    out = {}
    for c in dict.fromkeys(cases.tolist()):
        values = score[cases == c][brain[cases == c]]
        if len(values):
            k = max(1, int(np.ceil(top * len(values))))
            out[str(c)] = float(np.partition(values, len(values) - k)[-k:].mean())
    return out
