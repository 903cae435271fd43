"""The few headline numbers of a run, each beside its floor or baseline, with a plain verdict.

Read from the metrics JSON that ``evaluate``, ``anomaly`` and ``utility`` wrote;
nothing is recomputed. A conditional-fidelity ratio is only a verdict when the
real-data ceiling is significantly above chance, with SUBJECTS as the unit
(slices of one subject are not independent): ``evaluate`` records that test
(``conditional.ceiling_tests``); for metrics written before it did, the same
test is applied here to the recorded slice-level ceiling over the test subjects.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluate.stats import ALPHA, p_accuracy, p_correlation
from .read import Run
from .tables import MIN_UNITS, fmt

SMOKE_STEPS = 2000  # fewer optimiser steps than this: a smoke test, not a trained model
FD_NEAR_FLOOR = 1.25  # a Fréchet distance within this ratio of its real-vs-real floor reads "as close as real"
C2ST_MARGIN = 0.05  # a C2ST accuracy within this of its floor reads "as hard to tell apart as real from real"
C2ST_GOAL = 0.70  # at most this (and above the margin): "hard to tell apart", the realism goal of the generator
NOT_MEASURABLE = "not measurable on this data"


@dataclass(frozen=True)
class Headline:
    label: str  # what is measured, in words
    value: str  # the model's number
    reference: str  # its floor or baseline, in words
    verdict: str
    tone: str = "neutral"  # good | bad | neutral: the verdict's colour
    flag: str = ""  # why the number is not a result (small n), shown beside the verdict


# ----------------------------------------------------------------------------- evaluate


def num(value) -> str:
    return fmt(value, digits=3)


def realism(ev: dict) -> list[Headline]:
    fd = ((ev.get("realism") or {}).get("featnet") or {}).get("fd")
    if not isinstance(fd, dict) or fd.get("ratio") is None:
        return []
    near = fd["ratio"] <= FD_NEAR_FLOOR
    return [Headline("Fréchet distance to real (feature net)", num(fd["value"]),
                     f"floor {num(fd['floor'])} (real vs real)",
                     "as close as real is to real" if near else f"{fd['ratio']:.1f}× the real-vs-real distance",
                     "good" if near else "bad")]


def c2st(ev: dict) -> list[Headline]:
    acc = (ev.get("c2st") or {}).get("accuracy")
    if not isinstance(acc, dict) or acc.get("floor") is None:
        return []
    if acc["value"] <= acc["floor"] + C2ST_MARGIN:
        verdict, tone = "as hard to tell apart as real from real", "good"
    elif acc["value"] <= C2ST_GOAL:
        verdict, tone = f"hard to tell apart (≤ {C2ST_GOAL:.2f}), though above the floor", "good"
    else:
        verdict, tone = "samples told apart from real", "bad"
    return [Headline("C2ST: classifier accuracy, samples vs real (0.5 = cannot tell)", num(acc["value"]),
                     f"floor {num(acc['floor'])} (real vs real)", verdict, tone)]


def age_effect(ev: dict) -> list[Headline]:
    a = ev.get("age_effect") or {}
    if "sample_slope" not in a:
        return []
    n = a.get("n_real_subjects") or 0
    label = "Age effect: CSF fraction change per decade"
    if n < MIN_UNITS:
        return [Headline(label, num(a["sample_slope"]), f"real {num(a['real_slope'])}, {n} subjects", NOT_MEASURABLE,
                         flag=f"real interval from {n} subjects (< {MIN_UNITS})")]
    low, high = a["real_ci"]
    inside = bool(a["within_ci"])
    reference = f"real {num(a['real_slope'])} [{num(low)}, {num(high)}], {n} subjects"
    return [Headline(label, num(a["sample_slope"]), reference,
                     f"{'inside' if inside else 'outside'} the real 95 % interval", "good" if inside else "bad")]


def conditional(ev: dict) -> list[Headline]:
    """Age and sex read back from conditional samples, as a share of the real-data ceiling above chance."""
    c = ev.get("conditional") or {}
    if "real" not in c:
        return []
    real, samples, goal = c["real"], c.get("samples") or {}, c.get("goal", 0.9)
    n = real.get("n_subjects") or 0
    out = []
    for key, label, chance, test in (("age_r", "Age read back from samples (r)", 0.0, p_correlation),
                                     ("sex_accuracy", "Sex read back from samples (accuracy)", 0.5, p_accuracy)):
        asked, ceiling = samples.get(key), real.get(key)
        if asked is None:
            continue  # the model is not conditioned on it
        reference = f"real-data ceiling {num(ceiling)}, {n} subjects"
        recorded = (c.get("ceiling_test") or {}).get(key)  # evaluate's test, with subjects as the unit
        if recorded:
            p = recorded["p"]
        else:  # metrics written before evaluate recorded it: the slice-level ceiling over the test subjects
            p = test(ceiling, n) if ceiling is not None else 1.0
        if p >= ALPHA:
            out.append(Headline(label, num(asked), reference, NOT_MEASURABLE,
                                flag=f"ceiling not above chance (p = {p:.2g})"))
            continue
        share = (asked - chance) / (ceiling - chance)
        meets = share >= goal
        out.append(Headline(label, num(asked), reference, f"{'meets' if meets else 'below'} goal: {share:.2f} of the "
                            f"ceiling above chance (goal {goal:g})", "good" if meets else "bad"))
    return out


def memorisation(ev: dict) -> list[Headline]:
    share = (ev.get("memorisation") or {}).get("share_above")
    if not isinstance(share, dict) or share.get("floor") is None:
        return []
    ok = share["value"] <= share["floor"]
    return [Headline("Near-copies of training slices (share of samples)", num(share["value"]),
                     f"floor {num(share['floor'])} (real test slices)",
                     "no more than real slices" if ok else "more than real slices", "good" if ok else "bad")]


# ----------------------------------------------------------------------------- anomaly, utility


def anomaly(an: dict) -> list[Headline]:
    """The primary score's pixel AUROC and Dice beside the best baseline (brightness, or a baseline run)."""
    scores = an.get("scores") or {}
    primary = scores.get(an.get("primary_score"))
    if not primary:
        return []
    refs = {k: s for k, s in scores.items()
            if s.get("source") == "brightness" or str(s.get("source")).startswith("baseline")}
    out = []
    for key, what in (("pixel_auroc", "pixel AUROC"), ("dice", "Dice")):
        value = primary.get(key)
        ref_values = {k: s[key] for k, s in refs.items() if s.get(key) is not None}
        if value is None or not ref_values:
            continue
        best = max(ref_values, key=ref_values.get)
        beats = value > ref_values[best]
        out.append(Headline(f"Anomaly {what} ({an['primary_score']})", num(value), f"{best} {num(ref_values[best])}",
                            "beats the baselines" if beats else "does not beat the baselines",
                            "good" if beats else "bad"))
    return out


def utility(ut: dict) -> list[Headline]:
    """Balanced accuracy of a classifier trained on real + as many synthetic slices, vs real only."""
    arms, tasks = ut.get("arms") or {}, ut.get("tasks") or {}
    arm = "real+syn1" if "real+syn1" in arms else next((a for a in arms if a.startswith("real+syn")), None)
    if arm is None or "real" not in arms:
        return []
    out = []
    for task, info in tasks.items():
        mixed, real = arms[arm].get(task), arms["real"].get(task)
        if not mixed or not real:
            continue
        n = info.get("n_test_subjects") or 0
        label = f"Utility: {task.replace('_', ' ')} classifier, {arm} (balanced accuracy)"
        reference = f"real only {num(real['balanced_accuracy'])}"
        value = num(mixed["balanced_accuracy"])
        if n < MIN_UNITS:
            out.append(Headline(label, value, reference, NOT_MEASURABLE, flag=f"{n} test subjects (< {MIN_UNITS})"))
        elif mixed["delta_ci_low"] > 0 or mixed["delta_ci_high"] < 0:
            helps = mixed["delta_ci_low"] > 0
            out.append(Headline(label, value, reference, "synthetic data helps" if helps else "synthetic data hurts",
                                "good" if helps else "bad"))
        else:
            out.append(Headline(label, value, reference, "no measurable difference"))
    return out


def headlines(run: Run) -> list[Headline]:
    """Every headline of a run, in reading order: realism, conditioning, memorisation, anomaly, utility."""
    ev, an, ut = (run.parts.get(k) or {} for k in ("eval", "anomaly", "utility"))
    return [*realism(ev), *c2st(ev), *age_effect(ev), *conditional(ev), *memorisation(ev), *anomaly(an),
            *utility(ut)]


def lineage(summary: dict | None) -> tuple[int | None, float]:
    """Optimiser steps and seconds of a run together with every run it started from (``[init]``: each summary's
    ``init.source``, nested); steps None when a summary in the chain does not record them."""
    steps, seconds = 0, 0.0
    if not summary:
        return None, seconds
    while summary:
        if not isinstance(summary.get("steps"), int):
            return None, seconds
        steps, seconds = steps + summary["steps"], seconds + (summary.get("seconds") or 0.0)
        summary = (summary.get("init") or {}).get("source")
    return steps, seconds


def warnings(run: Run, test_subjects: int | None) -> list[str]:
    """Why the run's numbers should not be read as results: a smoke test (counting the runs it started from),
    too few test subjects or cases."""
    out = []
    steps = lineage(run.summary)[0]
    if steps is not None and steps < SMOKE_STEPS:
        out.append(f"Smoke test: trained for {steps:,} optimiser steps (< {SMOKE_STEPS:,}). Its numbers show that "
                   "the pipeline runs, not what the model can do.")
    if test_subjects is not None and test_subjects < MIN_UNITS:
        out.append(f"Small test set: {test_subjects} test subjects. Intervals and tests over fewer than "
                   f"{MIN_UNITS} subjects or cases are flagged, not presented as results.")
    cases = len(((run.parts.get("anomaly") or {}).get("cases") or {}).get("test", []))
    if 0 < cases < MIN_UNITS:
        out.append(f"Anomaly detection was tested on {cases} cases (< {MIN_UNITS}): its per-case intervals are "
                   "not shown.")
    return out
