"""Modality-aware distortions at calibrated severity levels (the inputs of MedQM-D labelling)."""

from ._base import (
    N_LEVELS,
    Distortion,
    DistortionNotApplicable,
    DistortionResult,
    create_distortion,
    distort,
    list_distortions,
)

__all__ = [
    "Distortion",
    "DistortionNotApplicable",
    "DistortionResult",
    "N_LEVELS",
    "create_distortion",
    "distort",
    "list_distortions",
]
