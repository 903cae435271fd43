"""``brainvae compare``: several architectures, one store, one budget, one leaderboard.

Each config is trained with the same seed(s) and the same wall-clock (or step)
budget, with early stopping off so every model spends its whole budget; then
each run is evaluated (``brainvae evaluate``) and the headline numbers are
gathered into ``leaderboard.csv`` / ``leaderboard.json`` with 95 % confidence
intervals across seeds (Student t) when ``seeds > 1``.

The comparison folder is resumable: a finished run (``summary.json`` present)
or evaluation (``eval/metrics.json``) is reused, an interrupted run resumes
from its last checkpoint; ``force`` starts everything afresh.

``include``: models trained elsewhere (run folders or shipped names, e.g. the
pretrained ``ixi-t1-128``) join the board as reference rows, evaluated on the
same store, split, n and seed, not trained again; their training figures come
from their own summary.json, so they are not held to the budget.

    OUT/<config stem>-s<seed>/      one run folder per (config, seed), with eval/
    OUT/included/<name>/eval/       the evaluation of an included model
    OUT/leaderboard.csv|json        mean (and CI) per config, then the included models
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .config import RunConfig, load_config, replace
from .errors import BrainVAEError
from .io.atomic import atomic_write_bytes
from .models.registry import lookup
from .provenance import provenance
from .rundir import RunDir

# (column, path in eval/metrics.json, higher is better?); the first one present ranks the board.
HEADLINE: list[tuple[str, tuple[str, ...], bool]] = [
    ("fd_featnet_ratio", ("realism", "featnet", "fd", "ratio"), False),  # Fréchet distance / real-real floor
    ("fd_featnet", ("realism", "featnet", "fd", "value"), False),
    ("fd_featnet_floor", ("realism", "featnet", "fd", "floor"), False),
    ("kid_featnet", ("realism", "featnet", "kid", "value"), False),
    ("fd_radiomics_ratio", ("realism", "radiomics", "fd", "ratio"), False),
    ("fd_pca64_ratio", ("realism", "pca64", "fd", "ratio"), False),
    ("c2st_acc", ("c2st", "accuracy", "value"), False),  # classifier two-sample test: 0.5 = indistinguishable
    ("c2st_acc_floor", ("c2st", "accuracy", "floor"), False),
    ("precision", ("realism", "featnet", "precision", "value"), True),
    ("recall", ("realism", "featnet", "recall", "value"), True),
    ("density", ("realism", "featnet", "density", "value"), True),
    ("coverage", ("realism", "featnet", "coverage", "value"), True),
    ("diversity_ms_ssim", ("diversity", "ms_ssim", "value"), False),
    ("diversity_ms_ssim_real", ("diversity", "ms_ssim", "floor"), False),
    ("memorised_share", ("memorisation", "share_above", "value"), False),
    ("hist_wasserstein", ("histogram", "wasserstein", "value"), False),
    ("ssim_brain", ("reconstruction", "brain", "ssim", "mean"), True),
    ("ssim_background", ("reconstruction", "background", "ssim", "mean"), True),
    ("psnr_brain", ("reconstruction", "brain", "psnr", "mean"), True),
    ("ms_ssim_brain", ("reconstruction", "brain", "ms_ssim", "mean"), True),
]


def _get(d: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def headline(summary: dict, metrics: dict | None) -> dict:
    """The leaderboard row of one run: training figures plus the evaluation's headline numbers."""
    row = {"steps": summary.get("steps"), "seconds": summary.get("seconds"),
           "img_per_s": summary.get("images_per_second"), "val_loss": summary.get("best_val_loss_per_pixel")}
    for column, path, _ in HEADLINE:
        row[column] = _get(metrics or {}, path)
    return row


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval of a few seeds' values (NaN bounds for one seed)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def _train_one(cfg_path: Path, run: RunDir, store: Path, seed: int, budget: str | None, steps: int | None,
               device: str, force: bool, progress: bool) -> dict:
    from .data.store import SliceStore
    from .train.engine import check_same_run, train

    cfg = load_config(RunConfig, cfg_path)
    # Same seed and budget for all; no early stopping and no epoch cap, so the budget decides.
    cfg = replace(cfg, train=replace(cfg.train, seed=seed, budget=budget, steps=steps, patience=0, epochs=100_000))
    if run.summary_file.exists() and not force:  # reused only when it is the run this compare asks for
        check_same_run(run.path, cfg, SliceStore(store), who="compare", verb="reuses")
        return json.loads(run.summary_file.read_text())
    resume = run.last_checkpoint.exists() and not force
    return train(run.path, store, cfg, device=device, resume=resume, force=force, progress=progress)


def _evaluated(run_path: Path, eval_dir: Path, store: Path, n_eval: int, seed: int, force: bool,
               progress: bool) -> dict:
    """metrics.json of ``evaluate`` on the store's test split, reused when present with the same store, n and
    seed (unless ``force``); redone otherwise."""
    metrics_file = eval_dir / "metrics.json"  # evaluate's own output layout
    old = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    same = (Path(old.get("store", "")).resolve() == Path(store).resolve() and old.get("n_requested") == n_eval
            and old.get("seed") == seed and old.get("split") == "test")
    if force or not same:
        from .evaluate.run_eval import evaluate_run

        evaluate_run(run_path, store, out=eval_dir, n=n_eval, seed=seed, force=True, progress=progress)
    return json.loads(metrics_file.read_text())


def compare(configs: list[Path], store: Path, out: Path, *, budget: str | None = None, steps: int | None = None,
            seeds: int = 1, n_eval: int = 1000, device: str = "auto", evaluate: bool = True,
            force: bool = False, progress: bool = True, log=print, include: list[str] = ()) -> pd.DataFrame:
    """Train and evaluate every config; returns the leaderboard (one row per config, best first, then the
    ``include``d models)."""
    if not configs:
        raise BrainVAEError("compare needs at least one config")
    included = [RunDir.resolve(name) for name in include]  # refuses an unknown name before any training
    if included and not evaluate:
        raise BrainVAEError("--include adds evaluated models to the board: drop --no-evaluate")
    for run in included:
        if not run.summary_file.exists():
            raise BrainVAEError(f"{run.path}: --include takes a finished run (no summary.json there)")
    if budget is None and steps is None:
        raise BrainVAEError("compare needs a --budget (e.g. 20m) or --steps so every model gets the same")
    if seeds < 1:
        raise BrainVAEError("--seeds must be at least 1")
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise BrainVAEError(f"config file names must differ (they name the runs): {stems}")
    for c in configs:
        if not Path(c).exists():
            raise BrainVAEError(f"{c}: config file not found")
        arch = load_config(RunConfig, c).model["arch"]  # fail before any training on a bad config
        if evaluate and not lookup(arch)[0].generative:
            raise BrainVAEError(f"{c}: {arch} does not generate, and compare evaluates generated slices; "
                                "train it with `brainvae train` and score it with `brainvae anomaly`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for seed in range(seeds):
        for cfg_path, stem in zip(configs, stems):
            run = RunDir(out / f"{stem}-s{seed}")
            log(f"[compare] {stem} seed {seed}: training -> {run.path}")
            summary = _train_one(Path(cfg_path), run, store, seed, budget, steps, device, force, progress)
            metrics = None
            if evaluate:
                log(f"[compare] {stem} seed {seed}: evaluation -> {run.eval_dir}")
                metrics = _evaluated(run.path, run.eval_dir, store, n_eval, seed, force, progress)
            rows.append({"config": stem, "arch": summary.get("arch"), "seed": seed, "run": str(run.path),
                         **headline(summary, metrics)})

    per_run = pd.DataFrame(rows)
    board = _aggregate(per_run, seeds)
    extra = []
    for run in included:
        eval_dir = out / "included" / run.name / "eval"
        log(f"[compare] {run.name} (included, not trained here): evaluation -> {eval_dir}")
        metrics = _evaluated(run.path, eval_dir, store, n_eval, 0, force, progress)
        summary = run.summary()
        extra.append({"config": run.name, "arch": summary.get("arch"), "seed": None, "run": str(run.path),
                      "included": True, **headline(summary, metrics)})
    if extra:  # below the ranked configs, as references
        ranked_by = board.attrs["ranked_by"]
        per_run = pd.concat([per_run.assign(included=False), pd.DataFrame(extra)], ignore_index=True)
        board = pd.concat([board.assign(included=False), pd.DataFrame(extra).drop(columns=["seed", "run"])],
                          ignore_index=True).dropna(axis=1, how="all")
        board.attrs["ranked_by"] = ranked_by
    _write(out, per_run, board, dict(configs=[str(c) for c in configs], store=str(store), budget=budget,
                                     steps=steps, seeds=seeds, n_eval=n_eval, include=[str(i) for i in include]))
    return board


def _aggregate(per_run: pd.DataFrame, seeds: int) -> pd.DataFrame:
    numeric = [c for c in per_run.columns if c not in ("config", "arch", "seed", "run")]
    out = []
    for stem, g in per_run.groupby("config", sort=False):
        row = {"config": stem, "arch": g["arch"].iloc[0], "seeds": len(g)}
        for col in numeric:
            m, lo, hi = mean_ci(g[col].tolist())
            row[col] = m
            if seeds > 1:
                row[f"{col}_ci_low"], row[f"{col}_ci_high"] = lo, hi
        out.append(row)
    board = pd.DataFrame(out).dropna(axis=1, how="all")  # e.g. the evaluation columns with --no-evaluate
    rank_by = next((c for c, _, higher in HEADLINE if c in board and board[c].notna().any()), "val_loss")
    higher = next((h for c, _, h in HEADLINE if c == rank_by), False)
    board = board.sort_values(rank_by, ascending=not higher, na_position="last").reset_index(drop=True)
    board.attrs["ranked_by"] = rank_by
    return board


def _write(out: Path, per_run: pd.DataFrame, board: pd.DataFrame, settings: dict) -> None:
    atomic_write_bytes(out / "leaderboard.csv", board.to_csv(index=False).encode())
    atomic_write_bytes(out / "runs.csv", per_run.to_csv(index=False).encode())
    doc = {"settings": settings, "ranked_by": board.attrs.get("ranked_by"),
           "leaderboard": json.loads(board.to_json(orient="records")),
           "runs": json.loads(per_run.to_json(orient="records")), "provenance": provenance()}
    atomic_write_bytes(out / "leaderboard.json", json.dumps(doc, indent=2).encode())
