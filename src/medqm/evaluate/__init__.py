"""Evaluation of quality scores: classical no-reference baselines, agreement metrics with case-level
uncertainty (re-exported from `medqm.metrics`), and `evaluate` — MedQM-I against classical and deep BIQA on
the same held-out images, with a report (`medqm.evaluate.report`) — and `cross_validate`, the same comparison
with every case held out once over K case-level folds and the figures pooled.
"""

from medqm.metrics import (
    CaseBootstrap,
    LogisticFit,
    agreement,
    bootstrap_agreement,
    compare_srcc,
    fit_logistic,
    krcc,
    logistic4,
    paired_bootstrap_srcc,
    plcc_raw,
    srcc,
    williams_t,
)

from .baselines import (
    Baseline,
    BaselineInfo,
    aligned_score,
    baseline_info,
    create_baseline,
    list_baselines,
    score_images,
)
from .crossval import CVConfig, CVResult, cross_validate
from .report import HEADLINE_HEADER, design_of, headline_rows, headline_title
from .runner import EvalConfig, EvalResult, evaluate
from .tasks import attach_task_labels, task_metrics

__all__ = [
    "task_metrics",
    "attach_task_labels",
    "Baseline",
    "BaselineInfo",
    "aligned_score",
    "baseline_info",
    "create_baseline",
    "list_baselines",
    "score_images",
    "CaseBootstrap",
    "LogisticFit",
    "agreement",
    "bootstrap_agreement",
    "compare_srcc",
    "fit_logistic",
    "krcc",
    "logistic4",
    "paired_bootstrap_srcc",
    "plcc_raw",
    "srcc",
    "williams_t",
    "EvalConfig",
    "EvalResult",
    "evaluate",
    "CVConfig",
    "CVResult",
    "cross_validate",
    "HEADLINE_HEADER",
    "headline_rows",
    "headline_title",
    "design_of",
]
