"""Training on the 'loss' target (the default): standardised log-loss targets, the validation calibration, the weight
average, and the 'quality' target kept as it was."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medqm.model import MedQMI, Scorer
from medqm.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import TYPE_WEIGHT, make_synthetic_labels  # noqa: E402

IMG = 64
C, S = 0.693, 0.315


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """The synthetic table with losses spread over decades, as KL labels are (most images within a few
    hundredths of a nat of unchanged, a few far from it): D = 1e-3 · (10^(3 · w_type · level / 5) − 1) nats,
    0 for the references, and Q the default quality map of D."""
    out = make_synthetic_labels(tmp_path_factory.mktemp("syn-loss") / "labels", n_per_modality=4,
                                modalities=("CT", "MR", "PATH"),
                                types=("gaussian_noise", "gaussian_blur"), levels=(1, 3, 5))
    df = pd.read_parquet(out / "labels.parquet")
    w = df.type.map(TYPE_WEIGHT).fillna(0.0).to_numpy()
    d = 1e-3 * (10 ** (3 * w * df.level.to_numpy() / 5) - 1)
    df["diag_loss"] = d
    df["quality"] = 1 / (1 + np.exp((d - C) / S))
    df["map_center"], df["map_scale"] = C, S
    df.to_parquet(out / "labels.parquet", index=False)
    return out


def _cfg(labels, out, **kw):
    return TrainConfig(**{"labels": str(labels), "out": str(out), "model_kwargs": {"img_size": IMG}, "epochs": 6,
                          "batch_size": 16, "lr": 3e-3, "patience": 0, "fractions": (0.5, 0.3, 0.2), "tasks": [], **kw})


def _y(quality, center, scale, eps=1e-3):
    """y = −asinh(D / 2 eps), D the loss of the quality under the map, written out here."""
    q = np.asarray(quality, dtype=np.float64)
    d = center - scale * np.log(q / (1 - q))
    return -np.arcsinh(d / (2 * eps))


@pytest.fixture(scope="module")
def loss_run(labels, tmp_path_factory):
    torch.manual_seed(0)
    cfg = _cfg(labels, tmp_path_factory.mktemp("loss") / "run", cache_dir=str(tmp_path_factory.mktemp("cache")))
    lines = []
    return cfg, train(cfg, log=lines.append), lines


def test_the_default_target_is_the_log_loss_standardised_on_the_training_images(loss_run, labels):
    cfg, result, lines = loss_run
    conf = json.loads((Path(cfg.out) / "config.json").read_text())["config"]
    assert conf["target"] == "loss" and conf["quality_map"] == [0.693, 0.315]  # the rows' own map
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    split = pd.read_csv(Path(cfg.out) / "split.csv")
    train_cases = set(split.case_id[split.split == "train"])
    y = _y(rows.quality[rows.case_id.isin(train_cases)], 0.693, 0.315)
    before = result.test["calibration"]["before"]  # the standardisation, before the calibration moved it
    assert before["target_loc"] == pytest.approx(y.mean(), rel=1e-6)
    assert before["target_scale"] == pytest.approx(y.std(), rel=1e-6)
    assert cfg.loss["w_reg"] == 1.0 and any(line.startswith("calibrated on") for line in lines)


def test_the_calibration_puts_the_validation_scores_on_the_label_scale(loss_run, labels):
    """Least squares of the true y on the predicted y over the validation images: slope 1, intercept 0 (up to the
    float16 cache: the scores here are computed from the image files)."""
    cfg, result, _ = loss_run
    cal = result.test["calibration"]
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    split = pd.read_csv(Path(cfg.out) / "split.csv")
    val = rows[rows.case_id.isin(set(split.case_id[split.split == "val"]))]
    assert cal["n"] == len(val) and cal["slope"] > 0
    scores = Scorer(cfg.out, runtime="torch", workers=0).score_files(val.path.tolist())
    pred = _y(scores.quality.to_numpy(), 0.693, 0.315)
    slope, intercept = np.polyfit(pred, _y(val.quality.to_numpy(), 0.693, 0.315), 1)
    assert slope == pytest.approx(1.0, abs=0.03) and abs(intercept) < 0.03 * np.std(pred) + 1e-3


def test_the_log_loss_target_ranks_held_out_images_better_than_the_quality_target(loss_run, labels, tmp_path):
    """On every image of the held-out cases (validation and test: half the cases), scored from the files: with
    losses spread over decades the quality target sees the small ones as ties, the log-loss target does not."""
    from scipy.stats import spearmanr

    cfg, _, _ = loss_run
    torch.manual_seed(0)
    quality = train(_cfg(labels, tmp_path / "q", target="quality", cache_dir=str(tmp_path / "cache")), log=None)
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    split = pd.read_csv(Path(cfg.out) / "split.csv")
    held = rows[rows.case_id.isin(set(split.case_id[split.split != "train"]))]
    r = {}
    for name, out in (("loss", cfg.out), ("quality", quality.out)):
        scores = Scorer(out, runtime="torch", workers=0).score_files(held.path.tolist())
        r[name] = spearmanr(scores.quality, held.quality)[0]
    assert r["loss"] > 0.4 and r["loss"] > r["quality"], r


def test_the_quality_target_trains_as_before(labels, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(labels, tmp_path / "q", target="quality", cache_dir=str(tmp_path / "cache"), epochs=2)
    result = train(cfg, log=None)
    conf = json.loads((Path(cfg.out) / "config.json").read_text())["config"]
    assert "target" not in conf and cfg.loss["w_reg"] == 10.0 and "calibration" not in result.test
    assert MedQMI.from_pretrained(cfg.out).cfg.target == "quality"


def test_the_weight_average_is_what_is_evaluated_and_saved(labels, tmp_path):
    """With ema_decay the saved weights are the running average: they differ from the same training's last
    weights without it, and (warm-up: the plain mean of the steps, not pulled back to the initial weights) they
    rank the validation images, scored here from the files, as a trained model does."""
    cache = str(tmp_path / "cache")
    torch.manual_seed(0)
    plain = train(_cfg(labels, tmp_path / "plain", cache_dir=cache, calibrate=False, ema_decay=0.0), log=None)
    torch.manual_seed(0)
    avg = train(_cfg(labels, tmp_path / "ema", cache_dir=cache, calibrate=False, ema_decay=0.9), log=None)
    a = MedQMI.from_pretrained(plain.out).state_dict()
    b = MedQMI.from_pretrained(avg.out).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("head."))
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    split = pd.read_csv(Path(avg.out) / "split.csv")
    val = rows[rows.case_id.isin(set(split.case_id[split.split == "val"]))]
    from scipy.stats import spearmanr

    scores = Scorer(avg.out, runtime="torch", workers=0).score_files(val.path.tolist())
    r = spearmanr(scores.quality, val.quality)[0]
    print(f"validation SRCC of the averaged weights {r:.3f}")
    assert r > 0.4


@pytest.mark.parametrize("bad", [{"target": "logit"}, {"ema_decay": 1.0}, {"ema_decay": -0.1},
                                 {"model_kwargs": {"target": "quality"}}])
def test_bad_training_settings_are_refused(bad, tmp_path):
    with pytest.raises(ValueError):
        TrainConfig(labels=str(tmp_path), out=str(tmp_path / "o"), **bad)
