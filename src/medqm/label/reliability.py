"""Severity monotonicity of a label set: does the labeller's loss grow with the distortion level?

Within each series (one reference image, one distortion type, its levels), Spearman's correlation between
the level and the label's loss (−quality): near 1 when the labelling model's loss grows with severity, near 0
when it reacts erratically, which caps what any blind quality model can learn from the labels. Computed by
`medqm label` on its output (``reliability.json``) and by `medqm evaluate`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from scipy.stats import spearmanr


def _srcc(a, b) -> float:
    return float(spearmanr(a, b)[0])


def severity_monotonicity(table, *, min_levels: int = 3) -> dict[str, Any]:
    """Spearman(level, −quality) within each (ref_id, type) series of distorted images.

    Series with fewer than ``min_levels`` levels, or whose labels are all equal, are skipped (counted).
    """
    need = [c for c in ("ref_id", "type", "level", "quality") if c not in table]
    if need:
        raise ValueError(f"the label table lacks columns {need} (expected a `medqm label` output)")
    t = table[table["quality"].notna() & table["level"].fillna(0).astype(int).gt(0)]
    rhos, flat = [], 0
    for _, g in t.groupby(["ref_id", "type"], sort=True):
        lv = g["level"].to_numpy(dtype=np.float64)
        q = g["quality"].to_numpy(dtype=np.float64)
        if len(np.unique(lv)) < min_levels:
            continue
        if np.ptp(q) == 0:
            flat += 1
            continue
        rhos.append(_srcc(lv, -q))
    r = np.asarray(rhos, dtype=np.float64)
    out = {"mean_rho": float(r.mean()) if r.size else float("nan"),
           "median_rho": float(np.median(r)) if r.size else float("nan"),
           "frac_rho_ge_0.8": float((r >= 0.8).mean()) if r.size else float("nan"),
           "n_series": int(r.size), "n_flat": int(flat), "min_levels": min_levels}
    if {"answer_types", "nll_ref_items", "nll_dist_items"} <= set(t.columns):
        out["by_answer_type"] = _per_question(t, min_levels)
    return out


def _items(v) -> list:
    if isinstance(v, str):
        return json.loads(v)
    return [] if v is None else list(v)


def _per_question(t, min_levels: int) -> dict[str, dict[str, float]]:
    """Mean Spearman(level, NLL_dist − NLL_ref) per answer type, one series per (ref_id, type, question)."""
    series: dict[tuple, list[tuple[float, float]]] = {}
    answer: dict[tuple, str] = {}
    for ref, typ, lv, at, a, b in zip(t["ref_id"], t["type"], t["level"], t["answer_types"],
                                      t["nll_ref_items"], t["nll_dist_items"]):
        at, a, b = _items(at), _items(a), _items(b)
        if not (len(at) == len(a) == len(b)):
            continue
        for i, (kind, x, y) in enumerate(zip(at, a, b)):
            key = (ref, typ, i)
            series.setdefault(key, []).append((float(lv), float(y) - float(x)))
            answer[key] = str(kind)
    by: dict[str, list[float]] = {}
    for key, pts in series.items():
        lv, d = np.array(pts).T
        if len(np.unique(lv)) < min_levels or np.ptp(d) == 0:
            continue
        by.setdefault(answer[key], []).append(_srcc(lv, d))
    return {k: {"mean_rho": float(np.mean(v)), "n_series": len(v)} for k, v in sorted(by.items())}
