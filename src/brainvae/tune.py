"""``brainvae tune``: hyper-parameter search with Optuna (Akiba et al. 2019).

The search space is the ``[tune]`` table of a run config; keys name a field as
``section.field`` (``train.`` may be left out), values declare a range or choices:

    [tune]
    lr = { low = 2e-4, high = 3e-3, log = true }
    "model.latent_dim" = { choices = [64, 128, 256] }

Each trial trains a run under ``OUT/trial-NNNN`` and reports its validation loss
after every epoch, so the median pruner stops hopeless trials early. The study
lives in SQLite (``OUT/study.db``) by default; any database URL given as
``storage`` lets several workers on several machines share one study.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import RunConfig, save_config, to_dict
from .errors import BrainVAEError
from .io.atomic import atomic_write_bytes


def _suggest(trial, name: str, spec: dict):
    if "choices" in spec:
        return trial.suggest_categorical(name, list(spec["choices"]))
    if not {"low", "high"} <= set(spec):
        raise BrainVAEError(f"[tune] {name}: give either choices = [...] or low/high")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(name, low, high, log=log)
    return trial.suggest_float(name, float(low), float(high), log=log)


def trial_config(base: RunConfig, params: dict) -> RunConfig:
    """Apply ``{"model.beta": 0.5, "lr": 1e-3}`` to a run config (validated like any config)."""
    model = dict(base.model)
    train = {}
    for key, value in params.items():
        section, _, field = key.rpartition(".")
        section = section or "train"
        if section == "model":
            model[field] = value
        elif section == "train":
            train[field] = value
        else:
            raise BrainVAEError(f"[tune] {key}: the section must be 'model' or 'train'")
    return RunConfig(model=model, train=dataclasses.replace(base.train, **train), tune=base.tune)


def tune(base: RunConfig, store: Path, out: Path, *, trials: int, storage: str | None = None,
         study_name: str = "brainvae", device: str = "auto", seed: int = 0, progress: bool = True) -> dict:
    import optuna

    from .train.engine import train

    if not base.tune:
        raise BrainVAEError("the config has no [tune] table: declare the search space there")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))

    def objective(trial) -> float:
        params = {name: _suggest(trial, name, spec) for name, spec in base.tune.items()}
        cfg = trial_config(base, params)
        run = out / f"trial-{trial.number:04d}"

        def report(step: int, epoch: int, val: float) -> None:
            trial.report(val, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        summary = train(run, store, cfg, device=device, force=True, progress=progress, on_validate=report)
        trial.set_user_attr("run", str(run))
        return summary["best_val_loss_per_pixel"]

    study.optimize(objective, n_trials=trials)
    table = study.trials_dataframe()
    table.to_csv(out / "trials.csv", index=False)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise BrainVAEError(f"{out}: no trial completed")
    best = study.best_trial
    save_config(trial_config(base, best.params), out / "best.toml")
    result = {"best_value": best.value, "best_params": best.params, "best_run": best.user_attrs.get("run"),
              "trials": len(study.trials), "completed": len(completed),
              "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
              "storage": storage, "base_config": to_dict(base)}
    atomic_write_bytes(out / "best.json", json.dumps(result, indent=2, default=str).encode())
    return result
