"""Letterbox resizing: fit an image into a square canvas with its aspect ratio kept."""

from __future__ import annotations

import numpy as np

_FILTERS = {"area": "BOX", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}


def resize_pad(
    pixels: np.ndarray, size: int = 256, *, order: str = "area", fill: float = 0.0
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize ``pixels`` (H×W or H×W×C) so its longer side is ``size``, then pad to size×size.

    ``order='area'`` averages source pixels when shrinking (no aliasing) and is bilinear when enlarging;
    ``'nearest'`` is for label masks. Returns (array of the input dtype, scale = new/old, (pad_top, pad_left)).
    """
    from PIL import Image

    if order not in _FILTERS:
        raise ValueError(f"order must be one of {list(_FILTERS)}, got {order!r}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    h, w = pixels.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    name = _FILTERS[order]
    if order == "area" and scale > 1:
        name = "BILINEAR"
    resample = getattr(Image.Resampling, name)

    def _one(channel: np.ndarray) -> np.ndarray:
        img = Image.fromarray(channel.astype(np.float32), mode="F")
        return np.asarray(img.resize((nw, nh), resample=resample), dtype=np.float32)

    if pixels.ndim == 2:
        resized = _one(pixels)
    else:
        resized = np.stack([_one(pixels[..., c]) for c in range(pixels.shape[2])], axis=-1)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.full((size, size) + pixels.shape[2:], fill, dtype=np.float32)
    out[top : top + nh, left : left + nw] = resized
    if np.issubdtype(pixels.dtype, np.integer):
        info = np.iinfo(pixels.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(pixels.dtype, copy=False), scale, (top, left)
