"""A small label table with real signal, in the `medqm label` schema, for training tests.

Real demo images (one per case, several modalities) distorted with `medqm.distort.distort` at levels 1–5;
the quality is a known decreasing function of the level, steeper for noise than for blur than for JPEG:
Q = 0.95 for the reference and 0.95 − w_type · level / 5 for a distorted image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medqm.distort import distort
from medqm.distort.calibration import reference_sample
from medqm.io.collection import default_collection

TYPE_WEIGHT = {"gaussian_noise": 0.85, "gaussian_blur": 0.7, "jpeg": 0.5}


def synthetic_quality(kind: str, level: int) -> float:
    return 0.95 if kind == "reference" else 0.95 - TYPE_WEIGHT[kind] * level / 5


def make_synthetic_labels(out: Path, *, n_per_modality: int = 2, types=tuple(TYPE_WEIGHT), levels=(1, 2, 3, 4, 5),
                          modalities=("CT", "MR", "PATH", "US", "XR", "FUNDUS"), seed: int = 0) -> Path:
    """Write ``out/labels.parquet`` (+ images/) and return ``out``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    refs = [r for r in reference_sample(default_collection(), n_per_modality=n_per_modality, seed=seed)
            if r.modality in modalities]
    rows = []
    for ref in refs:
        ref_id = Path(ref.path).stem
        variants = [("reference", 0, ref.pixels)]
        for kind in types:
            for level in levels:
                variants.append((kind, level, distort(ref, kind, level, seed=0).pixels))
        for kind, level, px in variants:
            dist_id = ref_id if kind == "reference" else f"{ref_id}__{kind}__L{level}__s0"
            path = out / "images" / f"{dist_id}.png"
            Image.fromarray(np.round(np.clip(px, 0, 1) * 255).astype(np.uint8)).save(path)
            q = synthetic_quality(kind, level)
            rows.append({"dist_id": dist_id, "ref_id": ref_id, "case_id": ref.case_id, "modality": ref.modality,
                         "type": kind, "level": level, "seed": 0, "n_qa": 1, "nll_ref": 1.0, "nll_dist": 1.0,
                         "diag_loss": 0.0, "quality": q, "model_id": "synthetic", "model_revision": "test",
                         "map_center": 0.693, "map_scale": 0.315, "path": str(path.resolve()),
                         "ref_path": str(Path(ref.path).resolve()), "params": json.dumps({"level": level})})
    pd.DataFrame(rows).to_parquet(out / "labels.parquet", index=False)
    return out
