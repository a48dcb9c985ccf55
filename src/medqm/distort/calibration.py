"""Severity calibration: median SSIM to the reference per type and level over a collection.

A level scale means something only if it is monotone and its mildest level is mild: for every type the
median SSIM must strictly decrease from level 1 to 5, with level 1 ≥ 0.9. `scripts/calibrate_distortions.py`
writes the measured table to docs/distortions.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medqm.io import MedImage
from medqm.io.collection import load_manifest, read_collection_image

from ._base import create_distortion, list_distortions

MIN_LEVEL1_SSIM = 0.9


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM on display values (data_range 1); colour images average the per-channel SSIM."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=1.0, channel_axis=2 if a.ndim == 3 else None))


def reference_sample(collection: str | Path, n_per_modality: int = 6, seed: int = 0) -> list[MedImage]:
    """Up to ``n_per_modality`` images per modality, one per case first, chosen reproducibly."""
    df = load_manifest(collection)
    rng = np.random.default_rng(seed)
    picks = []
    for _, g in df.groupby("modality", sort=True):
        cases = list(g.groupby("case_id", sort=True))
        order = rng.permutation(len(cases))
        chosen = []
        rounds = 0
        while len(chosen) < n_per_modality and rounds < 50:
            for i in order:
                rows = cases[i][1]
                if rounds < len(rows) and len(chosen) < n_per_modality:
                    chosen.append(rows.iloc[(rounds * 7 + len(rows) // 2) % len(rows)])
            rounds += 1
        picks.extend(chosen)
    return [read_collection_image(r) for r in picks]


def ssim_table(references: list[MedImage], names: list[str] | None = None, seeds: int = 1):
    """Rows of (type, level, median SSIM, 10th percentile, number of images) for each applicable type."""
    import pandas as pd

    rows = []
    for name in names or list_distortions():
        d = create_distortion(name)
        refs = [r for r in references if d.applies_to(r.modality, color=r.is_color)]
        for level in range(1, 6):
            scores = [ssim(r.pixels, d(r, level, seed).pixels) for r in refs for seed in range(seeds)]
            rows.append({
                "type": name, "family": d.family, "level": level, "n": len(scores),
                "median_ssim": float(np.median(scores)) if scores else float("nan"),
                "p10_ssim": float(np.percentile(scores, 10)) if scores else float("nan"),
            })
    return pd.DataFrame(rows)


def calibration_problems(table) -> list[str]:
    """Types whose median SSIM is not strictly decreasing, or whose level 1 is not mild."""
    problems = []
    for name, g in table.groupby("type"):
        med = g.sort_values("level")["median_ssim"].to_numpy()
        if not np.all(np.diff(med) < 0):
            problems.append(f"{name}: median SSIM not strictly decreasing {np.round(med, 3).tolist()}")
        if med[0] < MIN_LEVEL1_SSIM:
            problems.append(f"{name}: level 1 median SSIM {med[0]:.3f} < {MIN_LEVEL1_SSIM}")
    return problems
