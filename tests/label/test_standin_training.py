"""The stand-in's training helpers (`medqm.label.standin`), without training it."""

from __future__ import annotations

import math

import numpy as np
import torch

from medqm.label.standin.augment import sampling_weights
from medqm.label.standin.scoring import spread
from medqm.label.standin.training import TrainConfig, lr_scheduler
from medqm.label.tasks import VQAItem
from medqm.synth import spread_order


def _closed_form(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio × peak (the schedule the card describes)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def test_lr_schedule_is_warmup_then_cosine():
    for steps, warmup in ((40, 7), (10, 1), (5, 0)):
        cfg = TrainConfig(steps=steps, warmup=warmup, lr=5e-4, min_lr_ratio=0.05)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = lr_scheduler(opt, cfg)
        got = []
        for _ in range(steps):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        np.testing.assert_allclose(got, [_closed_form(s, cfg) for s in range(steps)], rtol=1e-9)
        assert got[-1] > cfg.lr * cfg.min_lr_ratio * (1 - 1e-9)


def _item(t: str, answer: str, modality: str, i: int) -> VQAItem:
    return VQAItem(f"{i}.png", f"q {t}", answer, f"c{i}", t, str(i), modality, [answer])


def test_sampling_weights_give_each_type_its_share_and_balance_lesion_answers():
    items = ([_item("modality", "CT", "CT", i) for i in range(9)] + [_item("modality", "MR", "MR", 9)]
             + [_item("lesion_present", "yes", "CT", 10 + i) for i in range(8)]
             + [_item("lesion_present", "no", "CT", 20 + i) for i in range(2)])
    w = sampling_weights(items, {"modality": 0.25, "lesion_present": 0.75})
    assert abs(w.sum() - 1) < 1e-12
    by_type = {t: sum(wi for wi, it in zip(w, items, strict=True) if it.answer_type == t)
               for t in ("modality", "lesion_present")}
    assert abs(by_type["modality"] - 0.25) < 1e-12 and abs(by_type["lesion_present"] - 0.75) < 1e-12
    yes = sum(wi for wi, it in zip(w, items, strict=True) if it.answer == "yes")
    assert abs(yes - 0.375) < 1e-12  # yes and no share the modality's mass equally despite 8 : 2
    mr = w[9] / w[0]
    assert abs(mr - 3 / 1) < 1e-9  # within modality: each group ∝ sqrt(size): sqrt(1)/1 vs sqrt(9)/9


def test_spread_helpers():
    for n in (0, 1, 2, 7, 33):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
    assert spread_order(5)[0] == 2  # the middle first
    picked = spread([("a", 1), ("a", 2), ("b", 3)], 2, key=lambda x: x[0])
    assert picked == [("a", 1), ("b", 3)]  # round-robin over the groups
