"""``brainvae evaluate``: a run's samples and reconstructions against real slices, beside a real-vs-real floor.

    metrics = evaluate_run("runs/vae", "datasets/ixi-t1-axial", n=1000, seed=0)

``n`` real test slices are drawn (seeded); a conditional model samples with
their conditions (age, sex, position from the test manifest rows), so sample i
is matched to test slice i; an unconditional model samples from its prior.
Every distance between samples and test slices is reported beside its *floor*,
the same distance between ``n`` real training slices and the same test slices
(different subjects, since splits are by subject), and the ratio model / floor:
a ratio near 1 means the samples are as close to the test set as other real
slices are. All images are compared at the model's size (store slices are
resized as ``SliceBatches`` feeds the model: ``data.resize``).

The classifier two-sample test (``c2st``: can a small CNN tell samples from
real test slices?) has the same floor: the same test between the ``n`` real
training slices and the real test slices, both split in halves by subject.
Models conditioned on age also get an age-effect check (``age_effect``): the
slope of the in-brain CSF fraction vs requested age, beside the slope of real
test + validation slices near the middle of the brain.

Writes ``OUT/metrics.json`` (schema in ``evaluate_run``), ``reconstruction.csv``
and figures, atomically; an existing OUT is refused unless ``force``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from ..progress import bar as progress_bar

from .. import generate as G
from ..conditions import SEX_CODE, conditions_of
from ..data.resize import read_resized, resize_masks
from ..data.store import SliceStore
from ..errors import BrainVAEError, OutputExistsError
from ..io.atomic import atomic_dir
from ..provenance import provenance
from ..rundir import RunDir
from . import age_effect as A
from . import features as Fe
from . import realism as R
from .c2st import STEPS as C2ST_STEPS
from .c2st import c2st
from .reconstruction import reconstruction_metrics, summarise

AGES = (25, 35, 45, 55, 65, 75, 85)
FIG_COLUMNS = 8


# ----------------------------------------------------------------------------- data


# Metrics added by name (CONTRIBUTING.md, "Adding a metric"): name -> fn(samples, real, floor, seed) -> dict, the
# arrays (n, H, W) float32 in [0, 1]: generated slices, the real evaluation slices, and real training slices (the
# real-vs-real floor's reference). ``evaluate`` stores each result as metrics[name].
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, int], dict]] = {}


def register_metric(name: str, fn: Callable[[np.ndarray, np.ndarray, np.ndarray, int], dict]) -> None:
    """Add a metric that ``evaluate`` computes after its own (a name of its own, not one of its sections)."""
    if name in METRICS:
        raise ValueError(f"metric {name!r} registered twice")
    METRICS[name] = fn


@torch.no_grad()
def reconstruct(model, images: np.ndarray, cond: dict[str, np.ndarray] | None, batch_size: int = 128) -> np.ndarray:
    """Mean reconstructions (fp32) of (n, H, W) images."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size])[:, None].to(model.device)
        c = None if cond is None else {k: torch.as_tensor(v[start:start + len(x)], dtype=torch.float32,
                                                          device=model.device) for k, v in cond.items()}
        out.append(model.reconstruct(x, c)[:, 0].float().clamp(0, 1).cpu().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- numbers


def ratio(value, floor) -> float | None:
    """model / floor, or None where the floor is not a positive finite number."""
    if value is None or floor is None or not np.isfinite(floor) or floor <= 1e-12 or not np.isfinite(value):
        return None
    return float(value / floor)


def paired(model: dict, floor: dict) -> dict:
    """{"fd": x, ...} and the floor's -> {"fd": {"value", "floor", "ratio"}, ...} (KID also with std)."""
    out = {}
    for key in model:
        if key.endswith("_std"):
            continue
        out[key] = {"value": model[key], "floor": floor[key], "ratio": ratio(model[key], floor[key])}
        if f"{key}_std" in model:
            out[key].update(std=model[f"{key}_std"], floor_std=floor[f"{key}_std"])
    return out


def summary_rows(metrics: dict) -> list[dict]:
    """The metric | model | floor | ratio table printed by the CLI: every number measured beside a floor (the
    ``paired`` entries), the age effect (its "floor" is the real slices' slope), the reconstruction (no floor)."""
    paired = [(f"{space} {key}", v) for space, d in metrics["realism"].items() for key, v in d.items()]
    paired += [(f"{group} {key}", v) for group in ("c2st", "histogram", "diversity", "memorisation")
               for key, v in metrics[group].items() if isinstance(v, dict) and "floor" in v]
    rows = [{"metric": name, "model": v["value"], "floor": v["floor"], "ratio": v["ratio"]} for name, v in paired]
    age = metrics.get("age_effect", {})
    if "sample_slope" in age:  # the "floor" of this row is the real slices' slope
        rows.append({"metric": "age CSF slope/decade (floor=real)", "model": age["sample_slope"],
                     "floor": age["real_slope"], "ratio": ratio(age["sample_slope"], age["real_slope"])})
    for key in ("psnr", "ssim", "ms_ssim"):
        rows.append({"metric": f"reconstruction {key} (brain)", "model": metrics["reconstruction"]["brain"][key]["mean"],
                     "floor": None, "ratio": None})
    return rows


def conditional_section(model, store: SliceStore, n: int, seed: int, progress: bool,
                        predictor_steps: int | None = None, split: str = "test") -> dict | None:
    """Conditional fidelity for age+sex models (``evaluate.conditional``), or a note when it is not available."""
    if not {"age", "sex"} <= set(model.config.conditions):
        return None
    try:
        from .conditional import conditional_fidelity
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.conditional":
            raise
        return {"skipped": "conditional fidelity is not available in this version of brainvae "
                           "(no brainvae.evaluate.conditional module)"}
    from .conditional import PredictorConfig

    cfg = PredictorConfig() if predictor_steps is None else PredictorConfig(steps=predictor_steps)
    return conditional_fidelity(model, store, n=n, seed=seed, progress=progress, predictor=cfg, split=split)


def c2st_section(samples: np.ndarray, real: np.ndarray, train: np.ndarray, real_subjects: np.ndarray,
                 train_subjects: np.ndarray, seed: int, steps: int | None = None) -> dict:
    """C2ST of samples vs real test slices, and its floor: real training vs real test slices (``evaluate.c2st``).

    All three sets have the same size. Real sets are split in halves by subject,
    so the classifier cannot win by recognising subjects; samples by slice.
    Real test is the reference set ``b`` in both tests, so with one seed both
    use the same halves of it.
    """
    steps = C2ST_STEPS if steps is None else steps
    model = c2st(samples, real, seed=seed, steps=steps, groups_b=real_subjects)
    floor = c2st(train, real, seed=seed, steps=steps, groups_a=train_subjects, groups_b=real_subjects)
    out = paired({k: model[k] for k in ("accuracy", "auc")}, {k: floor[k] for k in ("accuracy", "auc")})
    return {**out, "n_train": model["n_train"], "n_test": model["n_test"], "floor_n_train": floor["n_train"],
            "floor_n_test": floor["n_test"], "steps": model["steps"],
            "split_by_subject": {"real_test": model["split_by_group"]["b"],
                                 "real_train": floor["split_by_group"]["a"]},
            "floor_sets": "real training vs real test slices (different subjects), as many as the samples"}


def age_effect_section(model, store: SliceStore, seed: int, split: str = "test") -> tuple[dict, dict | None]:
    """CSF fraction vs age of samples (ages ``A.AGES``) and of real test + val slices (val only when tuning) near
    position 0.5.

    Returns (metrics["age_effect"], the points for the figure or None). Samples:
    ``A.PER_AGE`` per age, alternately female and male when the model takes sex,
    at position 0.5 when it takes position; one seed for all (sample_images).
    Real: test and validation slices with |position - 0.5| <= ``A.WINDOW`` and a
    known age, resized to the model's size like the samples are compared
    everywhere else.
    """
    conds = set(model.config.conditions)
    if "age" not in conds:
        return {"skipped": "the model is not conditioned on age"}, None
    m = store.manifest
    splits = ["test", "val"] if split == "test" else [split]  # tuning (val) never looks at the test subjects
    near = ((m["split"].isin(splits)) & ((m["position"] - A.POSITION).abs() <= A.WINDOW + 1e-9)
            & np.isfinite(m["age"].to_numpy(dtype=float)))
    rows = np.flatnonzero(near.to_numpy())
    subjects = m["subject"].to_numpy()[rows]
    if len(np.unique(subjects)) < 3:
        return {"skipped": f"fewer than 3 test/val subjects with a known age have slices at position "
                           f"{A.POSITION} ± {A.WINDOW} ({len(np.unique(subjects))})"}, None
    size = model.config.image_size
    real_age = m["age"].to_numpy(dtype=float)[rows]
    real_csf = A.csf_fraction(read_resized(store.images, rows, size))  # (m,)

    ages = np.repeat(np.asarray(A.AGES, float), A.PER_AGE)  # (n,)
    cond = {"age": ages, "sex": np.resize([SEX_CODE["F"], SEX_CODE["M"]], len(ages)), "position": A.POSITION}
    images = G.sample_images(model, len(ages), {k: v for k, v in cond.items() if k in conds}, seed)  # (n, S, S)
    sample_csf = A.csf_fraction(images)
    result = A.compare_age_effect(ages, sample_csf, real_age, real_csf, subjects, seed=seed)
    result.update(ages=list(A.AGES), per_age=A.PER_AGE, csf_threshold=A.CSF_THRESHOLD, foreground=A.FOREGROUND,
                  position=A.POSITION, window=A.WINDOW,
                  sample_sex=("alternately F and M" if "sex" in conds else "not a condition"))
    return result, {"sample_age": ages, "sample_csf": sample_csf, "real_age": real_age, "real_csf": real_csf}


# ----------------------------------------------------------------------------- figures


def _image_rows(path: Path, rows: list[np.ndarray], row_labels: list[str], col_labels: list[str] | None = None,
                title: str = "", cmaps: list[str] | None = None, vmaxes: list[float] | None = None) -> None:
    """A labelled grid figure, one list entry per row of (k, H, W) images, drawn as one RGB mosaic (fast).

    Row i maps 0..``vmaxes[i]`` (default 1) through ``cmaps[i]`` (default grey); a row in another colour map
    (a score map) gets a colour bar at its right."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmaps, vmaxes = cmaps or ["gray"] * len(rows), vmaxes or [1.0] * len(rows)
    h, w = rows[0].shape[-2:]
    pad = max(2, h // 16)
    ncol = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.float32)  # (rows, cols, RGB)
    for i, images in enumerate(rows):
        cmap = plt.get_cmap(cmaps[i])
        for j, img in enumerate(images):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = cmap(np.clip(img / vmaxes[i], 0, 1))[..., :3]
    bars = [i for i, cmap in enumerate(cmaps) if cmap != "gray"]
    unit = max(1.0, 96 / h) / 100  # inches per mosaic pixel: at least ~1 inch per image
    top = 0.55 if title else 0.3  # inches for the title and the column labels
    left, right = 1.3, (0.9 if bars else 0.1)  # inches for the row labels, and for the colour bars
    fw, fh = canvas.shape[1] * unit + left + right, canvas.shape[0] * unit + top + 0.1
    fig = plt.figure(figsize=(fw, fh))
    ax = fig.add_axes((left / fw, 0.1 / fh, canvas.shape[1] * unit / fw, canvas.shape[0] * unit / fh))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for i, label in enumerate(row_labels):
        ax.text(-pad, pad + i * (h + pad) + h / 2, label, ha="right", va="center", fontsize=8)
    for j, label in enumerate(col_labels or []):
        ax.text(pad + j * (w + pad) + w / 2, pad / 2, label, ha="center", va="bottom", fontsize=7)
    for i in bars:
        bottom = fh - top - (pad + i * (h + pad) + h) * unit  # inches from the figure's bottom to row i's
        cax = fig.add_axes(((left + canvas.shape[1] * unit + 0.1) / fw, bottom / fh, 0.12 / fw, h * unit / fh))
        fig.colorbar(ScalarMappable(Normalize(0, vmaxes[i]), cmaps[i]), cax=cax)
        cax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _spread(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of k items whose values span the range evenly (sorted by value)."""
    order = np.argsort(values, kind="stable")
    return order[np.unique(np.linspace(0, len(order) - 1, min(k, len(order))).round().astype(int))]


def fig_real_vs_sample(path: Path, real: np.ndarray, real_pos: np.ndarray, samples: np.ndarray,
                       sample_pos: np.ndarray, matched: bool, split: str = "test") -> None:
    """Real slices of ``split`` above samples at matched slice positions.

    ``matched``: sample i was generated at real slice i's position. Otherwise,
    for evenly spread real positions, the sample whose predicted position (the
    feature net's head) is nearest.
    """
    cols = _spread(real_pos, FIG_COLUMNS)
    if matched:
        picked, labels = cols, [f"pos {real_pos[i]:.2f}" for i in cols]
        note = "samples generated at the real slice's position"
    else:
        picked = np.array([np.argmin(np.abs(sample_pos - real_pos[i])) for i in cols])
        labels = [f"{real_pos[i]:.2f} / {sample_pos[j]:.2f}" for i, j in zip(cols, picked)]
        note = "samples ordered by the feature net's predicted position (real / predicted)"
    _image_rows(path, [real[cols], samples[picked]], [f"real ({split})", "sample"], labels, title=note)


def fig_reconstructions(path: Path, real: np.ndarray, recon: np.ndarray, positions: np.ndarray) -> None:
    cols = _spread(positions, FIG_COLUMNS)
    resid = np.abs(real[cols] - recon[cols])
    vmax = max(float(resid.max()), 1e-3)
    _image_rows(path, [real[cols], recon[cols], resid], ["original", "reconstruction", "|residual|"],
                [f"pos {positions[i]:.2f}" for i in cols], cmaps=["gray", "gray", "magma"], vmaxes=[1.0, 1.0, vmax])


def fig_closest_pairs(path: Path, samples: np.ndarray, nearest: np.ndarray, ssim: np.ndarray, threshold: float) -> None:
    _image_rows(path, [samples, nearest], ["sample", "nearest train"], [f"SSIM {s:.3f}" for s in ssim],
                title=f"most similar sample / training pairs (memorisation threshold SSIM {threshold:.3f})")


def fig_histograms(path: Path, hists: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, h in hists.items():
        centres = (np.arange(len(h)) + 0.5) / len(h)
        ax.plot(centres, h, label=name, drawstyle="steps-mid")
    ax.set_xlabel(f"intensity (pixels above {R.FOREGROUND})")
    ax.set_ylabel("fraction of in-brain pixels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def age_sex_images(model, seed: int, ages=AGES) -> np.ndarray:
    """(2, len(ages), H, W): rows F, M; one latent (same seed) for every cell; position 0.5 if conditioned."""
    out = np.zeros((2, len(ages), model.config.image_size, model.config.image_size), np.float32)
    for i, sex in enumerate((SEX_CODE["F"], SEX_CODE["M"])):
        for j, age in enumerate(ages):
            cond = {k: v for k, v in {"age": float(age), "sex": sex, "position": 0.5}.items()
                    if k in model.config.conditions}
            g = torch.Generator(device=model.device).manual_seed(seed)
            out[i, j] = model.generate(1, cond, g).float().clamp(0, 1)[0, 0].cpu().numpy()
    return out


def interpolation_pair(store: SliceStore, test_rows: np.ndarray) -> tuple[int, int]:
    """Two test slices of different subjects (if there are two) near the median position: store rows."""
    m = store.manifest.iloc[test_rows]
    mid = m.iloc[(m["position"] - m["position"].median()).abs().argsort(kind="stable")]
    a = mid.index[0]
    other = mid[mid["subject"] != mid.loc[a, "subject"]]
    b = other.index[0] if len(other) else mid.index[min(1, len(mid) - 1)]
    return int(a), int(b)


# ----------------------------------------------------------------------------- the evaluation


@dataclass
class EvalSets:
    """The real slices an evaluation compares with (store rows and images at the model's size)."""

    split: str  # the real set the samples are measured against: "test" (report) or "val" (tuning)
    eval_rows: np.ndarray  # all rows of that split
    train_rows: np.ndarray  # all training rows (the floor's sets and the memorisation search)
    eval_sel: np.ndarray  # (m,) drawn rows of the split, sorted
    train_sel: np.ndarray  # (m,) drawn training rows, sorted
    real: np.ndarray  # (m, S, S) slices of eval_sel
    train: np.ndarray  # (m, S, S) slices of train_sel
    brain: np.ndarray  # (m, S, S) bool brain masks of eval_sel
    cond: dict  # conditions of eval_sel in user units (conditions_of)


def check_splits(store: SliceStore, split: str, n: int) -> None:
    """Refuse a split name, a store without enough ``split`` / training slices, or n < 2 (before any work)."""
    if split not in ("test", "val"):
        raise BrainVAEError(f"evaluate measures against the test or val split, not {split!r}")
    eval_rows, train_rows = store.indices(split), store.indices("train")
    for name, rows in ((split, eval_rows), ("train", train_rows)):
        if len(rows) < 2:
            raise BrainVAEError(f"{store.path}: the store's {name} split has {len(rows)} slices; evaluation needs "
                                f"real {split} slices and training slices (prepare the store with a train/val/test "
                                "split)")
    if n < 2:
        raise BrainVAEError(f"-n must be at least 2, got {n}")


def load_sets(store: SliceStore, split: str, n: int, seed: int, size: int) -> EvalSets:
    """min(n, split size, train size) slices of ``split`` and as many training slices, drawn with ``seed``."""
    eval_rows, train_rows = store.indices(split), store.indices("train")
    rng = np.random.default_rng(seed)
    m = min(n, len(eval_rows), len(train_rows))
    eval_sel = np.sort(rng.choice(eval_rows, m, replace=False))
    train_sel = np.sort(rng.choice(train_rows, m, replace=False))
    return EvalSets(split, eval_rows, train_rows, eval_sel, train_sel, read_resized(store.images, eval_sel, size),
                    read_resized(store.images, train_sel, size), resize_masks(store.array("brain")[eval_sel], size),
                    conditions_of(store.manifest.iloc[eval_sel]))


def reconstruction_section(model, sets: EvalSets, cond: dict | None) -> tuple[np.ndarray, dict, dict]:
    """(reconstructions (m, S, S), per-slice metrics, metrics["reconstruction"])."""
    recon = reconstruct(model, sets.real, cond)
    rec = reconstruction_metrics(sets.real, recon, sets.brain)
    rec_summary = summarise(rec)
    section = {"n": len(sets.real), **{region: {k.rsplit("_", 1)[0]: v for k, v in rec_summary.items()
                                                if k.endswith("_" + region)} for region in ("brain", "background")}}
    return recon, rec, section


def realism_section(store: SliceStore, sets: EvalSets, samples: np.ndarray, seed: int, ext, featnet_steps,
                    progress: bool) -> dict:
    """Distances of samples and of real training slices to the real set in every feature space, the intensity
    histograms and MS-SSIM diversity; also the feature net's info and the featnet positions (for the figures)."""
    cfg = Fe.FeatNetConfig(**({"steps": featnet_steps} if featnet_steps is not None else {}))
    net, info = Fe.load_or_train_featnet(store, cfg, progress=progress)
    real, train = sets.real, sets.train
    f_real, pos_real = Fe.featnet_features(net, real)
    f_samp, pos_samp = Fe.featnet_features(net, samples)
    spaces = {"featnet": (f_real, f_samp, Fe.featnet_features(net, train)[0])}
    radi = [Fe.radiomics(x) for x in (real, samples, train)]
    std = Fe.Standardiser.fit(radi[2])
    spaces["radiomics"] = tuple(std(x) for x in radi)
    pca = Fe.fit_pca(train, seed=seed)
    spaces["pca64"] = tuple(Fe.pca_features(pca, x) for x in (real, samples, train))
    if ext is not None:
        spaces["extractor"] = (ext(real), ext(samples), ext(train))
    realism = {name: paired(R.feature_distances(r, s, seed=seed), R.feature_distances(r, t, seed=seed))
               for name, (r, s, t) in spaces.items()}
    hists = {f"real {sets.split}": R.intensity_histogram(real), "real train": R.intensity_histogram(train),
             "samples": R.intensity_histogram(samples)}
    histogram = paired(R.histogram_distance(hists[f"real {sets.split}"], hists["samples"]),
                       R.histogram_distance(hists[f"real {sets.split}"], hists["real train"]))
    m = len(real)
    pairs = min(500, m * (m - 1) // 2)
    div_s, div_r = R.diversity(samples, pairs, seed), R.diversity(real, pairs, seed)
    return {"realism": realism, "histogram": histogram, "hists": hists, "info": info, "pos_samp": pos_samp,
            "diversity": {"ms_ssim": {"value": div_s, "floor": div_r, "ratio": ratio(div_s, div_r)}, "pairs": pairs},
            "position_mae": float(np.mean(np.abs(pos_real - sets.cond["position"]))),
            "extractor_dim": int(spaces["extractor"][0].shape[1]) if ext is not None else None}


def memorisation_section(store: SliceStore, sets: EvalSets, samples: np.ndarray, size: int, k: int = 20) -> dict:
    """Nearest training slice (SSIM) of every sample and of every real slice; the share of samples closer than
    the real slices' 99th percentile, and the closest pairs (for the figure)."""
    thumb = min(32, size)
    train_rows = sets.train_rows
    thumbs = read_resized(store.images, train_rows, thumb).reshape(len(train_rows), -1)  # (N_train, thumb * thumb)

    def train_images(idx: np.ndarray) -> np.ndarray:
        return read_resized(store.images, train_rows[idx], size)

    s_idx, s_ssim = R.nearest_by_ssim(samples, thumbs, train_images, k=k, thumb_size=thumb)
    _, t_ssim = R.nearest_by_ssim(sets.real, thumbs, train_images, k=k, thumb_size=thumb)
    mem = R.memorisation(s_ssim, t_ssim, quantile=99.0)
    closest = np.argsort(-s_ssim, kind="stable")[:FIG_COLUMNS]
    subjects = store.manifest["subject"].to_numpy()
    section = {
        "share_above": {"value": mem["share_above"], "floor": mem["floor_share_above"],
                        "ratio": ratio(mem["share_above"], mem["floor_share_above"])},
        "nn_ssim_mean": {"value": mem["nn_ssim_mean"], "floor": mem["test_nn_ssim_mean"],
                         "ratio": ratio(mem["nn_ssim_mean"], mem["test_nn_ssim_mean"])},
        "threshold_ssim": mem["threshold_ssim"], "quantile": 99.0, "k": k,
        "closest_pairs": [{"sample": int(i), "train_row": int(train_rows[s_idx[i]]),
                           "subject": str(subjects[train_rows[s_idx[i]]]), "ssim": float(s_ssim[i])} for i in closest],
    }
    figure = {"samples": samples[closest], "nearest": train_images(s_idx[closest]), "ssim": s_ssim[closest],
              "threshold": mem["threshold_ssim"]}
    return {"section": section, "figure": figure}


def write_figures(folder: Path, model, store: SliceStore, sets: EvalSets, samples: np.ndarray, recon: np.ndarray,
                  pos_samp: np.ndarray, hists: dict, closest: dict, seed: int, age_effect: dict,
                  age_points: dict | None) -> list[str]:
    """The evaluation's figures in ``folder``; returns their file names."""
    conds = set(model.config.conditions)
    figures = ["real_vs_sample.png", "reconstructions.png", "closest_pairs.png", "histograms.png", "interpolation.png"]
    fig_real_vs_sample(folder / figures[0], sets.real, sets.cond["position"], samples, pos_samp, "position" in conds,
                       sets.split)
    fig_reconstructions(folder / figures[1], sets.real, recon, sets.cond["position"])
    fig_closest_pairs(folder / figures[2], **closest)
    fig_histograms(folder / figures[3], hists)
    a, b = interpolation_pair(store, sets.eval_sel)
    _image_rows(folder / figures[4], [G.interpolate(model, store, a, b, steps=FIG_COLUMNS)], ["interpolation"],
                [f"t={t:.2f}" for t in np.linspace(0, 1, FIG_COLUMNS)],
                title=f"latent interpolation between {sets.split} slices {a} and {b} (store rows)")
    if {"age", "sex"} <= conds:
        grid = age_sex_images(model, seed)
        _image_rows(folder / "age_sex_grid.png", list(grid), ["F", "M"], [f"age {a}" for a in AGES],
                    title="same latent (seed) at every age and sex" + (", position 0.5" if "position" in conds else ""))
        figures.append("age_sex_grid.png")
    if age_points is not None:
        A.fig_age_effect(folder / "age_effect.png", age_effect, **age_points)
        figures.append("age_effect.png")
    return figures


def evaluate_run(run: str | Path, store: str | Path | SliceStore, out: str | Path | None = None, n: int = 1000,
                 seed: int = 0, extractor: str | Path | None = None, force: bool = False, progress: bool = True,
                 featnet_steps: int | None = None, predictor_steps: int | None = None,
                 device: str | torch.device = "cpu", c2st_steps: int | None = None, sampler: dict | None = None,
                 split: str = "test") -> dict:
    """Evaluate a run against a store's test split (``split="val"`` to tune); writes OUT (default RUN/eval, or
    RUN/eval-val) and returns metrics.json's dict.

    metrics.json keys:
      run, store, arch, image_size, conditions, split, n (slices per set), n_requested, seed,
      sampling            how samples were conditioned
      feature_net         cache path, trained_now, objective, config, position MAE on the real set
      realism             {space: {fd|kid|precision|recall|density|coverage: {value, floor, ratio[, std, floor_std]}}}
                          for spaces featnet, radiomics, pca64 and extractor (with --extractor)
      c2st                classifier two-sample test, samples vs real slices (floor: real train vs real):
                          {accuracy|auc: {value, floor, ratio}, n_train, n_test (per class), floor_n_train,
                          floor_n_test, steps, split_by_subject, floor_sets}; 0.5 = cannot be told apart
      age_effect          (age-conditioned models) CSF fraction vs age: {sample_slope, real_slope, real_ci,
                          within_ci, n_real_subjects, ...} (per decade); {"skipped": why} for other models
                          or too few real subjects
      histogram           {wasserstein|js|intersection: {value, floor, ratio}}
      diversity           {ms_ssim: {value (samples), floor (real), ratio}, pairs}
      memorisation        {share_above, nn_ssim_mean: {value, floor, ratio}, threshold_ssim, quantile, k, closest_pairs}
      reconstruction      {n, brain|background: {mse|psnr|ssim|ms_ssim: {mean, std}}}
      conditional         conditional fidelity (age+sex models; a "skipped" note when unavailable), else absent
      summary             [{metric, model, floor, ratio}], figures, provenance
    """
    run = Path(run)
    store = store if isinstance(store, SliceStore) else SliceStore(store)
    out = Path(out) if out is not None else RunDir.resolve(run).output("eval" if split == "test" else f"eval-{split}")
    if out.exists() and not force:
        raise OutputExistsError(out)
    check_splits(store, split, n)
    model = G.load(run, device=device)
    if not model.generative:
        raise BrainVAEError(f"{run}: {model.arch} does not generate, and evaluate measures generated slices; "
                            f"score it with `brainvae anomaly {run} --data STORE`")
    model.configure_sampler(**(sampler or {}))  # e.g. ldm steps / guidance
    ext = Fe.TorchScriptExtractor(extractor) if extractor is not None else None
    size, conds = model.config.image_size, tuple(model.config.conditions)
    stages = ["load slices", "sample", "reconstruct", "realism", "c2st", "age effect", "memorisation", "write"]
    bar = progress_bar(total=len(stages), desc="evaluate", unit="stage", disable=not progress)

    def stage(index: int) -> None:
        bar.n = index
        bar.set_postfix_str(stages[index])

    stage(0)
    sets = load_sets(store, split, n, seed, size)
    stage(1)
    cond = {k: sets.cond[k] for k in conds} or None
    samples = G.sample_images(model, len(sets.real), cond, seed)  # sample i at the conditions of real slice i
    stage(2)
    recon, rec, reconstruction = reconstruction_section(model, sets, cond)
    stage(3)
    real = realism_section(store, sets, samples, seed, ext, featnet_steps, progress)
    stage(4)
    subject = store.manifest["subject"].to_numpy()
    two_sample = c2st_section(samples, sets.real, sets.train, subject[sets.eval_sel], subject[sets.train_sel], seed,
                              c2st_steps)
    stage(5)
    age_effect, age_points = age_effect_section(model, store, seed, split)
    stage(6)
    mem = memorisation_section(store, sets, samples, size)

    metrics = {
        "run": str(run), "store": str(store.path), "arch": model.arch, "image_size": size, "conditions": list(conds),
        "split": split, "n": len(sets.real), "n_requested": n, "seed": seed,
        "sampling": (f"conditions of the n real {split} slices (sample i matched to {split} slice i)" if conds
                     else "the model's prior (unconditional)"),
        "sampler": model.sampler_settings(),  # the prior's sampling options (ldm: steps, solver, guidance)
        "feature_net": {**{k: v for k, v in real["info"].items() if k != "final_batch"},
                        "test_position_mae": real["position_mae"]},
        "realism": real["realism"], "c2st": two_sample, "histogram": real["histogram"],
        "diversity": real["diversity"], "memorisation": mem["section"], "reconstruction": reconstruction,
        "age_effect": age_effect,
    }
    if ext is not None:
        metrics["extractor"] = {"path": str(ext.path), "input": ext.input_note, "dim": real["extractor_dim"]}
    for name, fn in METRICS.items():
        if name in metrics:
            raise BrainVAEError(f"registered metric {name!r} would replace evaluate's own section {name!r}")
        metrics[name] = fn(samples, sets.real, sets.train, seed)
    conditional = conditional_section(model, store, n, seed, progress, predictor_steps, split)
    if conditional is not None:
        metrics["conditional"] = conditional
    metrics["summary"] = summary_rows(metrics)

    stage(7)
    with atomic_dir(out, force=force) as tmp:
        metrics["figures"] = write_figures(tmp, model, store, sets, samples, recon, real["pos_samp"], real["hists"],
                                           mem["figure"], seed, age_effect, age_points)
        metrics["provenance"] = provenance(run=str(run), store=str(store.path), seed=seed, n=len(sets.real),
                                           feature_net=real["info"]["path"],
                                           extractor=str(extractor) if extractor else None)
        pd.DataFrame({"store_row": sets.eval_sel, "subject": subject[sets.eval_sel],
                      "position": sets.cond["position"], **rec}).to_csv(tmp / "reconstruction.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True, default=_json_default))
    bar.n = len(stages)
    bar.close()
    return metrics


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
