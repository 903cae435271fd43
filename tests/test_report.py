"""``brainvae report`` on fake run folders, and both HTML pages (report, quiz) in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from typer.testing import CliRunner

from brainvae.cli import app
from brainvae.evaluate.stats import p_accuracy, p_correlation
from brainvae.report import headline as H
from brainvae.report.html import png_bytes
from brainvae.report.images import PAGE_BUDGET
from brainvae.report.quiz import quiz_html
from brainvae.report.report import build_report
from brainvae.report.tables import flatten, interval

runner = CliRunner()
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
ROOT = Path(__file__).resolve().parents[1]

# The demo's numbers where the real-data ceiling is at chance: 3 test subjects, sex accuracy 0.50, age r 0.15.
CHANCE_CEILING = {"goal": 0.9, "real": {"n_subjects": 3, "age_r": 0.145, "sex_accuracy": 0.5},
                  "samples": {"age_r": 0.65, "sex_accuracy": 0.88},
                  "ratio": {"age_r": 4.45, "sex_accuracy": 1.75}, "meets_goal": {"age_r": True, "sex_accuracy": True}}
EVAL = {
    "n": 64, "seed": 0, "conditions": ["age", "sex", "position"],
    "sampling": "conditions of the n real test slices", "sampler": {"steps": 16, "solver": "heun"},
    "realism": {"featnet": {"fd": {"value": 12.5, "floor": 3.25, "ratio": 3.85},
                            "kid": {"value": 0.05, "floor": 0.01, "ratio": 5.0, "std": 0.002, "floor_std": 0.001}},
                "pca64": {"fd": {"value": 2.0, "floor": 1.9, "ratio": 1.05}}},
    "c2st": {"accuracy": {"value": 0.93, "floor": 0.71, "ratio": 1.3}, "n_test": 35},
    "memorisation": {"share_above": {"value": 0.01, "floor": 0.01, "ratio": 1.0}, "threshold_ssim": 0.85,
                     "closest_pairs": [{"sample": 3, "train_row": 7, "ssim": 0.9}]},
    "age_effect": {"sample_slope": -0.004, "real_slope": 0.0041, "real_ci": [0.0009, 0.0066], "within_ci": False,
                   "n_real_subjects": 3, "per_age": 32, "position": 0.5, "window": 0.05},
    "conditional": CHANCE_CEILING,
    "reconstruction": {"n": 64, "brain": {"ssim": {"mean": 0.81, "std": 0.05}, "psnr": {"mean": 25.1, "std": 1.0}}},
    "intensity_w1": 0.02, "intensity_w1_floor": 0.0051,
    "summary": [{"metric": "featnet fd", "model": 12.5, "floor": 3.25, "ratio": 3.85},
                {"metric": "c2st accuracy", "model": 0.93, "floor": 0.71, "ratio": 1.3}],
    "provenance": {"seed": 0, "versions": {"torch": "2.13.0"}},
}
ANOMALY = {
    "primary_score": "model/residual", "cases": {"validation": ["S04"], "test": ["S01", "S05"]},
    "postprocess": {"median": 5, "erode": 3, "min_area": 10},
    "scores": {"model/residual": {"source": "model", "pixel_auroc": 0.83, "dice": 0.41, "threshold": 0.2,
                                  "dice_all_brain": 0.08,
                                  "per_case_mean": {"dice": {"mean": 0.42, "ci95": [0.4134, 0.4347], "n": 2}}},
               "brightness/hyper": {"source": "brightness", "pixel_auroc": 0.6, "dice": 0.2}},
}
UTILITY = {"tasks": {"sex": {"chance": 0.5, "n_test_subjects": 3}},
           "arms": {arm: {"sex": {"balanced_accuracy": acc, "ci_low": acc - 0.2, "ci_high": acc + 0.2,
                                  "delta_vs_real": acc - 0.5, "delta_ci_low": -0.1, "delta_ci_high": 0.1}}
                    for arm, acc in (("real", 0.5), ("real+syn1", 0.55))}}
HEADINGS = re.compile(r"brainvae report: .*|Summary|Leaderboard|Comparison|Data|Store .*|Run [\w-]+( \(\d\))?|"
                      r"Training|Evaluation|Anomaly detection|Downstream utility|Samples|Visual Turing test|"
                      r"Problems reading this folder")


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
    (run / "provenance.json").write_text(json.dumps({"store": str(store) if store else "missing/store",
                                                     "store_config": {"axis": "axial", "size": 32}}))
    if full:
        for part, metrics in (("eval", EVAL), ("anomaly", ANOMALY), ("utility", UTILITY)):
            (run / part).mkdir()
            (run / part / "metrics.json").write_text(json.dumps(metrics))
        for i, n in enumerate(("real_vs_sample", "reconstructions", "closest_pairs", "my_extra_plot")):
            tiny_png(run / "eval" / f"{n}.png", i)
        tiny_png(run / "anomaly" / "overlay_S01.png", 7)
        tiny_png(run / "utility" / "utility.png", 8)
        tiny_png(run / "samples-age30-F" / "grid.png", 9)
        (run / "samples-age30-F" / "meta.json").write_text(json.dumps({"n": 16, "seed": 0,
                                                                       "cond": {"age": 30, "sex": -1.0}}))
    return run


def fake_compare(root: Path) -> Path:
    d = root / "cmp"
    d.mkdir()
    (d / "leaderboard.csv").write_text("config,arch,seeds,val_loss,val_loss_ci_low,val_loss_ci_high\n"
                                       "vae,vae,2,-0.8,-0.9,-0.7\nae,ae,2,-0.5,-0.6,-0.4\n")
    (d / "leaderboard.json").write_text(json.dumps({"ranked_by": "val_loss", "settings": {"budget": "5m"}}))
    return d


def embedded_images(html: str) -> list[Image.Image]:
    """Every data-URI PNG of the page, decoded (raises if one does not decode)."""
    images = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        images.append(image)
    return images


def test_flatten_puts_floor_beside_value():
    rows, records = flatten(EVAL)
    by_name = {r["metric"]: r for r in rows}
    fd = by_name["realism › featnet › fd"]
    assert (fd["value"], fd["floor"], fd["ratio"]) == ("12.5", "3.25", "3.85")
    assert by_name["realism › featnet › kid"]["more"] == "std 0.002, floor_std 0.001"
    assert by_name["intensity_w1"]["floor"] == "0.0051" and "intensity_w1_floor" not in by_name  # flat x_floor joins x
    assert by_name["reconstruction › brain › ssim"]["value"] == "0.81"  # mean is the value of a {mean, std} dict
    assert [name for name, _ in records] == ["memorisation › closest_pairs", "summary"]


def test_report_renders_every_section(tiny_store, tmp_path):
    full = fake_run(tmp_path, "vae-run", tiny_store)
    bare = fake_run(tmp_path, "bare-run", None, full=False)
    out = tmp_path / "report.html"
    r = runner.invoke(app, ["report", str(full), str(bare), "--compare", str(fake_compare(tmp_path)),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert 'src="http' not in html and "<link" not in html  # self-contained
    for heading in ("Summary", "Leaderboard", "Comparison", "Data", "Run vae-run", "Run bare-run", "Training",
                    "Evaluation", "Anomaly detection", "Downstream utility", "Samples"):
        assert f">{heading}<" in html, heading
    # every number of eval/metrics.json, in one collapsed table: the floor in the row of its distance
    assert re.search(r"<td>realism › featnet › fd</td>\s*<td>12.5</td>\s*<td>3.25</td>\s*<td>3.85</td>", html)
    assert re.search(r"<td>intensity_w1</td>\s*<td>0.02</td>\s*<td>0.0051</td>", html)
    assert "<td>12.5 (3.25)</td>" in html  # feature spaces side by side: value (floor)
    assert "-0.8 [-0.9, -0.7]" in html  # leaderboard value with its CI
    assert "Real test slices (top) and samples (bottom)" in html and "My extra plot." in html
    assert "Random samples at age 30, sex F" in html  # the conditions of a sample grid, from its meta.json
    assert "Test case S01: " in html and "threshold" in html
    assert html.count("class='orient'") == 5  # orientation letters on the slice figures and the sample grid
    assert "48 slices of 6 subjects" in html  # the store named in provenance.json
    assert "1 line(s) could not be read" in html
    assert "absent" in html and "was not found" in html and "brainvae evaluate" in html  # the bare run
    # 4 eval figures + overlay + utility + sample grid + 2 training curves + 1 age figure (one store: shown once)
    assert len(embedded_images(html)) == 4 + 1 + 1 + 1 + 2 + 1

    r = runner.invoke(app, ["report", str(full), "--out", str(out)])
    assert r.exit_code == 1 and "already exists; pass --force" in r.output
    assert runner.invoke(app, ["report", str(full), "--out", str(out), "--force"]).exit_code == 0


def test_summary_comes_first_with_banner_warnings_and_verdicts(tiny_store, tmp_path):
    html = build_report([fake_run(tmp_path, "vae-run", tiny_store)])
    body = html[html.index("<body>"):]
    assert re.match(r"<body>\s*<h1>[^<]*</h1>\s*<section id='summary' data-first-screen>", body)
    summary = body[:body.index("</section>")]
    assert "SIMULATED DATA" in summary  # the store's hospital is SIM
    assert "Smoke test: trained for 40 optimiser steps" in summary
    assert "Small test set: 1 test subjects" in summary
    assert "vae, 32 px, conditioned on age, sex, position" in summary and "40 steps" in summary
    for measure, reference in (("Fréchet distance to real", "floor 3.25"), ("C2ST", "floor 0.71"),
                               ("Anomaly pixel AUROC", "brightness/hyper 0.6")):
        row = re.search(f"<tr><td>{measure}[^<]*</td><td><b>[^<]+</b></td><td>([^<]+)</td>", summary)
        assert row and reference in row.group(1), measure
    assert "meets goal" not in html  # the ceiling is at chance
    assert html.count(H.NOT_MEASURABLE) == 4  # age r, sex, age effect (3 subjects), utility (3 subjects)


def test_training_counts_the_runs_a_model_started_from_and_c2st_reads_against_its_goal(tiny_store, tmp_path):
    """A run trained on from another model ([init]) is not a smoke test when the whole lineage trained long
    enough, and says so; a C2ST accuracy at most 0.70 reads "hard to tell apart", not "told apart"."""
    run = fake_run(tmp_path, "v2", tiny_store)
    first = {"arch": "vae", "steps": 1500, "seconds": 600.0}
    summary = json.loads((run / "summary.json").read_text())
    summary["init"] = {"from": "runs/v1", "source": {**first, "init": {"from": "runs/v0", "source": first}}}
    (run / "summary.json").write_text(json.dumps(summary))
    html = build_report([run])
    top = html[html.index("<body>"):html.index("</section>")]
    assert "Smoke test" not in top and "3,040 steps" in top and "with the runs it started from" in top
    assert H.lineage({"steps": 5, "init": {"source": {"seconds": 3.0}}}) == (None, 0.0)  # a step count unknown
    assert H.lineage(None) == (None, 0.0)
    verdicts = {v: H.c2st({"c2st": {"accuracy": {"value": v, "floor": 0.5}}})[0] for v in (0.52, 0.66, 0.8)}
    assert verdicts[0.52].verdict.startswith("as hard to tell apart") and verdicts[0.52].tone == "good"
    assert verdicts[0.66].verdict.startswith("hard to tell apart") and verdicts[0.66].tone == "good"
    assert verdicts[0.8].verdict == "samples told apart from real" and verdicts[0.8].tone == "bad"


def test_no_raw_json_headings_and_details_closed(tiny_store, tmp_path):
    html = build_report([fake_run(tmp_path, "a", tiny_store), fake_run(tmp_path, "b", tiny_store)],
                        fake_compare(tmp_path))
    headings = re.findall(r"<h\d[^>]*>(.*?)</h\d>", html)
    assert headings and all(HEADINGS.fullmatch(re.sub(r"<[^>]+>", "", h)) for h in headings), headings
    assert "<details open" not in html and html.count("<details>") >= 8
    # every table row has as many cells as its header: no stray columns
    for table in re.findall(r"<table.*?</table>", html, re.S):
        widths = {len(re.findall(r"<t[hd][ >]", row)) for row in re.findall(r"<tr.*?</tr>", table, re.S)}
        assert len(widths) == 1, table[:300]


def test_conditional_verdict_needs_a_ceiling_above_chance():
    chance = H.conditional({"conditional": CHANCE_CEILING})
    assert [h.verdict for h in chance] == [H.NOT_MEASURABLE] * 2
    assert all("ceiling not above chance" in h.flag for h in chance)
    strong = {"goal": 0.9, "real": {"n_subjects": 20, "age_r": 0.8, "sex_accuracy": 0.9},
              "samples": {"age_r": 0.76, "sex_accuracy": 0.6}}
    age, sex = H.conditional({"conditional": strong})
    assert age.verdict.startswith("meets goal: 0.95") and age.tone == "good"
    assert sex.verdict.startswith("below goal: 0.25") and sex.tone == "bad"  # (0.6 - 0.5) / (0.9 - 0.5)
    assert p_accuracy(0.5, 3) == 0.5 and p_accuracy(0.9, 20) < 0.001
    assert p_correlation(0.145, 3) > 0.4 and p_correlation(0.6, 18) < 0.01
    # the subject-level test evaluate recorded decides, not the slice-level numbers
    recorded = {**strong, "ceiling_test": {"age_r": {"p": 0.2}, "sex_accuracy": {"p": 0.01}}}
    age, sex = H.conditional({"conditional": recorded})
    assert age.verdict == H.NOT_MEASURABLE and "p = 0.2" in age.flag and sex.verdict.startswith("below goal")


def test_small_n_intervals_are_flagged(tiny_store, tmp_path):
    assert interval(0.1, 0.3, n=4) == "not shown (n = 4)" and interval(0.1, 0.3, n=5) == "[0.1, 0.3]"
    html = build_report([fake_run(tmp_path, "vae-run", tiny_store)])
    assert "0.4134" not in html and "not shown (n = 2)" in html  # anomaly per-case interval over 2 cases
    assert "[0.3, 0.7]" not in html and "not shown (n = 3)" in html  # utility interval over 3 subjects
    (age,) = H.age_effect(EVAL)
    assert age.verdict == H.NOT_MEASURABLE and "3 subjects" in age.flag and "0.0009" not in age.reference
    (age,) = H.age_effect({"age_effect": {**EVAL["age_effect"], "n_real_subjects": 12}})
    assert age.verdict == "outside the real 95 % interval" and "[0.0009, 0.0066]" in age.reference


def test_six_runs_fit_the_size_budget(tiny_store, tmp_path):
    rng = np.random.default_rng(0)
    raw = 0
    runs = []
    for i in range(6):
        run = fake_run(tmp_path, f"run{i}", tiny_store)
        (run / "metrics.jsonl").unlink()  # no training curves to draw: a faster test
        for name in ("real_vs_sample", "reconstructions", "closest_pairs", "histograms"):
            noise = Image.fromarray(rng.integers(0, 256, (250, 900), dtype=np.uint8)).convert("RGB")  # incompressible
            buf = io.BytesIO()
            noise.save(buf, format="PNG")
            (run / "eval" / f"{name}.png").write_bytes(buf.getvalue())
            raw += len(buf.getvalue())
        runs.append(run)
    assert raw * 4 / 3 > PAGE_BUDGET  # embedded as they are, the figures alone would exceed the budget
    html = build_report(runs)
    assert len(html.encode("utf-8")) <= PAGE_BUDGET
    images = embedded_images(html)
    assert len(images) == 6 * 8 + 1  # every image still decodes: 8 figures per run, the store's ages
    assert 'width="900"' in html  # a downscaled figure keeps its displayed size


def test_assets_are_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["brainvae"]
    assets = ROOT / "src" / "brainvae" / "report" / "assets"
    files = [f.relative_to(assets.parents[1]).as_posix() for f in assets.iterdir()]
    assert files and all(any(fnmatch(f, p) for p in patterns) for f in files), files


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
    dom, log = chromium(out.as_uri(), tmp_path, "--dump-dom", "--virtual-time-budget=5000", "--window-size=1280,900")
    attrs = assert_page_ok(dom, log, n_images=out.read_text().count("<img "))
    assert attrs.get("first-screen") == "yes"  # the summary ends within a 1280 x 900 window
    assert "Run vae-run" in dom and "SIMULATED DATA" in dom


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
