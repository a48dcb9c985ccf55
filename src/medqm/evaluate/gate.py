"""Quality-gate thresholds with a guarantee about the MLLM: distribution-free risk control on MedQM-D labels.

A gate passes an image when its quality score is at least ``t``. The risk is defined on the labels, so the
guarantee speaks about the diagnostic model, not about pixels. Per image, with D its diagnostic loss (nats):

- ``lost-answer-rate``: L = 1[D > ln 2], the correct answers became less than half as likely;
- ``mean-loss``: L = min(max(D, 0), B), the loss in nats, capped at ``loss_cap`` B (an answer made more likely
  counts 0; the cap bounds a single image's weight, and the guarantee is about the capped loss).

Images of one case are not independent, so everything is computed over cases (the exchangeable unit): for
case c with m_c labelled images, a_c(t) = Σ_{i∈c} L_i·1[s_i ≥ t] / m_c and b_c(t) = Σ_{i∈c} 1[s_i ≥ t] / m_c.
The risk on passed images is R(t) = E[r_c(t) | b_c(t) > 0] with r_c = a_c / b_c, the share of a case's passed
images that lost the answer (or their mean loss), averaged over the cases that have any image passed.

Two ways to choose the lowest threshold, on a grid of candidates fixed before the losses are seen:

- ``ltt`` (Learn then Test, Angelopoulos et al., 2021): for each candidate, test H0: R(t) > α on the n_t
  calibration cases with an image passed (given n_t, their r_c are iid draws from the cases the gate lets
  through, values in [0, B]) with the Hoeffding–Bentkus p-value of the mean r̄ (Bates et al., 2021):
  p(t) = min(exp(−n_t·h(min(r̄/B, α/B), α/B)), e·P[Binomial(n_t, α/B) ≤ ⌈n_t·r̄/B⌉]), h(a, b) = a·ln(a/b) +
  (1 − a)·ln((1 − a)/(1 − b)); Bonferroni over the K candidates: every t with p(t) ≤ δ/K is safe, and the
  lowest safe one is chosen. With probability ≥ 1 − δ over the calibration cases, R(t̂) ≤ α: among the
  images the gate passes, the risk is at most α.
- ``crc`` (Conformal Risk Control, Angelopoulos et al., 2022): the joint loss a_c(t) is non-increasing in t
  and bounded by B; the lowest t with (n·mean_c a_c(t) + B) / (n + 1) ≤ α gives E[a(t̂)] ≤ α in expectation
  over calibration and a new case: the expected loss per *submitted* image, a rejected image counting 0.

`calibrate` returns a `GateThreshold`; `validity_check` repeats calibration on random case splits and
measures the realised risk on the held-out cases; `risk_coverage` is the curve a report draws. `Gate` is the
``gate.json`` that `medqm gate calibrate` writes and `medqm serve --gate` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LN2 = math.log(2.0)
RISKS = ("lost-answer-rate", "mean-loss")
METHODS = ("ltt", "crc")
GATE_FORMAT = "medqm-gate/1"
DEFAULT_LOSS_CAP = 4 * LN2  # a 16-fold drop in the correct answers' likelihood
# candidate thresholds for MedQM-I's quality (in [0, 1]): fixed before any label is seen
QUALITY_GRID = tuple(round(float(v), 2) for v in np.linspace(0.05, 0.95, 19))


def image_losses(diag_loss, risk: str, loss_cap: float = DEFAULT_LOSS_CAP) -> np.ndarray:
    """Per-image loss L from the diagnostic loss D (nats) under ``risk`` (see the module docstring)."""
    d = np.asarray(diag_loss, dtype=np.float64)
    if np.isnan(d).any():
        raise ValueError("diagnostic losses contain NaN")
    if risk == "lost-answer-rate":
        return (d > LN2).astype(np.float64)
    if risk == "mean-loss":
        if not loss_cap > 0:
            raise ValueError(f"loss_cap must be positive, got {loss_cap}")
        return np.clip(d, 0.0, loss_cap)
    raise ValueError(f"unknown risk {risk!r}; one of {RISKS}")


def loss_bound(risk: str, loss_cap: float = DEFAULT_LOSS_CAP) -> float:
    """B, the largest value one image's loss can take."""
    return 1.0 if risk == "lost-answer-rate" else float(loss_cap)


def case_curves(scores, losses, cases, grid: Sequence[float]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(a, b, case ids): a[c, k] and b[c, k] of the module docstring at threshold grid[k], one row per case."""
    s = np.asarray(scores, dtype=np.float64)
    ell = np.asarray(losses, dtype=np.float64)
    cases = np.asarray([str(c) for c in cases])
    if not (len(s) == len(ell) == len(cases)):
        raise ValueError("scores, losses and cases must have the same length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN (unscored images must be left out before calibrating)")
    t = np.asarray(grid, dtype=np.float64)
    ids, inv = np.unique(cases, return_inverse=True)
    passed = (s[:, None] >= t[None, :]).astype(np.float64)  # (images, K)
    m = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    a = np.zeros((len(ids), len(t)))
    b = np.zeros((len(ids), len(t)))
    np.add.at(a, inv, passed * ell[:, None])
    np.add.at(b, inv, passed)
    return a / m[:, None], b / m[:, None], ids.tolist()


def hoeffding_bentkus_pvalue(mean: float, n: int, alpha: float) -> float:
    """p-value of H0: E[X] > ``alpha`` for n iid X in [0, 1] with sample mean ``mean`` (Bates et al., 2021);
    1 when n = 0."""
    from scipy.stats import binom

    if n <= 0:
        return 1.0
    a = min(float(mean), alpha)
    eps = 1e-12
    h = 0.0 if a >= alpha else (a * math.log(max(a, eps) / alpha) + (1 - a) * math.log((1 - a) / (1 - alpha)))
    p_hoeffding = math.exp(-n * h)
    p_bentkus = math.e * float(binom.cdf(math.ceil(n * float(mean) - 1e-9), n, alpha))
    return float(min(1.0, p_hoeffding, p_bentkus))


@dataclass
class GateThreshold:
    """One calibrated threshold: pass when the score is at least ``pass_min`` (None: no candidate is safe)."""

    pass_min: float | None
    method: str
    risk: str
    alpha: float
    delta: float | None
    n_cases: int
    n_images: int
    calibration_risk: float | None  # on the calibration cases, the risk ``method`` controls (see realised_risk)
    pass_rate: float  # case-weighted fraction of calibration images passed at pass_min (0 when None)
    grid: list[float] = field(default_factory=list)
    p_values: list[float] | None = None  # ltt: per candidate

    @property
    def attained(self) -> bool:
        return self.pass_min is not None

    def guarantee(self) -> str:
        """The promise, in one sentence, or why there is none."""
        if not self.attained:
            return (f"no threshold controls {self.risk} at α = {self.alpha:g} with {self.n_cases} calibration cases: "
                    "nothing passes")
        lost = self.risk == "lost-answer-rate"
        if self.method == "ltt":
            what = ("the correct answer becomes less than half as likely for at most a fraction" if lost
                    else "the mean diagnostic loss (nats, capped) is at most")
            return (f"with probability ≥ {1 - self.delta:g} over the calibration, among the images that pass {what} "
                    f"α = {self.alpha:g} (Learn then Test, {self.n_cases} cases)")
        what = ("the share of submitted images that pass yet whose correct answer becomes less than half as likely"
                if lost else "the diagnostic loss (nats, capped) per submitted image, rejected images counting 0,")
        return f"in expectation, {what} is at most α = {self.alpha:g} (conformal risk control, {self.n_cases} cases)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "attained": self.attained, "guarantee": self.guarantee()}


def calibrate(scores, diag_loss, cases, *, alpha: float, delta: float = 0.1, risk: str = "lost-answer-rate",
              method: str = "ltt", loss_cap: float = DEFAULT_LOSS_CAP,
              grid: Sequence[float] = QUALITY_GRID) -> GateThreshold:
    """The lowest threshold on ``grid`` whose risk on passed images is controlled at ``alpha`` (module docstring).

    ``scores``: higher is better (a quality); ``diag_loss``: MedQM-D's D per image, in nats; ``cases``: the case
    of each image (the exchangeable unit: never calibrate on cases the score model was trained on).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if not 0 < alpha:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if method == "ltt" and not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    losses = image_losses(diag_loss, risk, loss_cap)
    bound = loss_bound(risk, loss_cap)
    grid = sorted(float(g) for g in grid)
    a, b, ids = case_curves(scores, losses, cases, grid)
    n = len(ids)
    if n == 0:
        raise ValueError("no calibration images")
    a_bar, b_bar = a.mean(0), b.mean(0)
    if method == "ltt":
        p = np.ones(len(grid))
        if alpha < bound:
            for j in range(len(grid)):
                sel = b[:, j] > 0
                r = a[sel, j] / b[sel, j]
                p[j] = hoeffding_bentkus_pvalue(r.mean() / bound if len(r) else 0.0, int(sel.sum()), alpha / bound)
        else:  # the risk can never exceed α: every candidate is safe
            p[:] = 0.0
        safe = np.flatnonzero(p <= delta / len(grid))
        k = int(safe.min()) if len(safe) else None
        p_values = [float(v) for v in p]
    else:
        ok = np.flatnonzero((n * a_bar + bound) / (n + 1) <= alpha)
        # a_bar is non-increasing in t, so the safe set is an upper interval of the grid: take its lowest point
        k = int(ok.min()) if len(ok) else None
        p_values = None
    if k is None or b_bar[k] == 0:
        risk_hat = None
    else:
        risk_hat = _case_risk(a[:, k], b[:, k]) if method == "ltt" else float(a_bar[k])
    return GateThreshold(
        pass_min=grid[k] if k is not None else None, method=method, risk=risk, alpha=float(alpha),
        delta=float(delta) if method == "ltt" else None, n_cases=n, n_images=len(losses),
        calibration_risk=risk_hat, pass_rate=float(b_bar[k]) if k is not None else 0.0, grid=grid,
        p_values=p_values)


def _case_risk(a: np.ndarray, b: np.ndarray) -> float:
    """R̂: the mean of a_c / b_c over the cases with an image passed (NaN when none)."""
    sel = b > 0
    return float(np.mean(a[sel] / b[sel])) if sel.any() else float("nan")


def realised_risk(scores, diag_loss, cases, pass_min: float | None, *, risk: str, method: str = "ltt",
                  loss_cap: float = DEFAULT_LOSS_CAP) -> tuple[float, float]:
    """(risk, pass rate) of a threshold on labelled images, as ``method`` guarantees it: for ``ltt`` the
    case-averaged risk among passed images (NaN when nothing passes), for ``crc`` the mean over cases of the
    loss per submitted image, rejected images counting 0."""
    if pass_min is None:
        return (float("nan") if method == "ltt" else 0.0), 0.0
    a, b, _ = case_curves(scores, image_losses(diag_loss, risk, loss_cap), cases, [pass_min])
    r = _case_risk(a[:, 0], b[:, 0]) if method == "ltt" else float(a.mean())
    return r, float(b.mean())


def validity_check(scores, diag_loss, cases, *, alpha: float, delta: float = 0.1, risk: str = "lost-answer-rate",
                   method: str = "ltt", loss_cap: float = DEFAULT_LOSS_CAP, grid: Sequence[float] = QUALITY_GRID,
                   n_splits: int = 200, calibration_fraction: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Calibrate on a random half of the cases, measure the realised risk on the other half; repeat.

    Reports how often a threshold was found, how often the realised risk (as the method defines it,
    `realised_risk`) on the held-out cases exceeded α (``violation_rate``, over splits where something passed;
    for ``ltt`` about δ or less, for ``crc`` a guarantee in expectation only, so the mean held-out risk is the
    figure to compare with α; both up to the held-out cases' own sampling error), and the held-out pass rate.
    """
    cases = np.asarray([str(c) for c in cases])
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(diag_loss, dtype=np.float64)
    ids = np.unique(cases)
    if len(ids) < 4:
        raise ValueError(f"a validity check needs at least 4 cases, got {len(ids)}")
    rng = np.random.default_rng(seed)
    n_cal = max(1, min(len(ids) - 1, round(calibration_fraction * len(ids))))
    found, violated, risks, rates = 0, 0, [], []
    for _ in range(n_splits):
        cal = set(rng.choice(ids, size=n_cal, replace=False).tolist())
        m = np.fromiter((c in cal for c in cases), bool, len(cases))
        g = calibrate(s[m], d[m], cases[m], alpha=alpha, delta=delta, risk=risk, method=method, loss_cap=loss_cap,
                      grid=grid)
        r, rate = realised_risk(s[~m], d[~m], cases[~m], g.pass_min, risk=risk, method=method, loss_cap=loss_cap)
        rates.append(rate)
        if g.attained and rate > 0:
            found += 1
            risks.append(r)
            violated += int(r > alpha)
    return {"alpha": alpha, "delta": delta, "risk": risk, "method": method, "n_splits": n_splits,
            "n_cases": len(ids), "n_calibration_cases": n_cal, "attained": found,
            "violation_rate": violated / found if found else float("nan"),
            "mean_heldout_risk": float(np.mean(risks)) if risks else float("nan"),
            "mean_heldout_pass_rate": float(np.mean(rates)),
            "pass_rate_interval": [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))]}


def risk_coverage(scores, diag_loss, *, risk: str = "lost-answer-rate", loss_cap: float = DEFAULT_LOSS_CAP,
                  points: int = 50) -> dict[str, list[float]]:
    """Image-level risk among passed images against the fraction passed, as the threshold sweeps the scores."""
    s = np.asarray(scores, dtype=np.float64)
    ell = image_losses(diag_loss, risk, loss_cap)
    order = np.argsort(-s, kind="stable")
    cum = np.cumsum(ell[order])
    n = len(s)
    ks = np.unique(np.linspace(1, n, min(points, n)).round().astype(int))
    return {"coverage": (ks / n).tolist(), "risk": (cum[ks - 1] / ks).tolist(),
            "threshold": s[order][ks - 1].tolist()}


@dataclass
class Gate:
    """``gate.json``: calibrated pass thresholds (overall and per modality) with their guarantees."""

    risk: str
    method: str
    alpha: float
    delta: float | None
    loss_cap: float | None
    default: GateThreshold
    by_modality: dict[str, GateThreshold] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # modality → why it uses the default
    provenance: dict[str, Any] = field(default_factory=dict)  # labels, model, calibration cases

    def threshold_for(self, modality: str | None) -> GateThreshold:
        """The modality's own threshold when it was calibrated, else the overall one."""
        return self.by_modality.get(modality or "", self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"format": GATE_FORMAT, "risk": self.risk, "method": self.method, "alpha": self.alpha,
                "delta": self.delta, "loss_cap": self.loss_cap, "default": self.default.to_dict(),
                "by_modality": {k: v.to_dict() for k, v in sorted(self.by_modality.items())},
                "fallbacks": dict(sorted(self.fallbacks.items())), "provenance": self.provenance}

    def save(self, path: str | Path) -> Path:
        from medqm._fs import write_json

        return write_json(self.to_dict(), path, allow_nan=False)

    @classmethod
    def load(cls, path: str | Path) -> Gate:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable gate file ({e})") from e
        if not isinstance(d, dict) or d.get("format") != GATE_FORMAT:
            raise ValueError(f"{path}: not a MedQM gate file (format {GATE_FORMAT!r} expected)")

        def thr(x: dict) -> GateThreshold:
            keep = {k: x[k] for k in GateThreshold.__dataclass_fields__ if k in x}
            return GateThreshold(**keep)

        try:
            return cls(risk=d["risk"], method=d["method"], alpha=d["alpha"], delta=d.get("delta"),
                       loss_cap=d.get("loss_cap"), default=thr(d["default"]),
                       by_modality={k: thr(v) for k, v in d.get("by_modality", {}).items()},
                       fallbacks=d.get("fallbacks", {}), provenance=d.get("provenance", {}))
        except KeyError as e:
            raise ValueError(f"{path}: not a valid MedQM gate file (missing {e.args[0]!r})") from e
        except (TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a valid MedQM gate file ({e})") from e


def calibrate_gate(scores, diag_loss, cases, modalities, *, alpha: float, delta: float = 0.1,
                   risk: str = "lost-answer-rate", method: str = "ltt", loss_cap: float = DEFAULT_LOSS_CAP,
                   by_modality: bool = False, min_cases: int = 20, grid: Sequence[float] = QUALITY_GRID,
                   provenance: dict[str, Any] | None = None) -> Gate:
    """A `Gate`: the overall threshold, and with ``by_modality`` one per modality that has ``min_cases`` cases
    (the others fall back to the overall threshold, and the gate says so)."""
    kw = {"alpha": alpha, "delta": delta, "risk": risk, "method": method, "loss_cap": loss_cap, "grid": grid}
    s, d = np.asarray(scores, dtype=np.float64), np.asarray(diag_loss, dtype=np.float64)
    cases, mods = np.asarray([str(c) for c in cases]), np.asarray([str(m) for m in modalities])
    gate = Gate(risk=risk, method=method, alpha=float(alpha), delta=float(delta) if method == "ltt" else None,
                loss_cap=float(loss_cap) if risk == "mean-loss" else None, default=calibrate(s, d, cases, **kw),
                provenance=dict(provenance or {}))
    if by_modality:
        for mod in sorted(set(mods.tolist())):
            m = mods == mod
            n_cases = len(set(cases[m].tolist()))
            if n_cases < min_cases:
                gate.fallbacks[mod] = f"{n_cases} calibration cases < {min_cases}: the overall threshold applies"
                continue
            g = calibrate(s[m], d[m], cases[m], **kw)
            if g.attained:
                gate.by_modality[mod] = g
            else:
                gate.fallbacks[mod] = f"no safe threshold with its {n_cases} cases: the overall threshold applies"
    return gate



def gate_from_labels(labels: str | Path, model: str | Path | None = None, *, alpha: float, delta: float = 0.1,
                     risk: str = "lost-answer-rate", method: str = "ltt", loss_cap: float = DEFAULT_LOSS_CAP,
                     by_modality: bool = False, min_cases: int = 20, split_file: str | Path | None = None,
                     cache_dir: str | Path | None = None, batch_size: int = 32, runtime: str = "auto",
                     say=None) -> Gate:
    """Calibrate a gate for a MedQM-I checkpoint on a `medqm label` output (the cases it never saw).

    The checkpoint's ``split.csv`` (or ``split_file``) names the cases it was trained and validated on; their
    images are left out, the others are scored (cached under ``cache_dir``) and calibrate the gate. Images that
    fail to score are left out and counted.
    """
    from medqm._fs import cache_dir as default_cache_dir
    from medqm.label import read_labels
    from medqm.model import checkpoint_info, default_checkpoint

    from ._scoring import checkpoint_digest, checkpoint_split, score_checkpoint

    say = say or (lambda _m: None)
    model_dir = Path(model) if model is not None else default_checkpoint()
    checkpoint_info(model_dir)  # a clear error for a folder that is not a checkpoint
    split = Path(split_file) if split_file else checkpoint_split(model_dir)
    if split is None:
        raise FileNotFoundError(f"{model_dir} has no split.csv: pass the split it was trained with (--split FILE), "
                                "so that its training cases are kept out of the calibration")
    from medqm.train import load_split

    sp = load_split(split)
    seen = set(sp.loc[sp["split"].isin(["train", "val"]), "case_id"].astype(str))
    table = read_labels(labels)
    for col in ("path", "case_id", "modality", "diag_loss"):
        if col not in table:
            raise ValueError(f"{labels}: the label table lacks column {col!r} (expected a `medqm label` output)")
    table = table.assign(case_id=table["case_id"].astype(str))
    rows = table[~table["case_id"].isin(seen) & table["diag_loss"].notna()].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{labels}: every labelled case was used to train or validate {model_dir}; calibrate on "
                         "labels of other cases")
    say(f"calibration: {len(rows)} images of {rows['case_id'].nunique()} cases "
        f"({table['case_id'].nunique() - rows['case_id'].nunique()} cases left out: the checkpoint trained on them)")
    cache = Path(cache_dir) if cache_dir else default_cache_dir("scores")
    scored = score_checkpoint(model_dir, rows["path"].tolist(), cache, name="gate", batch_size=batch_size,
                              runtime=runtime)
    ok = scored["quality"].notna().to_numpy()
    if not ok.all():
        say(f"{int((~ok).sum())} images could not be scored and are left out")
    rows = rows[ok]
    meta = table.attrs.get("medqm", {})
    provenance = {
        "labels": str(Path(labels).resolve()), "label_model": meta.get("model_id"),
        "label_model_revision": meta.get("model_revision"),
        "model": str(model_dir.resolve()), "model_digest": checkpoint_digest(model_dir),
        "split": str(Path(split).resolve()), "n_images": int(len(rows)), "n_cases": int(rows["case_id"].nunique()),
        "excluded_cases": len(seen & set(table["case_id"])),
    }
    return calibrate_gate(scored["quality"].to_numpy()[ok], rows["diag_loss"].to_numpy(), rows["case_id"].to_numpy(),
                          rows["modality"].to_numpy(), alpha=alpha, delta=delta, risk=risk, method=method,
                          loss_cap=loss_cap, by_modality=by_modality, min_cases=min_cases, provenance=provenance)



def quantile_grid(scores, levels: Sequence[float] = tuple(np.linspace(0.05, 0.95, 19))) -> list[float]:
    """Candidate thresholds at quantiles of a method's scores (scores only, never losses), for scores on any
    scale: at the same level, every method passes about the same share of images."""
    return sorted({float(v) for v in np.quantile(np.asarray(scores, dtype=np.float64), levels)})


def compare_gates(scores: dict[str, np.ndarray], diag_loss, cases, *, reference: str,
                  risk: str = "lost-answer-rate", alphas: Sequence[float] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
                  delta: float = 0.1, loss_cap: float = DEFAULT_LOSS_CAP, n_splits: int = 200, n_boot: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """Gates of several quality scores (higher = better) on the same labelled images, for a report.

    For each method: its risk–coverage curve; then, for each calibration method (ltt, crc), at the smallest
    α of ``alphas`` that ``reference`` attains in at least half of the validity check's splits (calibration on
    half the cases), every method's threshold calibrated on all these images, its pass
    rate with a case-bootstrap 95 % interval, and the validity check over ``n_splits`` case splits. Candidate
    thresholds are each method's score quantiles. Images any method failed to score are left out.
    """
    d = np.asarray(diag_loss, dtype=np.float64)
    cases = np.asarray([str(c) for c in cases])
    ok = np.isfinite(d) & np.all([np.isfinite(np.asarray(v, dtype=np.float64)) for v in scores.values()], axis=0)
    sc = {k: np.asarray(v, dtype=np.float64)[ok] for k, v in scores.items()}
    d, cases = d[ok], cases[ok]
    ids, inv = np.unique(cases, return_inverse=True)
    rng = np.random.default_rng(seed)
    boot = [np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids)) for _ in range(n_boot)]
    out: dict[str, Any] = {"risk": risk, "delta": delta, "loss_cap": loss_cap if risk == "mean-loss" else None,
                           "n_images": int(len(d)), "n_cases": int(len(ids)), "reference": reference,
                           "curves": {k: risk_coverage(v, d, risk=risk, loss_cap=loss_cap) for k, v in sc.items()},
                           "methods": {}}
    grids = {k: quantile_grid(v) for k, v in sc.items()}
    for method in METHODS:
        # the smallest α the reference attains in at least half of the validity splits (half the cases each)
        alpha = next((a for a in alphas if 2 * validity_check(
            sc[reference], d, cases, alpha=a, delta=delta, risk=risk, method=method, loss_cap=loss_cap,
            grid=grids[reference], n_splits=n_splits, seed=seed)["attained"] >= n_splits), None)
        entry: dict[str, Any] = {"alpha": alpha, "alphas_tried": list(alphas), "by_method": {}}
        if alpha is not None:
            for name, v in sc.items():
                g = calibrate(v, d, cases, alpha=alpha, delta=delta, risk=risk, method=method, loss_cap=loss_cap,
                              grid=grids[name])
                rates = []
                if g.attained:
                    a, b, _ = case_curves(v, image_losses(d, risk, loss_cap), cases, [g.pass_min])
                    rates = [float(np.average(b[:, 0], weights=w)) for w in boot if w.sum() > 0]
                v_check = validity_check(v, d, cases, alpha=alpha, delta=delta, risk=risk, method=method,
                                         loss_cap=loss_cap, grid=grids[name], n_splits=n_splits, seed=seed)
                entry["by_method"][name] = {
                    "pass_min": g.pass_min, "pass_rate": g.pass_rate, "calibration_risk": g.calibration_risk,
                    "pass_rate_ci": [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))]
                    if rates else None, "validity": v_check}
        out["methods"][method] = entry
    return out


__all__ = ["DEFAULT_LOSS_CAP", "GATE_FORMAT", "METHODS", "QUALITY_GRID", "RISKS", "Gate", "GateThreshold",
           "calibrate", "calibrate_gate", "case_curves", "compare_gates", "gate_from_labels",
           "hoeffding_bentkus_pvalue", "image_losses", "loss_bound", "quantile_grid", "realised_risk",
           "risk_coverage", "validity_check"]
