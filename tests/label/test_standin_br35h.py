"""The stand-in's Br35H path (`scripts/train_diagnostic_vlm.py --br35h`): tumour items, the split by near-duplicate
cluster, and the tumour metrics of the evaluation, on a tiny fake Br35H folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from medqm.label.standin.evaluation import calibration, roc_auc, tumour_metrics
from medqm.label.standin.training import TrainConfig, with_tumour_share
from medqm.label.tasks import QUESTION_TEMPLATES, VQAItem, demo_questions
from medqm.testing import FAKE_TUMOUR_CASES, fake_tumour_collection

ROOT = Path(__file__).resolve().parents[2]

FAKE_CASES = FAKE_TUMOUR_CASES


def _fake_br35h(root: Path) -> Path:
    return fake_tumour_collection(root)


def _script():
    spec = importlib.util.spec_from_file_location("train_diagnostic_vlm", ROOT / "scripts" / "train_diagnostic_vlm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tumour_share_renormalises_the_others():
    share = with_tumour_share(TrainConfig().type_share, 0.3)
    assert abs(sum(share.values()) - 1) < 1e-12 and share["tumour"] == 0.3
    base = TrainConfig().type_share
    assert abs(share["body_part"] / share["modality"] - base["body_part"] / base["modality"]) < 1e-12
    assert "tumour" not in TrainConfig().type_share  # the default recipe is unchanged
    with pytest.raises(ValueError):
        with_tumour_share(base, 1.0)


def test_demo_questions_do_not_ask_the_tumour_question():
    items = demo_questions(ROOT / "data" / "demo")
    assert QUESTION_TEMPLATES["tumour"] not in {it.question for it in items}


def _scored(answers, p_yes):
    items, scores = [], []
    for i, (a, p) in enumerate(zip(answers, p_yes, strict=True)):
        it = VQAItem(f"{i}.png", QUESTION_TEMPLATES["tumour"], a, f"c{i}", "tumour", str(i), "MR", ["yes", "no"])
        nll = {"yes": -np.log(p), "no": -np.log(1 - p)}
        pred = "yes" if p >= 0.5 else "no"
        items.append(it)
        scores.append({"nll": nll, "prediction": pred, "correct": pred == a, "answer_nll": nll[a]})
    return items, scores


def test_tumour_metrics_auc_balanced_accuracy_and_ece():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(0.875)  # a tie counts half
    assert roc_auc([1, 1], [0.2, 0.3]) is None
    items, scores = _scored(["yes", "yes", "yes", "no"], [0.95, 0.95, 0.3, 0.05])
    m = tumour_metrics(items, scores, n_boot=50)
    assert m["n"] == 4 and m["n_yes"] == 3 and m["n_cases"] == 4
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["auc"] == pytest.approx(1.0)
    # chosen-answer probabilities 0.95, 0.95, 0.7 (wrong), 0.95 (right): bin (0.9, 1] 3 right, bin (0.6, 0.7] 1 wrong
    assert m["ece"] == pytest.approx(0.75 * 0.05 + 0.25 * 0.7)
    assert set(m["interval_95"]) == {"balanced_accuracy", "auc", "ece"}
    assert not m["met"]["balanced_accuracy"]
    cal = calibration(items, scores)
    assert sum(b["n"] for b in cal["bins"]) == 4 and len(cal["bins"]) == 10


def test_smoke_with_a_fake_br35h_folder(tmp_path):
    br = _fake_br35h(tmp_path / "br35h")
    work = tmp_path / "work"
    script = _script()
    rc = script.main(["--smoke", "--br35h", str(br), "--work", str(work), "--skip-reaction",
                      "--collection", str(ROOT / "data" / "demo")])
    assert rc == 0
    smoke = work / "smoke"
    summary = json.loads((smoke / "model" / "training_summary.json").read_text())
    assert summary["config"]["br35h"] == str(br) and summary["config"]["type_share"]["tumour"] == 0.3

    # the items and the split the run used (the lesion set is cached by now)
    from medqm.label.standin.data import load_data

    args = script.parse_args(["--smoke", "--br35h", str(br)])
    data = load_data(ROOT / "data" / "demo", smoke, script.make_config(args))
    tumour = [it for it in data.items if it.answer_type == "tumour"]
    assert tumour and all(it.question == QUESTION_TEMPLATES["tumour"] and it.choices == ["yes", "no"]
                          for it in tumour)
    flags = {case: lesion for case, lesion, _ in FAKE_CASES}
    assert all(it.answer == ("yes" if flags[it.case_id] else "no") for it in tumour)
    br_items = [it for it in data.items if data.source[it.image] == "br35h"]
    assert {it.answer_type for it in br_items} == {"modality", "body_part", "plane", "tumour"}
    assert not [it for it in br_items if it.answer_type == "lesion_present"]
    parts = {}
    for it in br_items:  # by case: every image of a cluster on one side
        parts.setdefault(it.case_id, set()).add(data.split[it.case_id])
    assert all(len(v) == 1 for v in parts.values())
    held = {c for c, _, _ in FAKE_CASES if data.split[c] == "val"}
    assert held and held != set(flags)
    assert {flags[c] for c in held} == {0, 1}

    res = json.loads((smoke / "eval_results.json").read_text())
    t = res["tumour"]
    assert t["n"] == sum(it.answer_type == "tumour" and data.split[it.case_id] == "val" for it in data.items)
    assert 0 <= t["balanced_accuracy"] <= 1 and t["auc"] is not None and 0 <= t["ece"] <= 1
    assert res["calibration"]["tumour"]["n"] == t["n"] and res["reaction"] is None
    assert "tumour" in res["accuracy"]
    card = (smoke / "model" / "MODEL_CARD.md").read_text()
    assert "## Tumour question (Br35H)" in card and "--br35h" in card


def test_occlude_blanks_the_head_or_its_surroundings(tmp_path):
    from medqm.io import read_image
    from medqm.label.standin.evaluation import occlude

    root = _fake_br35h(tmp_path / "br35h")
    px = read_image(root / "images" / "MR" / "mr-br35h-y-br35h-fake01-0.png").pixels
    yy, xx = np.mgrid[:256, :256]
    inside = ((yy - 128) / 112.0) ** 2 + ((xx - 128) / 92.0) ** 2 < 0.9  # well inside the ellipse
    outside = ((yy - 128) / 112.0) ** 2 + ((xx - 128) / 92.0) ** 2 > 1.1
    head = occlude(px, "head_blanked")
    assert np.ptp(head[inside]) == 0 and abs(float(head[inside].mean()) - float(px[inside].mean())) < 0.02
    assert np.array_equal(head[outside], px[outside])  # the surroundings untouched
    back = occlude(px, "background_blanked")
    assert np.all(back[outside] == 0) and np.array_equal(back[inside], px[inside])
    assert occlude(px, "full") is px
    with pytest.raises(ValueError, match="unknown occlusion"):
        occlude(px, "tumour_blanked")
