"""Evaluating the stand-in: held-out closed-set accuracy, the subset the shipped-model test re-scores
(``eval_subset.json``), and the reaction of the answer NLL to every distortion type and level."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from medqm._fs import file_sha256, write_json
from medqm.io import read_image

from .data import Data, read_pixels
from .features import Encoder, FeatureBank, closed_set, image_features, sequence_nll
from .scoring import accuracy_table, reaction_images, spread
from .training import TYPES, TrainConfig

__all__ = [
    "BALANCED",
    "SUBSET_PER_TYPE",
    "SUBSET_PREFIX",
    "TARGETS",
    "check_consistency",
    "choose_subset",
    "evaluate",
    "missed_targets",
    "reaction_check",
]

TARGETS = {"modality": 0.95, "lesion_present": 0.85, "lesion_quadrant": 0.7, "body_part": 0.8}


# the lesion questions are judged on balanced accuracy too: the synthetic set has several lesion-positive hybrids
# per lesion-free copy, so a model answering from the prior alone would look good on plain accuracy
BALANCED = ("lesion_present", "lesion_quadrant")


SUBSET_PREFIX = {"CT": 12, "MR": 28}  # lesion-set backgrounds the test regenerates (a prefix of the full set)


SUBSET_PER_TYPE = {"modality": 30, "body_part": 30, "plane": 20, "lesion_present": 40, "lesion_quadrant": 30}


def check_consistency(dm, enc: Encoder, items, pixels) -> float:
    """Largest |this script's NLL − answer_nll| over ``items`` (the feature path must be the backend's)."""
    import torch

    feats = image_features(dm.model, enc.normalize(enc.images01[[enc.index[it.image] for it in items]]))
    ids, attn, scored = enc.tokens([it.question for it in items], [it.answer for it in items])
    with torch.inference_mode():
        mine = sequence_nll(dm.model, feats, ids, attn, scored).double().numpy()
    theirs = dm.answer_nll([pixels[it.image] for it in items], [it.question for it in items],
                           [it.answer for it in items])
    return float(np.max(np.abs(mine - theirs)))


def choose_subset(data: Data, val_items) -> list:
    """The held-out items the shipped-model test re-scores: demo images and a regenerable lesion-set prefix."""
    les = data.lesions
    allowed = set()
    for mod, k in SUBSET_PREFIX.items():
        g = les[les["modality"] == mod]
        bgs = list(dict.fromkeys(g["background_id"].astype(str)))[:k]
        allowed |= {str(Path(p).resolve()) for p in g.loc[g["background_id"].astype(str).isin(bgs), "abs_path"]}
    pool = [it for it in val_items if data.source[it.image] == "demo" or it.image in allowed]
    out = []
    for t in TYPES:
        cand = sorted((it for it in pool if it.answer_type == t), key=lambda it: (it.image_id, it.question))
        out += spread(cand, SUBSET_PER_TYPE[t], key=lambda it: (data.source[it.image], it.case_id, it.answer))
    return out


def reaction_check(dm, enc: Encoder, data: Data, per_modality: int, levels=(1, 2, 3, 4, 5),
                   max_types: int | None = None) -> dict:
    """Mean NLL of the correct answers of demo images under every applicable distortion type and level.

    Vision features are computed once per distorted image and every question of the image is scored on them
    (`sequence_nll`, checked against ``answer_nll``); distortions are `medqm.distort.distort` with a per-image
    seed, as `medqm distort` makes them. ``max_types`` keeps the first types only (smoke runs).
    """
    import zlib

    import torch

    from medqm.distort import create_distortion, distort, list_distortions
    from medqm.label.hf import to_pil

    demo = data.demo
    ids = reaction_images(demo, per_modality=per_modality, split=data.split)
    rows = demo.set_index("id").loc[ids]
    by_image = defaultdict(list)
    for it in data.items:
        if data.source[it.image] == "demo":
            by_image[it.image].append(it)
    images = []
    for image_id, row in rows.iterrows():
        path = str(Path(row["abs_path"]).resolve())
        if by_image.get(path):
            images.append((image_id, row["modality"], read_image(path).pixels, by_image[path]))

    def mean_nll(pxs, its_list) -> float:
        pv = enc.processor.image_processor([to_pil(p, i) for i, p in enumerate(pxs)],
                                           return_tensors="pt")["pixel_values"]
        feats = image_features(dm.model, pv)
        rep = [i for i, its in enumerate(its_list) for _ in its]
        flat = [it for its in its_list for it in its]
        ids_, attn, scored = enc.tokens([it.question for it in flat], [it.answer for it in flat])
        with torch.inference_mode():
            return float(sequence_nll(dm.model, feats[rep], ids_, attn, scored).mean())

    t0 = time.perf_counter()
    clean = mean_nll([im[2] for im in images], [im[3] for im in images])
    out = {}
    for name in list_distortions()[:max_types]:
        d = create_distortion(name)
        use = [im for im in images if d.applies_to(im[1], color=im[2].ndim == 3)]
        if not use:
            continue
        means = {}
        for level in levels:
            dpx = [distort(px, name, level, seed=zlib.crc32(image_id.encode())).pixels for image_id, _, px, _ in use]
            means[level] = mean_nll(dpx, [im[3] for im in use])
        out[name] = {"n_images": len(use), "n_items": sum(len(im[3]) for im in use),
                     "modalities": sorted({im[1] for im in use}),
                     "mean_nll": means, "reacts": means[levels[-1]] > means[levels[0]]}
        print(f"  {name:22s} " + " ".join(f"L{k} {v:.3f}" for k, v in means.items())
              + f"  {'reacts' if out[name]['reacts'] else 'DOES NOT REACT'}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    n_react = sum(r["reacts"] for r in out.values())
    return {"types": out, "clean_mean_nll": clean, "n_images": len(images), "image_ids": [im[0] for im in images],
            "fraction_reacting": n_react / len(out),
            "not_reacting": sorted(k for k, r in out.items() if not r["reacts"]),
            "per_modality": per_modality, "levels": list(levels), "seconds": time.perf_counter() - t0}


def _heldout_accuracy(dm, enc: Encoder, pixels: dict, val_items: list, data: Data):
    """Closed-set scores of every held-out item on its unaltered image, and the accuracy tables: per answer type
    (with balanced accuracy and recall per answer), per source and per modality."""
    bank = FeatureBank()
    images = sorted(pixels)
    for lo in range(0, len(images), 64):
        chunk = images[lo:lo + 64]
        bank.add([(p, 0) for p in chunk],
                 image_features(dm.model, enc.normalize(enc.images01[[enc.index[p] for p in chunk]])))
    bank.freeze()
    scores = closed_set(dm.model, enc, bank, val_items)
    for it in val_items:
        it.meta["source"] = data.source[it.image]
    acc = accuracy_table(val_items, scores)
    for t_, row in acc.items():  # mean recall over the answers: a constant answer scores 1 / (number of answers)
        hits = defaultdict(list)
        for it, sc in zip(val_items, scores, strict=True):
            if it.answer_type == t_:
                hits[it.answer].append(sc["correct"])
        row["balanced_accuracy"] = float(np.mean([np.mean(h) for h in hits.values()]))
        row["per_answer"] = {a: {"n": len(h), "recall": float(np.mean(h))} for a, h in sorted(hits.items())}
    return scores, acc, accuracy_table(val_items, scores, by="source"), accuracy_table(val_items, scores, by="modality")


def _subset_rows(data: Data, val_items: list, scores: list) -> tuple[list[dict], dict]:
    """The `choose_subset` items with every choice's NLL (``eval_subset.json``'s items) and their accuracy."""
    subset = choose_subset(data, val_items)
    pos = {id(it): i for i, it in enumerate(val_items)}
    sub_rows = []
    for it in subset:
        s = scores[pos[id(it)]]
        src = data.source[it.image]
        rel = Path(it.image).relative_to(Path(data.roots[src]).resolve()).as_posix()
        sub_rows.append({"source": src, "image": rel, "sha256": file_sha256(it.image), "image_id": it.image_id,
                         "case_id": it.case_id, "modality": it.modality, "question": it.question, "answer": it.answer,
                         "answer_type": it.answer_type, "choices": it.choices, "nll": s["nll"],
                         "prediction": s["prediction"]})
    sub_acc = {}
    for t_ in TYPES:
        r = [row for row in sub_rows if row["answer_type"] == t_]
        if r:
            sub_acc[t_] = sum(row["prediction"] == row["answer"] for row in r) / len(r)
    return sub_rows, sub_acc


def _limitation_notes(model_dir: Path, missed: list[str]) -> list[str]:
    """The model card's explanations of missed targets (with the lesion probe's numbers where it was run)."""
    notes = []
    if {"lesion_present", "lesion_quadrant"} & set(missed):
        notes.append(
            "Lesion targets missed (" + ", ".join(t_ for t_ in missed if t_.startswith("lesion")) + "). The vision "
            "tower is frozen ImageNet EfficientNet-Lite0 read in 32-px cells (8 × 8 tokens at 256 px), and the "
            "synthetic lesions are 8–20 px across with a contrast-to-noise ratio of 1.8–5 against their "
            "surroundings: the decoder can only use what ImageNet features keep of such a blob. A finer grid "
            "(output stride 16, 256 tokens) costs the decoder 4× the tokens per step (measured 4.9 s instead of "
            "0.3 s per step on the shared 2-core machine), and training the tower itself needs its forward and "
            "backward pass on every step; neither fits the 45-minute CPU budget.")
        probe_file = model_dir / "lesion_probe.json"
        if probe_file.is_file():
            pr = json.loads(probe_file.read_text())
            r_ = pr["results"]
            lin = "; ".join(f"stride {k.rsplit('stride', 1)[1]}: {v['heldout_balanced_acc']:.2f}"
                            for k, v in r_.items() if k.startswith("linear"))
            ft = r_.get("finetune_top_stride32")
            notes.append(
                "Would a better decoder, a finer grid or a trained tower fix it? `scripts/probe_lesion_features.py` "
                f"(its output: `lesion_probe.json`) trains lesion detectors directly on the tower's features, same "
                f"lesion set and case split ({pr['heldout_images']} held-out images of {pr['heldout_cases']} cases). "
                f"Held-out balanced accuracy of a linear per-cell probe: {lin}"
                + (f"; with the tower's last stages trained on top of the stride-16 features and a per-cell mask "
                   f"loss: {ft['heldout_balanced_acc']:.2f} on held-out cases against {ft['train_balanced_acc']:.2f} "
                   f"on the training images (quadrant {ft['heldout_quadrant_acc']:.2f})" if ft else "") + ". "
                + ("The trained top fits the training cases without carrying over to new ones. "
                   if ft and ft["train_balanced_acc"] - ft["heldout_balanced_acc"] > 0.15 else "")
                + (f"None reaches the {TARGETS['lesion_present']} target: with the backgrounds of only the "
                   "training cases, more data (many more lesion-free backgrounds and patients) is the remedy before "
                   "compute, and a GPU alone would not reach the targets."
                   if max(v["heldout_balanced_acc"] for v in r_.values()) < TARGETS["lesion_present"] else ""))
    if "modality" in missed or "body_part" in missed:
        notes.append("Held-out modality and body-part items are nearly all CT and MR (the other modalities have "
                     "one to four cases, so few or none can be held out); their accuracy rests on a handful of "
                     "held-out patients.")
    return notes


def evaluate(model_dir: Path, data: Data, cfg: TrainConfig, *, reaction_per_modality: int,
             reaction_levels=(1, 2, 3, 4, 5), reaction_types: int | None = None) -> dict:
    """Measure the saved model in ``model_dir`` (through `medqm.label.hf.load_model`), write its
    ``eval_subset.json`` and return the results the model card reports."""
    from medqm.label.hf import load_model

    t0 = time.perf_counter()
    dm = load_model(model_dir, batch_size=32)
    val_items = [it for it in data.items if data.split[it.case_id] == "val"]
    pixels = read_pixels(sorted({it.image for it in val_items}))
    enc = Encoder(model_dir, data.items, pixels)  # every question (the reaction check asks training-only ones)
    probe = spread(sorted(val_items, key=lambda it: (it.image_id, it.question)), 24, key=lambda it: it.answer_type)
    gap = check_consistency(dm, enc, probe, pixels)
    print(f"training-path NLL vs answer_nll: max |diff| {gap:.2e} over {len(probe)} items", flush=True)
    if gap > 1e-3:
        raise RuntimeError(f"the training path's NLLs differ from answer_nll's by {gap:.2e}")
    t = time.perf_counter()
    scores, acc, acc_src, acc_mod = _heldout_accuracy(dm, enc, pixels, val_items, data)
    print(f"closed-set scoring of {len(val_items)} held-out items: {time.perf_counter() - t:.0f} s", flush=True)
    for k in TYPES:
        if k in acc:
            tgt = TARGETS.get(k)
            print(f"  {k:16s} {acc[k]['accuracy']:.3f} (n={acc[k]['n']}), balanced {acc[k]['balanced_accuracy']:.3f}"
                  + (f"  target {tgt}" if tgt else "") + "  " + ", ".join(
                      f"{a} {v['recall']:.2f}/{v['n']}" for a, v in acc[k]["per_answer"].items()))
    sub_rows, sub_acc = _subset_rows(data, val_items, scores)
    print("subset accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in sub_acc.items()), flush=True)
    print(f"reaction check ({reaction_per_modality} demo images per modality at most):", flush=True)
    reaction = reaction_check(dm, enc, data, reaction_per_modality, levels=tuple(reaction_levels),
                              max_types=reaction_types)
    print(f"reacting types: {reaction['fraction_reacting']:.2f}; not reacting: {reaction['not_reacting']}", flush=True)
    missed = missed_targets(acc)
    subset_doc = {
        "what": "held-out items the shipped-model test re-scores through medqm.label.hf.load_model",
        "model_revision": dm.revision,
        "lesion_set": {"per_modality": SUBSET_PREFIX, "variants": cfg.lesion_variants, "seed": cfg.lesion_seed},
        "tolerance": 5e-3, "tolerance_kind": "relative to max(1, |NLL|)", "targets": TARGETS,
        "heldout_accuracy": acc, "reaction_fraction": reaction["fraction_reacting"],
        "missed": missed, "balanced_targets": list(BALANCED),
        "accuracy": sub_acc, "items": sub_rows,
    }
    write_json(subset_doc, model_dir / "eval_subset.json", indent=1, ensure_ascii=False)
    return {"accuracy": acc, "accuracy_by_source": {f"{k[0]}|{k[1]}": v for k, v in acc_src.items()},
            "accuracy_by_modality": {f"{k[0]}|{k[1]}": v for k, v in acc_mod.items()},
            "subset_accuracy": sub_acc, "n_subset": len(sub_rows), "reaction": reaction, "consistency_gap": gap,
            "revision": dm.revision, "eval_seconds": time.perf_counter() - t0,
            "notes": _limitation_notes(model_dir, missed)}


def missed_targets(acc: dict) -> list[str]:
    """Answer types whose target is missed (accuracy, and for `BALANCED` types balanced accuracy too)."""
    out = []
    for t, tgt in TARGETS.items():
        if t in acc:
            got = min(acc[t]["accuracy"], acc[t]["balanced_accuracy"]) if t in BALANCED else acc[t]["accuracy"]
            if got < tgt:
                out.append(t)
    return sorted(out)

