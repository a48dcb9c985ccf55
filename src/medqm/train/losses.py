"""Training losses: a regression term, a rank-aware term, the MoE load-balancing term and the per-task terms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def plcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 − Pearson correlation over the batch (differentiable; 0 for perfectly linear agreement).

    Returns 0 when the batch has fewer than two images or constant targets (nothing to rank).
    """
    if pred.numel() < 2:
        return pred.sum() * 0
    p = pred - pred.mean()
    t = target - target.mean()
    if float(t.abs().max()) < eps:
        return pred.sum() * 0
    r = (p * t).sum() / (p.norm() * t.norm() + eps)
    return 1 - r


def pairwise_rank_loss(pred: torch.Tensor, target: torch.Tensor, *, margin: float = 0.0,
                       min_gap: float = 0.01) -> torch.Tensor:
    """Logistic pairwise ranking loss over all pairs whose targets differ by more than ``min_gap``.

    For a pair with target_i > target_j the loss is softplus(−(pred_i − pred_j − margin) / 0.05); the mean over
    such pairs is returned (0 when there are none).
    """
    dt = target.unsqueeze(1) - target.unsqueeze(0)
    dp = pred.unsqueeze(1) - pred.unsqueeze(0)
    mask = dt > min_gap
    if not bool(mask.any()):
        return pred.sum() * 0
    return F.softplus(-(dp[mask] - margin) / 0.05).mean()


class QualityLoss(torch.nn.Module):
    """loss = w_reg · MSE + w_rank · rank term (``'plcc'``, ``'pairwise'`` or ``'both'``) + w_balance · MoE balance
    (+ w_task · the per-task term, when task targets are given).

    The balance term (1 at an even expert load) enters as (balance − 1) so a balanced head adds nothing. The
    per-task term is the mean over tasks of the same w_reg · MSE + w_rank · rank term on the task outputs
    (``task_scores``), each over the images that have a target for that task (NaN targets are left out, so they
    give no gradient); a task without any target in the batch is skipped.
    """

    def __init__(self, *, w_reg: float = 10.0, w_rank: float = 1.0, rank: str = "plcc", w_balance: float = 0.01,
                 w_task: float = 0.5):
        super().__init__()
        if rank not in ("plcc", "pairwise", "both", "none"):
            raise ValueError(f"rank must be 'plcc', 'pairwise', 'both' or 'none', got {rank!r}")
        if not (w_task >= 0 and math.isfinite(w_task)):
            raise ValueError(f"w_task (the task weight) must be a finite number >= 0, got {w_task!r}")
        self.w_reg, self.w_rank, self.rank, self.w_balance, self.w_task = w_reg, w_rank, rank, w_balance, w_task

    def _fit_terms(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reg = F.mse_loss(pred, target)
        if self.rank == "plcc":
            rank = plcc_loss(pred, target)
        elif self.rank == "pairwise":
            rank = pairwise_rank_loss(pred, target)
        elif self.rank == "both":
            rank = 0.5 * (plcc_loss(pred, target) + pairwise_rank_loss(pred, target))
        else:
            rank = pred.sum() * 0
        return reg, rank

    def task_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over tasks (columns) of w_reg · MSE + w_rank · rank term on the rows whose target is not NaN."""
        pred, target = pred.float(), target.float()
        if pred.shape != target.shape or pred.ndim != 2:
            raise ValueError(f"task predictions and targets must both be (batch, tasks), got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        terms = []
        for k in range(target.shape[1]):
            ok = torch.isfinite(target[:, k])
            if bool(ok.any()):
                reg, rank = self._fit_terms(pred[ok, k], target[ok, k])
                terms.append(self.w_reg * reg + self.w_rank * rank)
        return torch.stack(terms).mean() if terms else pred.sum() * 0

    def forward(self, out: dict[str, torch.Tensor], target: torch.Tensor,
                task_target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``out``: the model's outputs; the terms compare what its head regresses (``raw`` and ``task_raw``, the
        scores themselves for outputs without them) with ``target`` / ``task_target`` on that scale
        (`medqm.model.MedQMI.quality_to_raw`)."""
        pred = out.get("raw", out["score"]).float()
        target = target.float()
        reg, rank = self._fit_terms(pred, target)
        balance = out["balance_loss"].float() - 1.0 if out["gates"].shape[-1] > 1 else pred.sum() * 0
        total = self.w_reg * reg + self.w_rank * rank + self.w_balance * balance
        terms = [("mse", reg), ("rank", rank), ("balance", balance)]
        if task_target is not None and task_target.shape[-1] > 0:
            if "task_scores" not in out:
                raise ValueError("task targets were given but the model has no task outputs (MedQMIConfig.tasks)")
            tasks = self.task_loss(out.get("task_raw", out["task_scores"]), task_target)
            total = total + self.w_task * tasks
            terms.append(("tasks", tasks))
        return total, {k: float(v.detach()) for k, v in [("loss", total), *terms]}


__all__ = ["plcc_loss", "pairwise_rank_loss", "QualityLoss"]
