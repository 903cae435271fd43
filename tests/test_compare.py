"""brainvae compare: same budget for every config, resumable folder, leaderboard with CIs."""

from __future__ import annotations

import json

import pytest

from brainvae.compare import compare, mean_ci
from brainvae.errors import BrainVAEError


def write_configs(tmp_path, archs=("ae", "vae")):
    paths = []
    for arch in archs:
        p = tmp_path / f"{arch}.toml"
        p.write_text(f'[model]\narch = "{arch}"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n'
                     '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\npatience = 1\n')
        paths.append(p)
    return paths


def test_compare_trains_each_config_with_the_same_budget_and_reuses_finished_runs(tiny_store, tmp_path):
    configs = write_configs(tmp_path)
    board = compare(configs, tiny_store, tmp_path / "cmp", steps=7, seeds=2, evaluate=False, progress=False,
                    log=lambda *_: None)
    assert list(board["config"]) == sorted(board["config"], key=lambda c: board.set_index("config").val_loss[c])
    assert set(board["config"]) == {"ae", "vae"} and (board["seeds"] == 2).all()
    assert (board["steps"] == 7).all()  # early stopping is off: patience = 1 in the config is overridden
    assert {"val_loss_ci_low", "val_loss_ci_high"} <= set(board.columns)
    doc = json.loads((tmp_path / "cmp" / "leaderboard.json").read_text())
    assert len(doc["runs"]) == 4 and doc["settings"]["steps"] == 7
    stamp = (tmp_path / "cmp" / "vae-s1" / "summary.json").stat().st_mtime_ns
    compare(configs, tiny_store, tmp_path / "cmp", steps=7, seeds=2, evaluate=False, progress=False,
            log=lambda *_: None)
    assert (tmp_path / "cmp" / "vae-s1" / "summary.json").stat().st_mtime_ns == stamp  # reused, not retrained
    # a finished run is reused only for the same budget and store: another one is refused, not silently reused
    with pytest.raises(BrainVAEError, match="train.steps was 7, now 9"):
        compare(configs, tiny_store, tmp_path / "cmp", steps=9, seeds=2, evaluate=False, progress=False,
                log=lambda *_: None)
    from conftest import make_store

    other = make_store(tmp_path / "other", seed=1)  # other slices (a copy of the same store would be the same)
    with pytest.raises(BrainVAEError, match="not the store"):
        compare(configs, other, tmp_path / "cmp", steps=7, seeds=2, evaluate=False, progress=False,
                log=lambda *_: None)


def test_compare_refuses_without_a_budget_or_with_clashing_names(tiny_store, tmp_path):
    configs = write_configs(tmp_path)
    with pytest.raises(BrainVAEError, match="budget"):
        compare(configs, tiny_store, tmp_path / "c", evaluate=False, progress=False)
    with pytest.raises(BrainVAEError, match="differ"):
        compare([configs[0], configs[0]], tiny_store, tmp_path / "c", steps=2, evaluate=False, progress=False)


def test_mean_ci():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 2.0 < hi and hi - 2.0 == pytest.approx(2.0 - lo)
    assert mean_ci([5.0])[0] == 5.0


def test_included_models_are_evaluated_on_the_same_store_not_trained(tiny_store, tmp_path, monkeypatch):
    import brainvae.evaluate.run_eval as run_eval
    from brainvae.train.engine import train
    from brainvae.config import RunConfig, load_config

    configs = write_configs(tmp_path)
    finished = tmp_path / "elsewhere"
    train(finished, tiny_store, load_config(RunConfig, configs[0]), progress=False)
    calls = []

    def fake_evaluate(run, store, out, n, seed, force, progress):  # what compare asks of `evaluate`
        calls.append((str(run), str(store), n, seed))
        fd = {"ae": 3.0, "vae": 2.0}.get(run.name[:-3], 5.0)  # the included model is the worst
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"realism": {"featnet": {"fd": {"ratio": fd}}}, "store": str(store),
                                                      "n_requested": n, "seed": seed, "split": "test"}))

    monkeypatch.setattr(run_eval, "evaluate_run", fake_evaluate)
    stamp = (finished / "summary.json").stat().st_mtime_ns
    board = compare(configs, tiny_store, tmp_path / "cmp", steps=3, n_eval=50, progress=False,
                    log=lambda *_: None, include=[str(finished)])
    assert list(board["config"]) == ["vae", "ae", "elsewhere"]  # ranked configs first, then the reference
    assert list(board["included"]) == [False, False, True] and board["fd_featnet_ratio"].iloc[-1] == 5.0
    assert calls[-1] == (str(finished), str(tiny_store), 50, 0)
    assert (tmp_path / "cmp" / "included" / "elsewhere" / "eval" / "metrics.json").exists()
    assert (finished / "summary.json").stat().st_mtime_ns == stamp  # not trained again
    assert not (finished / "eval").exists()  # its evaluation lives in the comparison folder
    n_calls = len(calls)
    compare(configs, tiny_store, tmp_path / "cmp", steps=3, n_eval=50, progress=False, log=lambda *_: None,
            include=[str(finished)])
    assert len(calls) == n_calls  # every evaluation reused
    compare(configs, tiny_store, tmp_path / "cmp", steps=3, n_eval=60, progress=False, log=lambda *_: None,
            include=[str(finished)])
    assert len(calls) == n_calls + 3  # another n: evaluated again, not reused
    with pytest.raises(BrainVAEError, match="no such run"):
        compare(configs, tiny_store, tmp_path / "c2", steps=3, progress=False, include=["nowhere"])
