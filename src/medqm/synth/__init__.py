"""Data synthesis: synthetic lesions inserted into real backgrounds, so that diagnostic questions have a known truth.

Layering: after `medqm.io` (whose images it reads) and before `medqm.label` (whose lesion questions it feeds);
it imports nothing from the later stages.
"""

from .lesions import (
    DEFAULT_PER_MODALITY,
    LESION_COLUMNS,
    LESION_PARAMS,
    LesionKind,
    LesionParams,
    anatomy_mask,
    insert_lesion,
    make_lesion_set,
    spread_order,
)
from .quadrants import QUADRANTS, image_quadrant

__all__ = [
    "DEFAULT_PER_MODALITY",
    "LESION_COLUMNS",
    "LESION_PARAMS",
    "QUADRANTS",
    "LesionKind",
    "LesionParams",
    "anatomy_mask",
    "image_quadrant",
    "insert_lesion",
    "make_lesion_set",
    "spread_order",
]
