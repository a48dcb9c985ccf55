"""`medqm evaluate --folds K` (`medqm.evaluate.cross_validate`) end to end on the small synthetic label table:
pooled figures checked against independent computations, resume after an interruption, option checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

import medqm.train
from medqm.cli import app
from medqm.evaluate import CVConfig, create_baseline, cross_validate, headline_rows
from medqm.io import read_image
from medqm.train import load_split

MODELS = ["medqm_i", "medqm_i_no_priors", "medqm_i_baseline"]
SHOWN = {"medqm_i": "MedQM-I", "medqm_i_no_priors": "MedQM-I no priors", "medqm_i_baseline": "deep baseline"}
K = 2
N_BOOT = 40
TRAIN = {"img_size": 64, "epochs": 2, "patience": 0}


def _config(labels, out, cache, **kw) -> CVConfig:
    return CVConfig(labels=str(labels), out=str(out), folds=K, models=MODELS, baselines=["niqe", "brisque", "piqe"],
                    cache_dir=str(cache), n_boot=N_BOOT, gate_splits=20, num_threads=1, **{**TRAIN, **kw})


@pytest.fixture(scope="module")
def cv(labels, tmp_path_factory):
    """A run interrupted in the first training of fold 2, then resumed to the end: (result, out, trainings)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cv")
    out, cache = root / "cv", root / "features"
    real_train = medqm.train.train
    calls: list[list[str]] = [[], []]  # the models trained by the first and by the second run

    def interrupted(tcfg, **kw):
        calls[0].append(Path(tcfg.out).relative_to(out).as_posix())
        if len(calls[0]) == len(MODELS) + 1:  # fold 2's first model: leave a half-written checkpoint, then stop
            Path(tcfg.out).mkdir(parents=True)
            (Path(tcfg.out) / "metrics.csv").write_text("epoch\n1\n")
            raise KeyboardInterrupt
        return real_train(tcfg, **kw)

    def counted(tcfg, **kw):
        calls[1].append(Path(tcfg.out).relative_to(out).as_posix())
        return real_train(tcfg, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(medqm.train, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cross_validate(_config(labels, out, cache), log=None)
        mp.setattr(medqm.train, "train", counted)
        lines: list[str] = []
        result = cross_validate(_config(labels, out, cache), log=lines.append)
    return result, out, calls, lines


def test_folds_cover_every_case_once_and_models_never_see_their_test_cases(cv, labels):
    result, out, _, _ = cv
    table = pd.read_parquet(Path(labels) / "labels.parquet")
    folds = pd.read_csv(out / "folds.csv", dtype={"case_id": str})
    assert folds.case_id.is_unique and set(folds.case_id) == set(table.case_id) and set(folds.fold) == set(range(K))
    for i in range(K):
        split = load_split(out / f"fold-{i}" / "split.csv")
        test = set(split.loc[split.split == "test", "case_id"])
        assert test == set(folds.loc[folds.fold == i, "case_id"])
        for m in MODELS:  # each checkpoint saved the split it trained on: the fold's, test cases never trained on
            seen = load_split(out / f"fold-{i}" / m / "split.csv")
            assert not set(seen.loc[seen.split != "test", "case_id"]) & test
    rows = result.rows
    assert len(rows) == len(table) and rows.path.is_unique and rows.case_id.nunique() == 10


def test_pooled_srcc_is_spearman_of_the_concatenated_fold_predictions(cv, labels):
    result, out, _, _ = cv
    m = result.metrics
    table = pd.read_parquet(Path(labels) / "labels.parquet").set_index("path")
    for variant in MODELS:
        preds = pd.concat([pd.read_csv(out / f"fold-{i}" / variant / "test_predictions.csv") for i in range(K)])
        assert len(preds) == len(table)
        expect = spearmanr(preds["pred"], table.loc[preds["path"], "quality"])[0]
        o = m["methods"][SHOWN[variant]]["overall"]
        assert o["srcc"] == pytest.approx(expect, abs=1e-12) and o["n_images"] == 70 and o["n_cases"] == 10
        for f, fold in zip(m["per_fold"]["folds"], range(K), strict=True):
            p = preds[preds["path"].isin(result.rows.loc[result.rows.fold == fold, "path"])]
            assert f["methods"][SHOWN[variant]]["srcc"] == pytest.approx(
                spearmanr(p["pred"], table.loc[p["path"], "quality"])[0], abs=1e-12)
    # a classical baseline, scored here from the image files: same images, sign-aligned (NIQE: lower is better)
    niqe = create_baseline("niqe")
    paths = sorted(table.index)
    x = np.array([niqe(read_image(p).pixels) for p in paths])
    assert m["methods"]["niqe"]["overall"]["srcc"] == pytest.approx(
        spearmanr(-x, table.loc[paths, "quality"])[0], abs=1e-9)


def test_metrics_json_says_what_is_pooled_and_keeps_the_headline_keys(cv):
    result, out, _, _ = cv
    m = json.loads((out / "metrics.json").read_text())
    assert m["design"]["kind"] == "cross-validation" and m["design"]["folds"] == K and m["design"]["pooled"]
    assert m["test_set"]["n_cases"] == 10 and m["test_set"]["n_images"] == 70
    assert [f["n_cases"] for f in m["test_set"]["by_fold"]] == [5, 5]
    assert {m["methods"][SHOWN[v]]["kind"] for v in MODELS} == {"main", "ablation", "deep"}
    rows = headline_rows(m)
    assert rows[0][0] == "MedQM-I" and rows[-1][0].startswith("distortion oracle") and rows[0][-1] == "10"
    sig = m["significance"]
    assert sig["best_deep_baseline"] == "deep baseline" and sig["best_classical"] in ("niqe", "brisque", "piqe")
    assert set(sig["tests"]) == set(m["methods"]) - {"MedQM-I"}
    drop = sig["ablations"]["MedQM-I no priors"]
    main, abl = (m["methods"][n]["overall"]["srcc"] for n in ("MedQM-I", "MedQM-I no priors"))
    assert drop["drop"] == pytest.approx(main - abl) and drop["ci"][0] <= drop["ci"][1] and 0 < drop["p"] <= 1
    assert sig["tests"]["deep baseline"]["bootstrap"]["n_boot"] == N_BOOT
    # the pooled label ceiling: each fold's oracle (mean label per type and level on the fold's other cases)
    table = pd.read_parquet(Path(m["labels"]["path"]) / "labels.parquet")
    folds = pd.read_csv(out / "folds.csv", dtype={"case_id": str}).set_index("case_id").fold
    table["fold"] = table.case_id.map(folds)
    oracle = pd.concat([table[table.fold == i].join(table[table.fold != i].groupby(["type", "level"]).quality.mean()
                                                    .rename("oracle"), on=["type", "level"]) for i in range(K)])
    assert m["label_reliability"]["distortion_oracle"]["srcc"] == pytest.approx(
        spearmanr(oracle.oracle, oracle.quality)[0], abs=1e-9)
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 70 and {"fold", "MedQM-I", "niqe"} <= set(pred.columns)
    md = (out / "report.md").read_text()
    assert "## Per fold (SRCC)" in md and "## Ablations (pooled)" in md and f"pooled over {K} folds" in md
    assert "MedQM-I vs deep baseline: SRCC difference" in md
    assert "(best classical baseline): SRCC difference" in md
    for f in ("report.html", "figures/per_fold.png", "figures/srcc.png", "figures/scatter.png"):
        assert (out / f).is_file(), f


def test_an_interrupted_run_resumes_without_retraining_finished_models(cv):
    _, out, calls, lines = cv
    first, second = calls
    fold2 = [f"fold-1/{m}" for m in MODELS]
    assert first == [f"fold-0/{m}" for m in MODELS] + fold2[:1]
    assert second == fold2  # the interrupted model again, from the start, then the rest; fold 1 untouched
    assert sum(line.startswith("-- ") for line in lines) == len(MODELS)
    assert all((out / f"fold-{i}" / f"{m}.done.json").is_file() for i in range(K) for m in MODELS)


def test_a_finished_run_reruns_without_training_and_refuses_other_settings(cv, labels, tmp_path):
    result, out, _, _ = cv
    cache = Path(result.metrics["settings"]["cache_dir"])
    lines: list[str] = []
    again = cross_validate(_config(labels, out, cache), log=lines.append)
    assert not any(line.startswith("-- ") for line in lines)
    for name, meth in result.metrics["methods"].items():  # deterministic: the same pooled figures
        assert again.metrics["methods"][name]["overall"]["srcc"] == pytest.approx(meth["overall"]["srcc"], abs=1e-12)
        assert again.metrics["methods"][name]["overall"]["srcc_ci"] == meth["overall"]["srcc_ci"]
    with pytest.raises(ValueError, match="other epochs"):
        cross_validate(_config(labels, out, cache, epochs=3), log=None)


def test_cli_cross_validation_resumes_the_finished_run(cv, labels):
    result, out, _, _ = cv
    r = CliRunner().invoke(app, ["evaluate", "--labels", str(labels), "--out", str(out), "--folds", str(K),
                                 "--models", ",".join(MODELS), "--baselines", "niqe,brisque,piqe",
                                 "--epochs", "2", "--patience", "0", "--img-size", "64", "--n-boot", str(N_BOOT),
                                 "--threads", "1", "--cache-dir", result.metrics["settings"]["cache_dir"]])
    assert r.exit_code == 0, r.output
    assert f"pooled over {K} case-level folds" in r.output and "-- fold" not in r.output
    assert "MedQM-I no priors" in r.output and "report.html" in r.output


@pytest.mark.parametrize("args, message", [
    (["--folds", "1"], "folds must be an integer >= 2"),
    (["--folds", "11"], "the labels have only 10 usable cases"),
    (["--folds", "2", "--model", "x"], "--model: single-split options"),
    (["--folds", "2", "--models", "medqm_i,medqm_j"], "unknown models ['medqm_j']"),
    (["--folds", "2", "--models", "medqm_i,medqm_i"], "lists a model twice"),
    ([], "--model is required"),
])
def test_cli_checks_the_cross_validation_options(labels, tmp_path, args, message):
    out = tmp_path / "cv"
    r = CliRunner().invoke(app, ["evaluate", "--labels", str(labels), "--out", str(out), *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not out.exists()
