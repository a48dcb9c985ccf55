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


class Guarantee(BaseModel):
    """The calibrated gate's threshold a verdict used, and what it promises (only when a gate file is loaded)."""

    threshold: str = Field(description="'default' (the overall threshold) or the modality whose own threshold "
                           "applied (its family's: XR for CR, DX, XA, RF)")
    pass_min: float | None = Field(description="the gate's pass threshold; null: no threshold is safe, nothing passes")
    risk: str = Field(description="lost-answer-rate or mean-loss, on the labelling MLLM's MedQM-D loss")
    method: str = Field(description="ltt (Learn then Test, with probability 1 − δ) or crc (conformal, in expectation)")
    alpha: float
    delta: float | None
    pass_rate: float = Field(description="fraction of the calibration images this threshold passed (case-weighted)")
    n_cases: int = Field(description="calibration cases behind this threshold")
    statement: str = Field(description="the guarantee in one sentence, or why there is none")
    scope: str = Field(description="which images the statement is about")
    fallback: str | None = Field(None, description="why this modality uses the overall threshold, when it does")


class ImageResult(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    file: str = Field(description="uploaded file name")
    index: int | None = Field(description="frame or slice index read from the file, when it holds several")
    modality: str | None
    height: int
    width: int
    channels: int
    quality: float = Field(description="MedQM-I quality in [0, 1]; higher is better")
    tasks: dict[str, float] = Field(default_factory=dict, description="quality in [0, 1] per answer type the "
                                    "checkpoint was trained on (e.g. {\"tumour\": 0.83, \"modality\": 0.91}): how "
                                    "well the MLLM can still answer that kind of question; empty for a checkpoint "
                                    "without tasks. The verdict uses the overall quality only")
    verdict: Verdict
    thresholds: Thresholds = Field(description="the thresholds the verdict used (per modality when configured; "
                                   "pass_min from the gate when one is loaded)")
    guarantee: Guarantee | None = Field(None, description="with a calibrated gate: the threshold applied and its "
                                        "guarantee; null without one")
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


class GateThresholdCard(BaseModel):
    """One calibrated threshold of the gate file, as `/v1/model` shows it."""

    pass_min: float | None = Field(description="null: no threshold is safe, nothing passes")
    attained: bool
    pass_rate: float = Field(description="expected pass rate: the calibration images it passed (case-weighted)")
    calibration_risk: float | None = Field(description="on the calibration cases, the risk the method controls "
                                           "(ltt: among passed images, per case; crc: per submitted image)")
    n_cases: int
    n_images: int
    guarantee: str = Field(description="what it promises, in one sentence")


class GateCard(BaseModel):
    """The calibrated gate file the service uses (`medqm gate calibrate`, docs/serve.md)."""

    file: str
    sha256: str = Field(description="of the gate file, for audit logs")
    risk: str
    method: str
    alpha: float
    delta: float | None
    loss_cap: float | None
    default: GateThresholdCard = Field(description="the overall threshold: for modalities without their own")
    by_modality: dict[str, GateThresholdCard] = Field(description="per-modality thresholds, keyed by modality")
    fallbacks: dict[str, str] = Field(description="modality → why it uses the overall threshold")
    provenance: dict[str, Any] = Field(description="labels, labelling model, checkpoint, calibration cases")


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
    tasks: list[str] = Field(default_factory=list, description="answer types with their own quality in each "
                             "result's 'tasks' (empty: overall quality only)")
    config: dict[str, Any]
    trained_on: dict[str, Any] | None
    quality_map: dict[str, Any]
    thresholds: Thresholds = Field(description="configured thresholds; with a gate, pass_min is null (the gate "
                                   "sets it) and review_min applies, lowered to the gate's pass_min when above it")
    modality_thresholds: dict[str, Thresholds]
    limits: Limits
    batching: Batching
    gate: GateCard | None = Field(None, description="the calibrated gate, when one is loaded")


class Health(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ok"] = "ok"
    model_id: str
    uptime_s: float
    queued: int = Field(description="images waiting for the model")
    queue_capacity: int = Field(description="most images that may wait (batching.max_queue); beyond, 503")
    gate_loaded: bool = Field(False, description="a calibrated gate file sets the pass thresholds")


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. upload_too_large, unsupported_format, overloaded")
    detail: str = Field(description="what was wrong, naming the file when one was")
    file: str | None = None
    request_id: str | None = None
