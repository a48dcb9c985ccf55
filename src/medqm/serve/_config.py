"""The quality gate's one validated configuration: model, verdict thresholds, request limits, batching, CORS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medqm.io import canonical_modality, modality_family

Verdict = Literal["pass", "review", "reject"]


class Thresholds(BaseModel):
    """Quality cut-offs: ``pass`` at or above ``pass_min``, ``review`` at or above ``review_min``, else ``reject``.

    With the default quality map, Q = 0.5 means the correct answer became 2× less likely than on a clean
    image and Q = 0.25 about 2.8× (`medqm.label.quality`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pass_min: float = Field(0.5, ge=0.0, le=1.0, description="quality at or above which an image passes")
    review_min: float = Field(0.25, ge=0.0, le=1.0,
                              description="quality at or above which it goes to review; below, reject")

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.review_min > self.pass_min:
            raise ValueError(f"review_min ({self.review_min}) must not exceed pass_min ({self.pass_min})")
        return self

    def verdict(self, quality: float) -> Verdict:
        if quality >= self.pass_min:
            return "pass"
        return "review" if quality >= self.review_min else "reject"


class Limits(BaseModel):
    """What one request may carry; anything beyond is refused with a 4xx before the model sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_upload_bytes: int = Field(32 * 2**20, gt=0, description="request body size (all files together), bytes")
    max_files: int = Field(16, gt=0, description="files per request")
    max_pixels: int = Field(4096 * 4096, gt=0, description="pixels per image, judged from the header before decoding")


class Batching(BaseModel):
    """Micro-batching: images from concurrent requests that arrive within ``window_ms`` share one forward pass.

    At most ``max_queue`` images wait for the model; a request whose images do not fit is answered 503 with a
    ``Retry-After`` of ``retry_after_s`` seconds (backpressure: memory stays bounded under any load).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_ms: float = Field(5.0, ge=0.0, le=1000.0,
                             description="how long the first image of a batch waits for company")
    max_batch: int = Field(32, ge=1, le=1024, description="images per forward pass")
    max_queue: int = Field(256, ge=1, le=65536, description="images waiting for the model; beyond, requests get 503")
    retry_after_s: int = Field(1, ge=1, le=3600, description="the Retry-After (seconds) of a 503 for a full queue")


class ServeConfig(BaseModel):
    """Everything `medqm serve` and `create_app` take. Load from YAML/JSON with `load_config`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Path | None = Field(None, description="MedQM-I checkpoint folder; None for the one shipped with medqm")
    runtime: Literal["auto", "torch", "onnx"] = "auto"
    device: str = "cpu"
    num_threads: int | None = Field(None, ge=1, description="CPU threads for the model (default: the runtime's choice)")
    thresholds: Thresholds = Thresholds()
    modality_thresholds: dict[str, Thresholds] = Field(
        default_factory=dict, description="per-modality overrides, keyed by modality (CT, MR, XR, …)")
    limits: Limits = Limits()
    batching: Batching = Batching()
    cors_origins: list[str] = Field(default_factory=list,
                                    description="origins allowed to call from a browser; empty: CORS off")
    heatmap_max_side: int = Field(512, ge=16, le=4096, description="longest side of a returned heatmap PNG, pixels")

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServeConfig:
        if self.batching.max_queue < self.limits.max_files:
            raise ValueError(f"batching.max_queue ({self.batching.max_queue}) must be at least limits.max_files "
                             f"({self.limits.max_files}): a request with the most files must fit in an empty queue")
        return self

    @field_validator("modality_thresholds")
    @classmethod
    def _canonical_keys(cls, v: dict[str, Thresholds]) -> dict[str, Thresholds]:
        return {canonical_modality(k): t for k, t in v.items()}

    def thresholds_for(self, modality: str | None) -> Thresholds:
        """The modality's own thresholds when configured, else its family's (XR for CR, DX, XA, RF), else the
        default."""
        if not modality:
            return self.thresholds
        for key in (modality, modality_family(modality)):
            if key in self.modality_thresholds:
                return self.modality_thresholds[key]
        return self.thresholds


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into ``base``, skipping None values (unset command-line options)."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = _merge(out.get(k) or {}, v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """A `ServeConfig` from a YAML or JSON file (optional) with ``overrides`` (nested dicts, None = unset) on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return ServeConfig.model_validate(_merge(data, overrides or {}))
