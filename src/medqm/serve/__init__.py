"""The quality gate: MedQM-I over HTTP, in front of a multimodal LLM (`medqm serve`).

``POST /v1/score`` takes uploaded images (DICOM, PNG, JPEG, TIFF, NIfTI slices…) and answers, per image,
the quality, a ``pass`` / ``review`` / ``reject`` verdict, the diagnostic loss the quality stands for, and
optionally a heatmap. Requests from concurrent clients are micro-batched into shared forward passes.
Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart); docs/serve.md describes the service.
"""

from medqm._extras import require

require("serve", "medqm serve (medqm.serve)")

from ._app import SCORE_PATH, GateError, create_app, run  # noqa: E402
from ._batching import MicroBatcher, QueueFull, Scored  # noqa: E402
from ._config import Batching, GateRule, Limits, ServeConfig, Thresholds, load_config, load_gate  # noqa: E402
from ._schemas import (  # noqa: E402
    DiagnosticLoss,
    ErrorResponse,
    GateCard,
    GateThresholdCard,
    Guarantee,
    Health,
    ImageResult,
    ImageTiming,
    ModelCard,
    ScoreResponse,
)

__all__ = [
    "create_app",
    "run",
    "ServeConfig",
    "Thresholds",
    "Limits",
    "Batching",
    "load_config",
    "load_gate",
    "GateRule",
    "MicroBatcher",
    "QueueFull",
    "Scored",
    "GateError",
    "SCORE_PATH",
    "ScoreResponse",
    "ImageResult",
    "ImageTiming",
    "DiagnosticLoss",
    "ModelCard",
    "GateCard",
    "GateThresholdCard",
    "Guarantee",
    "Health",
    "ErrorResponse",
]
