"""The quality gate's one validated configuration: model, verdict thresholds (fixed, or from a calibrated gate
file), request limits, batching, CORS."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from medqm.evaluate.gate import METHODS, RISKS, Gate, GateThreshold
from medqm.io import canonical_modality, modality_family

Verdict = Literal["pass", "review", "reject"]


class Thresholds(BaseModel):
    """Quality cut-offs: ``pass`` at or above ``pass_min``, ``review`` at or above ``review_min``, else ``reject``.

    With the default quality map, Q = 0.5 means the correct answer became 2× less likely than on a clean
    image and Q = 0.25 about 2.8× (`medqm.label.quality`). ``pass_min`` None: nothing passes (what a gate file
    says when its calibration found no safe threshold; in the configured ``thresholds`` of a service with a
    gate, None means that the gate file sets it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pass_min: float | None = Field(0.5, ge=0.0, le=1.0, description="quality at or above which an image passes; "
                                   "null: nothing passes (a gate without a safe threshold)")
    review_min: float = Field(0.25, ge=0.0, le=1.0,
                              description="quality at or above which it goes to review; below, reject")

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.pass_min is not None and self.review_min > self.pass_min:
            raise ValueError(f"review_min ({self.review_min}) must not exceed pass_min ({self.pass_min})")
        return self

    def verdict(self, quality: float) -> Verdict:
        if self.pass_min is not None and quality >= self.pass_min:
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


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_threshold(where: str, t: GateThreshold) -> None:
    """A threshold of a gate file that the service can use, or a ValueError saying what is wrong with it."""
    if t.pass_min is not None and not (_number(t.pass_min) and 0.0 <= t.pass_min <= 1.0):
        raise ValueError(f"{where}: pass_min must be a quality in [0, 1] or null, got {t.pass_min!r}")
    if not (_number(t.pass_rate) and 0.0 <= t.pass_rate <= 1.0):
        raise ValueError(f"{where}: pass_rate must lie in [0, 1], got {t.pass_rate!r}")
    if not (isinstance(t.n_cases, int) and t.n_cases > 0):
        raise ValueError(f"{where}: n_cases must be a positive integer, got {t.n_cases!r}")
    if t.risk not in RISKS or t.method not in METHODS:
        raise ValueError(f"{where}: risk {t.risk!r} / method {t.method!r} not one of {RISKS} / {METHODS}")
    if not (_number(t.alpha) and t.alpha > 0):
        raise ValueError(f"{where}: alpha must be a positive number, got {t.alpha!r}")
    if t.method == "ltt" and not (_number(t.delta) and 0 < t.delta < 1):
        raise ValueError(f"{where}: a Learn-then-Test threshold needs delta in (0, 1), got {t.delta!r}")
    t.guarantee()  # it must be able to say what it promises


def load_gate(path: str | Path) -> Gate:
    """A calibrated gate file (``medqm gate calibrate``), checked so that the service can rely on it.

    Modality keys are turned into canonical names (``MRI`` → ``MR``). Any problem is a ValueError that names
    the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such gate file" if not path.exists() else f"{path}: a gate file must be a file")
    gate = Gate.load(path)  # a ValueError naming the file: unreadable, another format, missing or malformed fields
    try:
        if gate.risk not in RISKS or gate.method not in METHODS:
            raise ValueError(f"risk {gate.risk!r} / method {gate.method!r} not one of {RISKS} / {METHODS}")
        if not isinstance(gate.by_modality, dict) or not isinstance(gate.fallbacks, dict):
            raise ValueError("by_modality and fallbacks must be mappings")
        _check_threshold("default", gate.default)
        by_modality = {}
        for key, t in gate.by_modality.items():
            _check_threshold(f"by_modality.{key}", t)
            by_modality[canonical_modality(key) or key] = t  # an unknown modality: a ValueError naming it
        gate.by_modality = by_modality
        gate.fallbacks = {_canonical_or_same(k): str(v) for k, v in gate.fallbacks.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a usable MedQM gate file ({e})") from None
    return gate


def _canonical_or_same(modality: str) -> str:
    try:
        return canonical_modality(modality) or modality
    except ValueError:
        return modality


@dataclass(frozen=True)
class GateRule:
    """What a gate decides for one modality: the threshold that applies, under which key, and why."""

    key: str  # "default", or the modality (or modality family) whose own threshold applies
    threshold: GateThreshold
    fallback: str | None  # why the modality uses the overall threshold, when the gate file says so


class ServeConfig(BaseModel):
    """Everything `medqm serve` and `create_app` take. Load from YAML/JSON with `load_config`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    gate: Path | None = Field(None, description="calibrated gate file (`medqm gate calibrate`): the pass thresholds "
                              "and their guarantee come from it; review_min stays the configured one")
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
    _gate: Gate | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _gate_owns_pass_thresholds(cls, data: Any) -> Any:
        """With a gate, pass thresholds come from the gate file only: a configured pass_min or per-modality
        thresholds alongside it are refused (which one should win would be a guess); review_min may stay."""
        if not isinstance(data, dict) or data.get("gate") is None:
            return data
        th = data.get("thresholds")
        if isinstance(th, Thresholds):
            th = {k: getattr(th, k) for k in th.model_fields_set}
        th = dict(th or {}) if isinstance(th, dict) or th is None else th
        if isinstance(th, dict) and th.get("pass_min") is not None:
            raise ValueError(f"the gate file {data['gate']} sets the pass threshold: drop thresholds.pass_min "
                             "(--pass-min) or the gate (--gate); review_min may stay")
        if data.get("modality_thresholds"):
            raise ValueError(f"the gate file {data['gate']} sets the per-modality pass thresholds: drop "
                             "modality_thresholds or the gate (--gate)")
        if isinstance(th, dict):
            data = {**data, "thresholds": {**th, "pass_min": None}}  # None here: the gate decides
        return data

    @field_validator("gate")
    @classmethod
    def _gate_file_is_usable(cls, v: Path | None) -> Path | None:
        if v is not None:
            load_gate(v)  # a clear error naming the file, before anything else starts
        return v

    @model_validator(mode="after")
    def _load_gate(self) -> ServeConfig:
        self._gate = load_gate(self.gate) if self.gate is not None else None
        return self

    @property
    def loaded_gate(self) -> Gate | None:
        """The calibrated gate read from ``gate`` (None without one)."""
        return self._gate

    def gate_rule(self, modality: str | None) -> GateRule | None:
        """The gate's threshold for ``modality``: its own when calibrated, else its family's (XR for CR, DX, XA,
        RF), else the overall one; None without a gate."""
        gate = self._gate
        if gate is None:
            return None
        keys = [k for k in (modality, modality_family(modality)) if k]
        for key in keys:
            if key in gate.by_modality:
                return GateRule(key, gate.threshold_for(key), None)
        fallback = next((gate.fallbacks[k] for k in keys if k in gate.fallbacks), None)
        if fallback is None and keys and (gate.by_modality or gate.fallbacks):
            fallback = "no calibration cases of this modality: the overall threshold applies"
        return GateRule("default", gate.default, fallback)

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
        default. With a gate: pass_min from the gate (`gate_rule`; None, nothing passes, when it found no safe
        threshold) and the configured review_min, lowered to pass_min when above it."""
        rule = self.gate_rule(modality)
        if rule is not None:
            pass_min, review_min = rule.threshold.pass_min, self.thresholds.review_min
            if pass_min is not None:
                review_min = min(review_min, float(pass_min))
            return Thresholds(pass_min=pass_min, review_min=review_min)
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
