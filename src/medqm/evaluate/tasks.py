"""Task-conditioned quality in the evaluation: MedQM-I's per-task outputs against the per-task labels.

A checkpoint trained with tasks (`medqm.model.MedQMIConfig.tasks`) predicts, beside the overall quality, one
quality per answer type (``tumour``, ``modality``…). Its label is Q_t, the quality map of the mean diagnostic loss
of the image's questions of type t (`medqm.train.data.task_qualities`); images without such a question have no
label for t and are left out of that task's figures. Per task this module measures, on the images that have it:

- the agreement of the task output with Q_t (SRCC, KRCC, PLCC after the logistic, RMSE; SRCC with a
  case-bootstrap interval, resampling the cases that have the task);
- the same SRCC for the model's overall quality, and the paired case-bootstrap test of the difference (does the
  task output rank Q_t better than the average does?);
- the SRCC of every other method (the ablations, the deep baseline and classical BIQA score only overall), as a
  point estimate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medqm.metrics import CaseBootstrap, agreement, bootstrap_agreement, paired_bootstrap_srcc, srcc

MIN_TASK_IMAGES = 3  # fewer labelled test images: the task's figures are not computed


def attach_task_labels(rows, table, tasks):
    """``rows`` (test rows with a ``path`` column) with a ``quality_<task>`` label column per task, looked up by path
    in the label ``table`` (the first row of a path, as `load_test_set` keeps it); NaN where the image has no
    question of that type."""
    from medqm.model import task_column
    from medqm.train.data import task_qualities

    rows = rows.copy()
    if not tasks:
        return rows
    tq = task_qualities(table)
    first = ~table["path"].astype(str).duplicated(keep="first")
    by_path = tq[first.to_numpy()].set_axis(table.loc[first, "path"].astype(str).to_numpy())
    for t in tasks:
        col = by_path[t] if t in by_path.columns else None
        rows[task_column(t)] = (rows["path"].astype(str).map(col).to_numpy(np.float64) if col is not None
                                else np.full(len(rows), np.nan))
    return rows


def task_metrics(methods, rows, cfg) -> dict[str, Any] | None:
    """The ``tasks`` section of metrics.json: per task of the main method (``kind == 'main'``, its ``tasks``
    scores), agreement with the task labels of ``rows``; None when the main method has no task outputs.

    ``cfg`` provides n_boot, seed and level (an `EvalConfig` or a `CVConfig`).
    """
    from medqm.model import task_column

    main = next((m for m in methods if m.kind == "main"), None)
    if main is None or not main.tasks:
        return None
    cases_all = rows["case_id"].astype(str).to_numpy()
    out: dict[str, Any] = {
        "method": main.name,
        "label": "Q_t: the quality map of the mean diagnostic loss of the image's questions of answer type t",
        "by_task": {},
    }
    for t, x_all in main.tasks.items():
        col = task_column(t)
        y_all = rows[col].to_numpy(np.float64) if col in rows else np.full(len(rows), np.nan)
        has = np.isfinite(y_all)
        entry: dict[str, Any] = {"n_images": int(has.sum()), "n_cases": int(len(set(cases_all[has])))}
        if has.sum() < MIN_TASK_IMAGES:
            entry["note"] = f"fewer than {MIN_TASK_IMAGES} test images have this task"
            out["by_task"][t] = entry
            continue
        x, y, cases = np.asarray(x_all, np.float64)[has], y_all[has], cases_all[has]
        overall = main.aligned[has]
        ok = np.isfinite(x)
        a = agreement(x[ok], y[ok])
        a.pop("fit", None)
        boot = CaseBootstrap(cases, cfg.n_boot, cfg.seed)
        ci = bootstrap_agreement(x, y, boot, level=cfg.level, metrics=("srcc",))["srcc"]
        entry.update({k: a.get(k) for k in ("srcc", "krcc", "plcc", "rmse")})
        entry["srcc_ci"] = ci
        entry["n_undefined"] = int((~ok).sum())
        entry["overall_output"] = {
            "srcc": srcc(overall[np.isfinite(overall)], y[np.isfinite(overall)]) if np.isfinite(overall).sum() >= 2
            else float("nan"),
            "srcc_ci": bootstrap_agreement(overall, y, boot, level=cfg.level, metrics=("srcc",))["srcc"],
        }
        entry["task_vs_overall"] = paired_bootstrap_srcc(x, overall, y, boot, level=cfg.level)
        others = {}
        for m in methods:
            if m is main:
                continue
            v = m.aligned[has]
            f = np.isfinite(v)
            others[m.name] = srcc(v[f], y[f]) if f.sum() >= 2 else float("nan")
        entry["other_methods_srcc"] = others
        out["by_task"][t] = entry
    return out


__all__ = ["attach_task_labels", "task_metrics", "MIN_TASK_IMAGES"]
