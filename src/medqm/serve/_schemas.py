"""Response bodies of the quality gate (they are also the OpenAPI schema at ``/docs``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._config import Batching, Limits, Thresholds, Verdict


class DiagnosticLoss(BaseModel):
    """The quality read back as likelihood: the inverse of the MedQM-D quality map."""

    nats: float = Field(description="diagnostic loss D = mean NLL increase of the correct answers, nats")
    likelihood_ratio: float = Field(description="exp(D): how many times less likely the correct answer becomes")
    summary: str = Field(description="the same in words")


class ImageTiming(BaseModel):
    read_ms: float = Field(description="decoding this file")
    queue_ms: float = Field(description="waiting for the model (micro-batching window and earlier batches)")
    inference_ms: float = Field(description="the forward pass this image was part of")
    batch_size: int = Field(description="images in that forward pass")


class ImageResult(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    file: str = Field(description="uploaded file name")
    index: int | None = Field(description="frame or slice index read from the file, when it holds several")
    modality: str | None
    height: int
    width: int
    channels: int
    quality: float = Field(description="MedQM-I quality in [0, 1]; higher is better")
    verdict: Verdict
    thresholds: Thresholds = Field(description="the thresholds the verdict used (per modality when configured)")
    diagnostic_loss: DiagnosticLoss
    expert: int = Field(description="the mixture-of-experts head's dominant expert")
    timing: ImageTiming
    heatmap_png: str | None = Field(None, description="base64 PNG of the image with the model's attention over it")


class ScoreResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    model_id: str
    results: list[ImageResult]
    total_ms: float = Field(description="server time from the first byte of the request to the answer")


class ModelCard(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    checkpoint: str
    architecture: str | None
    medqm_version: str | None = Field(description="medqm version that wrote the checkpoint")
    num_params: int | None
    img_size: int
    runtime: str
    device: str
    heatmaps: bool
    config: dict[str, Any]
    trained_on: dict[str, Any] | None
    quality_map: dict[str, Any]
    thresholds: Thresholds
    modality_thresholds: dict[str, Thresholds]
    limits: Limits
    batching: Batching


class Health(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ok"] = "ok"
    model_id: str
    uptime_s: float
    queued: int = Field(description="images waiting for the model")
    queue_capacity: int = Field(description="most images that may wait (batching.max_queue); beyond, 503")


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. upload_too_large, unsupported_format, overloaded")
    detail: str = Field(description="what was wrong, naming the file when one was")
    file: str | None = None
    request_id: str | None = None
