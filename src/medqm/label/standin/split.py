"""The stand-in's case-level split into training and held-out cases."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["case_split"]


def _answer_keys(g: pd.DataFrame) -> set[tuple[str, str]]:
    from medqm.label.tasks import BODY_PART_SYNONYMS

    keys = set()
    for col in ("body_part", "plane"):
        if col not in g:
            continue
        for v in g[col].astype(str):
            v = v.strip().lower()
            if v and v not in ("nan", "none"):
                keys.add((col, BODY_PART_SYNONYMS.get(v, v) if col == "body_part" else v))
    return keys


def case_split(manifest: pd.DataFrame, *, fraction: float = 0.3, max_fraction: float = 0.5,
               seed: int = 0) -> dict[str, str]:
    """Assign every case (patient, volume, slide) to ``"train"`` or ``"val"``, stratified by modality.

    Per modality with at least two cases, cases are visited in a seeded random order and held out while

    - the held-out images stay ≤ ``max_fraction`` of the modality's images (training keeps most of them), and
    - every body part and plane/view of a held-out case still occurs in the modality's training cases (a
      held-out case tests a new patient of a seen kind; an answer never seen in training cannot be learned),

    until they reach ``fraction`` of the modality's images. A modality with one case (or whose cases each have
    their own body part or view) keeps all its cases in training; the card says which.

    Args:
        manifest: a collection's manifest (``load_manifest``) with ``case_id``, ``modality``, ``body_part``
            and ``plane``.
        fraction: target share of each modality's images to hold out.
        max_fraction: largest share held out.
        seed: seeds the visiting order.

    Returns:
        ``{case_id: "train" | "val"}`` for every case of the manifest.
    """
    if not 0 < fraction <= max_fraction < 1:
        raise ValueError(f"need 0 < fraction ≤ max_fraction < 1, got fraction={fraction}, max_fraction={max_fraction}")
    mods = manifest.groupby("case_id")["modality"].nunique()
    if (mods > 1).any():
        raise ValueError(f"cases spanning several modalities: {sorted(mods[mods > 1].index)}")
    rng = np.random.default_rng(seed)
    split = {str(c): "train" for c in manifest["case_id"]}
    for mod in sorted(manifest["modality"].astype(str).unique()):
        g = manifest[manifest["modality"].astype(str) == mod]
        cases = sorted(g["case_id"].astype(str).unique())
        if len(cases) < 2:
            continue
        n = len(g)
        held: list[str] = []
        for c in rng.permutation(cases):
            trial = held + [str(c)]
            out = g["case_id"].astype(str).isin(trial)
            if out.sum() > max_fraction * n or out.all():
                continue
            if not _answer_keys(g[g["case_id"].astype(str) == c]) <= _answer_keys(g[~out]):
                continue
            held = trial
            if out.sum() >= fraction * n:
                break
        for c in held:
            split[c] = "val"
    return split

