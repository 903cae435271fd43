"""Package a trained run as a self-contained model folder (what ships in ``brainvae/pretrained/NAME``).

    export_model("runs/ldm", "src/brainvae/pretrained/ixi-t1-128")

Writes, atomically: ``checkpoints/best.safetensors`` holding only the EMA
weights of the run's best checkpoint (half the size of a training checkpoint),
the run's ``config.toml``, ``provenance.json`` and ``summary.json``, the eval
metrics when the run has them (``eval/metrics.json`` without its figure list),
the summary of its anomaly evaluation when it has one (``anomaly.json``, from
``anomaly/metrics.json``: every score's test figures, not the per-case detail),
and ``MODEL_CARD.md`` generated from those files: training data, preprocessing,
training length and hardware, measured quality, licence, intended use and
limitations. Every number in the card is read from the run's own files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import RunConfig, load_config, replace, save_config
from .data.store import SliceStore
from .errors import BrainVAEError
from .io.atomic import atomic_dir
from .models.registry import build, config_dict, lookup
from .rundir import CHECKPOINTS, RunDir
from .train.checkpoint import load_model, read_metadata, save_weights

CARD_METRICS = (  # (label, path in eval/metrics.json)
    ("C2ST accuracy vs real test slices (0.5 = indistinguishable)", ("c2st", "accuracy")),
    ("Fréchet distance, store feature net", ("realism", "featnet", "fd")),
    ("Fréchet distance, PCA-64", ("realism", "pca64", "fd")),
    ("precision (feature net)", ("realism", "featnet", "precision")),
    ("recall (feature net)", ("realism", "featnet", "recall")),
    ("diversity, MS-SSIM of sample pairs", ("diversity", "ms_ssim")),
)


def _get(d: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def training_lines(summary: dict, indent: str = "  ") -> list[str]:
    """Markdown lines of a run's stages; a run started from another model ([init]) lists that model's training
    too (recorded in its summary), so a card tells the whole lineage."""
    lines = []
    for stage in summary.get("stages", []):
        if "from" in stage:
            lines.append(f"{indent}- stage {stage['stage']}: taken as it was from `{stage['from']}`")
        else:
            lines.append(f"{indent}- stage {stage['stage']}: {stage['steps']} steps, {stage['seconds']} s")
    init = summary.get("init")
    if init:
        source = init.get("source") or {}
        lines.append(f"{indent}- started from the weights of `{init['from']}`"
                     + (f": {source.get('steps', '?')} steps, {source.get('seconds', '?')} s before this run"
                        if source else " (its training record was not found)"))
        lines += training_lines(source, indent + "  ")
    return lines


ANOMALY_FIGURES = ("pixel_auroc", "pixel_auprc", "dice", "val_dice")  # kept per score in anomaly.json


def anomaly_summary(metrics: dict) -> dict:
    """``anomaly/metrics.json`` without its per-case and per-slice detail: the store, the cases, the primary
    score, and each score's test figures, label-free Dice and case-level AUROC."""
    scores = {key: {**{k: r.get(k) for k in ANOMALY_FIGURES},
                    "label_free_dice": _get(r, ("label_free", "dice")),
                    "case_auroc": _get(r, ("case_detection", "auroc"))}
              for key, r in metrics.get("scores", {}).items()}
    return {"store": metrics.get("store"), "cases": metrics.get("cases"), "postprocess": metrics.get("postprocess"),
            "features": metrics.get("features"),
            "primary_score": metrics.get("primary_score"), "primary_selection": metrics.get("primary_selection"),
            "scores": scores}


def anomaly_lines(summary: dict) -> list[str]:
    """The card's table of an anomaly evaluation (``anomaly_summary``): the primary score first."""
    primary = summary.get("primary_score")
    cases = summary.get("cases") or {}
    lines = [f"Anomaly localisation on `{summary.get('store')}`: {len(cases.get('test', []))} test cases, "
             f"threshold and primary score chosen on {len(cases.get('validation', []))} validation cases "
             f"(`brainvae anomaly`" + (f", perceptual scores in the features of `{summary['features']}`"
                                        if summary.get("features") else "") + ").", "",
             "| score | pixel AUROC | AUPRC | Dice (validation threshold) | label-free Dice | case AUROC |",
             "|---|---|---|---|---|---|"]
    order = sorted(summary.get("scores", {}).items(), key=lambda kv: kv[0] != primary)
    for key, r in order:
        label = f"**{key}** (primary)" if key == primary else key
        lines.append(f"| {label} | {_fmt(r['pixel_auroc'])} | {_fmt(r['pixel_auprc'])} | {_fmt(r['dice'])} "
                     f"| {_fmt(r['label_free_dice'])} | {_fmt(r['case_auroc'])} |")
    return lines


def model_card(name: str, run: RunDir, metrics: dict | None, data_note: str | None = None,
               limitations: tuple[str, ...] = (), anomaly: dict | None = None) -> str:
    cfg = load_config(RunConfig, run.config_file)
    model_cls = lookup(cfg.arch)[0]
    generative = model_cls.generative
    prov = run.provenance()
    summary = run.summary()
    store_cfg = prov.get("store_config", {})
    hw = prov.get("hardware", {})
    use = (f"`brainvae sample {name} -n 64 --out DIR`" if generative else
           f"`brainvae anomaly {name} --data STORE --out DIR` (it localises anomalies; it does not generate)")
    lines = [f"# {name}", "",
             f"A `{cfg.arch}` model of 2-D brain MR slices, trained with brainvae "
             f"(commit {prov.get('git_commit') or 'unknown'}). Load it with `brainvae.load(\"{name}\")` or "
             f"{use}.", "",
             "## Training data", ""]
    store = prov.get("store")
    if store and Path(store).exists():
        m = SliceStore(store).manifest
        for split in ("train", "val", "test"):
            sel = m[m["split"] == split]
            lines.append(f"- {split}: {sel['subject'].nunique()} subjects, {len(sel)} slices")
        ages = m.drop_duplicates("subject")["age"].dropna()
        lines.append(f"- age {ages.min():.0f}–{ages.max():.0f} years (median {ages.median():.0f}); "
                     f"sex: {', '.join(f'{k} {int(v)}' for k, v in m.drop_duplicates('subject')['sex'].value_counts().items())}")
    lines += [f"- {data_note or 'source: see the store provenance; the model inherits the data licence'}", "",
              "## Preprocessing (the store it was trained on)", "",
              "```toml", *[f"{k} = {json.dumps(v)}" for k, v in store_cfg.items()], "```", "",
              "## Model and training", "",
              "```toml", *[f"{k} = {json.dumps(v)}" for k, v in cfg.model.items()], "```", "",
              f"- {summary.get('steps', '?')} optimiser steps in {summary.get('seconds', '?')} s "
              f"({summary.get('precision', '?')}, {summary.get('device', '?')}) on {hw.get('cpu_model', '?')} "
              f"({hw.get('cpu_capability', '?')}, {hw.get('torch_threads', '?')} threads)"]
    lines += training_lines(summary)
    if read_metadata(run.checkpoint("best")).get("stored_as") == "float16":
        lines.append("- weights stored as float16 (the model is rebuilt in float32 when loaded)")
    lines += ["", "## Measured quality (held-out test subjects)", ""]
    if metrics:
        lines += ["| measure | model | real-vs-real floor |", "|---|---|---|"]
        for label, path in CARD_METRICS:
            v = _get(metrics, path)
            if isinstance(v, dict):
                lines.append(f"| {label} | {_fmt(v.get('value'))} | {_fmt(v.get('floor'))} |")
        rec = _get(metrics, ("reconstruction", "brain", "ssim", "mean"))
        lines.append(f"| reconstruction SSIM in brain | {_fmt(rec)} | — |")
        memorised = _get(metrics, ("memorisation", "share_above"))
        if isinstance(memorised, dict):
            lines.append(f"| share of samples closer to a training slice than 99 % of real test slices are "
                         f"| {_fmt(memorised.get('value'))} | {_fmt(memorised.get('floor'))} |")
        cond = metrics.get("conditional") or {}
        for key, label in (("age_r", "age r of a predictor on samples (floor: on real test slices)"),
                           ("sex_accuracy", "sex accuracy of a classifier on samples (floor: on real test slices)")):
            if key in cond.get("samples", {}):
                lines.append(f"| {label} | {_fmt(cond['samples'][key])} | {_fmt(cond['real'].get(key))} |")
        age = metrics.get("age_effect") or {}
        if "sample_slope" in age:
            lo, hi = age["real_ci"]
            lines.append(f"| CSF fraction slope per decade at mid-brain (floor: real, 95 % CI {lo:.4f}–{hi:.4f}) "
                         f"| {_fmt(age['sample_slope'])} | {_fmt(age['real_slope'])} |")
        lines += ["", f"n = {metrics.get('n')} samples and real test slices; sampler {metrics.get('sampler') or 'the defaults'}."]
    elif generative or not anomaly:
        lines.append("Not evaluated (run `brainvae evaluate` on the run before exporting)." if generative else
                     "Not evaluated (run `brainvae anomaly` on the run before exporting).")
    if anomaly:
        lines += [*([""] if lines[-1] else []), *anomaly_lines(anomaly)]
    lines += ["", "## Intended use and limitations", "",
              "- Research on synthetic data and anomaly detection; not for clinical use.",
              "- Scanners, resolutions, orientations and pathology unlike the training store are outside its "
              "training distribution (see the preprocessing above).",
              *(["- Few subjects: samples can sit close to training slices; check memorisation (`brainvae evaluate`)."]
                if generative else []),
              *([f"- Its encoder is a feature net: `brainvae anomaly RUN --data STORE --features {name}` compares "
                 "each slice with the scored model's reconstruction in the encoder's first level (the perceptual "
                 "scores, measured in that model's card)."] if hasattr(model_cls, "perceptual_features") else []),
              *([f"- {line}" for line in limitations] if limitations else []), ""]
    return "\n".join(lines)


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, nested dicts (an ldm's [model.prior]) merged key by key."""
    return {**base, **{k: _merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in over.items()}}


def _record_train_ages(exported: RunDir, run: RunDir) -> None:
    """Runs trained before summaries recorded ``train_ages``: add them from the run's store, where it is found
    (``brainvae sample`` warns about ages outside them, also for a shipped model whose store is gone)."""
    summary = exported.summary()
    store = run.provenance().get("store")
    if not summary or "train_ages" in summary or not (store and Path(store, "manifest.csv").is_file()):
        return
    summary["train_ages"] = SliceStore(store).age_range("train")
    exported.summary_file.write_text(json.dumps(summary, indent=2))


def export_model(run: str | Path, out: str | Path, *, name: str | None = None, force: bool = False,
                 data_note: str | None = None, limitations: tuple[str, ...] = (),
                 model_overrides: dict | None = None, metrics: str | Path | None = None,
                 half: bool = False) -> Path:
    """Write a shipped-model folder from ``run``'s best checkpoint (EMA weights only).

    ``half``: store the floating-point weights as float16 (half the file; loading rebuilds the model in
    float32, so a model evaluated after export is measured with exactly the weights it ships).

    ``model_overrides`` changes fields of the model config that leave the weights' shapes alone, e.g. the
    default sampler of an ldm (``{"prior": {"steps": 16}}``); the weights must still fit the new config.
    ``metrics``: the evaluation to report in the card (default RUN/eval/metrics.json)."""
    rd = RunDir.resolve(run)
    if not rd.config_file.exists():
        raise BrainVAEError(f"{rd.path}: no config.toml (not a run folder)")
    out = Path(out)
    name = name or out.name
    model = load_model(rd.checkpoint("best"), prefer_ema=True)
    run_cfg = load_config(RunConfig, rd.config_file)
    if model_overrides:
        values = _merge(config_dict(model), model_overrides)
        rebuilt = build(values.pop("arch"), values)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt.eval()
        run_cfg = replace(run_cfg, model=_merge(run_cfg.model, model_overrides))
    metrics_file = Path(metrics) if metrics is not None else rd.eval_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    anomaly_file = rd.anomaly_dir / "metrics.json"
    anomaly = anomaly_summary(json.loads(anomaly_file.read_text())) if anomaly_file.exists() else None
    with atomic_dir(out, force=force) as tmp:
        (tmp / CHECKPOINTS).mkdir()
        stored = model.to(memory_format=torch.contiguous_format)
        save_weights(RunDir(tmp).checkpoints / "best.safetensors", stored.half() if half else stored, None,
                     {"exported_from": str(rd.path), **({"stored_as": "float16"} if half else {})})
        save_config(run_cfg, tmp / rd.config_file.name)
        for f in (rd.provenance_file, rd.summary_file):
            if f.exists():
                shutil.copy(f, tmp / f.name)
        _record_train_ages(RunDir(tmp), rd)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "figures"}, indent=1))
        if anomaly is not None:
            (tmp / "anomaly.json").write_text(json.dumps(anomaly, indent=1))
        # the card reads the copies just written (config with the overrides, provenance, summary)
        (tmp / "MODEL_CARD.md").write_text(model_card(name, RunDir(tmp), metrics, data_note, limitations, anomaly))
    return out

