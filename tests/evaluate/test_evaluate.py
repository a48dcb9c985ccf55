"""`medqm evaluate` end to end on a small synthetic label table and tiny checkpoints, and its building blocks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from evalfixtures import CASES, SPLIT, split_csv  # tests/evaluate, on sys.path via conftest.py
from typer.testing import CliRunner

from medqm.cli import app
from medqm.evaluate import EvalConfig, _scoring, create_baseline, evaluate, list_baselines
from medqm.evaluate.runner import describe_agreement, resolve_compare
from medqm.io import read_image
from medqm.train import SplitLeakageError

TEST_CASES = {c for c, s in SPLIT.items() if s == "test"}
N_BOOT = 40


@pytest.fixture(scope="module")
def report(labels, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    r = CliRunner().invoke(app, ["evaluate", "--labels", str(labels), "--model", str(checkpoints["main"]), "--out",
                                 str(out),
                                 "--compare", f"plain={checkpoints['plain']}", "--n-boot", str(N_BOOT), "--runtime",
                                 "torch",
                                 "--threads", "1", "--gallery", "3"])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_report_files_exist_and_the_console_shows_the_headline(report):
    out, output = report
    for f in ("metrics.json", "report.md", "report.html", "figures/srcc.png", "figures/scatter.png",
              "figures/severity.png", "figures/labels.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert "SRCC [95% CI]" in output and "MedQM-I" in output and "NIQE" in output
    md = (out / "report.md").read_text()
    assert "| method | kind | SRCC [95% CI] | PLCC [95% CI] | KRCC | RMSE | images | cases |" in md
    assert "## Alignment study" in md
    assert "## How learnable are these labels?" in md and "distortion oracle (label ceiling)" in md
    assert "Label ceiling" in output and "distortion oracle" in output


def test_report_compares_quality_gates(report):
    """The fixture's labels have D = 0 (no answer ever lost): every method's risk–coverage curve is flat at 0, and
    with 4 test cases conformal risk control attains α = 0.4 in half-case splits (2 cases: (0 + 1) / 3 ≤ 0.4)
    while Learn then Test (Hoeffding–Bentkus at δ / 19 on ≤ 2 cases) attains nothing."""
    out, _ = report
    g = json.loads((out / "metrics.json").read_text())["gate"]
    assert g["n_cases"] == 4 and g["reference"] == "MedQM-I" and set(g["curves"]) == {"MedQM-I", "plain",
                                                                                        *list_baselines()}
    assert all(max(c["risk"]) == 0 for c in g["curves"].values())
    assert g["methods"]["ltt"]["alpha"] is None and g["methods"]["crc"]["alpha"] == 0.4
    assert g["methods"]["crc"]["by_method"]["MedQM-I"]["validity"]["n_splits"] == 200
    md = (out / "report.md").read_text()
    assert "## Quality gate: Conformal risk control" in md and "too few cases for this guarantee" in md
    assert (out / "figures" / "risk_coverage.png").is_file()


def test_metrics_json_structure(report):
    out, _ = report
    m = json.loads((out / "metrics.json").read_text())
    assert {"medqm_version", "labels", "test_set", "settings", "methods", "significance", "alignment",
            "severity_curves", "timing"} <= set(m)
    ts = m["test_set"]
    assert set(ts["cases"]) == TEST_CASES and ts["n_images"] == 4 * 7 and not ts["sampled"]
    assert set(m["methods"]) == {"MedQM-I", "plain", *list_baselines()}
    for name, meth in m["methods"].items():
        o = meth["overall"]
        assert o["n_cases"] == 4 and o["n_images"] + o["n_undefined"] == 28, name
        for k in ("srcc", "krcc", "plcc", "plcc_raw", "rmse"):
            assert k in o and f"{k}_ci" in o
        assert set(meth["by_modality"]) == {"CT", "MR"}
        assert set(meth["by_type"]) == {"reference", "gaussian_noise", "gaussian_blur"}
        assert set(meth["by_level"]) == {"0", "1", "2", "3"}
        assert meth["sign"] == (-1 if meth["lower_better"] else 1)
    assert m["methods"]["niqe"]["lower_better"] and m["methods"]["MedQM-I"]["kind"] == "main"
    assert m["methods"]["plain"]["kind"] == "deep" and m["methods"]["plain"]["source"]["split_verified"]
    lo, hi = m["methods"]["brisque"]["overall"]["srcc_ci"]
    assert -1 <= lo <= hi <= 1
    sig = m["significance"]
    assert sig["reference"] == "MedQM-I" and sig["best_baseline"] in m["methods"]
    assert set(sig["tests"]) == set(m["methods"]) - {"MedQM-I"}
    t = sig["tests"][sig["best_baseline"]]
    assert t["bootstrap"]["n_boot"] == N_BOOT and 0 < t["bootstrap"]["p"] <= 1 and t["williams"]["df"] == 28 - 3
    al = m["alignment"]
    assert al["metrics"] == ["niqe", "brisque", "piqe"] and len(al["text"]) >= 4
    assert set(al["severity"]) == {"gaussian_noise", "gaussian_blur"}
    assert al["severity"]["gaussian_noise"]["label"] == pytest.approx(-1.0, abs=0.2)  # labels fall with level
    rel = m["label_reliability"]
    # fixture labels fall strictly with the level in every series; the oracle is the non-test mean per type/level
    assert rel["monotonicity"]["mean_rho"] == pytest.approx(1.0) and rel["monotonicity"]["n_series"] == 10 * 2
    table = pd.read_parquet(Path(m["labels"]["path"]) / "labels.parquet")
    pool = table[table.case_id.map(SPLIT) != "test"].groupby(["type", "level"]).quality.mean()
    test = table[table.case_id.map(SPLIT) == "test"]
    expect = test.join(pool.rename("p"), on=["type", "level"]).p
    from scipy.stats import spearmanr
    assert rel["distortion_oracle"]["srcc"] == pytest.approx(spearmanr(expect, test.quality)[0], abs=1e-9)
    assert rel["distortion_oracle"]["n_images"] == 28
    curve = m["severity_curves"]["gaussian_blur"]
    assert curve["levels"] == [0, 1, 2, 3] and len(curve["label"]) == 4


def test_html_is_self_contained(report):
    out, _ = report
    html = (out / "report.html").read_text()
    srcs = re.findall(r"src=['\"]([^'\"]+)['\"]", html)
    assert len(srcs) >= 4 + 3  # four figures and three heatmaps
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html
    for section in ("Headline", "Significance", "Alignment study", "Quality vs severity", "Predicted vs label",
                    "Per modality", "Where MedQM-I looks", "Label distribution"):
        assert section in html, section


def test_all_methods_score_the_same_images_and_classical_scores_are_sign_aligned(report, labels):
    out, _ = report
    base = _scoring._PartCache(out / "cache" / "baselines").load(list_baselines())
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    test_paths = set(rows.loc[rows.case_id.isin(TEST_CASES), "path"])
    assert set(base.path) == test_paths
    path = min(test_paths)
    direct = create_baseline("brisque")(read_image(path).pixels)
    assert base.set_index("path").at[path, "brisque"] == pytest.approx(direct)
    model_parts = [p for p in (out / "cache").iterdir() if p.name.startswith("model-")]
    assert len(model_parts) == 2
    for p in model_parts:
        assert set(_scoring._PartCache(p).load(["quality"]).path) == test_paths


def test_rerun_resumes_from_the_cache(report, labels, checkpoints, monkeypatch):
    out, _ = report
    before = json.loads((out / "metrics.json").read_text())

    def no_scoring(*a, **k):
        raise AssertionError("cached scores must be reused")

    monkeypatch.setattr(_scoring, "_score_chunk", no_scoring)
    monkeypatch.setattr(_scoring, "_score_model_batch", no_scoring)
    cfg = EvalConfig(labels=str(labels), model=str(checkpoints["main"]), out=str(out),
                     compare=[f"plain={checkpoints['plain']}"], n_boot=N_BOOT, runtime="torch", num_threads=1,
                     gallery=0, group_ci=False)
    result = evaluate(cfg, log=None)
    for name, meth in before["methods"].items():  # same seed, same scores: the same numbers
        assert result.metrics["methods"][name]["overall"]["srcc"] == pytest.approx(meth["overall"]["srcc"], nan_ok=True)
        assert result.metrics["methods"][name]["overall"]["srcc_ci"] == pytest.approx(meth["overall"]["srcc_ci"])


def test_max_images_samples_within_every_case(labels, checkpoints):
    full = _scoring.load_test_set(labels, checkpoints["main"] / "split.csv")
    sub = _scoring.load_test_set(labels, checkpoints["main"] / "split.csv", max_images=10, seed=3)
    assert len(full.rows) == 28 and len(sub.rows) == 10
    assert set(sub.rows.case_id) == TEST_CASES and sub.info["sampled"] and sub.info["n_usable"] == 28
    assert set(sub.rows.path) <= set(full.rows.path)
    again = _scoring.load_test_set(labels, checkpoints["main"] / "split.csv", max_images=10, seed=3)
    assert again.rows.path.tolist() == sub.rows.path.tolist()
    with pytest.raises(ValueError, match="below the number of test cases"):
        _scoring.load_test_set(labels, checkpoints["main"] / "split.csv", max_images=3)


def test_a_compare_checkpoint_that_saw_a_test_case_is_refused(labels, checkpoints, tmp_path):
    cfg = EvalConfig(labels=str(labels), model=str(checkpoints["main"]), out=str(tmp_path / "r"),
                     compare=[f"leaky={checkpoints['leaky']}"], baselines=["entropy"], n_boot=N_BOOT, runtime="torch")
    with pytest.raises(SplitLeakageError, match="trained or validated on 1 of the test cases"):
        evaluate(cfg, log=None)
    r = CliRunner().invoke(app, ["evaluate", "--labels", str(labels), "--model", str(checkpoints["main"]), "--out",
                                 str(tmp_path / "r2"), "--compare", str(checkpoints["leaky"]), "--baselines",
                                 "entropy"])
    assert r.exit_code == 2 and "test cases" in r.output


def test_a_split_that_leaks_a_reference_is_refused(labels, tmp_path):
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    bad = rows.copy()
    bad.loc[bad.index[0], "case_id"] = CASES[6]  # a row of a training case's reference now claims a test case
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad.to_parquet(bad_dir / "labels.parquet", index=False)
    (tmp_path / "split.csv").write_text(split_csv(SPLIT))
    with pytest.raises(SplitLeakageError):
        _scoring.load_test_set(bad_dir, tmp_path / "split.csv")


def test_compare_folders_are_discovered(checkpoints, tmp_path):
    found = resolve_compare([str(checkpoints["main"].parent)], checkpoints["main"], "MedQM-I")
    assert set(found) == {"plain", "leaky"}  # the main model's own folder is skipped
    named = resolve_compare([f"x={checkpoints['plain']}"], checkpoints["main"], "MedQM-I")
    assert named == {"x": checkpoints["plain"]}
    with pytest.raises(ValueError, match="used twice"):
        resolve_compare([f"x={checkpoints['plain']}", f"x={checkpoints['leaky']}"], checkpoints["main"], "MedQM-I")
    with pytest.raises(FileNotFoundError):
        resolve_compare([str(tmp_path)], checkpoints["main"], "MedQM-I")


def test_bad_options_are_clear_errors(labels, checkpoints, tmp_path):
    with pytest.raises(ValueError, match="unknown baselines"):
        EvalConfig(labels=str(labels), model=str(checkpoints["main"]), out=str(tmp_path), baselines=["nique"])
    with pytest.raises(FileNotFoundError, match="not a MedQM-I checkpoint"):
        EvalConfig(labels=str(labels), model=str(tmp_path), out=str(tmp_path))
    with pytest.raises(ValueError, match="n_boot"):
        EvalConfig(labels=str(labels), model=str(checkpoints["main"]), out=str(tmp_path), n_boot=1)


@pytest.mark.parametrize("r, ci, expect", [
    (0.31, [0.12, 0.45], "moderate agreement"),
    (0.05, [-0.2, 0.3], "essentially no agreement"),
    (-0.42, [-0.6, -0.2], "moderate *disagreement*"),
    (0.2, [-0.05, 0.4], "includes zero"),
    (0.93, [0.9, 0.95], "very strong agreement"),
])
def test_alignment_wording_follows_the_numbers(r, ci, expect):
    text = describe_agreement("NIQE", r, ci, 12)
    assert expect in text and f"SRCC {r:+.2f}" in text
    if ci[0] > 0 or ci[1] < 0:
        assert "includes zero" not in text
    assert "undefined" in describe_agreement("NIQE", float("nan"), None, 3)
    assert np.isfinite(r)
