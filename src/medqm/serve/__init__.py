"""The quality gate: MedQM-I over HTTP, in front of a multimodal LLM (`medqm serve`).

``POST /v1/score`` takes uploaded images (DICOM, PNG, JPEG, TIFF, NIfTI slices…) and answers, per image,
the quality, a ``pass`` / ``review`` / ``reject`` verdict, the diagnostic loss the quality stands for, and
optionally a heatmap. Requests from concurrent clients are micro-batched into shared forward passes.
Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart); docs/serve.md describes the service.
"""

from importlib.util import find_spec

_NEEDS = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
_missing = [pkg for pkg, mods in _NEEDS.items() if not any(find_spec(m) for m in mods)]
if _missing:
    raise ImportError(f"medqm.serve needs {', '.join(_missing)}: pip install 'medqm[serve]'")

from ._app import SCORE_PATH, GateError, create_app, run  # noqa: E402
from ._batching import MicroBatcher, QueueFull, Scored  # noqa: E402
from ._config import Batching, Limits, ServeConfig, Thresholds, load_config  # noqa: E402
from ._schemas import DiagnosticLoss, ErrorResponse, Health, ImageResult, ImageTiming, ModelCard, ScoreResponse  # noqa: E402

__all__ = [
    "create_app",
    "run",
    "ServeConfig",
    "Thresholds",
    "Limits",
    "Batching",
    "load_config",
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
    "Health",
    "ErrorResponse",
]
