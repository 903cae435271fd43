"""``brainvae quiz``: a blinded visual Turing test of real versus synthetic slices.

As in the radiology literature on synthetic MRI (e.g. Kazuhiro et al., 2018,
"Generative adversarial networks for the creation of realistic artificial brain
magnetic resonance images", Tomography 4(4); Han et al., 2018, "GAN-based
synthetic brain MR image generation", ISBI), readers see a shuffled mix of real
and generated images and mark each one real or synthetic with a confidence.

``make_quiz`` writes into one folder::

    quiz.html   the page given to readers: images embedded, no key inside, no server;
                a button exports the answers as CSV (quiz_id,item,answer,confidence,reader)
    key.csv     the hidden key: item, truth, where each image came from (keep it from readers)
    meta.json   run, store, n, seed, quiz id, date

``score_answers`` scores an exported CSV against the key: accuracy,
sensitivity and specificity (synthetic = positive) and the AUC of the
confidence-signed answers (+confidence for "synthetic", -confidence for
"real"), each with a 95 % bootstrap interval over items.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BrainVAEError, InputFileError, OutputExistsError
from ..io.atomic import atomic_dir, atomic_write_bytes
from .html import asset, esc, page, png_data_uri

CONFIDENCE = (1, 2, 3, 4, 5)
ANSWERS = {"real": 0, "r": 0, "synthetic": 1, "synth": 1, "s": 1, "fake": 1, "generated": 1}
ANSWER_COLUMNS = ("item", "answer", "confidence")


# ----------------------------------------------------------------------------- making the quiz


def _png(image: np.ndarray) -> bytes:
    """One slice as a grey PNG in [0, 1]; the same rendering for real and synthetic images."""
    from matplotlib import image as mpimg

    buf = io.BytesIO()
    mpimg.imsave(buf, np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1, format="png")
    return buf.getvalue()


def make_quiz(run: Path, store: Path, out: Path, *, n: int = 40, seed: int = 0, device: str = "cpu",
              force: bool = False) -> Path:
    """Draw n // 2 real test slices and the rest from the model, shuffle, write quiz.html + key.csv into ``out``."""
    import torch

    from .. import generate as G
    from ..data.dataset import SliceBatches
    from ..data.store import SliceStore

    out = Path(out)
    if out.exists() and not force:  # fail before loading anything
        raise OutputExistsError(out)
    if n < 2:
        raise BrainVAEError(f"--n must be at least 2 (one real, one synthetic), got {n}")
    model = G.load(run, device=device)
    st = SliceStore(store)
    try:
        data = SliceBatches(st, "test", model.config.image_size, model.device)
    except ValueError as exc:
        raise BrainVAEError(str(exc)) from None
    n_real, n_syn = n // 2, n - n // 2
    if n_real > len(data):
        raise BrainVAEError(f"{st.path}: the test split has {len(data)} slices, fewer than the {n_real} "
                            f"real images a quiz of {n} needs")
    rng = np.random.default_rng(seed)
    real_idx = np.sort(rng.choice(len(data), n_real, replace=False))  # batch() returns rows in sorted order
    x, _ = data.batch(real_idx)
    real = x[:, 0].float().cpu().numpy()
    # conditions of synthetic images: those of random test slices, so ages, sexes and positions match the real ones
    cond_idx = rng.choice(len(data), n_syn, replace=n_syn > len(data))
    cond = {k: data.cond[k][torch.as_tensor(cond_idx)] for k in model.config.conditions} or None
    synth = G.sample_images(model, n_syn, cond, seed, batch_size=max(n_syn, 1))

    manifest = st.manifest
    rows = []
    for i, idx in enumerate(real_idx):
        r = int(data.rows[idx])
        m = manifest.iloc[r]
        rows.append({"truth": "real", "source": f"store row {r}", "store_row": r, "subject": m.get("subject"),
                     "age": m.get("age"), "sex": m.get("sex"), "position": m.get("position"),
                     "sample_index": None, "seed": None, "image": real[i]})
    for i, idx in enumerate(cond_idx):
        r = int(data.rows[idx])
        m = manifest.iloc[r]
        c = {"age": m.get("age"), "sex": m.get("sex"), "position": m.get("position")} if cond else {}
        rows.append({"truth": "synthetic", "source": f"sample {i} of seed {seed}"
                     + (f", conditions of store row {r}" if cond else ""),
                     "store_row": r if cond else None, "subject": None, **{k: c.get(k) for k in ("age", "sex", "position")},
                     "sample_index": i, "seed": seed, "image": synth[i]})
    order = rng.permutation(n)
    width = len(str(n))
    items = [dict(rows[j], item=f"Q{k + 1:0{width}d}") for k, j in enumerate(order)]

    quiz_id = uuid.uuid4().hex[:12]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    key = pd.DataFrame([{k: it[k] for k in ("item", "truth", "source", "store_row", "subject", "age", "sex",
                                            "position", "sample_index", "seed")} for it in items])
    key.insert(0, "quiz_id", quiz_id)
    key["store_row"] = key["store_row"].astype("Int64")
    key["sample_index"] = key["sample_index"].astype("Int64")
    key["seed"] = key["seed"].astype("Int64")
    meta = {"quiz_id": quiz_id, "created": created, "run": str(run), "store": str(store), "n": n,
            "n_real": n_real, "n_synthetic": n_syn, "seed": seed, "arch": model.arch,
            "conditions": list(model.config.conditions), "image_size": model.config.image_size}
    html = quiz_html([(it["item"], _png(it["image"])) for it in items], quiz_id)
    with atomic_dir(out, force=force) as tmp:
        (tmp / "quiz.html").write_text(html, encoding="utf-8")
        key.to_csv(tmp / "key.csv", index=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def quiz_html(items: list[tuple[str, bytes]], quiz_id: str) -> str:
    """The readers' page: one card per (item id, PNG) with real/synthetic and confidence buttons."""
    cards = []
    for item, png in items:
        answer = "".join(f'<label><input type="radio" name="{esc(item)}-answer" value="{v}"> {v}</label> '
                         for v in ("real", "synthetic"))
        conf = "".join(f'<label><input type="radio" name="{esc(item)}-confidence" value="{c}">{c}</label> '
                       for c in CONFIDENCE)
        cards.append(f'<div class="item" data-item="{esc(item)}"><div class="id">{esc(item)}</div>'
                     f'<img src="{png_data_uri(png)}" alt="image {esc(item)}">'
                     f'<fieldset><legend class="small">This image is</legend>{answer}</fieldset>'
                     f'<fieldset><legend class="small">Confidence (1 = guessing, 5 = certain)</legend>{conf}'
                     f'</fieldset></div>')
    body = (
        f"<p>Each of the {len(items)} brain MR slices below is either <b>real</b> (from a scan) or "
        "<b>synthetic</b> (generated by a model); about half are synthetic. For every image choose real or "
        "synthetic and how confident you are, then press <b>Export answers</b> and send the downloaded CSV "
        "file back. Your answers are kept in this browser if you close the page.</p>"
        '<div class="bar"><label>Reader name <input id="reader" autocomplete="off"></label> '
        '<button id="export" type="button">Export answers (CSV)</button> '
        '<span id="progress"></span> <span id="status" class="muted"></span></div>'
        f'<div class="quiz">{"".join(cards)}</div>'
        f'<p class="muted small">Quiz {esc(quiz_id)}.</p><pre id="csv-out" hidden></pre>'
    )
    return page("Real or synthetic?", body, css=asset("quiz.css"),
                script=f"var QUIZ_ID = {json.dumps(quiz_id)};\n{asset('quiz.js')}")


# ----------------------------------------------------------------------------- scoring


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"unreadable {what} CSV ({exc})") from None
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputFileError(path, f"{what} CSV lacks column(s) {missing} (has {list(df.columns)})")
    for c in df.columns:
        df[c] = df[c].str.strip()
    return df


def find_key(answers: Path, key: Path | None) -> Path:
    """The key given, else key.csv beside the answers, else quiz/key.csv."""
    if key is not None:
        if not Path(key).is_file():
            raise BrainVAEError(f"{key}: quiz key not found")
        return Path(key)
    candidates = [Path(answers).parent / "key.csv", Path("quiz") / "key.csv"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise BrainVAEError(f"no quiz key found (looked for {', '.join(str(c) for c in candidates)}); "
                            "pass --key quiz/key.csv")
    return found


def auc_rank(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC per row of (B, n) labels and scores (Mann-Whitney with midranks; NaN without both classes)."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)
    npos = y.sum(axis=1)
    nneg = y.shape[1] - npos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis=1) - npos * (npos + 1) / 2) / (npos * nneg)


def reader_metrics(truth: np.ndarray, answer: np.ndarray, confidence: np.ndarray, *, n_boot: int = 2000,
                   seed: int = 0) -> dict:
    """Accuracy, sensitivity, specificity (synthetic = positive) and AUC, each with a 95 % bootstrap CI.

    ``truth`` and ``answer`` are 1 for synthetic, 0 for real; the AUC's score
    is +confidence for an answer "synthetic" and -confidence for "real".
    """
    from sklearn.metrics import roc_auc_score

    truth, answer = truth.astype(int), answer.astype(int)
    score = np.where(answer == 1, confidence, -confidence).astype(float)

    def rates(y, a):  # (B, n) -> per row
        correct = (y == a)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"accuracy": correct.mean(axis=1),
                    "sensitivity": (correct & (y == 1)).sum(axis=1) / (y == 1).sum(axis=1),
                    "specificity": (correct & (y == 0)).sum(axis=1) / (y == 0).sum(axis=1)}

    point = {k: float(v[0]) for k, v in rates(truth[None], answer[None]).items()}
    point["auc"] = float(roc_auc_score(truth, score)) if len(set(truth)) == 2 else float("nan")
    idx = np.random.default_rng(seed).integers(0, len(truth), size=(n_boot, len(truth)))
    boot = rates(truth[idx], answer[idx])
    boot["auc"] = auc_rank(truth[idx], score[idx])
    out = {}
    for name, value in point.items():
        b = boot[name][np.isfinite(boot[name])]
        lo, hi = (np.percentile(b, [2.5, 97.5]) if len(b) else (np.nan, np.nan))
        out[name] = {"value": _num(value), "ci_low": _num(lo), "ci_high": _num(hi)}
    tp = int(((truth == 1) & (answer == 1)).sum())
    tn = int(((truth == 0) & (answer == 0)).sum())
    out["confusion"] = {"synthetic called synthetic (TP)": tp, "synthetic called real (FN)": int((truth == 1).sum()) - tp,
                        "real called real (TN)": tn, "real called synthetic (FP)": int((truth == 0).sum()) - tn}
    return out


def _num(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else round(v, 4)


def score_answers(answers: Path, key: Path | None = None, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Score one answers CSV (one or several readers) against the quiz key."""
    answers = Path(answers)
    if not answers.is_file():
        raise BrainVAEError(f"{answers}: answers file not found")
    key_path = find_key(answers, key)
    a = _read_csv(answers, ANSWER_COLUMNS, "answers")
    k = _read_csv(key_path, ("item", "truth"), "quiz key")
    if "quiz_id" in a and "quiz_id" in k:
        ids_a, ids_k = set(a["quiz_id"]) - {""}, set(k["quiz_id"]) - {""}
        if ids_a and ids_k and not ids_a <= ids_k:
            raise InputFileError(answers, f"answers are for quiz {sorted(ids_a)}, but {key_path} is the key of "
                                          f"quiz {sorted(ids_k)}")
    unknown = sorted(set(a["item"]) - set(k["item"]))
    if unknown:
        raise InputFileError(answers, f"{len(unknown)} item id(s) not in the key {key_path}: "
                                      f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    bad_truth = sorted(set(k["truth"].str.lower()) - {"real", "synthetic"})
    if bad_truth:
        raise InputFileError(key_path, f"truth must be 'real' or 'synthetic', found {bad_truth}")
    truth_of = dict(zip(k["item"], (k["truth"].str.lower() == "synthetic").astype(int)))
    if "reader" not in a:
        a["reader"] = ""
    a["reader"] = a["reader"].replace("", "reader")

    readers = {}
    for reader, g in a.groupby("reader", sort=True):
        dup = sorted(g.loc[g["item"].duplicated(), "item"])
        if dup:
            raise InputFileError(answers, f"reader {reader!r} answered item(s) {dup[:10]} more than once")
        g = g[g["answer"] != ""]
        bad = sorted(set(g["answer"].str.lower()) - set(ANSWERS))
        if bad:
            raise InputFileError(answers, f"answers must be 'real' or 'synthetic', found {bad}")
        conf = pd.to_numeric(g["confidence"].replace("", np.nan), errors="coerce")
        bad_conf = g.loc[conf.isna() & (g["confidence"] != ""), "confidence"]
        if len(bad_conf):
            raise InputFileError(answers, f"confidence must be a number, found {sorted(set(bad_conf))[:5]}")
        missing_conf = int(conf.isna().sum())
        if g.empty:
            raise InputFileError(answers, f"reader {reader!r} answered no item")
        result = {"n_items": len(k), "n_answered": len(g), "n_unanswered": len(k) - len(g),
                  "n_without_confidence (counted as confidence 1)": missing_conf}
        result.update(reader_metrics(g["item"].map(truth_of).to_numpy(),
                                     g["answer"].str.lower().map(ANSWERS).to_numpy(),
                                     conf.fillna(1.0).to_numpy(), n_boot=n_boot, seed=seed))
        readers[str(reader)] = result
    return {"answers": str(answers), "key": str(key_path),
            "quiz_id": next(iter(set(k.get("quiz_id", pd.Series([""]))) - {""}), None),
            "definitions": {"positive": "synthetic",
                            "auc score": "+confidence for an answer 'synthetic', -confidence for 'real'",
                            "ci": f"95 % percentile bootstrap over items ({n_boot} resamples, seed {seed})",
                            "reading": "accuracy and AUC near 0.5: the reader could not tell synthetic from real"},
            "readers": readers}


def write_score(result: dict, out: Path, *, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(out)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    return out


def default_score_path(answers: Path) -> Path:
    return Path(answers).with_name(Path(answers).stem + ".score.json")


def score_lines(result: dict) -> list[str]:
    """Short printable lines: one per reader and metric."""
    lines = []
    for reader, r in result["readers"].items():
        lines.append(f"reader {reader}: {r['n_answered']} of {r['n_items']} answered")
        for name in ("accuracy", "sensitivity", "specificity", "auc"):
            m = r[name]
            text = "n/a" if m["value"] is None else f"{m['value']:.3f}"
            ci = "" if m["ci_low"] is None else f"  95% CI [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
            lines.append(f"  {name:<12} {text}{ci}")
    return lines
