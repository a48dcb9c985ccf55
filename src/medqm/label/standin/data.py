"""The stand-in's training data: the demo collection's questions plus a cached synthetic lesion set, split by case;
optionally the Br35H brain-tumour MR collection with its tumour question, split by near-duplicate cluster."""

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

__all__ = ["Data", "br35h_items", "lesion_masks", "lesion_set", "load_data", "read_pixels"]


@dataclass
class Data:
    items: list  # VQAItem
    split: dict  # case_id -> train/val
    source: dict  # image path -> "demo" / "lesions" / "br35h"
    roots: dict  # source -> root folder
    demo: object  # manifest DataFrame
    lesions: object  # manifest DataFrame
    br35h: object = None  # manifest DataFrame of the Br35H collection, when trained on it


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


def br35h_items(root: Path, all_roots: list) -> list:
    """The Br35H collection's questions as `demo_questions` asks them with choices over ``all_roots`` (the
    collections trained on together): modality, the tumour question (its manifest's ``finding`` is 'tumour'),
    body part and plane; the generic lesion questions are not asked of it."""
    root = Path(root).resolve()
    mine = {str(Path(p).resolve()) for p in load_manifest(root)["abs_path"]}
    items = [it for it in demo_questions([*all_roots, root]) if it.image in mine]
    if not any(it.answer_type == "tumour" for it in items):
        raise ValueError(f"{root}: no image has the tumour question (manifest column 'finding' = 'tumour' with a "
                         f"0/1 'lesion'); rebuild it with `medqm data build br35h --out {root}`")
    return items


def load_data(collection: Path, work: Path, cfg: TrainConfig) -> Data:
    les_root = lesion_set(collection, work, cfg)
    demo = load_manifest(collection)
    les = load_manifest(les_root)
    split = case_split(demo, fraction=cfg.val_fraction, seed=cfg.split_seed)
    unknown = set(les["case_id"]) - set(split)
    if unknown:
        raise RuntimeError(f"lesion-set cases missing from the demo collection: {sorted(unknown)}")
    items = demo_questions([collection, les_root])
    roots = {"demo": collection, "lesions": les_root}
    br = None
    if getattr(cfg, "br35h", None):
        br_root = Path(cfg.br35h)
        br = load_manifest(br_root)
        # the same case-level split, over Br35H's near-duplicate clusters (its case_id)
        br_split = case_split(br, fraction=cfg.val_fraction, seed=cfg.split_seed)
        clash = set(br_split) & set(split)
        if clash:
            raise RuntimeError(f"Br35H case ids clash with the demo collection's: {sorted(clash)[:5]}")
        split.update(br_split)
        items += br35h_items(br_root, [collection, les_root])
        roots["br35h"] = br_root
    source = {}
    for name, root in roots.items():
        for p in load_manifest(root)["abs_path"]:
            source[str(Path(p).resolve())] = name
    # leak check: a case is in one split only, so is every image of it (demo or synthetic)
    by_case = defaultdict(set)
    for it in items:
        by_case[it.case_id].add(split[it.case_id])
    assert all(len(s) == 1 for s in by_case.values()), "a case in both splits"
    if cfg.max_images_per_modality:
        items = _few_images(items, split, source, cfg.max_images_per_modality)
    return Data(items, split, source, roots, demo, les, br)


def _few_images(items: list, split: dict, source: dict, n: int) -> list:
    """The items of at most ``n`` images per (source, modality, split, tumour answer), spread over the sorted images
    (smoke runs; the tumour answer keeps both answers of Br35H on each side of the split)."""
    tumour = {it.image: it.answer for it in items if it.answer_type == "tumour"}
    groups = defaultdict(set)
    for it in items:
        groups[(source[it.image], it.modality, split[it.case_id], tumour.get(it.image, ""))].add(it.image)
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

