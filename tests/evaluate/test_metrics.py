"""Agreement metrics, the logistic fit, the case bootstrap and the significance tests (`medqm.metrics`, the one
metrics module that training and evaluation share).

Reference values: scipy.stats (spearmanr, kendalltau, pearsonr) on the same data, RMSE and the fitted curve
written out here with NumPy (independently of `medqm.metrics`); Williams' t on Steiger's
(1980) worked example (r12 = .5, r13 = .4, r23 = .1, n = 103), for which the formula gives t = 0.891
(the value psych::r.test prints for it, 0.89).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import medqm.metrics as M
from medqm.metrics import (
    CaseBootstrap,
    agreement,
    bootstrap_agreement,
    compare_srcc,
    correlations,
    fit_logistic,
    grouped_correlations,
    krcc,
    logistic4,
    paired_bootstrap_srcc,
    plcc_raw,
    rmse_raw,
    srcc,
    williams_t,
)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def clustered(rng, n_cases=12, per_case=30, case_sd=0.5, noise=0.3):
    """Scores sharing a strong case effect: rows within a case are far from independent."""
    cases = np.repeat(np.arange(n_cases), per_case)
    effect = rng.normal(0, case_sd, n_cases)[cases]
    x = rng.normal(size=cases.size)
    y = 0.5 * x + effect + rng.normal(0, noise, cases.size)
    return cases, x + effect, y


# ------------------------------------------------------------------------------------------------ vs scipy
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(rng, ties):
    x = rng.normal(size=300)
    y = np.tanh(x) + rng.normal(0, 0.5, 300)
    if ties:  # quantised scores, as 8-bit metrics and label maps produce
        x, y = np.round(x, 1), np.round(y, 1)
    assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert krcc(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert plcc_raw(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert rmse_raw(x, y) == pytest.approx(np.linalg.norm(x - y) / np.sqrt(x.size), rel=1e-12)
    a = agreement(x, y)
    assert a["srcc"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert a["krcc"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert a["plcc_raw"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert a["n"] == 300


def _vqeg(x, b1, b2, b3, b4):
    """VQEG's logistic written out directly (not `logistic4`, which avoids overflow through tanh)."""
    return b2 + (b1 - b2) / (1.0 + np.exp(-(x - b3) / abs(b4)))


def test_fitted_plcc_and_rmse_match_an_independent_computation(rng):
    """PLCC and RMSE after the fit: Pearson / root mean square of the fitted curve, and a least-squares fit no
    worse than scipy's curve_fit run here from its own start on the raw (unstandardised) scale."""
    from scipy.optimize import curve_fit

    x = rng.uniform(0, 60, 400)  # a BRISQUE-like scale
    y = 0.2 + 0.6 / (1 + np.exp(-(x - 30) / 6)) + rng.normal(0, 0.05, 400)
    a = agreement(x, y)
    assert a["fit"]["kind"] == "logistic"
    mapped = _vqeg(x, *a["fit"]["params"])
    assert a["plcc"] == pytest.approx(stats.pearsonr(mapped, y).statistic, abs=1e-9)
    assert a["rmse"] == pytest.approx(np.sqrt(np.mean((mapped - y) ** 2)), rel=1e-9)
    ref, _ = curve_fit(_vqeg, x, y, p0=(y.max(), y.min(), np.median(x), x.std()), maxfev=20000)
    ref_rmse = np.sqrt(np.mean((_vqeg(x, *ref) - y) ** 2))
    assert a["rmse"] <= ref_rmse * (1 + 1e-6)
    assert a["rmse"] == pytest.approx(0.05, rel=0.15)  # the noise level
    assert a["plcc"] > a["plcc_raw"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_training_correlations_are_the_raw_set_against_scipy(rng):
    """The trainer's set (`correlations`): SRCC, KRCC, PLCC and RMSE of the predictions as they are, named
    ``plcc_raw`` / ``rmse_raw`` (no fit), equal to scipy and to the raw values `agreement` reports."""
    t = rng.uniform(0, 1, 250)
    p = t + 0.3 * np.sin(6 * t) + rng.normal(0, 0.1, 250)  # label units, monotone-ish, non-linear
    m = correlations(p, t)
    assert set(m) == {"n", "srcc", "krcc", "plcc_raw", "rmse_raw"}  # no fitted plcc / rmse under a raw name
    assert m["n"] == 250
    assert m["srcc"] == pytest.approx(stats.spearmanr(p, t).statistic, abs=1e-12)
    assert m["krcc"] == pytest.approx(stats.kendalltau(p, t).statistic, abs=1e-12)
    assert m["plcc_raw"] == pytest.approx(stats.pearsonr(p, t).statistic, abs=1e-12)
    assert m["rmse_raw"] == pytest.approx(np.sqrt(((p - t) ** 2).sum() / p.size), rel=1e-12)
    a = agreement(p, t)
    assert (m["srcc"], m["krcc"], m["plcc_raw"]) == (a["srcc"], a["krcc"], a["plcc_raw"])
    assert a["rmse"] < m["rmse_raw"]  # the fitted map only lowers the squared error of a monotone predictor
    groups = np.where(t > 0.5, "hi", "lo")
    g = grouped_correlations(p, t, groups)
    assert list(g) == ["hi", "lo"]
    lo = t <= 0.5
    assert g["lo"]["srcc"] == pytest.approx(stats.spearmanr(p[lo], t[lo]).statistic, abs=1e-12)
    assert g["lo"]["plcc_raw"] == pytest.approx(stats.pearsonr(p[lo], t[lo]).statistic, abs=1e-12)
    assert g["hi"] == correlations(p[~lo], t[~lo])


def test_training_correlations_record_a_diverged_epoch_as_nan():
    m = correlations([0.1, np.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    assert m["n"] == 4 and all(np.isnan(m[k]) for k in ("srcc", "krcc", "plcc_raw", "rmse_raw"))
    constant = correlations([1, 1, 1], [1, 2, 3])
    assert np.isnan(constant["srcc"]) and np.isnan(constant["plcc_raw"])
    assert constant["rmse_raw"] == pytest.approx(np.sqrt(5 / 3))
    with pytest.raises(ValueError, match="differ in length"):
        correlations([1, 2], [1])


def test_undefined_correlations_are_nan():
    assert np.isnan(srcc([1, 1, 1, 1], [1, 2, 3, 4]))
    assert np.isnan(plcc_raw([1, 2], [2, 1]))
    assert np.isnan(rmse_raw([], []))
    a = agreement(np.ones(10), np.arange(10.0))
    assert all(np.isnan(a[k]) for k in ("srcc", "krcc", "plcc", "plcc_raw", "rmse")) and a["fit"] is None
    with pytest.raises(ValueError, match="finite"):
        agreement([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="differ in length"):
        srcc([1, 2, 3], [1, 2])


# ----------------------------------------------------------------------------------------------- logistic fit
def test_logistic_fit_recovers_a_known_curve(rng):
    x = rng.uniform(-30, 80, 400)  # a BRISQUE-like scale: the fit standardises internally
    true = (0.9, 0.2, 25.0, 8.0)
    fit = fit_logistic(x, logistic4(x, *true))
    assert fit.kind == "logistic" and fit.increasing
    np.testing.assert_allclose(fit.params, true, rtol=1e-4, atol=1e-4)


def test_fitted_plcc_beats_raw_plcc_on_a_monotone_nonlinear_relation(rng):
    x = rng.uniform(-3, 3, 500)
    y = 1 / (1 + np.exp(-2.5 * x)) + rng.normal(0, 0.03, 500)
    a = agreement(x, y)
    assert a["fit"]["kind"] == "logistic"
    assert a["plcc"] > a["plcc_raw"] + 0.02
    linear_rmse = np.sqrt(np.mean((np.polyval(np.polyfit(x, y, 1), x) - y) ** 2))
    assert a["rmse"] < linear_rmse
    assert a["rmse"] == pytest.approx(0.03, rel=0.2)  # label units: the noise level once the curve is right


def test_a_predictor_that_ranks_backwards_gets_negative_plcc(rng):
    x = rng.uniform(-3, 3, 300)
    y = 1 / (1 + np.exp(2 * x)) + rng.normal(0, 0.05, 300)
    a = agreement(x, y)
    assert a["srcc"] < -0.8 and a["plcc"] < -0.8 and not a["fit"]["increasing"]


def test_logistic_fit_falls_back_to_a_line(monkeypatch, rng):
    x = rng.normal(size=50)
    y = 2 * x + rng.normal(0, 0.1, 50)

    def broken(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr("scipy.optimize.curve_fit", broken)
    fit = fit_logistic(x, y)
    assert fit.kind == "linear" and fit.increasing
    a = agreement(x, y)
    assert a["plcc"] == pytest.approx(a["plcc_raw"], abs=1e-12)
    # four points cannot carry four parameters: a line, without calling the optimiser
    assert fit_logistic([0.0, 1.0, 2.0, 3.0], [0.1, 0.2, 0.5, 0.9]).kind == "linear"


# --------------------------------------------------------------------------------------------- case bootstrap
def test_every_replicate_is_a_union_of_whole_cases(rng):
    cases = np.array(["a"] * 5 + ["b"] * 2 + ["c"] * 7 + ["d"])
    rng.shuffle(cases)  # rows of a case need not be contiguous
    boot = CaseBootstrap(cases, n_boot=200, seed=3)
    assert boot.n_cases == 4
    for draw, idx in zip(boot.case_draws(), boot, strict=True):
        assert draw.size == 4  # as many draws as cases
        drawn = np.unique(cases)[draw]
        # each drawn case contributes all of its rows, once per draw; undrawn cases none
        for c in np.unique(cases):
            k = int((drawn == c).sum())
            assert int((cases[idx] == c).sum()) == k * int((cases == c).sum())


def test_bootstrap_is_seeded_and_paired():
    cases = np.repeat(np.arange(6), 4)
    a = [idx.tolist() for idx in CaseBootstrap(cases, 20, seed=5)]
    assert a == [idx.tolist() for idx in CaseBootstrap(cases, 20, seed=5)]
    assert a != [idx.tolist() for idx in CaseBootstrap(cases, 20, seed=6)]


def test_identical_images_of_a_case_give_the_interval_of_one_row_per_case(rng):
    """Resampling cases: copying every case's row k times changes nothing (resampling images would)."""
    n_cases, k = 15, 7
    x = rng.normal(size=n_cases)
    y = x + rng.normal(0, 0.7, n_cases)
    one = bootstrap_agreement(x, y, CaseBootstrap(np.arange(n_cases), 300, seed=0), metrics=("srcc", "plcc_raw"))
    cases = np.repeat(np.arange(n_cases), k)
    many = bootstrap_agreement(np.repeat(x, k), np.repeat(y, k), CaseBootstrap(cases, 300, seed=0),
                               metrics=("srcc", "plcc_raw"))
    np.testing.assert_allclose(many["srcc"], one["srcc"], atol=1e-12)
    np.testing.assert_allclose(many["plcc_raw"], one["plcc_raw"], atol=1e-12)
    # an image-level bootstrap of the copies would claim far more certainty
    naive = bootstrap_agreement(np.repeat(x, k), np.repeat(y, k), CaseBootstrap(np.arange(n_cases * k), 300, seed=0),
                                metrics=("srcc",))
    assert np.diff(naive["srcc"])[0] < 0.7 * np.diff(one["srcc"])[0]


def test_case_intervals_are_wider_than_image_intervals_on_clustered_data(rng):
    """Agreement carried by the case effect alone: how much it holds depends on which cases were drawn."""
    cases = np.repeat(np.arange(10), 30)
    effect = rng.normal(0, 1, 10)[cases]
    x = effect + rng.normal(0, 0.5, cases.size)
    y = effect + rng.normal(0, 0.5, cases.size)
    by_case = bootstrap_agreement(x, y, CaseBootstrap(cases, 300, seed=0), metrics=("srcc",))["srcc"]
    by_image = bootstrap_agreement(x, y, CaseBootstrap(np.arange(cases.size), 300, seed=0), metrics=("srcc",))["srcc"]
    assert by_case[1] - by_case[0] > 2 * (by_image[1] - by_image[0])
    point = srcc(x, y)
    assert by_case[0] < point < by_case[1]


def test_bootstrap_reports_all_metrics_and_skips_undefined_scores(rng):
    cases, x, y = clustered(rng, n_cases=8, per_case=10)
    x = x.copy()
    x[::7] = np.nan  # e.g. NIQE on a textureless image
    ci = bootstrap_agreement(x, y, CaseBootstrap(cases, 50, seed=0))
    assert set(M.METRICS) <= set(ci) and ci["n_boot"] == 50
    for m in M.METRICS:
        lo, hi = ci[m]
        assert lo <= hi and ci["n_valid"][m] == 50
    one_case = bootstrap_agreement(x, y, CaseBootstrap(np.zeros(cases.size), 50, seed=0), metrics=("srcc",))
    assert one_case["srcc"] is not None  # one case: every replicate is the same data, a zero-width interval
    assert one_case["srcc"][0] == pytest.approx(one_case["srcc"][1])


# ------------------------------------------------------------------------------------------------ significance
def test_paired_bootstrap_sanity(rng):
    cases, x, y = clustered(rng, n_cases=20, per_case=15, case_sd=0.2)
    boot = CaseBootstrap(cases, 400, seed=0)
    same = paired_bootstrap_srcc(x, x, y, boot)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["ci"] == [0.0, 0.0]
    worse = x + rng.normal(0, 3, x.size)  # a much noisier predictor
    res = paired_bootstrap_srcc(x, worse, y, boot)
    assert res["diff"] > 0.2 and res["ci"][0] > 0 and res["p"] < 0.01
    flipped = paired_bootstrap_srcc(worse, x, y, boot)
    assert flipped["diff"] == pytest.approx(-res["diff"]) and flipped["p"] == pytest.approx(res["p"])


def test_paired_bootstrap_p_values_are_not_small_under_the_null(rng):
    """Two equally good predictors (independent noise): p rarely below 0.05."""
    small = 0
    for rep in range(20):
        r = np.random.default_rng(rep)
        cases, _, y = clustered(r, n_cases=10, per_case=8)
        a, b = y + r.normal(0, 1, y.size), y + r.normal(0, 1, y.size)
        small += paired_bootstrap_srcc(a, b, y, CaseBootstrap(cases, 200, seed=rep))["p"] < 0.05
    assert small <= 3


def test_williams_t_on_steigers_example():
    t, p = williams_t(0.5, 0.4, 0.1, 103)
    assert t == pytest.approx(0.891, abs=1e-3)
    assert p == pytest.approx(2 * stats.t.sf(t, 100))
    assert williams_t(0.4, 0.5, 0.1, 103)[0] == pytest.approx(-t)
    assert williams_t(0.6, 0.6, 0.3, 50) == (0.0, 1.0)
    with pytest.raises(ValueError):
        williams_t(0.5, 0.4, 0.1, 3)


def test_compare_srcc_gives_both_tests(rng):
    cases, x, y = clustered(rng, n_cases=10, per_case=10)
    worse = x + rng.normal(0, 2, x.size)
    worse[0] = np.nan
    out = compare_srcc(x, worse, y, CaseBootstrap(cases, 100, seed=0))
    assert out["bootstrap"]["n_images"] == x.size - 1
    w = out["williams"]
    assert w["n_images"] == x.size - 1 and w["df"] == x.size - 4 and w["t"] > 0
    assert w["r_a"] == pytest.approx(srcc(x[1:], y[1:]))


def test_logistic_jacobian_matches_finite_differences(rng):
    x = rng.normal(size=40)
    for params in [(0.9, 0.1, 0.2, 0.7), (0.2, 0.8, -0.3, -1.3)]:
        jac = M._logistic4_jac(x, *params)
        for k in range(4):
            h = np.zeros(4)
            h[k] = 1e-6
            num = (logistic4(x, *(np.array(params) + h)) - logistic4(x, *(np.array(params) - h))) / 2e-6
            np.testing.assert_allclose(jac[:, k], num, atol=1e-6)


def test_fast_ranks_match_scipy(rng):
    x = np.round(rng.normal(size=500), 1)
    np.testing.assert_array_equal(M._rank(x), stats.rankdata(x))
