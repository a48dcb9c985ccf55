"""Modality-aware distortions at calibrated severity levels (the inputs of MedQM-D labelling).

Needs the ``distort`` extra (TorchIO, OpenCV, scikit-image): ``pip install 'medqm[distort]'``.
"""

from medqm._extras import require

require("distort", "medqm distort (medqm.distort)")

from ._base import (  # noqa: E402
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
