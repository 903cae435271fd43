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
area-resized like ``SliceBatches`` does).

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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .. import generate as G
from ..data.dataset import SEX_CODE
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


def load_rows(store: SliceStore, rows: np.ndarray, size: int, name: str = "images", chunk: int = 512) -> np.ndarray:
    """Store rows (in the given order) resized to ``size`` px by area averaging, (len(rows), size, size) float32."""
    rows = np.asarray(rows)
    out = np.empty((len(rows), size, size), np.float32)
    arr = store.array(name)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        order = np.argsort(part)  # sorted reads from the memory map
        block = np.ascontiguousarray(arr[part[order]], dtype=np.float32)
        if block.shape[-1] != size:  # area resizing in both directions, as SliceBatches feeds the model
            block = F.interpolate(torch.from_numpy(block)[:, None], size=(size, size), mode="area")[:, 0].numpy()
        out[start + order] = block
    return out


def conditions_of(store: SliceStore, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Manifest conditions of store rows in user units: age (years, NaN unknown), sex (+1/-1/0), position."""
    m = store.manifest.iloc[rows]
    return {"age": np.array(m["age"], dtype=float), "sex": np.array(m["sex"].map(SEX_CODE).fillna(0.0), dtype=float),
            "position": np.array(m["position"], dtype=float)}


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
    """The metric | model | floor | ratio table printed by the CLI."""
    rows = []
    for space, d in metrics["realism"].items():
        for key in ("fd", "kid", "precision", "recall", "density", "coverage"):
            if key in d:
                rows.append({"metric": f"{space} {key}", "model": d[key]["value"], "floor": d[key]["floor"],
                             "ratio": d[key]["ratio"]})
    for group, keys in (("c2st", ("accuracy", "auc")), ("histogram", ("wasserstein", "js")),
                        ("diversity", ("ms_ssim",)), ("memorisation", ("share_above",))):
        for key in keys:
            v = metrics[group][key]
            rows.append({"metric": f"{group} {key}", "model": v["value"], "floor": v["floor"], "ratio": v["ratio"]})
    age = metrics.get("age_effect", {})
    if "sample_slope" in age:  # the "floor" of this row is the real slices' slope
        rows.append({"metric": "age CSF slope/decade (floor=real)", "model": age["sample_slope"],
                     "floor": age["real_slope"], "ratio": ratio(age["sample_slope"], age["real_slope"])})
    for key in ("psnr", "ssim", "ms_ssim"):
        rows.append({"metric": f"reconstruction {key} (brain)", "model": metrics["reconstruction"]["brain"][key]["mean"],
                     "floor": None, "ratio": None})
    return rows


def conditional_section(model, store: SliceStore, n: int, seed: int, progress: bool,
                        predictor_steps: int | None = None) -> dict | None:
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
    return conditional_fidelity(model, store, n=n, seed=seed, progress=progress, predictor=cfg)


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


def age_effect_section(model, store: SliceStore, seed: int) -> tuple[dict, dict | None]:
    """CSF fraction vs age of samples (ages ``A.AGES``) and of real test + val slices near position 0.5.

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
    near = ((m["split"].isin(["test", "val"])) & ((m["position"] - A.POSITION).abs() <= A.WINDOW + 1e-9)
            & np.isfinite(m["age"].to_numpy(dtype=float)))
    rows = np.flatnonzero(near.to_numpy())
    subjects = m["subject"].to_numpy()[rows]
    if len(np.unique(subjects)) < 3:
        return {"skipped": f"fewer than 3 test/val subjects with a known age have slices at position "
                           f"{A.POSITION} ± {A.WINDOW} ({len(np.unique(subjects))})"}, None
    size = model.config.image_size
    real_age = m["age"].to_numpy(dtype=float)[rows]
    real_csf = A.csf_fraction(load_rows(store, rows, size))  # (m,)

    ages = np.repeat(np.asarray(A.AGES, float), A.PER_AGE)  # (n,)
    cond = {"age": ages, "sex": np.resize([-1.0, 1.0], len(ages)), "position": A.POSITION}
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
    """A labelled grid figure, one list entry per row of (k, H, W) images, drawn as one RGB mosaic (fast)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    h, w = rows[0].shape[-2:]
    pad = max(2, h // 16)
    ncol = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.float32)
    for i, images in enumerate(rows):
        cmap = plt.get_cmap((cmaps or ["gray"] * len(rows))[i])
        vmax = (vmaxes or [1.0] * len(rows))[i]
        for j, img in enumerate(images):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = cmap(np.clip(img / vmax, 0, 1))[..., :3]
    scale = max(1.0, 96 / h)  # at least ~1 inch per image
    top = 0.55 if title else 0.3  # inches for the title and the column labels
    fig = plt.figure(figsize=(canvas.shape[1] * scale / 100 + 1.4, canvas.shape[0] * scale / 100 + top + 0.1))
    ax = fig.add_axes((1.3 / fig.get_figwidth(), 0.1 / fig.get_figheight(), 1 - 1.4 / fig.get_figwidth(),
                       1 - (top + 0.1) / fig.get_figheight()))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for i, label in enumerate(row_labels):
        ax.text(-pad, pad + i * (h + pad) + h / 2, label, ha="right", va="center", fontsize=8)
    for j, label in enumerate(col_labels or []):
        ax.text(pad + j * (w + pad) + w / 2, pad / 2, label, ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _spread(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of k items whose values span the range evenly (sorted by value)."""
    order = np.argsort(values, kind="stable")
    return order[np.unique(np.linspace(0, len(order) - 1, min(k, len(order))).round().astype(int))]


def fig_real_vs_sample(path: Path, real: np.ndarray, real_pos: np.ndarray, samples: np.ndarray,
                       sample_pos: np.ndarray, matched: bool) -> None:
    """Real test slices above samples at matched slice positions.

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
    _image_rows(path, [real[cols], samples[picked]], ["real (test)", "sample"], labels, title=note)


def fig_reconstructions(path: Path, real: np.ndarray, recon: np.ndarray, positions: np.ndarray) -> None:
    cols = _spread(positions, FIG_COLUMNS)
    resid = np.abs(real[cols] - recon[cols])
    vmax = max(float(resid.max()), 1e-3)
    _image_rows(path, [real[cols], recon[cols], resid], ["original", "reconstruction", f"|residual|\n(0 to {vmax:.2f})"],
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
    for i, sex in enumerate((-1.0, 1.0)):
        for j, age in enumerate(ages):
            cond = {k: v for k, v in {"age": float(age), "sex": sex, "position": 0.5}.items()
                    if k in model.config.conditions}
            g = torch.Generator(device=model.device).manual_seed(seed)
            out[i, j] = model.sample(1, cond, g).float().clamp(0, 1)[0, 0].cpu().numpy()
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


def evaluate_run(run: str | Path, store: str | Path | SliceStore, out: str | Path | None = None, n: int = 1000,
                 seed: int = 0, extractor: str | Path | None = None, force: bool = False, progress: bool = True,
                 featnet_steps: int | None = None, predictor_steps: int | None = None,
                 device: str | torch.device = "cpu", c2st_steps: int | None = None, sampler: dict | None = None) -> dict:
    """Evaluate a run against a store's test split; writes OUT (default RUN/eval) and returns metrics.json's dict.

    metrics.json keys:
      run, store, arch, image_size, conditions, n (slices per set), n_requested, seed,
      sampling            how samples were conditioned
      feature_net         cache path, trained_now, objective, config, test position MAE
      realism             {space: {fd|kid|precision|recall|density|coverage: {value, floor, ratio[, std, floor_std]}}}
                          for spaces featnet, radiomics, pca64 and extractor (with --extractor)
      c2st                classifier two-sample test, samples vs real test (floor: real train vs real test):
                          {accuracy|auc: {value, floor, ratio}, n_train, n_test (per class), floor_n_train,
                          floor_n_test, steps, split_by_subject, floor_sets}; 0.5 = cannot be told apart
      age_effect          (age-conditioned models) CSF fraction vs age: {sample_slope, real_slope, real_ci,
                          within_ci, n_real_subjects, ...} (per decade); {"skipped": why} for other models
                          or too few real subjects
      histogram           {wasserstein|js|intersection: {value, floor, ratio}}
      diversity           {ms_ssim: {value (samples), floor (real test), ratio}, pairs}
      memorisation        {share_above, nn_ssim_mean: {value, floor, ratio}, threshold_ssim, quantile, k, closest_pairs}
      reconstruction      {n, brain|background: {mse|psnr|ssim|ms_ssim: {mean, std}}}
      conditional         conditional fidelity (age+sex models; a "skipped" note when unavailable), else absent
      summary             [{metric, model, floor, ratio}], figures, provenance
    """
    run = Path(run)
    store = store if isinstance(store, SliceStore) else SliceStore(store)
    out = Path(out) if out is not None else RunDir.resolve(run).output("eval")
    if out.exists() and not force:
        raise OutputExistsError(out)
    test_rows, train_rows = store.indices("test"), store.indices("train")
    for split, rows in (("test", test_rows), ("train", train_rows)):
        if len(rows) < 2:
            raise BrainVAEError(f"{store.path}: the store's {split} split has {len(rows)} slices; evaluation needs "
                                "real test slices and training slices (prepare the store with a train/val/test split)")
    if n < 2:
        raise BrainVAEError(f"-n must be at least 2, got {n}")
    model = G.load(run, device=device).configure_sampler(**(sampler or {}))  # e.g. ldm steps / guidance
    ext = Fe.TorchScriptExtractor(extractor) if extractor is not None else None
    size = model.config.image_size
    conds = tuple(model.config.conditions)
    steps = ["load slices", "sample", "reconstruct", "feature net", "features", "distances", "c2st", "age effect",
             "memorisation", "figures", "write"]
    bar = tqdm(total=len(steps), desc="evaluate", unit="stage", disable=not progress)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)

    stage(steps[0])
    rng = np.random.default_rng(seed)
    m = min(n, len(test_rows), len(train_rows))
    test_sel = np.sort(rng.choice(test_rows, m, replace=False))  # store rows
    train_sel = np.sort(rng.choice(train_rows, m, replace=False))
    real = load_rows(store, test_sel, size)  # (m, S, S)
    train = load_rows(store, train_sel, size)
    brain = load_rows(store, test_sel, size, name="brain") > 0.5
    test_cond = conditions_of(store, test_sel)
    bar.update()

    stage(steps[1])
    cond = {k: test_cond[k] for k in conds} or None
    samples = G.sample_images(model, m, cond, seed)  # sample i at the conditions of real slice i
    bar.update()

    stage(steps[2])
    recon = reconstruct(model, real, cond)
    rec = reconstruction_metrics(real, recon, brain)
    rec_summary = summarise(rec)
    reconstruction = {"n": m, **{region: {k.rsplit("_", 1)[0]: v for k, v in rec_summary.items()
                                          if k.endswith("_" + region)} for region in ("brain", "background")}}
    bar.update()

    stage(steps[3])
    net, info = Fe.load_or_train_featnet(store, Fe.FeatNetConfig(**({"steps": featnet_steps} if featnet_steps is not None
                                                                    else {})), progress=progress)
    bar.update()

    stage(steps[4])
    f_real, pos_real = Fe.featnet_features(net, real)
    f_samp, pos_samp = Fe.featnet_features(net, samples)
    f_train, _ = Fe.featnet_features(net, train)
    spaces = {"featnet": (f_real, f_samp, f_train)}
    radi = [Fe.radiomics(x) for x in (real, samples, train)]
    std = Fe.Standardiser.fit(radi[2])
    spaces["radiomics"] = tuple(std(x) for x in radi)
    pca = Fe.fit_pca(train, seed=seed)
    spaces["pca64"] = tuple(Fe.pca_features(pca, x) for x in (real, samples, train))
    if ext is not None:
        spaces["extractor"] = (ext(real), ext(samples), ext(train))
    bar.update()

    stage(steps[5])
    realism = {name: paired(R.feature_distances(r, s, seed=seed), R.feature_distances(r, t, seed=seed))
               for name, (r, s, t) in spaces.items()}
    hists = {"real test": R.intensity_histogram(real), "real train": R.intensity_histogram(train),
             "samples": R.intensity_histogram(samples)}
    histogram = paired(R.histogram_distance(hists["real test"], hists["samples"]),
                       R.histogram_distance(hists["real test"], hists["real train"]))
    pairs = min(500, m * (m - 1) // 2)
    div_s, div_r = R.diversity(samples, pairs, seed), R.diversity(real, pairs, seed)
    diversity = {"ms_ssim": {"value": div_s, "floor": div_r, "ratio": ratio(div_s, div_r)}, "pairs": pairs}
    bar.update()

    stage(steps[6])
    subject = store.manifest["subject"].to_numpy()
    two_sample = c2st_section(samples, real, train, subject[test_sel], subject[train_sel], seed, c2st_steps)
    bar.update()

    stage(steps[7])
    age_effect, age_points = age_effect_section(model, store, seed)
    bar.update()

    stage(steps[8])
    thumb = min(32, size)
    thumbs = load_rows(store, train_rows, thumb).reshape(len(train_rows), -1)  # (N_train, thumb * thumb)

    def train_images(idx: np.ndarray) -> np.ndarray:
        return load_rows(store, train_rows[idx], size)

    k = 20
    s_idx, s_ssim = R.nearest_by_ssim(samples, thumbs, train_images, k=k, thumb_size=thumb)
    _, t_ssim = R.nearest_by_ssim(real, thumbs, train_images, k=k, thumb_size=thumb)
    mem = R.memorisation(s_ssim, t_ssim, quantile=99.0)
    closest = np.argsort(-s_ssim, kind="stable")[:FIG_COLUMNS]
    manifest = store.manifest
    memorisation = {
        "share_above": {"value": mem["share_above"], "floor": mem["floor_share_above"],
                        "ratio": ratio(mem["share_above"], mem["floor_share_above"])},
        "nn_ssim_mean": {"value": mem["nn_ssim_mean"], "floor": mem["test_nn_ssim_mean"],
                         "ratio": ratio(mem["nn_ssim_mean"], mem["test_nn_ssim_mean"])},
        "threshold_ssim": mem["threshold_ssim"], "quantile": 99.0, "k": k,
        "closest_pairs": [{"sample": int(i), "train_row": int(train_rows[s_idx[i]]),
                           "subject": str(manifest["subject"].iat[train_rows[s_idx[i]]]),
                           "ssim": float(s_ssim[i])} for i in closest],
    }
    bar.update()

    metrics = {
        "run": str(run), "store": str(store.path), "arch": model.arch, "image_size": size, "conditions": list(conds),
        "n": m, "n_requested": n, "seed": seed,
        "sampling": ("conditions of the n real test slices (sample i matched to test slice i)" if conds
                     else "the model's prior (unconditional)"),
        "sampler": model.sampler_settings(),  # the prior's sampling options (ldm: steps, solver, guidance)
        "feature_net": {**{k2: v for k2, v in info.items() if k2 != "final_batch"},
                        "test_position_mae": float(np.mean(np.abs(pos_real - test_cond["position"])))},
        "realism": realism, "c2st": two_sample, "histogram": histogram, "diversity": diversity,
        "memorisation": memorisation, "reconstruction": reconstruction, "age_effect": age_effect,
    }
    if ext is not None:
        metrics["extractor"] = {"path": str(ext.path), "input": ext.input_note, "dim": int(spaces["extractor"][0].shape[1])}
    conditional = conditional_section(model, store, n, seed, progress, predictor_steps)
    if conditional is not None:
        metrics["conditional"] = conditional
    metrics["summary"] = summary_rows(metrics)

    stage(steps[9])
    with atomic_dir(out, force=force) as tmp:
        figures = ["real_vs_sample.png", "reconstructions.png", "closest_pairs.png", "histograms.png",
                   "interpolation.png"]
        fig_real_vs_sample(tmp / figures[0], real, test_cond["position"], samples, pos_samp, "position" in conds)
        fig_reconstructions(tmp / figures[1], real, recon, test_cond["position"])
        fig_closest_pairs(tmp / figures[2], samples[closest], train_images(s_idx[closest]), s_ssim[closest],
                          mem["threshold_ssim"])
        fig_histograms(tmp / figures[3], hists)
        a, b = interpolation_pair(store, test_sel)
        _image_rows(tmp / figures[4], [G.interpolate(model, store, a, b, steps=FIG_COLUMNS)], ["interpolation"],
                    [f"t={t:.2f}" for t in np.linspace(0, 1, FIG_COLUMNS)],
                    title=f"latent interpolation between test slices {a} and {b} (store rows)")
        if {"age", "sex"} <= set(conds):
            grid = age_sex_images(model, seed)
            _image_rows(tmp / "age_sex_grid.png", list(grid), ["F", "M"], [f"age {a}" for a in AGES],
                        title="same latent (seed) at every age and sex" + (", position 0.5" if "position" in conds
                                                                             else ""))
            figures.append("age_sex_grid.png")
        if age_points is not None:
            A.fig_age_effect(tmp / "age_effect.png", age_effect, **age_points)
            figures.append("age_effect.png")
        bar.update()
        stage(steps[10])
        metrics["figures"] = figures
        metrics["provenance"] = provenance(run=str(run), store=str(store.path), seed=seed, n=m,
                                           feature_net=info["path"], extractor=str(extractor) if extractor else None)
        pd.DataFrame({"store_row": test_sel, "subject": manifest["subject"].iloc[test_sel].to_numpy(),
                      "position": test_cond["position"], **rec}).to_csv(tmp / "reconstruction.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True, default=_json_default))
        bar.update()
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
