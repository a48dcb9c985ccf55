"""MedQM-D: label image quality by an MLLM's diagnostic loss (teacher-forced answer NLL) and a sigmoid map."""

from ._protocol import DiagnosticModel
from .quality import (
    DEFAULT_MAP,
    QualityMap,
    diagnostic_loss,
    likelihood_ratio,
    loss_to_quality,
    quality_to_loss,
)
from .runner import read_labels, run_labels
from .tasks import (
    VQAItem,
    demo_questions,
    read_slake,
    read_tasks,
    read_vqa_rad,
    write_tasks,
)

__all__ = [
    "DEFAULT_MAP",
    "DiagnosticModel",
    "QualityMap",
    "VQAItem",
    "demo_questions",
    "diagnostic_loss",
    "likelihood_ratio",
    "loss_to_quality",
    "quality_to_loss",
    "read_labels",
    "read_slake",
    "read_tasks",
    "read_vqa_rad",
    "run_labels",
    "write_tasks",
]


def load_model(*args, **kwargs):
    """`medqm.label.hf.load_model`, imported lazily so `import medqm.label` stays light."""
    from .hf import load_model as _load

    return _load(*args, **kwargs)
