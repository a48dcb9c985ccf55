"""Task-conditioned quality in training: per-answer-type targets, the masked task loss, a tiny run that learns them."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from medqm.model import MedQMI, Scorer
from medqm.train import QualityLoss, TrainConfig, train
from medqm.train.data import select_tasks, task_qualities, training_rows

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_synthetic_labels  # noqa: E402

IMG = 64
C, S = 0.6, 0.3  # a quality map other than the default, so the rows' own map_center / map_scale must be used


def _q(d: float) -> float:
    """The quality map written out: Q = 1 / (1 + exp((D − c) / s))."""
    return 1.0 / (1.0 + math.exp((d - C) / S))


def test_task_targets_are_the_quality_map_of_each_types_mean_loss():
    table = pd.DataFrame({
        "dist_id": ["a", "b", "c", "d", "e"],
        "answer_types": [json.dumps(["modality", "tumour", "tumour"]), json.dumps(["modality", "plane"]),
                         json.dumps(["tumour"]), json.dumps(["modality", "tumour"]), None],
        "loss_items": [json.dumps([0.1, 0.4, 1.0]), json.dumps([0.0, 2.0]), json.dumps([-0.2]),
                       json.dumps([0.3]),  # one loss for two questions: unusable row
                       None],
        "map_center": [C] * 5, "map_scale": [S] * 5,
    })
    with pytest.warns(UserWarning, match=r"1 label rows .* d \(2 answer types but 1 losses\)"):
        tq = task_qualities(table)
    assert list(tq.columns) == ["modality", "plane", "tumour"]
    expected = {
        "modality": [_q(0.1), _q(0.0), np.nan, np.nan, np.nan],
        "plane": [np.nan, _q(2.0), np.nan, np.nan, np.nan],
        "tumour": [_q((0.4 + 1.0) / 2), np.nan, _q(-0.2), np.nan, np.nan],  # the mean loss of the type's questions
    }
    for t, v in expected.items():
        np.testing.assert_allclose(tq[t].to_numpy(), v, rtol=1e-12, err_msg=t)


def test_legacy_label_sets_without_loss_items_use_the_nll_differences():
    table = pd.DataFrame({"answer_types": [json.dumps(["modality", "tumour"])],
                          "nll_ref_items": [json.dumps([0.5, 0.2])], "nll_dist_items": [json.dumps([0.7, 1.1])]})
    table.attrs["medqm"] = {"quality_map": {"center": C, "scale": S}}  # no per-row map: the label set's
    tq = task_qualities(table)
    np.testing.assert_allclose(tq.loc[0, ["modality", "tumour"]].to_numpy(float), [_q(0.2), _q(0.9)], rtol=1e-9)
    assert task_qualities(pd.DataFrame({"quality": [0.5]})).shape == (1, 0)  # no answer types: no tasks


def test_select_tasks_counts_labelled_images():
    rows = pd.DataFrame({"quality_tumour": [0.5, np.nan, 0.4], "quality_modality": [0.1, 0.2, 0.3], "quality": 0.5})
    assert select_tasks(rows, min_images=3) == ["modality"]
    assert select_tasks(rows, min_images=2) == ["modality", "tumour"]
    assert select_tasks(rows, min_images=2, candidates=["tumour"]) == ["tumour"]


def test_task_loss_ignores_missing_targets():
    loss = QualityLoss(w_reg=10.0, w_rank=1.0, rank="plcc")
    pred = torch.tensor([[0.2, 0.9], [0.4, 0.5], [0.8, 0.1], [0.5, 0.3]], requires_grad=True)
    target = torch.tensor([[0.1, float("nan")], [0.5, 0.4], [0.7, float("nan")], [0.6, 0.2]])
    got = loss.task_loss(pred, target)
    got.backward()
    p, t = pred.detach(), target

    def term(a, b):  # w_reg · MSE + w_rank · (1 − Pearson r), written out
        r = np.corrcoef(a, b)[0, 1]
        return 10.0 * float(np.mean((a - b) ** 2)) + (1 - r)

    want = (term(p[:, 0].numpy(), t[:, 0].numpy()) + term(p[[1, 3], 1].numpy(), t[[1, 3], 1].numpy())) / 2
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 1] == 0 and pred.grad[2, 1] == 0  # no target, no gradient
    all_missing = torch.full((4, 2), float("nan"))
    assert float(loss.task_loss(pred, all_missing)) == 0.0


def _loss(kind_of_row: str, kind: str, level: int) -> float:
    """Per-question loss of the synthetic task labels: a question of type 'noise' suffers only from Gaussian noise,
    one of type 'blur' only from blur, both in proportion to the level."""
    return 0.25 * level if kind == kind_of_row else 0.0


@pytest.fixture(scope="module")
def task_labels(tmp_path_factory):
    """The synthetic table (real demo images, noise and blur at levels 1, 3, 5) with per-question losses: every
    image has a 'noise' and a 'blur' question; only MR images also have a 'tumour' question (NaN elsewhere)."""
    out = make_synthetic_labels(tmp_path_factory.mktemp("tasks") / "labels", n_per_modality=3,
                                modalities=("CT", "MR", "PATH"), types=("gaussian_noise", "gaussian_blur"),
                                levels=(1, 3, 5))
    df = pd.read_parquet(out / "labels.parquet")
    types, items = [], []
    for r in df.itertuples():
        t = ["noise", "blur"] + (["tumour"] if r.modality == "MR" else [])
        d = [_loss("gaussian_noise", r.type, r.level), _loss("gaussian_blur", r.type, r.level)]
        if r.modality == "MR":
            d.append(0.2 * r.level)
        types.append(json.dumps(t))
        items.append(json.dumps(d))
    df["answer_types"], df["loss_items"] = types, items
    df.to_parquet(out / "labels.parquet", index=False)
    return out


def test_a_tiny_training_learns_the_task_outputs(task_labels, tmp_path):
    """Each task output, scored from the image files after a short frozen training, ranks its own target (noise
    or blur severity) and not the other's, although the overall quality falls with both."""
    torch.manual_seed(0)
    cfg = TrainConfig(labels=str(task_labels), out=str(tmp_path / "run"), model_kwargs={"img_size": IMG}, epochs=8,
                      batch_size=16, lr=3e-3, patience=0, cache_dir=str(tmp_path / "cache"), task_min_images=15)
    lines = []
    result = train(cfg, log=lines.append)
    assert MedQMI.from_pretrained(cfg.out).cfg.tasks == ("blur", "noise", "tumour")  # tumour: 21 MR images >= 15
    assert any(line.startswith("tasks: blur") for line in lines)
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["train_tasks"]) for h in result.history)
    assert {"val_srcc_blur", "val_srcc_noise", "val_srcc_tumour"} <= set(result.history[-1])
    assert set(result.test["tasks"]) == {"blur", "noise", "tumour"}
    refit = result.test["task_refit"]  # the heads refitted on the best epoch's representation, never made worse
    assert refit["mean_srcc_after"] >= refit["mean_srcc_before"] and any("task heads refitted" in x for x in lines)
    meta = json.loads((Path(cfg.out) / "config.json").read_text())["config"]
    assert meta["tasks"] == ["blur", "noise", "tumour"] and meta["meta"]["trained_on"]["tasks"]["tumour"] == 21
    rows, _ = training_rows(pd.read_parquet(Path(task_labels) / "labels.parquet"))
    scored = Scorer(cfg.out, runtime="torch", workers=0).score_files(rows["path"].tolist())
    assert {"quality_blur", "quality_noise", "quality_tumour"} <= set(scored.columns)
    for own, other in (("noise", "blur"), ("blur", "noise")):
        pred = scored[f"quality_{own}"].to_numpy()
        r_own = spearmanr(pred, rows[f"quality_{own}"])[0]
        r_other = spearmanr(pred, rows[f"quality_{other}"])[0]
        assert r_own > 0.35 and r_own > r_other + 0.4, (own, r_own, r_other)
    tests = pd.read_csv(Path(cfg.out) / "test_predictions.csv")
    assert {"pred_noise", "pred_tumour", "quality_tumour"} <= set(tests.columns)
    assert tests.loc[tests.modality != "MR", "quality_tumour"].isna().all()


def test_tasks_can_be_named_or_switched_off(task_labels, tmp_path):
    common = {"labels": str(task_labels), "model_kwargs": {"img_size": IMG}, "epochs": 1, "batch_size": 32,
              "cache_dir": str(tmp_path / "cache")}
    train(TrainConfig(out=str(tmp_path / "none"), tasks=[], **common), log=None)
    model = MedQMI.from_pretrained(tmp_path / "none")
    assert model.cfg.tasks == () and not any("task" in k for k in model.state_dict())
    assert "tasks" not in json.loads((tmp_path / "none" / "test_metrics.json").read_text())["test"]
    train(TrainConfig(out=str(tmp_path / "one"), tasks=["tumour"], **common), log=None)
    assert MedQMI.from_pretrained(tmp_path / "one").cfg.tasks == ("tumour",)
    with pytest.raises(ValueError, match=r"tasks \['lesion'\]: no labelled image .* present: blur, noise, tumour"):
        train(TrainConfig(out=str(tmp_path / "bad"), tasks=["lesion"], **common), log=None)
