"""The quality gate's HTTP API against a live uvicorn server: good files, bad files, every limit."""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from serve_helpers import DEMO_PNG, LIMITS, LiveServer, make_config, png_bytes, png_header_only

from medqm.label.quality import quality_to_loss
from medqm.model import Scorer
from medqm.serve import create_app

CT = get_testdata_file("CT_small.dcm")
RNG = np.random.default_rng(0)


def _post(client, files, params=None, data=None):
    return client.post("/v1/score", files=[("files", f) for f in files], params=params or {}, data=data or {})


def _check_result(r: dict, thresholds: dict) -> None:
    assert 0.0 <= r["quality"] <= 1.0
    expected = ("pass" if r["quality"] >= thresholds["pass_min"]
                else "review" if r["quality"] >= thresholds["review_min"] else "reject")
    assert r["verdict"] == expected and r["thresholds"] == thresholds
    loss = r["diagnostic_loss"]
    assert loss["nats"] == pytest.approx(quality_to_loss(r["quality"]), rel=1e-6, abs=1e-9)
    assert loss["likelihood_ratio"] == pytest.approx(math.exp(loss["nats"]))
    assert "likely" in loss["summary"]
    t = r["timing"]
    assert t["batch_size"] >= 1 and t["inference_ms"] > 0 and t["read_ms"] > 0 and t["queue_ms"] >= 0


# --------------------------------------------------------------------------------------------------- service endpoints


def test_healthz_and_model_card(client, checkpoint):
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["queued"] == 0 and h.json()["queue_capacity"] == 256
    card = client.get("/v1/model").json()
    assert card["model_id"] == h.json()["model_id"] and card["model_id"].startswith("medqm-i-serve-test@")
    assert card["img_size"] == 64 and card["runtime"] == "torch" and card["heatmaps"] is True
    assert card["thresholds"] == {"pass_min": 0.5, "review_min": 0.25}
    assert card["modality_thresholds"] == {"US": {"pass_min": 0.0, "review_min": 0.0}}
    assert card["limits"] == LIMITS and card["batching"]["enabled"] is True
    assert card["batching"]["max_queue"] == 256 and card["batching"]["retry_after_s"] == 1
    assert card["quality_map"]["center"] == pytest.approx(math.log(2))
    assert card["architecture"] and card["num_params"] > 0


def test_openapi_and_web_page(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file"' in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN


# --------------------------------------------------------------------------------------------------- good files


def test_dicom(client):
    with open(CT, "rb") as f:
        resp = _post(client, [("CT_small.dcm", f, "application/dicom")])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_id"].startswith("medqm-i-serve-test@") and resp.headers["x-request-id"] == body["request_id"]
    (r,) = body["results"]
    assert (r["file"], r["modality"], r["height"], r["width"], r["channels"]) == ("CT_small.dcm", "CT", 128, 128, 1)
    assert r["heatmap_png"] is None
    _check_result(r, {"pass_min": 0.5, "review_min": 0.25})


def test_png_with_modality_and_heatmap(client):
    resp = _post(client, [(DEMO_PNG.name, DEMO_PNG.read_bytes(), "image/png")], params={"heatmap": "true"},
                 data={"modality": "x-ray"})
    assert resp.status_code == 200, resp.text
    (r,) = resp.json()["results"]
    assert r["modality"] == "XR" and (r["height"], r["width"]) == (256, 256)
    heat = Image.open(io.BytesIO(base64.b64decode(r["heatmap_png"])))
    assert heat.format == "PNG" and heat.size == (256, 256) and heat.mode == "RGB"


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_jpeg_and_tiff(client, fmt):
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (48, 80), dtype=np.uint8)).save(buf, format=fmt)
    resp = _post(client, [(f"img.{fmt.lower()}", buf.getvalue())])
    assert resp.status_code == 200, resp.text
    (r,) = resp.json()["results"]
    assert (r["height"], r["width"], r["modality"]) == (48, 80, None)


def test_nifti_slice_from_form_or_query(client, nifti_bytes):
    resp = _post(client, [("vol.nii.gz", nifti_bytes)], data={"slice": "3", "modality": "MR"})
    assert resp.status_code == 200, resp.text
    (r,) = resp.json()["results"]
    assert r["index"] == 3 and r["modality"] == "MR" and (r["height"], r["width"]) == (32, 40)
    resp = _post(client, [("vol.nii.gz", nifti_bytes)], params={"slice": 7})
    assert resp.json()["results"][0]["index"] == 7
    default = _post(client, [("vol.nii.gz", nifti_bytes)]).json()["results"][0]  # no slice: the middle one
    assert default["index"] == 5


def test_several_files_keep_their_order_and_per_modality_thresholds(client):
    us = png_bytes(RNG.integers(0, 255, (60, 60), dtype=np.uint8))
    with open(CT, "rb") as f:
        resp = _post(client, [("a.png", us), ("b.dcm", f.read()), ("c.png", us)])
    assert resp.status_code == 200, resp.text
    a, b, c = resp.json()["results"]
    assert [r["file"] for r in (a, b, c)] == ["a.png", "b.dcm", "c.png"]
    assert (a["modality"], b["modality"]) == (None, "CT")  # a PNG carries no modality, a DICOM does
    _check_result(b, {"pass_min": 0.5, "review_min": 0.25})
    resp = _post(client, [("a.png", us)], data={"modality": "ultrasound"})
    (u,) = resp.json()["results"]
    assert u["modality"] == "US" and u["verdict"] == "pass"  # US has its own thresholds on this server
    _check_result(u, {"pass_min": 0.0, "review_min": 0.0})


def test_concurrent_requests_share_forward_passes(client):
    data = DEMO_PNG.read_bytes()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post(client, [("x.png", data)]), range(16)))
    assert all(r.status_code == 200 for r in responses)
    sizes = [r.json()["results"][0]["timing"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    qualities = {round(r.json()["results"][0]["quality"], 5) for r in responses}
    assert len(qualities) == 1  # batching does not change the score


# --------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, content, status, error, words", [
    ("notes.txt", b"patient notes, not an image", 415, "unsupported_format", "unrecognised file format"),
    # judged by content, not by name: junk named .dcm is no DICOM, like the same bytes named .bin
    ("x.dcm", np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 415, "unsupported_format",
     "not a DICOM file (no DICM preamble or valid dataset)"),
    ("x.bin", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 415, "unsupported_format",
     "unrecognised file format"),
    ("notes.dcm", b"patient notes, not an image\n" * 20, 415, "unsupported_format", "not a DICOM file"),
    ("empty.png", b"", 422, "unreadable_image", "empty file"),
    ("cut.png", png_bytes(np.zeros((64, 64), np.uint8))[:60], 422, "unreadable_image", "unreadable image"),
    ("cut.dcm", Path(CT).read_bytes()[:20000], 422, "unreadable_image", "cannot decode pixel data"),
    ("rtplan.dcm", Path(get_testdata_file("rtplan.dcm")).read_bytes(), 422, "unreadable_image", "no pixel data"),
])
def test_bad_files_name_the_file_and_the_reason(client, name, content, status, error, words):
    resp = _post(client, [(name, content)])
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == error and body["file"] == name and body["detail"].startswith(f"{name}: ")
    assert words in body["detail"] and "medqm-serve-" not in body["detail"]  # no server temp paths
    assert body["request_id"] == resp.headers["x-request-id"]


def test_one_bad_file_refuses_the_request(client):
    resp = _post(client, [("good.png", DEMO_PNG.read_bytes()), ("bad.bin", b"\x00" * 100)])
    assert resp.status_code == 415 and resp.json()["file"] == "bad.bin"


def test_slice_out_of_range_and_bad_parameters(client, nifti_bytes):
    resp = _post(client, [("vol.nii.gz", nifti_bytes)], data={"slice": "99"})
    assert resp.status_code == 422 and "out of range" in resp.json()["detail"] and resp.json()["file"] == "vol.nii.gz"
    resp = _post(client, [("x.png", DEMO_PNG.read_bytes())], data={"modality": "banana"})
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_modality" and "banana" in resp.json()["detail"]
    assert _post(client, [("vol.nii.gz", nifti_bytes)], params={"slice": -1}).status_code == 422
    assert client.post("/v1/score").status_code == 422  # no files at all (FastAPI's validation error)


# --------------------------------------------------------------------------------------------------- limits


def test_too_many_files(client):
    png = png_bytes(np.zeros((8, 8), np.uint8))
    resp = _post(client, [(f"{i}.png", png) for i in range(LIMITS["max_files"] + 1)])
    assert resp.status_code == 413 and resp.json()["error"] == "too_many_files"
    assert f"limit is {LIMITS['max_files']}" in resp.json()["detail"]


def test_upload_size_limit_with_and_without_content_length(client, server):
    big = RNG.integers(0, 255, LIMITS["max_upload_bytes"] + 100_000, dtype=np.uint8).tobytes()
    resp = _post(client, [("big.dcm", big)])
    assert resp.status_code == 413 and resp.json()["error"] == "upload_too_large"
    assert str(LIMITS["max_upload_bytes"]) in resp.json()["detail"]
    # a chunked body (no Content-Length) is counted as it streams in
    boundary = "medqmboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.dcm\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunks():
        yield head
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = client.post("/v1/score", content=chunks(),
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 413 and resp.json()["error"] == "upload_too_large", resp.text
    assert client.get("/healthz").status_code == 200  # the server is fine afterwards


@pytest.mark.parametrize("content", [png_header_only(100_000, 100_000), png_bytes(np.zeros((600, 600), np.uint8))],
                         ids=["declared-10G-pixels", "600x600"])
def test_pixel_limit_refuses_decompression_bombs(client, content):
    assert len(content) < 10_000  # tiny on the wire
    resp = _post(client, [("bomb.png", content)])
    assert resp.status_code == 413, resp.text
    body = resp.json()
    assert body["error"] == "image_too_large" and body["file"] == "bomb.png"
    assert "exceeds the limit" in body["detail"] and str(LIMITS["max_pixels"]) in body["detail"]


# --------------------------------------------------------------------------------------------------- logging, CORS


def test_logs_hold_no_file_names_or_patient_data(client, caplog):
    import pydicom

    name = "DOE_JOHN_MRN12345.dcm"
    patient = str(pydicom.dcmread(CT).PatientName)
    with caplog.at_level(logging.INFO, logger="medqm.serve"):
        with open(CT, "rb") as f:
            ok = _post(client, [(name, f)], params={"modality": "CT"})
        bad = _post(client, [("SMITH_JANE.txt", b"not an image")])
        lost = client.get("/patients/DOE_JOHN")
    assert ok.status_code == 200 and bad.status_code == 415 and lost.status_code == 404
    text = caplog.text
    assert ok.json()["request_id"] in text and bad.json()["request_id"] in text and "128x128" in text
    for secret in (name, "DOE", "SMITH", patient, "MRN12345"):
        assert secret not in text


def test_cors_is_off_by_default_and_can_be_enabled(checkpoint):
    origin = {"Origin": "https://viewer.example"}
    with TestClient(create_app(make_config(checkpoint))) as c:
        assert "access-control-allow-origin" not in c.get("/healthz", headers=origin).headers
    with TestClient(create_app(make_config(checkpoint, cors_origins=["https://viewer.example"]))) as c:
        assert c.get("/healthz", headers=origin).headers["access-control-allow-origin"] == "https://viewer.example"
        pre = c.options("/v1/score", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        other = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_batching_off_scores_one_image_per_forward_pass(checkpoint):
    cfg = make_config(checkpoint, batching={"enabled": False})
    with TestClient(create_app(cfg)) as c:
        png = DEMO_PNG.read_bytes()
        resp = _post(c, [("a.png", png), ("b.png", png), ("c.png", png)])
        assert resp.status_code == 200
        assert [r["timing"]["batch_size"] for r in resp.json()["results"]] == [1, 1, 1]
        assert c.get("/v1/model").json()["batching"]["enabled"] is False


# --------------------------------------------------------------------------------------------------- backpressure


class _HeldScorer:
    """A real `Scorer` whose forward passes wait until ``release`` is set: fills the service's queue on cue."""

    def __init__(self, scorer: Scorer):
        self.scorer, self.entered, self.release = scorer, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def score_pixels(self, images, **kw):
        self.entered.set()
        assert self.release.wait(60), "the test never released the scorer"
        return self.scorer.score_pixels(images, **kw)


def _wait_for_depth(client, depth: int) -> dict:
    """``/healthz`` once the queue holds ``depth`` images (the requests are on their way: a condition, not a race)."""
    deadline = time.monotonic() + 30
    while (h := client.get("/healthz").json())["queued"] < depth:
        assert time.monotonic() < deadline, f"the queue never reached {depth}: {h}"
        time.sleep(0.01)
    return h


def _check_overloaded(resp, retry_after: int) -> None:
    assert resp.status_code == 503 and resp.headers["retry-after"] == str(retry_after)
    body = resp.json()
    assert body["error"] == "overloaded" and f"retry after {retry_after} s" in body["detail"]
    assert body["request_id"] == resp.headers["x-request-id"] and body["file"] is None


def test_full_queue_answers_503_with_retry_after_then_recovers(checkpoint):
    held = _HeldScorer(Scorer(checkpoint, runtime="torch", num_threads=1))
    cfg = make_config(checkpoint, limits={**LIMITS, "max_files": 2},
                      batching={"window_ms": 0, "max_batch": 1, "max_queue": 3, "retry_after_s": 7})
    png = DEMO_PNG.read_bytes()
    with (LiveServer(create_app(cfg, scorer=held)) as server, httpx.Client(base_url=server.url, timeout=60) as c,
          ThreadPoolExecutor(4) as pool):
        try:
            first = pool.submit(_post, c, [("first.png", png)])
            assert held.entered.wait(30)  # the worker holds the first image: the queue is empty, the model busy
            waiting = [pool.submit(_post, c, [(f"q{i}.png", png)]) for i in range(2)]
            h = _wait_for_depth(c, 2)
            assert h["queued"] == 2 and h["queue_capacity"] == 3
            # two images do not fit in the one place left: refused whole, after the upload is parsed
            _check_overloaded(_post(c, [("a.png", png), ("b.png", png)]), 7)
            waiting.append(pool.submit(_post, c, [("last.png", png)]))  # one does
            h = _wait_for_depth(c, 3)
            assert h["queued"] == 3 and h["queue_capacity"] == 3 and h["status"] == "ok"
            _check_overloaded(_post(c, [("late.png", png)]), 7)  # a full queue: refused before parsing
            assert c.get("/healthz").json()["queued"] == 3  # the refused requests left nothing behind
        finally:
            held.release.set()
        assert [f.result(60).status_code for f in (first, *waiting)] == [200, 200, 200, 200]
        again = _post(c, [("a.png", png), ("b.png", png)])
        assert again.status_code == 200 and len(again.json()["results"]) == 2
        assert c.get("/healthz").json()["queued"] == 0


def test_openapi_documents_the_503(client):
    responses = client.get("/openapi.json").json()["paths"]["/v1/score"]["post"]["responses"]
    assert "503" in responses
