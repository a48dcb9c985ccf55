"""Evaluation of quality scores: classical no-reference baselines (more to come)."""

from .baselines import (
    Baseline,
    BaselineInfo,
    aligned_score,
    baseline_info,
    create_baseline,
    list_baselines,
    score_images,
)

__all__ = [
    "Baseline",
    "BaselineInfo",
    "aligned_score",
    "baseline_info",
    "create_baseline",
    "list_baselines",
    "score_images",
]
