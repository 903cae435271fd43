"""``brainvae report`` on fake run folders, and both HTML pages (report, quiz) in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.report.html import png_bytes
from brainvae.report.quiz import quiz_html
from brainvae.report.report import build_report, metric_rows

runner = CliRunner()
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

EVAL = {
    "n_real": 64,
    "reconstruction": {"mse": 0.0123, "ssim": 0.81, "psnr": 25.1},
    "realism": {"fid_like": {"value": 12.5, "floor": 3.25, "ratio": 3.85},
                "mmd": {"value": 0.05, "floor": 0.01},
                "intensity_w1": 0.02, "intensity_w1_floor": 0.0051},
    "memorisation": {"nearest": {"mean": 0.1, "min": 0.02}, "settings": {"features": {"layer": "pool"}}},
}


def tiny_png(path: Path, seed: int = 0) -> Path:
    fig = Figure(figsize=(1.2, 1.2))
    fig.subplots().imshow(np.random.default_rng(seed).random((8, 8)), cmap="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig, dpi=40))
    return path


def fake_run(root: Path, name: str = "vae-run", store: Path | None = None, full: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text('[model]\narch = "vae"\nimage_size = 32\nchannels = [8, 16]\nlatent_dim = 8\n\n'
                                     '[train]\nbatch_size = 8\nlr = 0.001\n')
    (run / "summary.json").write_text(json.dumps({"arch": "vae", "steps": 40, "seconds": 1.5,
                                                  "images_per_second": 210.0, "best_val_loss_per_pixel": -0.75}))
    lines = [json.dumps({"step": s, "epoch": 0, "lr": 1e-3, "train/img_per_s": 200.0, "train/loss": 1 / s,
                         "train/recon": 0.9 / s, "train/kl": 0.1}) for s in range(2, 42, 2)]
    lines += [json.dumps({"step": s, "epoch": 1, "val/loss": 1.2 / s, "val/recon": 1.1 / s, "val/kl": 0.1})
              for s in (10, 20, 30, 40)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 42, "train/lo')  # interrupted last line
    (run / "provenance.json").write_text(json.dumps({"store": str(store) if store else "missing/store"}))
    if full:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps(EVAL))
        for i, n in enumerate(("real_vs_sample", "reconstructions", "closest_pairs", "my_extra_plot")):
            tiny_png(run / "eval" / f"{n}.png", i)
        (run / "anomaly").mkdir()
        (run / "anomaly" / "metrics.json").write_text(json.dumps(
            {"pixel": {"auroc": {"value": 0.83, "ci_low": 0.7, "ci_high": 0.9}, "best_dice": 0.41}}))
        tiny_png(run / "anomaly" / "overlays.png", 7)
        (run / "utility").mkdir()
        (run / "utility" / "metrics.json").write_text(json.dumps({"train_real": {"auc": 0.9},
                                                                   "train_synthetic": {"auc": 0.85}}))
        tiny_png(run / "utility" / "utility.png", 8)
        tiny_png(run / "samples" / "grid.png", 9)
    return run


def fake_compare(root: Path) -> Path:
    d = root / "cmp"
    d.mkdir()
    (d / "leaderboard.csv").write_text("config,arch,seeds,val_loss,val_loss_ci_low,val_loss_ci_high\n"
                                       "vae,vae,2,-0.8,-0.9,-0.7\nae,ae,2,-0.5,-0.6,-0.4\n")
    (d / "leaderboard.json").write_text(json.dumps({"ranked_by": "val_loss", "settings": {"budget": "5m"}}))
    return d


def test_metric_rows_put_floor_beside_value():
    table, nested = metric_rows(EVAL["realism"])
    assert list(table.columns[:4]) == ["metric", "value", "floor", "ratio"]
    rows = table.set_index("metric")
    assert rows.loc["fid_like", "floor"] == "3.25" and rows.loc["fid_like", "ratio"] == "3.85"
    assert rows.loc["intensity_w1", "floor"] == "0.0051"  # flat x_floor joins the row of x
    assert "intensity_w1_floor" not in rows.index and nested == {}
    table, nested = metric_rows(EVAL["memorisation"])
    assert list(table["metric"]) == ["nearest"] and "settings" in nested


def test_report_renders_every_section(tiny_store, tmp_path):
    full = fake_run(tmp_path, "vae-run", tiny_store)
    bare = fake_run(tmp_path, "bare-run", None, full=False)
    out = tmp_path / "report.html"
    r = runner.invoke(app, ["report", str(full), str(bare), "--compare", str(fake_compare(tmp_path)),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert 'src="http' not in html and "<link" not in html  # self-contained
    for heading in ("Leaderboard", "Comparison", "Run vae-run", "Run bare-run", "Dataset", "Training",
                    "Evaluation", "Anomaly detection", "Downstream utility", "Samples"):
        assert f">{heading}" in html, heading
    # nested metrics: the floor sits in the same row as the distance
    assert re.search(r"<td>fid_like</td>\s*<td>12.5</td>\s*<td>3.25</td>\s*<td>3.85</td>", html)
    assert re.search(r"<td>intensity_w1</td>\s*<td>0.02</td>\s*<td>0.0051</td>", html)
    assert re.search(r"<td>ssim</td>\s*<td>0.81</td>", html)  # a group of plain numbers: a row each
    assert "12.5 (floor 3.25)" in html  # comparison table of metrics: value and floor in one cell
    assert "-0.8 [-0.9, -0.7]" in html  # leaderboard value with its CI
    assert "Real test slices beside samples" in html and "My extra plot." in html
    # dataset summary from the store named in provenance.json: 6 subjects, split 4/1/1
    assert "48 slices of 6 subjects" in html
    assert "1 line(s) could not be read" in html
    # the bare run: absent things said plainly, and the store that is not there
    assert "absent" in html and "was not found" in html and "brainvae evaluate" in html
    # one PNG per eval figure (4) + anomaly + utility + samples + 2 training curves + 1 age figure
    assert html.count('src="data:image/png;base64,') == 4 + 1 + 1 + 1 + 2 + 1

    r = runner.invoke(app, ["report", str(full), "--out", str(out)])
    assert r.exit_code == 1 and "already exists; pass --force" in r.output
    assert runner.invoke(app, ["report", str(full), "--out", str(out), "--force"]).exit_code == 0


def test_help():
    for cmd in (["report"], ["quiz"], ["quiz", "make"], ["quiz", "score"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, (cmd, r.output)


def test_report_user_errors(tmp_path):
    r = runner.invoke(app, ["report", "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "nothing to report" in r.output
    r = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no such run folder" in r.output and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "not a brainvae run folder" in r.output
    assert not (tmp_path / "r.html").exists()


# ----------------------------------------------------------------------------- headless browser


def chromium(url: str, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """Load ``url`` headless; return (the DOM after scripts ran, Chromium's log)."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def body_attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', tag))


def assert_page_ok(dom: str, log: str, n_images: int) -> dict[str, str]:
    attrs = body_attrs(dom)
    assert attrs.get("images-ok") == f"{n_images}/{n_images}", attrs  # every <img> decoded (naturalWidth > 0)
    assert attrs.get("errors", "") == "", attrs["errors"]
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console
    return attrs


@needs_chromium
def test_report_in_headless_chromium(tiny_store, tmp_path):
    out = tmp_path / "report.html"
    out.write_text(build_report([fake_run(tmp_path, "vae-run", tiny_store)], fake_compare(tmp_path)))
    dom, log = chromium(out.as_uri(), tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    assert_page_ok(dom, log, n_images=out.read_text().count("<img "))
    assert "Run vae-run" in dom


@needs_chromium
def test_quiz_page_exports_answers_in_headless_chromium(tmp_path):
    items = [(f"Q{i:02d}", png_bytes(_noise_fig(i), dpi=40)) for i in range(1, 7)]
    out = tmp_path / "quiz.html"
    out.write_text(quiz_html(items, "abc123"))
    dom, log = chromium(out.as_uri() + "#selftest", tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    attrs = assert_page_ok(dom, log, n_images=6)
    assert attrs.get("exported") == "yes"  # the Blob URL for the download was made
    csv = re.search(r'<pre id="csv-out"[^>]*>(.*?)</pre>', dom, re.S).group(1).strip().splitlines()
    assert csv[0] == "quiz_id,item,answer,confidence,reader"
    assert csv[1:] == [f"abc123,Q{i + 1:02d},{'real' if i % 2 else 'synthetic'},{1 + i % 5},selftest"
                       for i in range(6)]
    assert "6 of 6 answered" in dom


def _noise_fig(seed: int) -> Figure:
    fig = Figure(figsize=(1, 1))
    fig.subplots().imshow(np.random.default_rng(seed).random((8, 8)), cmap="gray")
    return fig
