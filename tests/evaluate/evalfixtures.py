"""Builders for the evaluation tests: a small synthetic label table with known quality, and tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

IMG = 64  # model input size of the tiny checkpoints
CASES = [f"case{i:02d}" for i in range(10)]
MODALITY = {c: ("CT" if i % 2 == 0 else "MR") for i, c in enumerate(CASES)}
SPLIT = {**dict.fromkeys(CASES[:4], "train"), **dict.fromkeys(CASES[4:6], "val"), **dict.fromkeys(CASES[6:], "test")}
LEVELS = (1, 2, 3)
TYPE_WEIGHT = {"gaussian_noise": 0.2, "gaussian_blur": 0.12}


def _reference(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A textured grey image in [0, 1]: smooth blobs, a few edges and fine texture (NIQE needs ≥ 96 px)."""
    from scipy.ndimage import gaussian_filter

    base = gaussian_filter(rng.random((size, size)), 6)
    base = (base - base.min()) / (np.ptp(base) + 1e-9)
    yy, xx = np.mgrid[:size, :size]
    shapes = ((xx - rng.integers(30, 100)) ** 2 + (yy - rng.integers(30, 100)) ** 2
              < rng.integers(200, 900)).astype(float)
    tex = gaussian_filter(rng.random((size, size)), 1.0)
    img = 0.55 * base + 0.3 * shapes + 0.15 * (tex - tex.mean()) / (tex.std() + 1e-9) * 0.3 + 0.1
    return np.clip(img, 0, 1)


def _distort(img: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    if kind == "gaussian_noise":
        return np.clip(img + rng.normal(0, 0.04 * level, img.shape), 0, 1)
    return gaussian_filter(img, 0.8 * level)


def make_labels(out: Path, seed: int = 0) -> Path:
    """``out/labels.parquet`` + images: 10 cases (CT / MR), a reference and 2 types × 3 levels each.

    Quality = 0.95 − w_type · level + a small case offset (so cases differ, as real ones do).
    """
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for case in CASES:
        ref_id = f"{case}-ref"
        ref = _reference(rng)
        offset = rng.normal(0, 0.02)
        variants = [("reference", 0, ref)] + [(k, lv, _distort(ref, k, lv, rng)) for k in TYPE_WEIGHT for lv in LEVELS]
        for kind, level, px in variants:
            dist_id = ref_id if kind == "reference" else f"{ref_id}__{kind}__L{level}"
            path = out / "images" / f"{dist_id}.png"
            Image.fromarray(np.round(px * 255).astype(np.uint8)).save(path)
            q = 0.95 - (TYPE_WEIGHT.get(kind, 0.0) * level) + offset
            rows.append({"dist_id": dist_id, "ref_id": ref_id, "case_id": case, "modality": MODALITY[case],
                         "type": kind, "level": level, "seed": 0, "n_qa": 1, "nll_ref": 1.0, "nll_dist": 1.0,
                         "diag_loss": 0.0, "quality": float(np.clip(q, 0, 1)), "model_id": "synthetic",
                         "model_revision": "test", "map_center": 0.693, "map_scale": 0.315,
                         "path": str(path.resolve()), "ref_path": str((out / "images" / f"{ref_id}.png").resolve()),
                         "params": json.dumps({"level": level})})
    pd.DataFrame(rows).to_parquet(out / "labels.parquet", index=False)
    return out


def split_csv(assign: dict[str, str]) -> str:
    df = pd.DataFrame({"case_id": list(assign), "split": list(assign.values())})
    return df.to_csv(index=False)


def make_checkpoint(out: Path, variant: str, split: dict[str, str], seed: int = 0) -> Path:
    import torch

    from medqm.model import create_model

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = create_model(variant, pretrained_backbone=False, img_size=IMG).eval()
    return model.save_pretrained(out, extra_files={"split.csv": split_csv(split)})
