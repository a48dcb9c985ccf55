"""`medqm serve --gate`: pass thresholds from a calibrated gate file, shown with their guarantee."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from serve_helpers import DEMO_PNG, gate_threshold, make_config, write_gate

from medqm.evaluate.gate import calibrate_gate
from medqm.io import read_image
from medqm.model import Scorer
from medqm.serve import ServeConfig, Thresholds, create_app, load_config, load_gate

CT = get_testdata_file("CT_small.dcm")
MEDQM = str(Path(sys.executable).with_name("medqm"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def scorer(checkpoint) -> Scorer:
    """One model for every app of this module (each app would otherwise load its own)."""
    return Scorer(checkpoint, runtime="torch", num_threads=1)


@pytest.fixture(scope="module")
def q_ct(scorer) -> float:
    """The quality the test model gives CT_small.dcm (the service scores the same pixels)."""
    q = float(scorer.score_pixels([read_image(CT)])[0].quality)
    assert 0.0 <= q < 1.0
    return q


def _score(client, modality: str | None = None, path=CT) -> dict:
    data = {"modality": modality} if modality else {}
    with open(path, "rb") as f:
        resp = client.post("/v1/score", files=[("files", (Path(path).name, f))], data=data)
    assert resp.status_code == 200, resp.text
    (r,) = resp.json()["results"]
    return r


def _synthetic_gate(path: Path):
    """A gate calibrated by `calibrate_gate` on synthetic numbers: low scores lose the answer, high ones do not."""
    rng = np.random.default_rng(0)
    n_cases, per_case = 120, 3
    cases = np.repeat([f"c{i}" for i in range(n_cases)], per_case)
    modalities = np.where(np.repeat(np.arange(n_cases), per_case) < 60, "CT", "MR")
    scores = rng.uniform(0, 1, len(cases))
    lost = rng.uniform(0, 1, len(cases)) < np.where(scores < 0.4, 0.9, 0.02)
    diag_loss = np.where(lost, 1.5, 0.1)
    gate = calibrate_gate(scores, diag_loss, cases, modalities, alpha=0.15, delta=0.1, by_modality=True,
                          min_cases=20, provenance={"labels": "synthetic"})
    assert gate.default.attained and set(gate.by_modality) == {"CT", "MR"}
    gate.save(path)
    return gate


# --------------------------------------------------------------------------------------------------- the API


def test_calibrated_gate_end_to_end(checkpoint, scorer, tmp_path):
    gate = _synthetic_gate(tmp_path / "gate.json")
    cfg = make_config(checkpoint, gate=tmp_path / "gate.json")
    with TestClient(create_app(cfg, scorer=scorer)) as c:
        assert c.get("/healthz").json()["gate_loaded"] is True
        card = c.get("/v1/model").json()
        g = card["gate"]
        assert (g["risk"], g["method"], g["alpha"], g["delta"]) == ("lost-answer-rate", "ltt", 0.15, 0.1)
        assert g["file"] == str(tmp_path / "gate.json") and re.fullmatch(r"[0-9a-f]{64}", g["sha256"])
        assert g["provenance"] == {"labels": "synthetic"} and g["fallbacks"] == {}
        assert set(g["by_modality"]) == {"CT", "MR"}
        for key, t in [("default", gate.default), *gate.by_modality.items()]:
            shown = g["default"] if key == "default" else g["by_modality"][key]
            assert shown["pass_min"] == t.pass_min and shown["pass_rate"] == pytest.approx(t.pass_rate)
            assert shown["n_cases"] == t.n_cases and shown["guarantee"] == t.guarantee()
            assert shown["attained"] is True
        assert card["thresholds"] == {"pass_min": None, "review_min": 0.25}  # the gate sets pass_min
        for modality, key in [("CT", "CT"), ("MRI", "MR"), ("US", "default"), (None, "CT")]:  # the DICOM says CT
            r = _score(c, modality)
            t = gate.threshold_for(key)
            assert r["guarantee"]["threshold"] == key and r["guarantee"]["pass_min"] == t.pass_min
            assert r["guarantee"]["statement"] == t.guarantee() and "probability ≥ 0.9" in t.guarantee()
            assert r["thresholds"] == {"pass_min": t.pass_min, "review_min": min(0.25, t.pass_min)}
            assert r["verdict"] == ("pass" if r["quality"] >= t.pass_min
                                    else "review" if r["quality"] >= min(0.25, t.pass_min) else "reject")
        assert r["guarantee"]["fallback"] is None
        us = _score(c, "US")["guarantee"]  # not calibrated on its own: the overall threshold, and the reason
        assert us["fallback"] == "no calibration cases of this modality: the overall threshold applies"
        assert "mix of modalities" in us["scope"]


def test_verdict_follows_the_gate_per_modality_and_no_threshold_passes_nothing(checkpoint, scorer, q_ct, tmp_path):
    below, above = max(0.0, q_ct - 0.05), min(1.0, q_ct + 0.05)
    path = write_gate(tmp_path / "gate.json", gate_threshold(None, n_cases=12),  # overall: nothing is safe
                      by_modality={"CT": gate_threshold(below), "XR": gate_threshold(above)},
                      fallbacks={"MR": "3 calibration cases < 20: the overall threshold applies"})
    cfg = make_config(checkpoint, gate=path, thresholds={"review_min": 0.0})
    with TestClient(create_app(cfg, scorer=scorer)) as c:
        ct = _score(c)  # the DICOM's own modality: CT, whose threshold is below its quality
        assert ct["quality"] == pytest.approx(q_ct, abs=1e-5)
        assert ct["verdict"] == "pass" and ct["guarantee"]["threshold"] == "CT"
        assert ct["guarantee"]["pass_min"] == below and ct["thresholds"] == {"pass_min": below, "review_min": 0.0}
        assert ct["guarantee"]["scope"].startswith("CT images")
        dx = _score(c, "DX")  # DX has no threshold of its own: its family's (XR), above the quality
        assert dx["verdict"] == "review" and dx["guarantee"]["threshold"] == "XR"
        assert dx["guarantee"]["pass_min"] == above and "DX images are covered only" in dx["guarantee"]["scope"]
        mr = _score(c, "MR")  # the overall threshold, which does not exist: nothing passes, whatever the quality
        assert mr["verdict"] == "review" and mr["thresholds"] == {"pass_min": None, "review_min": 0.0}
        assert mr["guarantee"]["threshold"] == "default" and mr["guarantee"]["pass_min"] is None
        assert mr["guarantee"]["fallback"] == "3 calibration cases < 20: the overall threshold applies"
        assert mr["guarantee"]["statement"].endswith("nothing passes")
        png = _score(c, path=DEMO_PNG)  # no modality at all: the overall threshold
        assert png["verdict"] in ("review",) and png["guarantee"]["threshold"] == "default"
        card = c.get("/v1/model").json()["gate"]
        assert card["default"]["pass_min"] is None and card["default"]["attained"] is False
        assert card["by_modality"]["CT"]["pass_min"] == below and card["fallbacks"] == {
            "MR": "3 calibration cases < 20: the overall threshold applies"}
        page = c.get("/").text
        assert "result.guarantee" in page and 'id="gate"' in page  # the page renders it (browser test: test_browser)


def test_without_a_gate_results_carry_no_guarantee(checkpoint, scorer):
    with TestClient(create_app(make_config(checkpoint), scorer=scorer)) as c:
        r = _score(c)
        assert r["guarantee"] is None and r["thresholds"] == {"pass_min": 0.5, "review_min": 0.25}
        assert c.get("/v1/model").json()["gate"] is None and c.get("/healthz").json()["gate_loaded"] is False


# --------------------------------------------------------------------------------------------------- configuration


def test_gate_thresholds_in_the_config(tmp_path):
    path = write_gate(tmp_path / "gate.json", gate_threshold(0.6),
                      by_modality={"MRI": gate_threshold(0.3), "XR": gate_threshold(None)})
    cfg = ServeConfig(gate=path, thresholds={"review_min": 0.4})
    assert cfg.loaded_gate is not None and set(cfg.loaded_gate.by_modality) == {"MR", "XR"}  # canonical names
    assert cfg.thresholds_for("CT") == cfg.thresholds_for(None) == Thresholds(pass_min=0.6, review_min=0.4)
    assert cfg.thresholds_for("MR") == Thresholds(pass_min=0.3, review_min=0.3)  # review_min never above pass_min
    assert cfg.thresholds_for("CR") == Thresholds(pass_min=None, review_min=0.4)  # XR's: nothing passes
    assert cfg.thresholds_for("CR").verdict(1.0) == "review" and cfg.thresholds_for("CR").verdict(0.1) == "reject"
    assert cfg.gate_rule("CR").key == "XR" and cfg.gate_rule("US").key == "default" and cfg.gate_rule(None).key == (
        "default")
    # review_min above the default pass_min (0.5) is fine with a gate: the gate's pass_min is the bound
    assert ServeConfig(gate=path, thresholds={"review_min": 0.55}).thresholds_for("CT").review_min == 0.55
    assert ServeConfig(gate=path, thresholds=Thresholds(review_min=0.45)).thresholds_for("CT").review_min == 0.45
    with pytest.raises(ValidationError, match="sets the pass threshold"):
        ServeConfig(gate=path, thresholds=Thresholds(pass_min=0.5))
    assert ServeConfig().gate_rule("CT") is None and ServeConfig().loaded_gate is None


def test_gate_refuses_configured_pass_thresholds(tmp_path):
    path = write_gate(tmp_path / "gate.json", gate_threshold(0.6))
    with pytest.raises(ValidationError, match="sets the pass threshold: drop thresholds.pass_min"):
        load_config(overrides={"gate": path, "thresholds": {"pass_min": 0.5, "review_min": None}})  # as the CLI
    settings = tmp_path / "serve.yaml"
    settings.write_text(f"gate: {path}\nmodality_thresholds:\n  CT: {{pass_min: 0.6, review_min: 0.3}}\n")
    with pytest.raises(ValidationError, match="sets the per-modality pass thresholds"):
        load_config(settings)
    settings.write_text(f"gate: {path}\nthresholds: {{review_min: 0.3}}\n")
    assert load_config(settings).thresholds_for("CT") == Thresholds(pass_min=0.6, review_min=0.3)


def _gate_dict(tmp_path) -> dict:
    return json.loads(write_gate(tmp_path / "ok.json", gate_threshold(0.6)).read_text())


@pytest.mark.parametrize("content, reason", [
    (None, "no such gate file"),
    ("{not json", "not a readable gate file"),
    ("[1, 2]", "not a MedQM gate file"),
    ('{"format": "medqm-collection/1"}', "not a MedQM gate file (format 'medqm-gate/1' expected)"),
    (lambda d: {k: v for k, v in d.items() if k != "risk"}, "missing 'risk'"),
    (lambda d: {**d, "default": {k: v for k, v in d["default"].items() if k != "pass_min"}}, "pass_min"),
    (lambda d: {**d, "default": {**d["default"], "pass_min": 1.5}}, "default: pass_min must be a quality in [0, 1]"),
    (lambda d: {**d, "default": {**d["default"], "pass_min": "high"}}, "pass_min must be a quality"),
    (lambda d: {**d, "default": {**d["default"], "delta": None}}, "needs delta in (0, 1)"),
    (lambda d: {**d, "method": "vibes"}, "method 'vibes'"),
    (lambda d: {**d, "by_modality": {"banana": d["default"]}}, "unknown modality 'banana'"),
    (lambda d: {**d, "by_modality": [1]}, "not a valid MedQM gate file"),
], ids=["missing", "not-json", "list", "foreign", "no-risk", "no-pass-min", "pass-min-1.5", "pass-min-text",
        "no-delta", "method", "modality", "by-modality-list"])
def test_a_bad_gate_file_is_a_clear_error_naming_it(tmp_path, content, reason):
    path = tmp_path / "gate.json"
    if callable(content):
        content = json.dumps(content(_gate_dict(tmp_path)))
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        load_gate(path)
    assert reason in str(err.value)
    with pytest.raises(ValidationError, match=re.escape(reason)):  # and so at start, before the model loads
        load_config(overrides={"gate": path})


def test_cli_serve_refuses_a_bad_gate_file(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text('{"format": "something-else"}')
    r = subprocess.run([MEDQM, "serve", "--gate", str(bad)], capture_output=True, text=True, env=ENV, timeout=120)
    out = " ".join(r.stdout.split())
    assert r.returncode == 2 and f"{bad}: not a MedQM gate file" in out, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    good = write_gate(tmp_path / "ok.json", gate_threshold(0.6))
    r = subprocess.run([MEDQM, "serve", "--gate", str(good), "--pass-min", "0.3"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    out = " ".join(r.stdout.split())
    assert r.returncode == 2 and "sets the pass threshold" in out and "Traceback" not in r.stdout + r.stderr
