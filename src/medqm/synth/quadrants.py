"""Image quadrants: where a synthetic lesion is put, and the answer to the "In which quadrant?" question."""

from __future__ import annotations

QUADRANTS = ["upper left", "upper right", "lower left", "lower right"]


def image_quadrant(row: float, col: float, shape) -> str:
    """Quadrant of a point in image coordinates (row down, col right; not patient anatomy: radiological
    display puts the patient's right on the image's left). 'upper' when ``row < (H-1)/2`` (the top half of
    the pixel rows), 'left' when ``col < (W-1)/2``; a point exactly on a midline goes lower / right."""
    H, W = shape[:2]
    v = "upper" if row < (H - 1) / 2 else "lower"
    h = "left" if col < (W - 1) / 2 else "right"
    return f"{v} {h}"


__all__ = ["QUADRANTS", "image_quadrant"]
