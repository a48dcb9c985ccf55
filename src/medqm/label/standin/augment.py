"""Light geometric/photometric augmentation of training views, and the sampling weights of the question types."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

import numpy as np

from medqm.synth import image_quadrant

if TYPE_CHECKING:  # pragma: no cover
    from .training import TrainConfig

__all__ = ["augment", "sampling_weights"]

_MIRROR = {"upper left": "upper right", "upper right": "upper left", "lower left": "lower right",
           "lower right": "lower left"}


def _quadrant_of(mask, size: int) -> tuple[str, float] | None:
    """(image quadrant of a mask's centroid, its distance in px to the nearer midline); None for an empty mask."""
    import torch

    m = mask[0]
    total = float(m.sum())
    if total <= 0:
        return None
    idx = torch.arange(size, dtype=torch.float32)
    r = float((m.sum(1) * idx).sum()) / total
    c = float((m.sum(0) * idx).sum()) / total
    mid = (size - 1) / 2
    return image_quadrant(r, c, (size, size)), min(abs(r - mid), abs(c - mid))


def augment(x, mask, answer, answer_type, rng: np.random.Generator, cfg: TrainConfig, size: int):
    """One sample's light augmentation; returns (image, mask, answer).

    ``x`` is a 3×S×S tensor in [0, 1], ``mask`` the image's 1×S×S lesion mask or None. Per sample: a horizontal
    flip (p = 0.5); with probability ``cfg.affine_p`` a small affine map (rotation U(±rotate)°, scale
    U(1 ± scale), translation U(±shift) px; bilinear, border padding), otherwise an integer shift of ≤ shift px
    (replicate padding, no resampling); then contrast about the mean and gain, each ×U(1 ± 0.1). The mask goes
    through the same geometry; a lesion's quadrant answer follows its centroid, and a transform that would
    put the centroid within 1.5 px of a midline, or push half the lesion out of the frame, is dropped.
    """
    import torch
    import torch.nn.functional as F

    # all draws up front, so the random stream does not depend on the image
    flip = cfg.hflip and rng.random() < 0.5
    use_affine = rng.random() < cfg.affine_p
    angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate))
    scale = 1 + rng.uniform(-cfg.scale, cfg.scale)
    ty, tx = rng.uniform(-cfg.shift, cfg.shift, size=2)
    dy, dx = (int(v) for v in rng.integers(-cfg.shift, cfg.shift + 1, size=2))
    gain = 1 + rng.uniform(-cfg.gain, cfg.gain)
    con = 1 + rng.uniform(-cfg.contrast, cfg.contrast)

    if flip:
        x = x.flip(-1)
        mask = mask.flip(-1) if mask is not None else None

    def geometry(t):
        img, m = t
        if use_affine:
            # output pixel p samples the input at A·p + b (normalised coordinates, align_corners=False)
            cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
            theta = torch.tensor([[cos, -sin, -2 * tx / size], [sin, cos, -2 * ty / size]], dtype=torch.float32)
            grid = F.affine_grid(theta[None], [1, 1, size, size], align_corners=False)
            img = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            if m is not None:
                m = F.grid_sample(m[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        elif dy or dx:
            p = cfg.shift
            img = F.pad(img[None], (p, p, p, p), mode="replicate")[0][:, p - dy:p - dy + size, p - dx:p - dx + size]
            if m is not None:
                m = F.pad(m[None], (p, p, p, p))[0][:, p - dy:p - dy + size, p - dx:p - dx + size]
        return img, m

    if flip and answer_type == "lesion_quadrant":
        answer = _MIRROR[answer]
    before = _quadrant_of(mask, size) if mask is not None else None
    if before is not None and answer_type == "lesion_quadrant" and before[0] != answer:
        x2, m2 = x, mask  # mask and answer disagree at this resolution: trust the answer, keep the flip only
    else:
        x2, m2 = geometry((x, mask))
        if before is not None:
            after = _quadrant_of(m2, size)
            if after is None or after[1] < 1.5 or float(m2.sum()) < 0.5 * float(mask.sum()):
                x2, m2 = x, mask  # the lesion would sit on a midline or leave the frame: keep the flip only
            elif answer_type == "lesion_quadrant":
                answer = after[0]
    x = x2
    m = x.mean()
    x = torch.clamp(((x - m) * con + m) * gain, 0.0, 1.0)
    return x, m2, answer


def sampling_weights(items, share: dict, balanced: tuple[str, ...] = ("lesion_present", "tumour")) -> np.ndarray:
    """Per-item probabilities: each type gets its share; inside a type, (answer, modality) groups ∝ sqrt(size).

    For the ``balanced`` types the answers of a modality share its mass equally (the synthetic set has several
    lesion-positive hybrids per lesion-free copy; a prior-only model must not look good).
    """
    groups = Counter((it.answer_type, it.answer, it.modality) for it in items)
    per_mod = Counter()
    answers = defaultdict(set)
    for (t, a, m), n in groups.items():
        per_mod[(t, m)] += n
        answers[(t, m)].add(a)
    mass = {}
    for (t, a, m), n in groups.items():
        mass[(t, a, m)] = (math.sqrt(per_mod[(t, m)]) / len(answers[(t, m)]) if t in balanced else math.sqrt(n))
    per_type = defaultdict(float)
    for (t, _a, _m), v in mass.items():
        per_type[t] += v
    w = np.zeros(len(items))
    for i, it in enumerate(items):
        key = (it.answer_type, it.answer, it.modality)
        w[i] = share[it.answer_type] * mass[key] / groups[key] / per_type[it.answer_type]
    return w / w.sum()

