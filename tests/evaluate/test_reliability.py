"""Label reliability: the distortion oracle and severity monotonicity, against values computed independently."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from evalfixtures import SPLIT  # tests/evaluate, on sys.path via conftest.py
from scipy.stats import spearmanr

from medqm.evaluate.reliability import (
    describe_reliability,
    distortion_oracle,
    label_reliability,
    severity_monotonicity,
)

SPLIT_DF = pd.DataFrame({"case_id": list(SPLIT), "split": list(SPLIT.values())})


def _table(quality_fn, seed=0, types=("gaussian_noise", "jpeg"), levels=(1, 2, 3, 4, 5), refs_per_case=2):
    rng = np.random.default_rng(seed)
    rows = []
    for case in SPLIT:
        for r in range(refs_per_case):
            ref = f"{case}-r{r}"
            rows.append({"case_id": case, "ref_id": ref, "type": "reference", "level": 0, "quality": 0.9})
            for t in types:
                for lv in levels:
                    rows.append({"case_id": case, "ref_id": ref, "type": t, "level": lv,
                                 "quality": float(quality_fn(t, lv, rng))})
    return pd.DataFrame(rows)


def _test_rows(table):
    return table[table.case_id.map(SPLIT) == "test"].reset_index(drop=True)


def test_oracle_predicts_the_non_test_mean_of_each_type_and_level():
    table = _table(lambda t, lv, rng: 0.9 - 0.1 * lv * (2 if t == "jpeg" else 1) + rng.normal(0, 0.05))
    rows = _test_rows(table)
    pred = distortion_oracle(table, SPLIT_DF, rows)
    pool = table[table.case_id.map(SPLIT) != "test"]
    expect = rows.merge(pool.groupby(["type", "level"], as_index=False).quality.mean(), on=["type", "level"],
                        how="left", suffixes=("", "_mean"))["quality_mean"].to_numpy()
    np.testing.assert_allclose(pred, expect, rtol=0, atol=1e-12)
    rel = label_reliability(table, SPLIT_DF, rows, n_boot=50)
    o = rel["distortion_oracle"]
    assert o["srcc"] == pytest.approx(spearmanr(expect, rows.quality)[0], abs=1e-9)
    assert o["n_images"] == len(rows) and o["n_uncovered"] == 0 and o["n_cases"] == 4
    lo, hi = o["srcc_ci"]
    assert lo <= o["srcc"] <= hi
    json.dumps({k: v for k, v in rel.items() if k != "pred"})  # JSON-serialisable for metrics.json


def test_monotone_labels_give_rho_one_and_random_labels_give_about_zero():
    mono = severity_monotonicity(_table(lambda t, lv, rng: 0.95 - 0.15 * lv))
    assert mono["mean_rho"] == pytest.approx(1.0) and mono["frac_rho_ge_0.8"] == 1.0
    assert mono["n_series"] == 10 * 2 * 2 and mono["n_flat"] == 0
    noisy = _table(lambda t, lv, rng: rng.uniform(), seed=3, refs_per_case=20)
    noisy = noisy[noisy.type != "reference"]  # references (Q = 0.9 by definition) would rank first, rightly
    m = severity_monotonicity(noisy)
    assert m["n_series"] == 10 * 20 * 2 and abs(m["mean_rho"]) < 0.1
    rel = label_reliability(noisy, SPLIT_DF, _test_rows(noisy), n_boot=20)
    assert abs(rel["distortion_oracle"]["srcc"]) < 0.15
    text = " ".join(describe_reliability(rel, "MedQM-I", 0.1))
    assert "erratically" in text and "Label ceiling" in text


def test_constant_series_are_counted_not_scored():
    t = _table(lambda tp, lv, rng: 0.5 if tp == "jpeg" else 0.9 - 0.1 * lv)
    m = severity_monotonicity(t)
    assert m["n_flat"] == 20 and m["n_series"] == 20 and m["mean_rho"] == pytest.approx(1.0)


def test_types_unseen_outside_the_test_cases_are_left_out_and_counted():
    table = _table(lambda t, lv, rng: 0.9 - 0.1 * lv)
    extra = table[(table.case_id.map(SPLIT) == "test") & (table.type == "jpeg")].assign(type="ct_ring")
    table = pd.concat([table, extra], ignore_index=True)
    rows = _test_rows(table)
    rel = label_reliability(table, SPLIT_DF, rows, n_boot=20)
    assert rel["distortion_oracle"]["n_uncovered"] == len(extra)
    assert np.isnan(rel["pred"][rows.type.eq("ct_ring").to_numpy()]).all()
    assert "left out" in describe_reliability(rel)[0]


def test_the_oracle_never_predicts_a_case_from_itself():
    table = _table(lambda t, lv, rng: 0.9 - 0.1 * lv)
    train_rows = table[table.case_id.map(SPLIT) == "train"]
    with pytest.raises(AssertionError, match="shares cases"):
        distortion_oracle(table, SPLIT_DF, train_rows)


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="level"):
        severity_monotonicity(pd.DataFrame({"ref_id": [], "type": [], "quality": []}))


def test_per_question_monotonicity_separates_a_steady_question_from_an_erratic_one():
    rng = np.random.default_rng(5)
    rows = []
    for r in range(30):
        for lv in (1, 2, 3, 4, 5):
            steady, erratic = 0.3 * lv, rng.normal()
            rows.append({"case_id": "c", "ref_id": f"r{r}", "type": "jpeg", "level": lv, "quality": 0.5,
                         "answer_types": json.dumps(["modality", "lesion_present"]),
                         "nll_ref_items": json.dumps([0.1, 0.2]),
                         "nll_dist_items": json.dumps([0.1 + steady, 0.2 + erratic])})
    per = severity_monotonicity(pd.DataFrame(rows))["by_answer_type"]
    assert per["modality"] == {"mean_rho": pytest.approx(1.0), "n_series": 30}
    assert abs(per["lesion_present"]["mean_rho"]) < 0.25 and per["lesion_present"]["n_series"] == 30
