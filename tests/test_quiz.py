"""``brainvae quiz make`` / ``quiz score``: the blinded visual Turing test."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.data.store import SliceStore
from brainvae.report.quiz import auc_rank, reader_metrics
from test_report import CHROMIUM, assert_page_ok, chromium

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def quiz_dir(tiny_store, tmp_path):
    cfg = tmp_path / "cvae.toml"
    cfg.write_text('[model]\narch = "cvae"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n\n'
                   '[train]\nbatch_size = 8\nval_batches = 1\nprecision = "fp32"\n')
    run = tmp_path / "run"
    assert invoke("train", cfg, "--data", tiny_store, "--out", run, "--steps", 2, "--quiet").exit_code == 0
    out = tmp_path / "quiz"
    r = invoke("quiz", "make", run, "--data", tiny_store, "--n", 6, "--seed", 3, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "give only this file to readers" in r.output
    return out


def answers(key: pd.DataFrame, flip: bool = False, confidence=4, reader="ann") -> pd.DataFrame:
    truth = key["truth"]
    if flip:
        truth = truth.map({"real": "synthetic", "synthetic": "real"})
    return pd.DataFrame({"quiz_id": key["quiz_id"], "item": key["item"], "answer": truth,
                         "confidence": confidence, "reader": reader})


def test_quiz_make_writes_a_blinded_page_and_a_key(quiz_dir, tiny_store):
    html = (quiz_dir / "quiz.html").read_text()
    key = pd.read_csv(quiz_dir / "key.csv")
    assert sorted(key["truth"]) == ["real"] * 3 + ["synthetic"] * 3
    assert list(key["item"]) == [f"Q{i}" for i in range(1, 7)]
    assert re.findall(r'data-item="(Q\d)"', html) == list(key["item"])
    assert html.count('<img src="data:image/png;base64,') == 6
    for leak in ("store row", "sample 0", "key.csv", *key["source"]):  # no key inside the page
        assert leak not in html
    # real images come from the test split; synthetic ones carry conditions of test slices
    test_rows = set(SliceStore(tiny_store).indices("test"))
    assert set(key["store_row"].dropna().astype(int)) <= test_rows
    assert key.loc[key.truth == "synthetic", "age"].notna().all()
    meta = json.loads((quiz_dir / "meta.json").read_text())
    assert meta["n_real"] == 3 and meta["quiz_id"] == key["quiz_id"][0]
    r = invoke("quiz", "make", quiz_dir.parent / "run", "--data", tiny_store, "--out", quiz_dir)
    assert r.exit_code == 1 and "already exists; pass --force" in r.output


def test_quiz_score_perfect_inverted_and_errors(quiz_dir, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./quiz/key.csv to fall back on
    key = pd.read_csv(quiz_dir / "key.csv")
    perfect = quiz_dir / "perfect.csv"  # beside key.csv: found without --key
    answers(key).to_csv(perfect, index=False)
    r = invoke("quiz", "score", perfect)
    assert r.exit_code == 0, r.output
    result = json.loads((quiz_dir / "perfect.score.json").read_text())["readers"]["ann"]
    for name in ("accuracy", "sensitivity", "specificity", "auc"):
        assert result[name]["value"] == 1.0, name
    assert "accuracy" in r.output and "95% CI" in r.output
    assert invoke("quiz", "score", perfect).exit_code == 1  # no overwrite without --force

    inverted = tmp_path / "inverted.csv"
    answers(key, flip=True).to_csv(inverted, index=False)
    r = invoke("quiz", "score", inverted, "--key", quiz_dir / "key.csv", "--out", tmp_path / "inv.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "inv.json").read_text())["readers"]["ann"]
    assert result["accuracy"]["value"] == 0.0 and result["auc"]["value"] == 0.0

    r = invoke("quiz", "score", inverted)  # no key beside it, none in ./quiz
    assert r.exit_code == 1 and "no quiz key found" in r.output
    bad = answers(key)
    bad.loc[0, "item"] = "Q99"
    bad.to_csv(tmp_path / "unknown.csv", index=False)
    r = invoke("quiz", "score", tmp_path / "unknown.csv", "--key", quiz_dir / "key.csv")
    assert r.exit_code == 1 and "not in the key" in r.output and "Q99" in r.output and "Traceback" not in r.output
    answers(key).drop(columns="confidence").to_csv(tmp_path / "nocol.csv", index=False)
    r = invoke("quiz", "score", tmp_path / "nocol.csv", "--key", quiz_dir / "key.csv")
    assert r.exit_code == 1 and "lacks column(s) ['confidence']" in r.output
    other = answers(key).assign(quiz_id="ffffffffffff")
    other.to_csv(tmp_path / "other.csv", index=False)
    r = invoke("quiz", "score", tmp_path / "other.csv", "--key", quiz_dir / "key.csv")
    assert r.exit_code == 1 and "is the key of quiz" in r.output
    r = invoke("quiz", "score", perfect, "--key", tmp_path / "nokey.csv")
    assert r.exit_code == 1 and "quiz key not found" in r.output


def test_reader_metrics_known_values():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    answer = np.array([1, 1, 1, 0, 1, 1, 0, 0])  # 3/4 synthetic found, 2/4 real found
    m = reader_metrics(truth, answer, np.full(8, 3.0), n_boot=200)
    assert m["sensitivity"]["value"] == 0.75 and m["specificity"]["value"] == 0.5
    assert m["accuracy"]["value"] == 0.625
    assert m["accuracy"]["ci_low"] <= 0.625 <= m["accuracy"]["ci_high"]
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, (5, 30)), rng.integers(-5, 6, (5, 30)).astype(float)
    assert np.allclose(auc_rank(y, s), [roc_auc_score(a, b) for a, b in zip(y, s)])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_answers_exported_by_the_page_score(quiz_dir, tmp_path):
    dom, log = chromium((quiz_dir / "quiz.html").as_uri() + "#selftest", tmp_path, "--dump-dom",
                        "--virtual-time-budget=5000")
    assert_page_ok(dom, log, n_images=6)
    csv = re.search(r'<pre id="csv-out"[^>]*>(.*?)</pre>', dom, re.S).group(1)
    (quiz_dir / "answers-selftest.csv").write_text(csv)
    r = invoke("quiz", "score", quiz_dir / "answers-selftest.csv")
    assert r.exit_code == 0, r.output
    result = json.loads((quiz_dir / "answers-selftest.score.json").read_text())
    assert result["readers"]["selftest"]["n_answered"] == 6
