"""How learnable is a label set? Two checks that need only the labels and the split.

A blind model can only be as good as its labels are a function of what the image shows. When a diagnostic
model's answers flip at random under mild distortions, the labels carry noise no image model can predict, and
a test SRCC far below 1 says more about the labeller than about the quality model. Before reading (or chasing)
a headline number, measure the ceiling:

- **distortion oracle**: predict each test image's quality by the mean label of its (distortion type, level)
  over the *non-test* (training and validation) cases. It knows exactly how each image was degraded, something a
  blind model must infer, and nothing about the image's content; its SRCC is what recognising the degradation
  perfectly buys.
  A blind model can exceed it only by predicting how each particular image's answers respond, which a few
  dozen training cases rarely teach.
- **severity monotonicity**: within each series (one reference image, one distortion type, its levels),
  Spearman's correlation between the level and the label's loss (−quality). Near 1 when the labeller's loss
  grows with severity, near 0 when it reacts erratically.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medqm.label.reliability import oracle_by_answer_type, retest_srcc, severity_monotonicity
from medqm.metrics import CaseBootstrap, agreement, bootstrap_agreement

__all__ = ["distortion_oracle", "label_reliability", "describe_reliability", "severity_monotonicity"]

ORACLE_KEY = ("type", "level")


def _keys(table) -> list[tuple[str, int]]:
    types = table["type"].fillna("reference").astype(str).to_numpy()
    levels = table["level"].fillna(0).astype(int).to_numpy()
    return list(zip(types, levels, strict=True))


def distortion_oracle(table, split, rows):
    """Per row of ``rows`` (test images), the mean quality of its (type, level) on the split's other cases.

    ``table`` is a label table (all cases), ``split`` a (case_id, split) table, ``rows`` the test rows. NaN
    where no non-test image has the same type and level.
    """
    need = [c for c in ("case_id", "type", "level", "quality") if c not in table]
    if need:
        raise ValueError(f"the label table lacks columns {need} (expected a `medqm label` output)")
    test_cases = set(split.loc[split["split"] == "test", "case_id"].astype(str))
    known = set(split["case_id"].astype(str))
    pool = table[table["case_id"].astype(str).isin(known - test_cases) & table["quality"].notna()]
    if set(pool["case_id"].astype(str)) & set(rows["case_id"].astype(str)):
        raise AssertionError("the oracle's pool shares cases with the rows it predicts")
    means: dict[tuple[str, int], list[float]] = {}
    for k, q in zip(_keys(pool), pool["quality"].to_numpy(dtype=np.float64), strict=True):
        means.setdefault(k, []).append(q)
    table_mean = {k: float(np.mean(v)) for k, v in means.items()}
    return np.array([table_mean.get(k, np.nan) for k in _keys(rows)], dtype=np.float64)


def label_reliability(table, split, rows, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                      pred=None) -> dict[str, Any]:
    """The distortion oracle's agreement with the test labels (case-bootstrap CIs) and severity monotonicity.

    ``pred``: the oracle's predictions of ``rows`` when already made (cross-validation pools each fold's
    `distortion_oracle`); then ``split`` is not used.
    """
    pred = distortion_oracle(table, split, rows) if pred is None else np.asarray(pred, dtype=np.float64)
    y = rows["quality"].to_numpy(dtype=np.float64)
    cases = rows["case_id"].astype(str).to_numpy()
    ok = np.isfinite(pred)
    oracle: dict[str, Any] = {"n_images": int(ok.sum()), "n_uncovered": int((~ok).sum()),
                              "n_cases": int(len(set(cases[ok]))), "key": list(ORACLE_KEY)}
    if ok.sum() >= 2:
        a = agreement(pred[ok], y[ok])
        a.pop("fit", None)
        oracle.update({k: a[k] for k in ("srcc", "plcc", "krcc", "rmse") if k in a})
        ci = bootstrap_agreement(pred[ok], y[ok], CaseBootstrap(cases[ok], n_boot, seed), level=level,
                                 metrics=("srcc",))
        oracle["srcc_ci"] = ci["srcc"]
    else:
        oracle.update(srcc=float("nan"), srcc_ci=None)
    out = {"distortion_oracle": oracle, "monotonicity": severity_monotonicity(table), "pred": pred}
    # properties of the whole label set, as `medqm label` writes them into reliability.json
    retest = retest_srcc(table)
    if retest is not None:
        out["test_retest"] = retest
    by_type = oracle_by_answer_type(table)
    if by_type:
        out["oracle_loco_by_answer_type"] = by_type
    return out


def describe_reliability(rel: dict[str, Any], main: str | None = None, main_srcc: float | None = None) -> list[str]:
    """Plain-language sentences for the report."""
    o, m = rel["distortion_oracle"], rel["monotonicity"]
    out = []
    s = o.get("srcc")
    s = float("nan") if s is None else s
    if not np.isfinite(s) and o.get("n_images"):
        out.append("Label ceiling: undefined on these test images (their labels, or the mean labels of their "
                   "distortion types and levels, are constant).")
    if np.isfinite(s):
        ci = o.get("srcc_ci")
        cis = f" (95 % CI {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""
        out.append(
            f"Label ceiling (for a model that only recognises the degradation): an oracle that knows each test "
            f"image's distortion type and level, and predicts the mean label of that type and level on the "
            f"training and validation cases, reaches SRCC {s:.3f}{cis} on "
            f"{o['n_images']} test images" + (f" ({o['n_uncovered']} with no training counterpart left out)"
                                                if o["n_uncovered"] else "") + ".")
        if main is not None and main_srcc is not None and np.isfinite(main_srcc):
            out.append(f"{main} reaches {main_srcc:.3f}, {main_srcc / s:.0%} of it." if s > 0 else
                       f"{main} reaches {main_srcc:.3f}.")
    if m["mean_rho"] is not None and np.isfinite(m["mean_rho"]):
        out.append(
            f"Severity monotonicity: within a series (one reference, one distortion type, its levels) the label's "
            f"loss follows the level with mean Spearman ρ = {m['mean_rho']:.2f}; {m['frac_rho_ge_0.8']:.0%} of "
            f"{m['n_series']} series have ρ ≥ 0.8" + (f" ({m['n_flat']} series with constant labels left out)"
                                                       if m["n_flat"] else "") + ".")
        per = m.get("by_answer_type") or {}
        if per:
            out.append("Per question type, the answer's loss follows the level with mean ρ: "
                       + ", ".join(f"{k} {v['mean_rho']:.2f}" for k, v in
                                   sorted(per.items(), key=lambda kv: -kv[1]["mean_rho"])) + ".")
        if m["mean_rho"] < 0.6:
            out.append("The labeller reacts erratically to severity: expect a low ceiling for any blind model on "
                       "these labels, whatever its design.")
    rt = rel.get("test_retest")
    if rt and rt.get("flip") is not None and np.isfinite(rt["flip"]):
        out.append(f"Test–retest: the loss measured on the mirrored images (answers mirrored) agrees with the loss on "
                   f"the originals at Spearman {rt['flip']:.3f} over {rt['n_images']} distorted images (all cases).")
    by = rel.get("oracle_loco_by_answer_type") or {}
    if by:
        out.append("Per question type, the same oracle (leave one case out, all cases) on that type's own loss: "
                   + ", ".join(f"{k} {v['srcc']:.2f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]["srcc"]))
                   + ".")
    return out
