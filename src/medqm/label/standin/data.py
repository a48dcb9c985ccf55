"""The stand-in's training data: the demo collection's questions plus a cached synthetic lesion set, split by case."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medqm._fs import write_json
from medqm.io import read_image
from medqm.io.collection import load_manifest
from medqm.label.tasks import demo_questions
from medqm.synth import spread_order

from .split import case_split

if TYPE_CHECKING:  # pragma: no cover
    from .training import TrainConfig

__all__ = ["Data", "lesion_masks", "lesion_set", "load_data", "read_pixels"]


@dataclass
class Data:
    items: list  # VQAItem
    split: dict  # case_id -> train/val
    source: dict  # image path -> "demo" / "lesions"
    roots: dict  # source -> root folder
    demo: object  # manifest DataFrame
    lesions: object  # manifest DataFrame


def lesion_set(collection: Path, work: Path, cfg: TrainConfig) -> Path:
    """Build (or reuse) the synthetic lesion set; rebuilt when its parameters changed."""
    from medqm.synth import make_lesion_set

    out = work / "lesions"
    params = {"per_modality": cfg.lesion_per_modality, "variants": cfg.lesion_variants, "seed": cfg.lesion_seed,
              "collection": str(Path(collection).resolve())}
    stamp = out / "params.json"
    if stamp.is_file() and (out / "manifest.csv").is_file() and json.loads(stamp.read_text()) == params:
        return out
    t = time.perf_counter()
    rows = make_lesion_set(collection, out, per_modality=cfg.lesion_per_modality, variants=cfg.lesion_variants,
                           seed=cfg.lesion_seed)
    write_json(params, stamp, indent=1)
    print(f"lesion set: {len(rows)} images in {out} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def load_data(collection: Path, work: Path, cfg: TrainConfig) -> Data:
    les_root = lesion_set(collection, work, cfg)
    demo = load_manifest(collection)
    les = load_manifest(les_root)
    split = case_split(demo, fraction=cfg.val_fraction, seed=cfg.split_seed)
    unknown = set(les["case_id"]) - set(split)
    if unknown:
        raise RuntimeError(f"lesion-set cases missing from the demo collection: {sorted(unknown)}")
    items = demo_questions([collection, les_root])
    source = {}
    for root, name in ((collection, "demo"), (les_root, "lesions")):
        for p in load_manifest(root)["abs_path"]:
            source[str(Path(p).resolve())] = name
    # leak check: a case is in one split only, so is every image of it (demo or synthetic)
    by_case = defaultdict(set)
    for it in items:
        by_case[it.case_id].add(split[it.case_id])
    assert all(len(s) == 1 for s in by_case.values()), "a case in both splits"
    if cfg.max_images_per_modality:
        items = _few_images(items, split, source, cfg.max_images_per_modality)
    return Data(items, split, source, {"demo": collection, "lesions": les_root}, demo, les)


def _few_images(items: list, split: dict, source: dict, n: int) -> list:
    """The items of at most ``n`` images per (source, modality, split), spread over the sorted images (smoke runs)."""
    groups = defaultdict(set)
    for it in items:
        groups[(source[it.image], it.modality, split[it.case_id])].add(it.image)
    keep = set()
    for imgs in groups.values():
        imgs = sorted(imgs)
        keep.update(imgs[i] for i in spread_order(len(imgs))[:n])
    return [it for it in items if it.image in keep]


def lesion_masks(data: Data, size: int) -> dict[str, object]:
    """Image path -> its lesion mask at the model's resolution (1×S×S float tensor, area-averaged; all zero for a
    known lesion-free image), for every image whose lesion status is known and, if positive, has a mask."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = {}
    for name, df in (("demo", data.demo), ("lesions", data.lesions)):
        root = data.roots[name]
        for row in df.to_dict("records"):
            flag = str(row.get("lesion", "")).strip()
            path = str(Path(row["abs_path"]).resolve())
            mask_file = str(row.get("mask", "")).strip()
            if flag in ("0", "0.0"):
                m = np.zeros((size, size), np.float32)
            elif flag in ("1", "1.0") and mask_file:
                m = np.asarray(Image.open(Path(root) / mask_file))
                m = (m.max(axis=2) if m.ndim == 3 else m) > 0
                if not m.any():
                    continue
                m = F.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(size, size), mode="area")
                m = m[0, 0].numpy()
            else:
                continue  # unknown status, or a lesion without a mask: no patch targets
            out[path] = torch.from_numpy(np.ascontiguousarray(m))[None]
    return out


def read_pixels(paths) -> dict[str, np.ndarray]:
    """Float display pixels as `medqm label` reads them (`read_image(path).pixels`)."""
    return {p: read_image(p).pixels for p in paths}

