"""Closed-set scoring through the generic hf backend, accuracy tables and the choice of images to distort."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medqm.synth import spread_order

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from medqm.label.hf import HFDiagnosticModel
    from medqm.label.tasks import VQAItem

__all__ = ["accuracy_table", "closed_set_scores", "reaction_images", "spread"]


def closed_set_scores(model: HFDiagnosticModel, items: Sequence[VQAItem], images: dict[str, np.ndarray]) -> list[dict]:
    """Every choice's answer NLL for each item, through the model's generic `answer_nll`.

    Args:
        model: an `HFDiagnosticModel` (`medqm.label.hf.load_model`).
        items: VQA items with ``choices``.
        images: ``item.image -> float pixels in [0, 1]``.

    Returns:
        One dict per item: ``nll`` (choice -> NLL, nats), ``prediction`` (the most likely choice; ties go to the
        first listed), ``correct`` and ``answer_nll`` (the NLL of the correct answer).
    """
    flat_img, flat_q, flat_a, owner = [], [], [], []
    for i, it in enumerate(items):
        if not it.choices:
            raise ValueError(f"item {i} ({it.image_id}: {it.question!r}) has no choices")
        for c in it.choices:
            flat_img.append(images[it.image])
            flat_q.append(it.question)
            flat_a.append(c)
            owner.append(i)
    nll = model.answer_nll(flat_img, flat_q, flat_a) if flat_a else np.zeros(0)
    out = [{"nll": {}} for _ in items]
    for i, a, v in zip(owner, flat_a, nll, strict=True):
        out[i]["nll"][a] = float(v)
    for it, rec in zip(items, out, strict=True):
        scores = rec["nll"]
        pred = min(it.choices, key=lambda c: (scores[c], it.choices.index(c)))
        rec.update(prediction=pred, correct=pred == it.answer, answer_nll=scores[it.answer])
    return out


def accuracy_table(items: Sequence[VQAItem], scores: Sequence[dict], *, by: str | None = None) -> dict:
    """``{answer_type: {"n", "correct", "accuracy"}}`` (or ``{(answer_type, item.meta[by] / modality): ...}``)."""
    table: dict[Any, dict[str, float]] = {}
    for it, s in zip(items, scores, strict=True):
        key = it.answer_type if by is None else (it.answer_type, it.modality if by == "modality" else it.meta.get(by))
        row = table.setdefault(key, {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += int(s["correct"])
    for row in table.values():
        row["accuracy"] = row["correct"] / row["n"]
    return table


def reaction_images(manifest: pd.DataFrame, *, per_modality: int, split: dict[str, str] | None = None) -> list[str]:
    """Up to ``per_modality`` image ids per modality, round-robin over cases (held-out cases first when
    ``split`` is given) and spread within each case; sorted for determinism."""
    chosen = []
    for mod in sorted(manifest["modality"].astype(str).unique()):
        g = manifest[manifest["modality"].astype(str) == mod]
        cases = sorted(g["case_id"].astype(str).unique(),
                       key=lambda c: (0 if split and split.get(c) == "val" else 1, c))
        queues = []
        for c in cases:
            ids = sorted(g.loc[g["case_id"].astype(str) == c, "id"].astype(str))
            queues.append([ids[i] for i in spread_order(len(ids))])  # middle first, then the quarters, ...
        picked: list[str] = []
        while len(picked) < per_modality and any(queues):
            for q in queues:
                if q and len(picked) < per_modality:
                    picked.append(q.pop(0))
        chosen += picked
    return chosen



def spread(items, n: int, key) -> list:
    """Up to n items, round-robin over groups (sorted by ``key``), in a fixed order."""
    groups = defaultdict(list)
    for it in items:
        groups[key(it)].append(it)
    queues = [groups[k] for k in sorted(groups)]
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out

