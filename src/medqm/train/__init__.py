"""Training MedQM-I on MedQM-D labels: case-level splits, feature caching, losses, the training loop."""

from medqm.metrics import correlations, grouped_correlations

from .losses import QualityLoss, pairwise_rank_loss, plcc_loss
from .split import (
    SPLITS,
    SplitLeakageError,
    assign_split,
    check_folds,
    check_split,
    load_split,
    make_folds,
    make_split,
    save_split,
)
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "QualityLoss",
    "plcc_loss",
    "pairwise_rank_loss",
    "correlations",
    "grouped_correlations",
    "SPLITS",
    "SplitLeakageError",
    "make_split",
    "make_folds",
    "check_folds",
    "check_split",
    "assign_split",
    "save_split",
    "load_split",
]
