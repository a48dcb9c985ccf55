"""Agreement between predicted and labelled quality: SRCC, PLCC, KRCC, RMSE (the usual IQA set)."""

from __future__ import annotations

import numpy as np


def correlations(pred, target) -> dict[str, float]:
    """SRCC, PLCC, KRCC and RMSE of ``pred`` against ``target``; NaN correlations when either is constant."""
    from scipy import stats

    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(target, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.shape[0]} vs {t.shape[0]}")
    out = {"n": int(p.size), "rmse": float(np.sqrt(np.mean((p - t) ** 2))) if p.size else float("nan")}
    if p.size < 3 or np.ptp(p) == 0 or np.ptp(t) == 0:
        out.update(srcc=float("nan"), plcc=float("nan"), krcc=float("nan"))
        return out
    out["srcc"] = float(stats.spearmanr(p, t).statistic)
    out["plcc"] = float(stats.pearsonr(p, t).statistic)
    out["krcc"] = float(stats.kendalltau(p, t).statistic)
    return out


def grouped_correlations(pred, target, groups) -> dict[str, dict[str, float]]:
    """`correlations` per group label (modality, distortion type…)."""
    pred, target, groups = np.asarray(pred), np.asarray(target), np.asarray(groups)
    return {str(g): correlations(pred[groups == g], target[groups == g]) for g in sorted(set(groups.tolist()))}


__all__ = ["correlations", "grouped_correlations"]
