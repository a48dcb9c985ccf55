"""Gate calibration (medqm.evaluate.gate): thresholds against brute force, validity where the truth is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from evalfixtures import CASES, SPLIT  # tests/evaluate, on sys.path via conftest.py
from scipy.stats import binom
from typer.testing import CliRunner

from medqm.cli import app
from medqm.evaluate.gate import (
    LN2,
    QUALITY_GRID,
    Gate,
    calibrate,
    calibrate_gate,
    realised_risk,
    risk_coverage,
    validity_check,
)


def _population(rng, n_cases: int, per_case: int = 1, case_sd: float = 0.0):
    """Quality q ~ U(0, 1); the answer is lost (D = 1.5 nats, else 0.1) with probability 0.8·(1 − q) + a case
    offset. With case_sd = 0: risk among passed R(t) = 0.4·(1 − t), joint risk J(t) = 0.4·(1 − t)²."""
    cases = np.repeat(np.arange(n_cases), per_case)
    q = rng.random(n_cases * per_case)
    p = np.clip(0.8 * (1 - q) + rng.normal(0, case_sd, n_cases)[cases], 0, 1)
    d = np.where(rng.random(len(q)) < p, 1.5, 0.1)
    return q, d, cases.astype(str)


def _brute_force(q, d, cases, alpha, delta, method, grid):
    """The threshold rule of the docstring, written out with loops and scipy (no shared code)."""
    lost = [1.0 if v > LN2 else 0.0 for v in d]
    ids = sorted(set(cases))
    chosen = None
    for t in sorted(grid, reverse=True):
        per_case = []
        for c in ids:
            idx = [i for i in range(len(q)) if cases[i] == c]
            passed = [i for i in idx if q[i] >= t]
            per_case.append((sum(lost[i] for i in passed) / len(idx), len(passed) / len(idx)))
        if method == "crc":
            n = len(ids)
            ok = (sum(a for a, _ in per_case) + 1.0) / (n + 1) <= alpha
        else:
            r = [a / b for a, b in per_case if b > 0]
            n = len(r)
            if n == 0:
                ok = False
            else:
                mean = sum(r) / n
                a_ = min(mean, alpha)
                h = 0.0 if a_ >= alpha else ((a_ * math.log(a_ / alpha) if a_ > 0 else 0.0)
                                             + (1 - a_) * math.log((1 - a_) / (1 - alpha)))
                p = min(1.0, math.exp(-n * h), math.e * binom.cdf(math.ceil(n * mean - 1e-9), n, alpha))
                ok = p <= delta / len(grid)
        if ok:
            chosen = t
        elif method == "crc":
            break  # crc's safe set is an upper interval of the grid
    return chosen


@pytest.mark.parametrize("method", ["ltt", "crc"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_matches_brute_force(method, seed):
    rng = np.random.default_rng(seed)
    q, d, cases = _population(rng, 60, per_case=3, case_sd=0.1)
    grid = [round(v, 2) for v in np.linspace(0.05, 0.95, 10)]
    g = calibrate(q, d, cases, alpha=0.25, delta=0.1, method=method, grid=grid)
    assert g.pass_min == _brute_force(q, d, cases, 0.25, 0.1, method, grid)
    assert g.n_cases == 60 and g.n_images == 180


def test_ltt_holds_with_probability_one_minus_delta_where_the_truth_is_known():
    """200 fresh calibration sets: the true risk among passed images at the chosen threshold exceeds α in at
    most δ of them (plus sampling error), and the gate is not vacuous (it passes images)."""
    rng = np.random.default_rng(0)
    alpha, delta, draws = 0.2, 0.1, 200
    violations, rates = 0, []
    for _ in range(draws):
        q, d, cases = _population(rng, 600)
        g = calibrate(q, d, cases, alpha=alpha, delta=delta, method="ltt")
        if g.attained:
            violations += 0.4 * (1 - g.pass_min) > alpha
            rates.append(1 - g.pass_min)
    assert violations / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert len(rates) > 0.8 * draws and np.mean(rates) > 0.15  # R(t) ≤ 0.2 ⇔ t ≥ 0.5: at most 50 % may pass


def test_crc_holds_in_expectation_where_the_truth_is_known():
    rng = np.random.default_rng(1)
    alpha, draws = 0.1, 200
    joint = []
    for _ in range(draws):
        q, d, cases = _population(rng, 100)
        g = calibrate(q, d, cases, alpha=alpha, method="crc")
        joint.append(0.4 * (1 - g.pass_min) ** 2 if g.attained else 0.0)
    se = np.std(joint) / math.sqrt(draws)
    assert np.mean(joint) <= alpha + 3 * se


def test_validity_check_on_clustered_cases():
    rng = np.random.default_rng(2)
    q, d, cases = _population(rng, 400, per_case=4, case_sd=0.1)
    v = validity_check(q, d, cases, alpha=0.2, delta=0.1, n_splits=200)
    assert v["n_splits"] == 200 and v["attained"] > 150
    assert v["violation_rate"] <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / v["attained"])
    assert 0 < v["mean_heldout_pass_rate"] < 1


def test_an_unattainable_alpha_passes_nothing():
    rng = np.random.default_rng(3)
    q, d, cases = _population(rng, 20)
    g = calibrate(q, d, cases, alpha=0.01, delta=0.1)
    assert not g.attained and g.pass_rate == 0.0 and "nothing passes" in g.guarantee()
    assert math.isnan(realised_risk(q, d, cases, g.pass_min, risk="lost-answer-rate")[0])


def test_mean_loss_is_capped_and_ignores_gains():
    q = np.array([0.9, 0.9, 0.9, 0.9])
    d = np.array([-3.0, 0.5, 100.0, 0.5])  # a gain counts 0, a huge loss counts the cap
    r, rate = realised_risk(q, d, ["a", "b", "c", "d"], 0.5, risk="mean-loss", loss_cap=2.0)
    assert rate == 1.0 and r == pytest.approx((0 + 0.5 + 2.0 + 0.5) / 4)


def test_risk_coverage_is_the_running_mean_by_score():
    q = np.array([0.9, 0.8, 0.7, 0.6])
    d = np.array([0.0, 1.0, 0.0, 1.0])  # lost: no, yes, no, yes
    rc = risk_coverage(q, d, points=4)
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0] and rc["risk"] == pytest.approx([0, 0.5, 1 / 3, 0.5])


def test_gate_file_round_trip_and_modality_fallback(tmp_path):
    rng = np.random.default_rng(4)
    q, d, cases = _population(rng, 300)
    mods = np.where(np.arange(300) < 290, "MR", "CT")  # CT: 10 cases, below min_cases
    gate = calibrate_gate(q, d, cases, mods, alpha=0.2, by_modality=True, min_cases=20, provenance={"labels": "x"})
    assert "MR" in gate.by_modality and "CT" in gate.fallbacks and "10 calibration cases" in gate.fallbacks["CT"]
    path = gate.save(tmp_path / "gate.json")
    back = Gate.load(path)
    assert back.to_dict() == gate.to_dict()
    assert back.threshold_for("CT").pass_min == gate.default.pass_min
    assert back.threshold_for("MR").pass_min == gate.by_modality["MR"].pass_min
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a MedQM gate file"):
        Gate.load(tmp_path / "bad.json")


def test_cli_calibrates_on_the_cases_the_model_never_saw(labels, checkpoints, tmp_path, monkeypatch):
    """The label fixture's D is 0 everywhere (nothing lost), so any α is attainable and the lowest candidate
    passes; the calibration set is the 4 test cases of the checkpoint's split, never its train/val cases."""
    import pandas as pd

    table = pd.read_parquet(labels / "labels.parquet")
    out = tmp_path / "gate.json"
    r = CliRunner().invoke(app, ["gate", "calibrate", "--labels", str(labels), "--model", str(checkpoints["main"]),
                                 "--alpha", "0.2", "--method", "crc", "--out", str(out), "--cache",
                                 str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    g = json.loads(out.read_text())
    test_cases = [c for c in CASES if SPLIT[c] == "test"]
    assert g["provenance"]["n_cases"] == len(test_cases)
    assert g["provenance"]["n_images"] == int(table.case_id.isin(test_cases).sum())
    assert g["default"]["pass_min"] == QUALITY_GRID[0] and g["default"]["attained"]
    assert "conformal risk control" in r.output


def test_cli_refuses_labels_of_training_cases_only(labels, checkpoints, tmp_path):
    import pandas as pd

    table = pd.read_parquet(labels / "labels.parquet")
    sub = tmp_path / "train-only"
    sub.mkdir()
    table[table.case_id.map(SPLIT) == "train"].to_parquet(sub / "labels.parquet", index=False)
    r = CliRunner().invoke(app, ["gate", "calibrate", "--labels", str(sub), "--model", str(checkpoints["main"]),
                                 "--alpha", "0.2", "--out", str(tmp_path / "g.json")])
    assert r.exit_code == 2 and "every labelled case was used to train" in r.output
