"""ServeConfig validation and loading, the micro-batcher on its own, and the `medqm serve` command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from medqm.io import MedImage
from medqm.model.scoring import QualityScore
from medqm.serve import MicroBatcher, QueueFull, ServeConfig, Thresholds, load_config

MEDQM = str(Path(sys.executable).with_name("medqm"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------------- config


def test_thresholds_give_verdicts_and_are_validated():
    t = Thresholds(pass_min=0.6, review_min=0.3)
    assert [t.verdict(q) for q in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)] == ["reject", "reject", "review", "review",
                                                                        "pass", "pass"]
    with pytest.raises(ValidationError, match="must not exceed pass_min"):
        Thresholds(pass_min=0.3, review_min=0.6)
    with pytest.raises(ValidationError):
        Thresholds(pass_min=1.5)


def test_modality_thresholds_use_canonical_names():
    cfg = ServeConfig(modality_thresholds={"x-ray": {"pass_min": 0.7, "review_min": 0.4}})
    assert cfg.thresholds_for("XR") == Thresholds(pass_min=0.7, review_min=0.4)
    assert cfg.thresholds_for("CT") == cfg.thresholds_for(None) == Thresholds()
    with pytest.raises(ValidationError, match="unknown modality"):
        ServeConfig(modality_thresholds={"banana": {}})


def test_xray_codes_fall_back_to_the_xr_thresholds():
    xr, xa = Thresholds(pass_min=0.7, review_min=0.4), Thresholds(pass_min=0.9, review_min=0.8)
    cfg = ServeConfig(modality_thresholds={"XR": xr.model_dump(), "xa": xa.model_dump()})
    assert set(cfg.modality_thresholds) == {"XR", "XA"}  # XA is its own modality now, not folded into XR
    assert cfg.thresholds_for("XA") == xa
    assert cfg.thresholds_for("DX") == cfg.thresholds_for("CR") == cfg.thresholds_for("RF") == xr
    assert cfg.thresholds_for("MG") == cfg.thresholds_for("CT") == Thresholds()


def test_load_config_from_yaml_with_overrides(tmp_path):
    p = tmp_path / "gate.yaml"
    p.write_text("thresholds: {pass_min: 0.8, review_min: 0.5}\nlimits: {max_files: 4}\nbatching: {window_ms: 2}\n"
                 "modality_thresholds:\n  CT: {pass_min: 0.6, review_min: 0.3}\n")
    cfg = load_config(p, {"thresholds": {"pass_min": None, "review_min": 0.4}, "limits": {"max_files": None},
                          "batching": {"enabled": False}, "runtime": None})
    assert cfg.thresholds == Thresholds(pass_min=0.8, review_min=0.4)
    assert cfg.limits.max_files == 4 and cfg.batching.window_ms == 2 and cfg.batching.enabled is False
    assert cfg.runtime == "auto" and cfg.thresholds_for("CT").pass_min == 0.6
    with pytest.raises(ValidationError, match="extra"):
        load_config(overrides={"limits": {"max_filez": 3}})


def test_queue_bound_is_validated():
    cfg = load_config(overrides={"batching": {"max_queue": 4, "retry_after_s": 3}, "limits": {"max_files": 4}})
    assert cfg.batching.max_queue == 4 and cfg.batching.retry_after_s == 3
    assert ServeConfig().batching.max_queue == 256 and ServeConfig().batching.retry_after_s == 1
    with pytest.raises(ValidationError, match="max_queue .* must be at least limits.max_files"):
        ServeConfig(batching={"max_queue": 4}, limits={"max_files": 5})
    with pytest.raises(ValidationError):
        ServeConfig(batching={"max_queue": 0})


# --------------------------------------------------------------------------------------------------- micro-batching


class _StubScorer:
    """Records the batches it is given; an image whose first pixel is 1.0 makes its batch fail.

    With ``held``, each forward pass sets ``entered`` and waits until ``release`` is set.
    """

    def __init__(self, held: bool = False):
        self.batch_size = 1
        self.calls: list[tuple[int, bool]] = []
        self.held, self.entered, self.release = held, threading.Event(), threading.Event()

    def score_pixels(self, images, *, heatmaps=False):
        if self.held:
            self.entered.set()
            assert self.release.wait(30), "the test never released the scorer"
        self.calls.append((len(images), heatmaps))
        if any(im.pixels[0, 0] == 1.0 for im in images):
            raise RuntimeError("boom")
        return [QualityScore(float(im.pixels.mean()), np.ones(2) / 2, np.zeros(2)) for im in images]


def _img(value: float) -> MedImage:
    return MedImage(np.full((4, 4), value, np.float32), path="x.png")


def test_batcher_groups_images_within_the_window():
    scorer = _StubScorer()
    b = MicroBatcher(scorer, window_ms=300, max_batch=4)
    b.start()
    try:
        futures = [b.submit(_img(i / 10)) for i in range(6)]
        out = [f.result(10) for f in futures]
    finally:
        b.close()
    assert [o.batch_size for o in out] == [4, 4, 4, 4, 2, 2] and scorer.batch_size == 4
    assert [o.score.quality for o in out] == pytest.approx([i / 10 for i in range(6)])
    assert all(o.queue_ms >= 0 and o.inference_ms >= 0 for o in out)


def test_batcher_off_scores_one_by_one_and_splits_heatmap_requests():
    scorer = _StubScorer()
    b = MicroBatcher(scorer, enabled=False, window_ms=300, max_batch=8)
    b.start()
    try:
        assert [b.submit(_img(0.2)).result(10).batch_size for _ in range(3)] == [1, 1, 1]
    finally:
        b.close()
    scorer = _StubScorer()
    b = MicroBatcher(scorer, window_ms=300, max_batch=8)
    b.start()
    try:
        futures = [b.submit(_img(0.2), heatmap=i % 2 == 0) for i in range(4)]
        [f.result(10) for f in futures]
    finally:
        b.close()
    assert sorted(scorer.calls) == [(2, False), (2, True)]


def test_one_failing_image_does_not_fail_its_batch():
    scorer = _StubScorer()
    b = MicroBatcher(scorer, window_ms=300, max_batch=8)
    b.start()
    try:
        futures = [b.submit(_img(v)) for v in (0.1, 1.0, 0.3)]
        assert futures[0].result(10).score.quality == pytest.approx(0.1)
        assert futures[2].result(10).score.quality == pytest.approx(0.3)
        with pytest.raises(RuntimeError, match="model failed"):
            futures[1].result(10)
    finally:
        b.close()


def test_batcher_queue_is_bounded_and_takes_a_request_whole_or_not_at_all():
    scorer = _StubScorer(held=True)
    b = MicroBatcher(scorer, window_ms=0, max_batch=1, max_queue=3)
    b.start()
    try:
        first = b.submit(_img(0.1))
        assert scorer.entered.wait(10)  # the worker took the first image and waits: the queue is empty again
        assert b.queue_depth == 0 and b.max_queue == 3
        queued = b.submit_all([_img(0.2), _img(0.3)])
        with pytest.raises(QueueFull, match="2 image.* offered, 2 already waiting.*holds 3") as full:
            b.submit_all([_img(0.4), _img(0.5)])
        assert (full.value.offered, full.value.depth, full.value.capacity) == (2, 2, 3)
        assert b.queue_depth == 2  # neither of the refused images was queued
        queued.append(b.submit(_img(0.4)))
        with pytest.raises(QueueFull):
            b.submit(_img(0.5))
    finally:
        scorer.release.set()
    try:
        assert [f.result(10).score.quality for f in (first, *queued)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
        assert b.submit(_img(0.5)).result(10).score.quality == pytest.approx(0.5)  # room again once drained
        assert b.queue_depth == 0
    finally:
        b.close()
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(_StubScorer(), max_queue=0)


def test_submit_needs_a_started_batcher():
    with pytest.raises(RuntimeError, match="start"):
        MicroBatcher(_StubScorer()).submit(_img(0.1))
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(_StubScorer(), max_batch=0)


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_serve_refuses_bad_settings(tmp_path):
    r = subprocess.run([MEDQM, "serve", "--model", str(tmp_path / "nope")], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2 and "not a MedQM-I checkpoint" in r.stdout
    r = subprocess.run([MEDQM, "serve", "--pass-min", "0.2", "--review-min", "0.4"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert r.returncode == 2 and "must not exceed pass_min" in r.stdout


def test_cli_serve_answers_on_its_port(checkpoint, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "gate.json"
    cfg.write_text('{"thresholds": {"pass_min": 0.9, "review_min": 0.1}, "limits": {"max_files": 2}}')
    proc = subprocess.Popen([MEDQM, "serve", "--model", str(checkpoint), "--port", str(port), "--runtime", "torch",
                             "--config", str(cfg), "--no-batching", "--threads", "1", "--max-queue", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "medqm serve did not come up"
            time.sleep(0.2)
        card = httpx.get(url + "/v1/model").json()
        assert card["thresholds"] == {"pass_min": 0.9, "review_min": 0.1}
        assert card["limits"]["max_files"] == 2 and card["batching"]["enabled"] is False
        assert card["batching"]["max_queue"] == 20
        assert httpx.get(url + "/healthz").json()["queue_capacity"] == 20
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "quality gate ready" in out
