"""Evaluation of quality scores: classical no-reference baselines, agreement metrics with case-level
uncertainty, and `evaluate` — MedQM-I against classical and deep BIQA on the same held-out images, with a report.
"""

from .baselines import (
    Baseline,
    BaselineInfo,
    aligned_score,
    baseline_info,
    create_baseline,
    list_baselines,
    score_images,
)
from .metrics import (
    CaseBootstrap,
    LogisticFit,
    agreement,
    bootstrap_agreement,
    compare_srcc,
    fit_logistic,
    krcc,
    logistic4,
    paired_bootstrap_srcc,
    plcc,
    srcc,
    williams_t,
)
from .runner import EvalConfig, EvalResult, evaluate

__all__ = [
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
    "plcc",
    "srcc",
    "williams_t",
    "EvalConfig",
    "EvalResult",
    "evaluate",
]
