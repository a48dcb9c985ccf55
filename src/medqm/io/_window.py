"""Intensity windows: named presets, per-modality defaults, and the linear VOI mapping to [0, 1]."""

from __future__ import annotations

import numpy as np

# (center, width) in HU. Standard radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

# CT body part (DICOM BodyPartExamined, lower case, or a free word) -> preset used when the file has no window.
_CT_DEFAULT_BY_BODY_PART = {
    "head": "brain",
    "brain": "brain",
    "skull": "bone",
    "chest": "lung",
    "lung": "lung",
    "thorax": "lung",
    "abdomen": "soft_tissue",
    "pelvis": "soft_tissue",
    "pancreas": "soft_tissue",
    "liver": "liver",
    "neck": "soft_tissue",
    "spine": "bone",
    "extremity": "bone",
    "knee": "bone",
    "hand": "bone",
    "foot": "bone",
}

PERCENTILE_WINDOW = (0.5, 99.5)

Window = tuple[float, float] | str | None


def resolve_window(window: Window, *, modality: str | None, body_part: str | None) -> tuple[float, float] | str | None:
    """Turn a caller's window argument into (center, width), 'percentile', 'minmax' or None (= use the file's VOI).

    ``None`` means automatic: the caller of this function uses the file's own VOI when there is one and
    otherwise asks `default_window`.
    """
    if window is None:
        return None
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key in ("percentile", "minmax"):
            return key
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        raise ValueError(
            f"unknown window {window!r}; use one of {', '.join(sorted(WINDOW_PRESETS))}, 'percentile', 'minmax' "
            "or a (center, width) pair"
        )
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a preset name or a (center, width) pair, got {window!r}") from None
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return (center, width)


def default_window(modality: str | None, body_part: str | None) -> tuple[float, float] | str:
    """Window for a file that states none: CT presets by body part (soft tissue when unknown), else percentiles."""
    if modality == "CT":
        part = (body_part or "").strip().lower()
        for word, preset in _CT_DEFAULT_BY_BODY_PART.items():
            if word in part:
                return WINDOW_PRESETS[preset]
        return WINDOW_PRESETS["soft_tissue"]
    return "percentile"


def apply_window(values: np.ndarray, window: tuple[float, float] | str) -> tuple[np.ndarray, tuple[float, float]]:
    """Map stored values to [0, 1] with a linear window; returns the pixels and the (center, width) used.

    The (center, width) pair follows DICOM's linear VOI function (PS3.3 C.11.2.1.2) without its
    half-unit offsets, which matter only for integer outputs.
    """
    v = values.astype(np.float32, copy=False)
    if window == "percentile":
        lo, hi = np.percentile(v, PERCENTILE_WINDOW)
    elif window == "minmax":
        lo, hi = float(v.min()), float(v.max())
    else:
        center, width = window
        lo, hi = center - width / 2.0, center + width / 2.0
    lo, hi = float(lo), float(hi)
    if hi <= lo:  # a constant image: all zeros rather than a division by zero
        return np.zeros_like(v, dtype=np.float32), ((lo + hi) / 2.0, 1.0)
    out = np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out, ((lo + hi) / 2.0, hi - lo)
