"""How reliable is a label set? Three figures, computed by `medqm label` on its output (``reliability.json``).

- **Severity monotonicity**: within each series (one reference image, one distortion type, its levels),
  Spearman's correlation between the level and the label's loss (−quality): near 1 when the labelling
  model's loss grows with severity, near 0 when it reacts erratically, which caps what any blind quality
  model can learn from the labels. Also computed by `medqm evaluate`.
- **Distortion-oracle ceiling, leave one case out**: each distorted image's quality predicted by the mean
  quality of the same (type, level) over the *other* cases; Spearman over all images pooled. What a model
  that recognises only the degradation could reach, over every case rather than one test split.
- **Test–retest** (labels made with ``views`` ≥ 2): Spearman between the D of view 0 (the original) and
  view 1 (mirrored, answers mirrored), and view 0 against views 2 and 3 (shift, both) when present: how much
  of a label survives a change the image's quality does not see.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from medqm.metrics import srcc


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
        rhos.append(srcc(lv, -q))
    r = np.asarray(rhos, dtype=np.float64)
    out = {"mean_rho": float(r.mean()) if r.size else float("nan"),
           "median_rho": float(np.median(r)) if r.size else float("nan"),
           "frac_rho_ge_0.8": float((r >= 0.8).mean()) if r.size else float("nan"),
           "n_series": int(r.size), "n_flat": int(flat), "min_levels": min_levels}
    if {"answer_types", "nll_ref_items", "nll_dist_items"} <= set(t.columns):
        out["by_answer_type"] = _per_question(t, min_levels)
    return out


def _json_list(value) -> list | None:
    """A list cell of the label table (JSON text, or a list / array as Parquet may give it); None when empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return json.loads(value) if value.strip() else None
    return list(value)


def _items(v) -> list:
    return _json_list(v) or []


def _item_losses(row) -> list | None:
    """The row's per-question losses: ``loss_items``, or for label sets written before it (the nll definition)
    ``nll_dist_items`` − ``nll_ref_items``."""
    items = _json_list(row.get("loss_items"))
    if items is not None:
        return items
    dist, ref = _json_list(row.get("nll_dist_items")), _json_list(row.get("nll_ref_items"))
    if dist is None or ref is None or len(dist) != len(ref):
        return None
    return [float(a) - float(b) for a, b in zip(dist, ref, strict=True)]


def _per_question(t, min_levels: int) -> dict[str, dict[str, float]]:
    """Mean Spearman(level, per-question loss) per answer type, one series per (ref_id, type, question).

    The per-question loss is NLL_dist − NLL_ref, or the label definition's own term (``loss_items``) for
    labels made with another definition than nll (``loss`` column)."""
    series: dict[tuple, list[tuple[float, float]]] = {}
    answer: dict[tuple, str] = {}
    n = len(t)
    own = t["loss"].tolist() if "loss" in t and "loss_items" in t else ["nll"] * n
    terms = t["loss_items"].tolist() if "loss_items" in t else [None] * n
    for ref, typ, lv, at, a, b, kind_of_loss, term in zip(t["ref_id"], t["type"], t["level"], t["answer_types"],
                                                         t["nll_ref_items"], t["nll_dist_items"], own, terms,
                                                         strict=True):
        at, a, b = _items(at), _items(a), _items(b)
        if not (len(at) == len(a) == len(b)):
            continue
        d = ([float(v) for v in _items(term)] if kind_of_loss == "kl"
             else [float(y) - float(x) for x, y in zip(a, b, strict=True)])
        if len(d) != len(at):
            continue
        for i, (kind, v) in enumerate(zip(at, d, strict=True)):
            key = (ref, typ, i)
            series.setdefault(key, []).append((float(lv), v))
            answer[key] = str(kind)
    by: dict[str, list[float]] = {}
    for key, pts in series.items():
        lv, d = np.array(pts).T
        if len(np.unique(lv)) < min_levels or np.ptp(d) == 0:
            continue
        by.setdefault(answer[key], []).append(srcc(lv, d))
    return {k: {"mean_rho": float(np.mean(v)), "n_series": len(v)} for k, v in sorted(by.items())}


def oracle_loco(table, *, label: str = "quality") -> dict[str, Any]:
    """Distortion-oracle ceiling, leave one case out: Spearman(prediction, label) over all distorted images.

    The prediction for an image of case c is the mean ``label`` of the images with the same (type, level)
    in every case but c; images whose (type, level) no other case has are not predicted (``n_uncovered``).
    References (level 0) are left out: their D is 0 by construction. A point value (no bootstrap).
    """
    need = [c for c in ("case_id", "type", "level", label) if c not in table]
    if need:
        raise ValueError(f"the label table lacks columns {need} (expected a `medqm label` output)")
    t = table[table[label].notna() & table["level"].fillna(0).astype(int).gt(0)]
    y = t[label].to_numpy(dtype=np.float64)
    key = list(zip(t["type"].astype(str), t["level"].astype(int), strict=True))
    case = t["case_id"].astype(str).tolist()
    tot: dict[tuple, list[float]] = {}
    per_case: dict[tuple, list[float]] = {}
    for k, c, v in zip(key, case, y, strict=True):
        a = tot.setdefault(k, [0.0, 0])
        a[0] += v
        a[1] += 1
        b = per_case.setdefault((k, c), [0.0, 0])
        b[0] += v
        b[1] += 1
    pred = np.full(len(y), np.nan)
    for i, (k, c) in enumerate(zip(key, case, strict=True)):
        s_all, n_all = tot[k]
        s_c, n_c = per_case[(k, c)]
        if n_all > n_c:
            pred[i] = (s_all - s_c) / (n_all - n_c)
    ok = ~np.isnan(pred)
    return {"srcc": srcc(pred[ok], y[ok]) if ok.any() else float("nan"), "n_images": int(ok.sum()),
            "n_uncovered": int((~ok).sum()), "n_cases": len(set(case)), "label": label}


def task_losses(table, *, bad: list[str] | None = None) -> dict[str, np.ndarray]:
    """Per answer type (sorted), each row's mean loss over its questions of that type, NaN where it has none.

    The per-question losses are ``loss_items`` (the label definition's own terms), or ``nll_dist_items`` −
    ``nll_ref_items`` for label sets written before it; non-finite ones are left out. Empty without
    ``answer_types``. A row whose lists do not match (lengths differ, or not JSON) gets NaN everywhere and,
    when ``bad`` is a list, an entry ``"<dist_id> (<reason>)"`` there; one bad row never stops the others.
    """
    if "answer_types" not in table or len(table) == 0:
        return {}
    per_row: list[dict[str, float]] = []
    for i, row in enumerate(table.to_dict("records")):
        sums: dict[str, list[float]] = {}
        try:
            types, items = _json_list(row.get("answer_types")), _item_losses(row)
            if types is not None and items is not None:
                if len(types) != len(items):
                    raise ValueError(f"{len(types)} answer types but {len(items)} losses")
                for t, d in zip(types, items, strict=True):
                    if d is not None and math.isfinite(float(d)):
                        sums.setdefault(str(t), []).append(float(d))
        except (ValueError, TypeError) as e:
            if bad is not None:
                bad.append(f"{row.get('dist_id', i)} ({e})")
            sums = {}
        per_row.append({t: float(np.mean(v)) for t, v in sums.items()})
    kinds = sorted({t for r in per_row for t in r})
    return {k: np.array([r.get(k, np.nan) for r in per_row], dtype=np.float64) for k in kinds}


def oracle_by_answer_type(table) -> dict[str, dict[str, Any]]:
    """`oracle_loco` of each answer type's own loss (`task_losses`, negated so that higher is better), over the
    images that have a question of that type: how learnable a task-conditioned quality is."""
    out = {}
    for kind, loss in task_losses(table).items():
        ok = ~np.isnan(loss)
        if ok.sum() < 2:
            continue
        sub = table.loc[ok].assign(_task_label=-loss[ok])
        r = oracle_loco(sub, label="_task_label")
        out[kind] = {"srcc": r["srcc"], "n_images": r["n_images"], "n_cases": r["n_cases"]}
    return out


def retest_srcc(table) -> dict[str, Any] | None:
    """Spearman of D between view 0 and each other view over the distorted images; None with one view."""
    if "view_losses" not in table:
        return None
    t = table[table["level"].fillna(0).astype(int).gt(0)]
    per = [_items(v) for v in t["view_losses"]]
    k = min((len(v) for v in per), default=0)
    if k < 2:
        return None
    from .runner import VIEWS

    d = np.array([v[:k] for v in per], dtype=np.float64)
    out: dict[str, Any] = {VIEWS[j]: srcc(d[:, 0], d[:, j]) for j in range(1, k)}
    out["n_images"] = len(d)
    return out


def label_reliability(table) -> dict[str, Any]:
    """What ``reliability.json`` holds: severity monotonicity, the leave-one-case-out oracle ceiling and,
    with several views, the test–retest Spearman of D (view 0 against each other view)."""
    out: dict[str, Any] = {"severity_monotonicity": severity_monotonicity(table)}
    if "case_id" in table:
        out["oracle_loco"] = oracle_loco(table)
        by_type = oracle_by_answer_type(table)
        if by_type:
            out["oracle_loco"]["by_answer_type"] = by_type
    retest = retest_srcc(table)
    if retest is not None:
        out["test_retest"] = retest
    return out
