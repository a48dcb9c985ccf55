"""Training losses (the agreement metrics are tested with `medqm.metrics`, in tests/evaluate/test_metrics.py)."""

import pytest
import torch

from medqm.train import QualityLoss, pairwise_rank_loss, plcc_loss


def test_plcc_loss():
    t = torch.tensor([0.1, 0.4, 0.5, 0.9])
    assert plcc_loss(2 * t + 1, t).item() == pytest.approx(0.0, abs=1e-6)
    assert plcc_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)
    assert plcc_loss(t, torch.full((4,), 0.3)).item() == 0.0  # constant targets: nothing to rank
    p = torch.rand(4, requires_grad=True)
    plcc_loss(p, t).backward()
    assert torch.isfinite(p.grad).all()


def test_pairwise_rank_loss_prefers_the_right_order():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert pairwise_rank_loss(t, t) < pairwise_rank_loss(t.flip(0), t)
    assert pairwise_rank_loss(t, torch.full((3,), 0.5)).item() == 0.0


def test_quality_loss_combines_terms():
    out = {"score": torch.tensor([0.2, 0.5, 0.8]), "gates": torch.full((3, 4), 0.25), "balance_loss": torch.tensor(1.0)}
    t = torch.tensor([0.2, 0.5, 0.8])
    total, parts = QualityLoss(rank="both")(out, t)
    assert parts["mse"] == pytest.approx(0) and parts["balance"] == pytest.approx(0) and total.item() < 0.01
    with pytest.raises(ValueError, match="rank must be"):
        QualityLoss(rank="listwise")

