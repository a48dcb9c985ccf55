"""Diagnostic loss and the sigmoid quality map of MedQM-D.

For a reference image r with question/answer pairs j = 1..m and a distorted version x̃::

    D(x̃) = mean_j [NLL_j(x̃) − NLL_j(r)]          (nats)

is a log-likelihood ratio: on average the correct answers became exp(D) times less likely. The quality is

    Q = σ((c − D) / s) = 1 / (1 + exp((D − c) / s))

with c = ln 2 and s = ln 2 / ln 9 by default, chosen so the numbers read in likelihood terms:

    Q = 0.9  ⇔  D = 0        (the answers are exactly as likely as on the clean image)
    Q = 0.5  ⇔  D = ln 2     (the correct answers became half as likely)
    Q = 0.1  ⇔  D = 2 ln 2   (a quarter as likely)

Equivalently Q = 1 / (1 + 9^(log2(L_ref / L_dist) − 1)). The map is monotone decreasing, bounded, and
keeps D's sign (D < 0, an answer made *more* likely, gives Q > 0.9). docs/medqm-d.md explains the choice.

The same map serves the ``kl`` label definition (`medqm.label.runner.LabelDefinition`), where D is a mean
KL divergence of the answer distributions, never negative: Q ≤ 0.9, 0.9 still meaning "unchanged", and
Q = 0.5 a KL of ln 2 nats per question rather than "half as likely".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class QualityMap:
    """Q = σ((center − D) / scale); parameters in nats. Stored with every label set."""

    center: float = LN2
    scale: float = LN2 / math.log(9.0)

    def __post_init__(self):
        if not (self.scale > 0 and math.isfinite(self.scale) and math.isfinite(self.center)):
            raise ValueError(f"quality map needs a finite center and a positive scale, got {self}")

    def __call__(self, loss):
        """Diagnostic loss (nats) → quality in (0, 1)."""
        z = (np.asarray(loss, dtype=np.float64) - self.center) / self.scale
        q = 0.5 * (1.0 - np.tanh(0.5 * z))  # = 1 / (1 + e^z), without overflow for large |z|
        return float(q) if np.ndim(q) == 0 else q

    def inverse(self, quality):
        """Quality in (0, 1) → diagnostic loss (nats); ±inf at 0 and 1."""
        q = np.asarray(quality, dtype=np.float64)
        if np.any((q < 0) | (q > 1)) or np.any(np.isnan(q)):
            raise ValueError("quality must lie in [0, 1]")
        with np.errstate(divide="ignore"):
            d = self.center - self.scale * (np.log(q) - np.log1p(-q))
        return float(d) if np.ndim(d) == 0 else d

    def to_dict(self) -> dict:
        return {"formula": "Q = 1 / (1 + exp((D - center) / scale))", **asdict(self)}


DEFAULT_MAP = QualityMap()


def loss_to_quality(loss, quality_map: QualityMap = DEFAULT_MAP):
    return quality_map(loss)


def quality_to_loss(quality, quality_map: QualityMap = DEFAULT_MAP):
    """Invert the quality map: the diagnostic loss (nats) a quality corresponds to."""
    return quality_map.inverse(quality)


def likelihood_ratio(quality, quality_map: QualityMap = DEFAULT_MAP):
    """How many times less likely the correct answer became, for a given quality (exp of the loss)."""
    return np.exp(quality_map.inverse(quality))


def diagnostic_loss(nll_distorted, nll_reference) -> float:
    """Mean over the image's questions of NLL(distorted) − NLL(reference), in nats."""
    a, b = np.asarray(nll_distorted, np.float64), np.asarray(nll_reference, np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need matching, non-empty per-question NLLs, got {a.shape} and {b.shape}")
    return float(np.mean(a - b))
