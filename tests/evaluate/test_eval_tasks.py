"""Per-task agreement in `medqm evaluate` (single split and cross-validation): figures checked against Spearman
correlations computed here from the labels' per-question losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from evalfixtures import CASES, IMG, MODALITY, SPLIT, make_labels, split_csv
from scipy.stats import spearmanr

from medqm.evaluate import CVConfig, EvalConfig, cross_validate, evaluate
from medqm.model import Scorer, create_model

C, S = 0.693, 0.315  # the quality map of the fixture's rows
# cases with a 'tumour' question: the MR ones and three CT training cases (56 images, enough for a task); the CT test
# cases (6, 8) have none
TUMOUR = {c for c in CASES if MODALITY[c] == "MR"} | {CASES[0], CASES[2], CASES[4]}


def _loss(kind: str, level: int, question: str) -> float:
    """Per-question loss: 'noise' questions suffer from noise, 'blur' ones from blur, 'tumour' from both."""
    if question == "tumour":
        return 0.2 * level if kind != "reference" else 0.0
    return 0.3 * level if kind == f"gaussian_{question}" else 0.01


@pytest.fixture(scope="module")
def task_labels(tmp_path_factory) -> Path:
    """The evaluation fixture's labels with per-question losses; only the `TUMOUR` cases have a 'tumour' question."""
    out = make_labels(tmp_path_factory.mktemp("eval-task-labels") / "labels")
    df = pd.read_parquet(out / "labels.parquet")
    qs = [["noise", "blur"] + (["tumour"] if c in TUMOUR else []) for c in df["case_id"]]
    df["answer_types"] = [json.dumps(q) for q in qs]
    df["loss_items"] = [json.dumps([_loss(k, lv, q) for q in qq])
                        for k, lv, qq in zip(df["type"], df["level"], qs, strict=True)]
    df.to_parquet(out / "labels.parquet", index=False)
    return out


def _expected_label(row, task: str) -> float:
    qs = ["noise", "blur"] + (["tumour"] if row["case_id"] in TUMOUR else [])
    if task not in qs:
        return float("nan")
    return 1.0 / (1.0 + math.exp((_loss(row["type"], row["level"], task) - C) / S))


def test_single_split_reports_per_task_agreement(task_labels, tmp_path):
    torch.manual_seed(0)
    model = create_model("medqm_i_no_priors", pretrained_backbone=False, img_size=IMG, tasks=["noise", "tumour"])
    with torch.no_grad():
        model.task_head.weight.normal_(0, 1.0)
    ckpt = model.eval().save_pretrained(tmp_path / "ckpt", extra_files={"split.csv": split_csv(SPLIT)})
    res = evaluate(EvalConfig(labels=str(task_labels), model=str(ckpt), out=str(tmp_path / "report"),
                              baselines=["niqe", "entropy"], n_boot=50, gate_splits=0, gallery=0, runtime="torch"),
                   log=None)
    sec = json.loads((tmp_path / "report" / "metrics.json").read_text())["tasks"]
    assert sec["method"] == "MedQM-I" and list(sec["by_task"]) == ["noise", "tumour"]
    rows = res.test.rows
    scores = Scorer(ckpt, runtime="torch").score_files(rows["path"].tolist())
    for task in ("noise", "tumour"):
        y = np.array([_expected_label(r, task) for _, r in rows.iterrows()])
        has = np.isfinite(y)
        e = sec["by_task"][task]
        assert e["n_images"] == int(has.sum()) and e["n_cases"] == rows.loc[has, "case_id"].nunique()
        pred = scores[f"quality_{task}"].to_numpy()
        assert e["srcc"] == pytest.approx(spearmanr(pred[has], y[has])[0], abs=1e-6)
        assert e["overall_output"]["srcc"] == pytest.approx(spearmanr(scores["quality"][has], y[has])[0], abs=1e-6)
        lo, hi = e["srcc_ci"]
        assert -1 <= lo <= hi <= 1
        niqe = next(m for m in res.methods if m.name == "niqe").raw  # lower is better: the sign flips
        assert e["other_methods_srcc"]["niqe"] == pytest.approx(spearmanr(-niqe[has], y[has])[0], abs=1e-9)
    assert rows.loc[rows["modality"] == "CT", "quality_tumour"].isna().all()  # the CT test cases have no tumour
    assert rows["quality_tumour"].notna().sum() == sec["by_task"]["tumour"]["n_images"] > 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Task-conditioned quality" in report and "| tumour |" in report
    assert "Task-conditioned quality" in (tmp_path / "report" / "report.html").read_text()


def test_checkpoints_without_tasks_leave_the_section_empty(labels, checkpoints, tmp_path):
    res = evaluate(EvalConfig(labels=str(labels), model=str(checkpoints["main"]), out=str(tmp_path / "r"),
                              baselines=["entropy"], n_boot=20, gate_splits=0, gallery=0, runtime="torch"), log=None)
    assert res.metrics["tasks"] is None
    assert "Task-conditioned" not in (tmp_path / "r" / "report.md").read_text()


def test_cross_validation_pools_the_task_outputs(task_labels, tmp_path):
    torch.set_num_threads(1)
    cfg = CVConfig(labels=str(task_labels), out=str(tmp_path / "cv"), folds=2, models=["medqm_i_baseline"],
                   main="medqm_i_baseline", baselines=["entropy"], img_size=IMG, epochs=1, patience=0, n_boot=30,
                   gate_splits=0, cache_dir=str(tmp_path / "features"))
    res = cross_validate(cfg, log=None)
    sec = res.metrics["tasks"]
    assert set(sec["by_task"]) == {"blur", "noise", "tumour"}  # every answer type has >= 50 labelled images
    assert res.rows.shape[0] > sec["by_task"]["tumour"]["n_images"]  # cases without the task are left out
    # the pooled predictions are each fold's checkpoint's test predictions
    pred = pd.concat([pd.read_csv(tmp_path / "cv" / f"fold-{i}" / "medqm_i_baseline" / "test_predictions.csv")
                      for i in range(2)])
    pooled = res.rows.merge(pred[["path", "pred_tumour"]], on="path")
    assert len(pooled) == len(res.rows)
    y = np.array([_expected_label(r, "tumour") for _, r in pooled.iterrows()])
    has = np.isfinite(y)
    e = sec["by_task"]["tumour"]
    assert e["n_images"] == int(has.sum())
    assert e["srcc"] == pytest.approx(spearmanr(pooled["pred_tumour"][has], y[has])[0], abs=1e-6)
    assert "Task-conditioned quality (pooled)" in (tmp_path / "cv" / "report.md").read_text()
