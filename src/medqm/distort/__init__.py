"""Modality-aware distortions at calibrated severity levels (the inputs of MedQM-D labelling)."""

from ._base import (
    N_LEVELS,
    Distortion,
    DistortionNotApplicable,
    DistortionOutputError,
    DistortionResult,
    create_distortion,
    distort,
    list_distortions,
    saturate,
)

__all__ = [
    "Distortion",
    "DistortionNotApplicable",
    "DistortionOutputError",
    "DistortionResult",
    "N_LEVELS",
    "create_distortion",
    "distort",
    "list_distortions",
    "saturate",
]
