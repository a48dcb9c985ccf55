"""The FastAPI app of the quality gate: read uploads with `medqm.io`, score with MedQM-I, give verdicts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import math
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from medqm import __version__
from medqm.io import MedImage, MedQMReadError, MedQMUnsupportedFormatError, canonical_modality, read_image, sniff_format
from medqm.label.quality import DEFAULT_MAP, QualityMap
from medqm.model import Scorer, checkpoint_info
from medqm.model.scoring import heatmap_overlay

from ._batching import MicroBatcher, QueueFull, Scored
from ._config import GateRule, ServeConfig
from ._schemas import (
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

log = logging.getLogger("medqm.serve")

SCORE_PATH = "/v1/score"
_MULTI_IMAGE = ("dicom", "nifti", "nrrd")  # formats where a slice / frame index means something
_SUFFIX = re.compile(r"(\.nii\.gz|\.[A-Za-z0-9]{1,8})$")
_LOGGED_PATHS = frozenset({"/", "/healthz", "/v1/model", SCORE_PATH, "/docs", "/redoc", "/openapi.json"})
_DRAIN_BYTES = 64 * 2**20  # read (and drop) at most this much of an oversized body so the client sees the 413


class GateError(HTTPException):
    """A refused request: HTTP status, a short machine-readable code, and the file it concerns."""

    def __init__(self, status_code: int, error: str, detail: str, file: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code, detail, headers)
        self.error, self.file = error, file


def _error_response(status: int, error: str, detail: str, file: str | None, request_id: str | None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=error, detail=detail, file=file, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------------- the loaded model


class _Gate:
    """The loaded model and what the endpoints report about it."""

    def __init__(self, cfg: ServeConfig, scorer: Scorer | None = None):
        self.cfg = cfg
        info = checkpoint_info(cfg.model)  # None: the shipped checkpoint
        self.scorer = scorer or Scorer(info.path, device=cfg.device, runtime=cfg.runtime,
                                       num_threads=cfg.num_threads, batch_size=cfg.batching.max_batch)
        self.meta = info.meta
        self.model_id = f"{info.path.name}@{info.weights_sha256[:12]}"
        self.checkpoint = info.path
        self.trained_on = info.trained_on
        qm = (self.trained_on or {}).get("quality_map") or {}
        # the quality map of the labels the model learned from; the default map otherwise
        self.quality_map = QualityMap(**{k: qm[k] for k in ("center", "scale") if k in qm}) if qm else DEFAULT_MAP
        b = cfg.batching
        self.batcher = MicroBatcher(self.scorer, enabled=b.enabled, window_ms=b.window_ms, max_batch=b.max_batch,
                                    max_queue=b.max_queue)
        self.gate_card = _gate_card(cfg)
        self.started = time.time()

    def health(self) -> Health:
        return Health(model_id=self.model_id, uptime_s=round(time.time() - self.started, 3),
                      queued=self.batcher.queue_depth, queue_capacity=self.batcher.max_queue,
                      gate_loaded=self.gate_card is not None)

    def overloaded(self, full: QueueFull) -> GateError:
        """The 503 for a full queue, with its ``Retry-After``."""
        retry = self.cfg.batching.retry_after_s
        return GateError(503, "overloaded", f"the service is at capacity ({full.depth} of {full.capacity} queue "
                         f"places taken, {full.offered} asked for); retry after {retry} s",
                         headers={"Retry-After": str(retry)})

    def no_room(self, n: int) -> GateError | None:
        """The 503 when ``n`` images would not fit in the queue now, else None (checked again on submitting)."""
        depth, capacity = self.batcher.queue_depth, self.batcher.max_queue
        return self.overloaded(QueueFull(n, depth, capacity)) if depth + n > capacity else None

    async def score(self, images: list[MedImage], heatmap: bool) -> list[Scored]:
        """All ``images`` through the micro-batcher, or a 503 when the queue cannot take them all."""
        try:
            futures = self.batcher.submit_all(images, heatmap=heatmap)
        except QueueFull as full:
            raise self.overloaded(full) from None
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    def results(self, images: list[tuple[str, MedImage, float]], scored: list[Scored],
                heatmap: bool) -> list[ImageResult]:
        """One `ImageResult` per (file name, image, read ms) and its score: verdict, loss, timing, heatmap."""
        out = []
        for (name, img, read_ms), s in zip(images, scored, strict=True):
            q = float(s.score.quality)
            th = self.cfg.thresholds_for(img.modality)
            rule = self.cfg.gate_rule(img.modality)
            out.append(ImageResult(
                file=name, index=img.index, modality=img.modality, height=img.shape[0], width=img.shape[1],
                channels=3 if img.is_color else 1, quality=q, tasks=dict(s.score.tasks), verdict=th.verdict(q),
                thresholds=th,
                guarantee=_guarantee(rule, img.modality) if rule is not None else None,
                diagnostic_loss=self.loss(q), expert=s.score.expert,
                timing=ImageTiming(read_ms=read_ms, queue_ms=s.queue_ms, inference_ms=s.inference_ms,
                                   batch_size=s.batch_size),
                heatmap_png=_png_base64(img.pixels, s.score.heatmap, self.cfg.heatmap_max_side)
                if heatmap and s.score.heatmap is not None else None,
            ))
        return out

    def card(self) -> ModelCard:
        cfg = self.cfg
        return ModelCard(
            model_id=self.model_id, checkpoint=str(self.checkpoint), architecture=self.meta.get("architecture"),
            medqm_version=self.meta.get("medqm_version"), num_params=self.meta.get("num_params"),
            img_size=self.scorer.img_size, runtime=self.scorer.runtime, device=str(self.scorer.device),
            heatmaps=self.scorer.heatmaps_available, tasks=list(self.scorer.tasks), config=self.meta.get("config", {}),
            trained_on=self.trained_on,
            quality_map=self.quality_map.to_dict(), thresholds=cfg.thresholds,
            modality_thresholds=cfg.modality_thresholds, limits=cfg.limits, batching=cfg.batching,
            gate=self.gate_card,
        )

    def loss(self, quality: float) -> DiagnosticLoss:
        """Quality → diagnostic loss and likelihood ratio (quality clipped off 0 and 1, where the loss is infinite)."""
        d = float(self.quality_map.inverse(min(max(quality, 1e-6), 1 - 1e-6)))
        n = math.exp(d)
        if n >= 1.005:
            text = f"the correct answer becomes {_times(n)}× less likely"
        elif n <= 1 / 1.005:
            text = f"the correct answer becomes {_times(1 / n)}× more likely"
        else:
            text = "the correct answer is as likely as on a clean image"
        return DiagnosticLoss(nats=d, likelihood_ratio=n, summary=text)


def _gate_card(cfg: ServeConfig) -> GateCard | None:
    """What `/v1/model` says about the loaded gate file (None without one)."""
    gate = cfg.loaded_gate
    if gate is None:
        return None

    def one(t) -> GateThresholdCard:
        return GateThresholdCard(pass_min=t.pass_min, attained=t.attained, pass_rate=t.pass_rate,
                                 calibration_risk=t.calibration_risk, n_cases=t.n_cases, n_images=t.n_images,
                                 guarantee=t.guarantee())

    return GateCard(
        file=str(cfg.gate), sha256=hashlib.sha256(Path(cfg.gate).read_bytes()).hexdigest(), risk=gate.risk,
        method=gate.method, alpha=gate.alpha, delta=gate.delta, loss_cap=gate.loss_cap, default=one(gate.default),
        by_modality={k: one(v) for k, v in sorted(gate.by_modality.items())}, fallbacks=dict(gate.fallbacks),
        provenance=dict(gate.provenance),
    )


def _guarantee(rule: GateRule, modality: str | None) -> Guarantee:
    """The gate threshold one verdict used and its promise (`ImageResult.guarantee`)."""
    t = rule.threshold
    if rule.key == "default":
        scope = ("all images the gate sees together, in the calibration set's mix of modalities; it does not hold "
                 "for one modality alone")
    elif modality == rule.key:
        scope = f"{rule.key} images: this threshold was calibrated on {rule.key} cases alone"
    else:
        scope = (f"{rule.key} images: this threshold was calibrated on {rule.key} cases; {modality} images are "
                 f"covered only as far as they are like those")
    return Guarantee(threshold=rule.key, pass_min=t.pass_min, risk=t.risk, method=t.method, alpha=t.alpha,
                     delta=t.delta, pass_rate=t.pass_rate, n_cases=t.n_cases, statement=t.guarantee(), scope=scope,
                     fallback=rule.fallback)


def _times(n: float) -> str:
    return f"{n:.2f}" if n < 10 else f"{n:.1f}" if n < 100 else f"{n:,.0f}"


# --------------------------------------------------------------------------------------------------- reading uploads


def _read_error(name: str, err: MedQMReadError, kind: str | None, tmp: Path) -> GateError:
    """The reader's reason → the right 4xx: 413 for size limits, 415 for unknown formats (by content), 422 for the
    rest."""
    reason = err.reason.replace(str(tmp), name).replace(str(tmp.parent), "")  # no server paths in answers
    if "exceeds the" in reason or "not enough memory" in reason:
        return GateError(413, "image_too_large", f"{name}: {reason}", name)
    if kind is None or isinstance(err, MedQMUnsupportedFormatError):  # by content: junk named .dcm too
        return GateError(415, "unsupported_format", f"{name}: {reason}", name)
    return GateError(422, "unreadable_image", f"{name}: {reason}", name)


def _read_uploads(uploads: list[UploadFile], *, index: int | None, modality: str | None,
                  max_pixels: int) -> list[tuple[str, MedImage, float]]:
    """Each upload → (file name, image, read ms). Files go to a private temporary folder, removed after reading."""
    out = []
    with tempfile.TemporaryDirectory(prefix="medqm-serve-") as tmp:
        for i, up in enumerate(uploads):
            t0 = time.perf_counter()
            name = Path(up.filename or f"file{i}").name or f"file{i}"
            m = _SUFFIX.search(name.lower())  # the suffix helps the reader (.nii.gz); the name itself is not used
            path = Path(tmp) / f"upload{i}{m.group(1) if m else ''}"
            with open(path, "wb") as f:
                shutil.copyfileobj(up.file, f, 2**20)
            kind = sniff_format(path)
            try:
                img = read_image(path, index=index if kind in _MULTI_IMAGE else None, modality=modality,
                                 max_pixels=max_pixels)
            except MedQMReadError as e:
                raise _read_error(name, e, kind, path) from None
            out.append((name, img, (time.perf_counter() - t0) * 1000.0))
    return out


def _png_base64(pixels, heatmap, max_side: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(heatmap_overlay(pixels, heatmap, max_side=max_side)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------- middleware


class _RequestGuard:
    """ASGI middleware: request ids, the upload size limit (413), a full queue (503) and one log line per request.

    A score request that finds the queue full is answered 503 before its body is parsed, so that refusing
    costs far less than scoring. The log line holds the request id, method, path, status, body size and
    time: never file names, form fields, headers or pixels, which may identify a patient.

    Args:
        max_bytes: the largest request body.
        no_room: n → the 503 refusal when n more images do not fit in the queue now, else None.
    """

    def __init__(self, app, *, max_bytes: int, no_room: Callable[[int], GateError | None]):
        self.app, self.max_bytes, self.no_room = app, max_bytes, no_room

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, t0 = uuid.uuid4().hex[:16], time.perf_counter()
        scope.setdefault("state", {}).update(request_id=rid, started=t0)
        status, size = 0, 0
        limited = scope["path"] == SCORE_PATH
        headers = dict(scope.get("headers") or [])

        async def counting_receive():
            nonlocal size
            msg = await receive()
            if msg["type"] == "http.request":
                size += len(msg.get("body", b""))
                if limited and size > self.max_bytes:
                    await _drain(receive, msg)
                    raise GateError(413, "upload_too_large", self._too_large(size, complete=False))
            return msg

        async def send_with_id(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(msg)

        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        early = None  # a refusal known before reading the body: too large, or no room in the queue
        if limited and declared > self.max_bytes:
            early = GateError(413, "upload_too_large", self._too_large(declared))
        elif limited and scope["method"] == "POST":
            early = self.no_room(1)
        try:
            if early is None:
                await self.app(scope, counting_receive, send_with_id)
            else:
                size = declared
                if declared <= _DRAIN_BYTES:
                    await _drain(receive, {"more_body": True})
                resp = _error_response(early.status_code, early.error, early.detail, None, rid, early.headers)
                await resp(scope, receive, send_with_id)
        finally:
            path = scope["path"] if scope["path"] in _LOGGED_PATHS else "(other)"  # a client's URL may hold anything
            log.info("request %s %s %s status=%d bytes=%d ms=%.1f", rid, scope["method"], path, status, size,
                     (time.perf_counter() - t0) * 1000.0)

    def _too_large(self, size: int, complete: bool = True) -> str:
        if complete:
            return f"upload of {size} bytes exceeds the limit of {self.max_bytes} bytes per request"
        return f"upload exceeds the limit of {self.max_bytes} bytes per request (stopped reading at {size} bytes)"


async def _drain(receive, msg) -> None:
    """Read and drop the rest of a request body (bounded), so the client gets the answer rather than a reset."""
    read = 0
    while msg.get("more_body", False) and read < _DRAIN_BYTES:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        read += len(msg.get("body", b""))


# --------------------------------------------------------------------------------------------------- the app

_HTML = "static/index.html"
_SLICE = "slice of a NIfTI / NRRD volume or frame of a multi-frame DICOM (default: the middle slice, the first frame)"
_MODALITY = ("modality of the images (CT, MR, XR, US…): needed for per-modality thresholds on files that carry "
             "none (PNG, NIfTI…); overrides a DICOM's own")


def create_app(config: ServeConfig | None = None, *, scorer: Scorer | None = None) -> FastAPI:
    """Build the quality-gate app; the model is loaded here, so a bad checkpoint fails before serving.

    Args:
        config: thresholds, limits, batching, CORS (defaults: `ServeConfig()`).
        scorer: an already built `Scorer` (else one is built from ``config.model``).
    """
    cfg = config or ServeConfig()
    gate = _Gate(cfg, scorer)
    app = FastAPI(
        title="MedQM quality gate",
        version=__version__,
        description="Scores medical images with MedQM-I before they reach a multimodal LLM: pass, review or reject.",
        lifespan=_lifespan(gate),
    )
    app.state.gate = gate
    app.add_exception_handler(GateError, _gate_error)
    _add_service_routes(app, gate)
    _add_score_route(app, gate)
    _add_middleware(app, gate)
    return app


def _lifespan(gate: _Gate):
    """Startup and shutdown: the batcher's worker thread runs while the app serves."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gate.batcher.start()
        log.info("quality gate ready: model %s, runtime %s, batching %s, queue %d", gate.model_id,
                 gate.scorer.runtime, "on" if gate.cfg.batching.enabled else "off", gate.batcher.max_queue)
        try:
            yield
        finally:
            await run_in_threadpool(gate.batcher.close)

    return lifespan


async def _gate_error(request: Request, exc: GateError) -> JSONResponse:
    """A `GateError` → its JSON body (`ErrorResponse`), status and headers, logged without patient data."""
    rid = request.scope.get("state", {}).get("request_id")
    log.info("request %s refused: status=%d error=%s", rid, exc.status_code, exc.error)
    return _error_response(exc.status_code, exc.error, exc.detail, exc.file, rid, exc.headers)


def _add_service_routes(app: FastAPI, gate: _Gate) -> None:
    """The web page, ``/healthz`` and ``/v1/model``."""
    page = resources.files("medqm.serve").joinpath(_HTML).read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, summary="Liveness: the model is loaded; the queue's depth")
    async def healthz() -> Health:
        return gate.health()

    @app.get("/v1/model", response_model=ModelCard, summary="Model card, thresholds, limits")
    async def model_card() -> ModelCard:
        return gate.card()


def _add_score_route(app: FastAPI, gate: _Gate) -> None:
    """``POST /v1/score``: check the request, read the uploads, score them through the batcher, give verdicts."""
    cfg = gate.cfg
    errors = {c: {"model": ErrorResponse} for c in (413, 415, 422, 503)}

    @app.post(SCORE_PATH, response_model=ScoreResponse, responses=errors, summary="Score uploaded images")
    async def score(
        request: Request,
        files: Annotated[list[UploadFile], File(description="DICOM, PNG, JPEG, TIFF, NIfTI… one image each")],
        slice_form: Annotated[int | None, Form(alias="slice", ge=0, description=_SLICE)] = None,
        modality_form: Annotated[str | None, Form(alias="modality", description=_MODALITY)] = None,
        slice_query: Annotated[int | None, Query(alias="slice", ge=0, description=_SLICE)] = None,
        modality_query: Annotated[str | None, Query(alias="modality", description=_MODALITY)] = None,
        heatmap: Annotated[bool, Query(description="also return the heatmap overlay as a base64 PNG")] = False,
    ) -> ScoreResponse:
        state = request.scope["state"]
        rid, t0 = state["request_id"], state["started"]  # from the first byte the app saw: upload parsing counts
        if len(files) > cfg.limits.max_files:
            raise GateError(413, "too_many_files",
                            f"{len(files)} files in one request; the limit is {cfg.limits.max_files}")
        index = slice_form if slice_form is not None else slice_query
        try:
            modality = canonical_modality(modality_form or modality_query)
        except ValueError as e:
            raise GateError(422, "invalid_modality", str(e)) from None
        if (full := gate.no_room(len(files))) is not None:  # 503 before spending any time on decoding
            raise full
        images = await run_in_threadpool(_read_uploads, files, index=index, modality=modality,
                                         max_pixels=cfg.limits.max_pixels)
        want_heatmap = heatmap and gate.scorer.heatmaps_available
        scored = await gate.score([img for _, img, _ in images], want_heatmap)
        if want_heatmap:  # PNG encoding takes a while: off the event loop
            results = await run_in_threadpool(gate.results, images, scored, want_heatmap)
        else:
            results = gate.results(images, scored, want_heatmap)
        total = (time.perf_counter() - t0) * 1000.0
        log.info("request %s scored files=%d sizes=%s verdicts=%s total_ms=%.1f", rid, len(results),
                 ",".join(f"{r.height}x{r.width}" for r in results), ",".join(r.verdict for r in results), total)
        return ScoreResponse(request_id=rid, model_id=gate.model_id, results=results, total_ms=total)


def _add_middleware(app: FastAPI, gate: _Gate) -> None:
    """CORS (when origins are configured) inside the request guard (ids, upload size limit, full queue, logging)."""
    cfg = gate.cfg
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    app.add_middleware(_RequestGuard, max_bytes=cfg.limits.max_upload_bytes, no_room=gate.no_room)


def run(config: ServeConfig | None = None, *, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info") -> None:
    """Serve the quality gate with uvicorn (blocks). Uvicorn's access log is off: it would log query strings."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


__all__ = ["create_app", "run", "GateError", "SCORE_PATH"]
