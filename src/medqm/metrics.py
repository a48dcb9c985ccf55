"""Agreement between a quality predictor and quality labels, with uncertainty that respects cases.

The one metrics module of MedQM: a stage-independent utility (like `medqm._fs`) that training and
evaluation both use, so a name means one thing wherever it is reported.

The IQA set, by the keys under which every stage reports it:

    srcc       Spearman's rank correlation (ties get average ranks)
    krcc       Kendall's tau-b
    plcc       Pearson's r after the VQEG four-parameter logistic fit, signed by the fitted map's direction
    plcc_raw   Pearson's r of the scores as they are
    rmse       root mean squared error after that fit (label units)
    rmse_raw   root mean squared error of the scores as they are (only for predictions in label units:
               `correlations`, what the trainer reports)

Images of one case (patient, volume, slide) and the distorted versions of one reference are strongly
correlated, so the statistical unit is the *case*: the 95 %
confidence intervals come from a bootstrap that resamples cases with replacement (a cluster bootstrap), and
the test between two methods is a paired bootstrap of cases on the SRCC difference. Williams' t for two
dependent correlations sharing one variable is also given, as the classical reference; it treats images as
independent and so is anti-conservative when images cluster in cases.

Every function takes the predictor *aligned* (higher = better quality; see
`medqm.evaluate.baselines.aligned_score`), so a negative correlation means disagreement.

References:
    - VQEG, "Final report from the Video Quality Experts Group on the validation of objective models of
      video quality assessment, Phase II", 2003 (the four-parameter logistic before PLCC / RMSE).
    - H. R. Sheikh, M. F. Sabir, A. C. Bovik, "A statistical evaluation of recent full reference image
      quality assessment algorithms", IEEE TIP 15(11), 2006 (logistic fit practice in IQA).
    - B. Efron, R. Tibshirani, "An Introduction to the Bootstrap", 1993 (percentile intervals); A. C. Davison,
      D. V. Hinkley, "Bootstrap Methods and their Application", 1997, §3.8 (resampling clusters).
    - E. J. Williams, "The comparison of regression variables", JRSS B 21(2), 1959; J. H. Steiger, "Tests for
      comparing elements of a correlation matrix", Psychological Bulletin 87(2), 1980, eq. 7 (Williams' T2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "CaseBootstrap",
    "LogisticFit",
    "agreement",
    "bootstrap_agreement",
    "compare_srcc",
    "correlations",
    "fit_logistic",
    "grouped_correlations",
    "krcc",
    "logistic4",
    "paired_bootstrap_srcc",
    "plcc_raw",
    "rmse_raw",
    "srcc",
    "williams_t",
]

METRICS = ("srcc", "krcc", "plcc", "plcc_raw", "rmse")


# ---------------------------------------------------------------------------------------------------- basic set
def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(target, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.size} vs {t.size}")
    return p, t


def _degenerate(p: np.ndarray, t: np.ndarray) -> bool:
    return p.size < 3 or np.ptp(p) == 0 or np.ptp(t) == 0


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def _rank(a: np.ndarray) -> np.ndarray:
    """Ranks 1…n with ties averaged: `scipy.stats.rankdata` without its per-call overhead (bootstrap hot path)."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    first = np.empty(s.size, dtype=bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    group = np.cumsum(first) - 1
    bounds = np.append(np.flatnonzero(first), s.size)
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of the 1-based positions a tie group occupies
    r = np.empty(s.size, dtype=np.float64)
    r[order] = mean_rank[group]
    return r


def srcc(pred, target) -> float:
    """Spearman rank correlation (ties get average ranks); NaN when fewer than 3 points or either is constant."""
    p, t = _pair(pred, target)
    if _degenerate(p, t):
        return float("nan")
    return _pearson(_rank(p), _rank(t))


def krcc(pred, target) -> float:
    """Kendall's tau-b (ties accounted for, as `scipy.stats.kendalltau`); NaN when undefined."""
    from scipy.stats import kendalltau

    p, t = _pair(pred, target)
    if _degenerate(p, t):
        return float("nan")
    return float(kendalltau(p, t).statistic)


def plcc_raw(pred, target) -> float:
    """Pearson linear correlation of the raw scores (no logistic fit: see `agreement`); NaN when undefined."""
    p, t = _pair(pred, target)
    if _degenerate(p, t):
        return float("nan")
    return _pearson(p, t)


def rmse_raw(pred, target) -> float:
    """Root mean squared difference of the raw scores from the labels (no fit); NaN when there are none.

    Meaningful only for a predictor in label units (a trained model); `agreement`'s ``rmse`` is after the fit.
    """
    p, t = _pair(pred, target)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else float("nan")


# ----------------------------------------------------------------------------------------- the logistic mapping
def logistic4(x, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """VQEG's four-parameter logistic: ``b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))``.

    ``b1`` and ``b2`` are the upper and lower asymptotes (swapped for a decreasing map), ``b3`` the midpoint
    and ``|b4|`` the width.
    """
    z = -(np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-12)
    return b2 + (b1 - b2) * 0.5 * (1.0 + np.tanh(-z / 2.0))  # the logistic, written to never overflow


def _logistic4_jac(x, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """∂ logistic4 / ∂(b1, b2, b3, b4), (n, 4): lets the optimiser skip finite differences."""
    w = max(abs(b4), 1e-12)
    u = (np.asarray(x, dtype=np.float64) - b3) / w
    s = 0.5 * (1.0 + np.tanh(u / 2.0))
    ds = (b1 - b2) * s * (1.0 - s)
    return np.stack([s, 1.0 - s, -ds / w, -ds * u * np.sign(b4 if b4 != 0 else 1.0) / w], axis=1)


@dataclass(frozen=True)
class LogisticFit:
    """A fitted monotone map from predictor scores to label units.

    Attributes:
        kind: ``'logistic'`` (the VQEG four-parameter logistic) or ``'linear'`` (the fallback when the
            logistic does not converge or fits worse than a straight line).
        params: (b1, b2, b3, b4) for the logistic, in the predictor's own units; (intercept, slope) for linear.
        increasing: whether the map rises with the predictor.
    """

    kind: str
    params: tuple[float, ...]
    increasing: bool

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "logistic":
            return logistic4(x, *self.params)
        return self.params[0] + self.params[1] * x

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": [float(v) for v in self.params], "increasing": self.increasing}


def _linear_fit(p: np.ndarray, t: np.ndarray) -> LogisticFit:
    slope, intercept = np.polyfit(p, t, 1)
    return LogisticFit("linear", (float(intercept), float(slope)), bool(slope >= 0))


def _sse(fit: LogisticFit, p: np.ndarray, t: np.ndarray) -> float:
    r = fit(p) - t
    return float(r @ r)


def fit_logistic(pred, target, *, init: Sequence[float] | None = None, maxfev: int = 2000) -> LogisticFit:
    """Fit VQEG's four-parameter logistic from ``pred`` to ``target`` by least squares.

    The predictor is standardised before fitting (baselines live on very different scales: BRISQUE ~ 0-100,
    total variation ~ 0.05). Two starts are tried, rising and falling (``b1, b2`` = the label maximum and
    minimum or the reverse, ``b3`` = the predictor median, ``b4`` = its standard deviation), and the one with
    the smaller squared error kept; ``init`` (logistic parameters in predictor units, e.g. a previous fit)
    replaces them with a single start. When no start converges, or the logistic fits worse than a straight
    line, the straight line is returned (``kind='linear'``): PLCC after the fit is then the raw PLCC.
    """
    from scipy.optimize import curve_fit

    p, t = _pair(pred, target)
    if p.size < 2 or np.ptp(p) == 0:
        raise ValueError("fit_logistic needs at least two distinct predictor values")
    mu, sd = float(p.mean()), float(p.std())
    z = (p - mu) / sd
    lo, hi = float(t.min()), float(t.max())
    if init is not None:
        b1, b2, b3, b4 = (float(v) for v in init)
        starts = [(b1, b2, (b3 - mu) / sd, b4 / sd)]
    else:
        starts = [(hi, lo, float(np.median(z)), 1.0), (lo, hi, float(np.median(z)), 1.0)]
    best = _linear_fit(p, t)
    best_sse = _sse(best, p, t)
    if p.size <= 4:  # four parameters need more than four points
        starts = []
    for start in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # OptimizeWarning: covariance not estimable — irrelevant here
                params, _ = curve_fit(logistic4, z, t, p0=start, jac=_logistic4_jac, maxfev=maxfev)
        except (RuntimeError, ValueError, TypeError, FloatingPointError):
            continue
        if not np.all(np.isfinite(params)):
            continue
        b1, b2, b3, b4 = (float(v) for v in params)
        fit = LogisticFit("logistic", (b1, b2, b3 * sd + mu, abs(b4) * sd), bool(b1 >= b2))
        err = _sse(fit, p, t)
        if err < best_sse - 1e-12 * max(best_sse, 1e-300):
            best, best_sse = fit, err
    return best


# ------------------------------------------------------------------------------------------- one-shot agreement
def _agreement(p: np.ndarray, t: np.ndarray, *, init=None,
               with_krcc: bool = True) -> tuple[dict[str, float], LogisticFit | None]:
    nan = float("nan")
    if _degenerate(p, t):
        return {"srcc": nan, "krcc": nan, "plcc": nan, "plcc_raw": nan, "rmse": nan}, None
    out = {"srcc": _pearson(_rank(p), _rank(t)), "plcc_raw": _pearson(p, t)}
    out["krcc"] = krcc(p, t) if with_krcc else nan
    fit = fit_logistic(p, t, init=init)
    mapped = fit(p)
    # a monotone map keeps the predictor's direction: a falling fit means disagreement, so PLCC turns negative
    r = _pearson(mapped, t) if np.ptp(mapped) > 0 else 0.0
    out["plcc"] = r if fit.increasing else -r
    out["rmse"] = float(np.sqrt(np.mean((mapped - t) ** 2)))
    return out, fit


def agreement(pred, target) -> dict[str, Any]:
    """SRCC, KRCC, PLCC (after the logistic fit), raw PLCC and RMSE (after the fit, label units).

    ``pred`` must be aligned (higher = better). PLCC after the fit carries the sign of the fitted map's
    direction, so a predictor that ranks images the wrong way round gets a negative PLCC, as its SRCC.
    Metrics are NaN when fewer than 3 points remain or either side is constant. Non-finite predictions are
    an error (drop them first). Returns also ``n`` and the fit (``fit``: see `LogisticFit.to_dict`).
    """
    p, t = _pair(pred, target)
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("agreement: pred and target must be finite (drop NaN scores before)")
    out, fit = _agreement(p, t)
    return {"n": int(p.size), **out, "fit": fit.to_dict() if fit is not None else None}


def correlations(pred, target) -> dict[str, float]:
    """The raw agreement set of a model that predicts in label units, as the trainer reports it.

    ``srcc``, ``krcc``, ``plcc_raw`` and ``rmse_raw`` of the predictions as they are, with ``n``: no logistic
    fit, so no ``plcc`` / ``rmse`` (those are `agreement`'s, after the fit). Raw values are continuous in the
    predictions, so a checkpoint's ``test_metrics.json`` and the evaluation's ``metrics.json`` (which has
    ``plcc_raw`` too) agree to float precision even though training scores cached float16 features and the
    evaluation the images; the fitted PLCC can amplify such differences (a near-step fit). NaN correlations
    when either side is constant or fewer than 3 points; every metric NaN when a value is not finite (a
    diverged epoch is recorded, not an error).
    """
    p, t = _pair(pred, target)
    nan = float("nan")
    out = {"n": int(p.size), "srcc": nan, "krcc": nan, "plcc_raw": nan, "rmse_raw": nan}
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        return out
    out["rmse_raw"] = rmse_raw(p, t)
    if not _degenerate(p, t):
        out.update(srcc=_pearson(_rank(p), _rank(t)), krcc=krcc(p, t), plcc_raw=_pearson(p, t))
    return out


def grouped_correlations(pred, target, groups) -> dict[str, dict[str, float]]:
    """`correlations` per group label (modality, distortion type…), groups in sorted order."""
    pred, target, groups = np.asarray(pred), np.asarray(target), np.asarray(groups)
    return {str(g): correlations(pred[groups == g], target[groups == g]) for g in sorted(set(groups.tolist()))}


# --------------------------------------------------------------------------------------------- case bootstrap
@dataclass
class CaseBootstrap:
    """Seeded bootstrap replicates that resample *cases* (clusters of rows) with replacement.

    Each replicate draws as many cases as there are, with replacement, and takes every row of each drawn
    case (a case drawn twice contributes its rows twice). The same object yields the same replicates every
    time it is iterated, so metrics of different methods computed over it are paired.

    Args:
        cases: the case id of every row (any hashable values).
        n_boot: number of replicates.
        seed: seed of the replicate generator (``numpy.random.default_rng``).
    """

    cases: Sequence[Any]
    n_boot: int = 1000
    seed: int = 0
    _rows: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self):
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")
        codes, _ = _factorize(self.cases)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        self._rows = np.split(order, bounds) if codes.size else []

    @property
    def n_cases(self) -> int:
        return len(self._rows)

    def case_draws(self) -> Iterator[np.ndarray]:
        """The drawn case numbers (0 … n_cases - 1) of each replicate."""
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n_boot):
            yield rng.integers(0, self.n_cases, size=self.n_cases)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Row indices of each replicate."""
        for draw in self.case_draws():
            yield np.concatenate([self._rows[c] for c in draw]) if self.n_cases else np.zeros(0, dtype=np.int64)


def _factorize(values) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray([str(v) for v in values], dtype=object)
    uniques, codes = np.unique(arr, return_inverse=True)
    return codes.astype(np.int64), uniques


def _interval(samples: np.ndarray, level: float) -> list[float] | None:
    s = samples[np.isfinite(samples)]
    if s.size < 2:
        return None
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a])
    return [float(lo), float(hi)]


def bootstrap_agreement(pred, target, boot: CaseBootstrap, *, level: float = 0.95,
                        metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Percentile confidence intervals of the `agreement` metrics over case-bootstrap replicates.

    Rows whose prediction is not finite are left out of every replicate (the row order of ``pred``,
    ``target`` and ``boot.cases`` must match). The logistic fit is redone on every replicate, started from
    the fit on all rows. Returns ``{metric: [lo, hi] or None, ..., 'n_boot': ..., 'n_valid': {metric: count}}``;
    an interval is None when fewer than two replicates give a defined value (e.g. a single case).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    p, t = _pair(pred, target)
    if p.size != len(boot.cases):
        raise ValueError(f"boot covers {len(boot.cases)} rows, pred has {p.size}")
    ok = np.isfinite(p) & np.isfinite(t)
    full_fit = None
    if {"plcc", "rmse"} & set(metrics) and not _degenerate(p[ok], t[ok]):
        full_fit = fit_logistic(p[ok], t[ok])
    init = full_fit.params if full_fit is not None and full_fit.kind == "logistic" else None
    samples = {m: np.full(boot.n_boot, np.nan) for m in metrics}
    need_fit = bool({"plcc", "rmse"} & set(metrics))
    for b, idx in enumerate(boot):
        idx = idx[ok[idx]]
        pb, tb = p[idx], t[idx]
        if _degenerate(pb, tb):
            continue
        if need_fit:
            vals, _ = _agreement(pb, tb, init=init, with_krcc="krcc" in metrics)
        else:
            vals = {"srcc": _pearson(_rank(pb), _rank(tb)), "plcc_raw": _pearson(pb, tb),
                    "krcc": krcc(pb, tb) if "krcc" in metrics else float("nan")}
        for m in metrics:
            samples[m][b] = vals[m]
    out: dict[str, Any] = {m: _interval(samples[m], level) for m in metrics}
    out["n_boot"] = boot.n_boot
    out["n_valid"] = {m: int(np.isfinite(samples[m]).sum()) for m in metrics}
    return out


# ------------------------------------------------------------------------------------------- significance tests
def paired_bootstrap_srcc(pred_a, pred_b, target, boot: CaseBootstrap, *, level: float = 0.95) -> dict[str, Any]:
    """Paired case bootstrap of SRCC(a) - SRCC(b) on the rows where both predictions are finite.

    Both methods are scored on the same resampled cases in every replicate. The two-sided p-value is the
    percentile-interval inversion ``(1 + 2 min(#{d* <= 0}, #{d* >= 0})) / (B + 1)``, capped at 1: the smallest
    level at which the equal-tailed interval of the difference excludes zero.
    Returns diff, ci, p, n_images, n_boot and n_valid (replicates where both SRCCs are defined).
    """
    a, t = _pair(pred_a, target)
    b, _ = _pair(pred_b, target)
    if a.size != len(boot.cases):
        raise ValueError(f"boot covers {len(boot.cases)} rows, pred has {a.size}")
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(t)
    diff = srcc(a[ok], t[ok]) - srcc(b[ok], t[ok])
    d = np.full(boot.n_boot, np.nan)
    for i, idx in enumerate(boot):
        idx = idx[ok[idx]]
        ab, bb, tb = a[idx], b[idx], t[idx]
        if _degenerate(ab, tb) or _degenerate(bb, tb):
            continue
        rt = _rank(tb)
        d[i] = _pearson(_rank(ab), rt) - _pearson(_rank(bb), rt)
    valid = d[np.isfinite(d)]
    if valid.size == 0:
        p = float("nan")
    else:
        tail = min(int((valid <= 0).sum()), int((valid >= 0).sum()))
        p = min(1.0, (1 + 2 * tail) / (valid.size + 1))
    return {"diff": float(diff), "ci": _interval(d, level), "p": p, "n_images": int(ok.sum()),
            "n_boot": boot.n_boot, "n_valid": int(valid.size)}


def williams_t(r12: float, r13: float, r23: float, n: int) -> tuple[float, float]:
    """Williams' t (Steiger 1980, eq. 7) for H0: r12 = r13, two correlations sharing variable 1.

    Here variable 1 is the label and 2, 3 the two predictors; r23 is the correlation between the predictors.
    Returns (t, two-sided p) with n - 3 degrees of freedom. Assumes independent observations.
    """
    from scipy.stats import t as student_t

    if n < 4:
        raise ValueError(f"williams_t needs n >= 4 observations, got {n}")
    det = 1 - r12**2 - r13**2 - r23**2 + 2 * r12 * r13 * r23
    rbar = (r12 + r13) / 2
    den = 2 * (n - 1) / (n - 3) * det + rbar**2 * (1 - r23) ** 3
    if den <= 0:
        return float("nan"), float("nan")
    tval = (r12 - r13) * math.sqrt((n - 1) * (1 + r23) / den)
    return float(tval), float(2 * student_t.sf(abs(tval), n - 3))


def compare_srcc(pred_a, pred_b, target, boot: CaseBootstrap, *, level: float = 0.95) -> dict[str, Any]:
    """Is method a's SRCC different from method b's? Both tests, on the rows where both are finite.

    ``bootstrap``: `paired_bootstrap_srcc` (the primary test: resamples cases). ``williams``: Williams' t on
    the Spearman correlations (ranks), treating images as independent (anti-conservative under clustering).
    """
    a, t = _pair(pred_a, target)
    b, _ = _pair(pred_b, target)
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(t)
    out: dict[str, Any] = {"bootstrap": paired_bootstrap_srcc(a, b, t, boot, level=level)}
    n = int(ok.sum())
    r12, r13, r23 = srcc(a[ok], t[ok]), srcc(b[ok], t[ok]), srcc(a[ok], b[ok])
    if n >= 4 and all(np.isfinite([r12, r13, r23])):
        tval, p = williams_t(r12, r13, r23, n)
        out["williams"] = {"t": tval, "df": n - 3, "p": p, "r_a": r12, "r_b": r13, "r_ab": r23, "n_images": n}
    else:
        out["williams"] = None
    return out
