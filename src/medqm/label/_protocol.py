"""What MedQM-D needs from a diagnostic model: the teacher-forced NLL of a given answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DiagnosticModel(Protocol):
    """A vision-language model scored by how likely it finds the correct answer.

    ``answer_nll`` returns, per sample, the negative log-likelihood in nats of the answer tokens only
    (summed over the answer's tokens, the prompt and image tokens never counted), teacher-forced: the log
    of how unlikely the model finds that exact answer. Images are float32 display pixels in [0, 1]
    (H×W or H×W×3), as `medqm.io.MedImage.pixels`.
    """

    model_id: str
    revision: str

    def answer_nll(self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        ...
