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
