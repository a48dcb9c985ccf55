"""Training end to end on a small synthetic label table (real demo images, known quality function)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medqm.model import MedQMI, Scorer, create_model
from medqm.train import TrainConfig, check_split, train
from medqm.train.data import FeatureCache

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_synthetic_labels  # noqa: E402

IMG = 64
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.py: one thread for small tensors


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    return make_synthetic_labels(tmp_path_factory.mktemp("syn") / "labels", n_per_modality=3,
                                 modalities=("CT", "MR", "PATH"),
                                 types=("gaussian_noise", "gaussian_blur"), levels=(1, 3, 5))


@pytest.fixture(scope="module")
def frozen_run(labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "medqm-i"
    cache = tmp_path_factory.mktemp("cache")
    cfg = TrainConfig(labels=str(labels), out=str(out), model_kwargs={"img_size": IMG}, epochs=3, batch_size=16,
                      cache_dir=str(cache), patience=0)
    lines = []
    result = train(cfg, log=lines.append)
    return cfg, result, lines


def test_frozen_training_writes_a_complete_checkpoint(frozen_run, labels):
    cfg, result, lines = frozen_run
    out = Path(cfg.out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "prompts.txt", "split.csv", "metrics.csv", "test_metrics.json",
            "test_predictions.csv", "train_config.json"} <= names
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.epoch) == [1, 2, 3] and {"train_loss", "val_srcc", "expert_load", "lr"} <= set(metrics.columns)
    assert sum(line.startswith("epoch") for line in lines) == 3 and any("held-out" in line for line in lines)
    split = pd.read_csv(out / "split.csv", dtype=str)
    check_split(split, pd.read_parquet(Path(labels) / "labels.parquet"))
    assert set(split.split) == {"train", "val", "test"}
    meta = json.loads((out / "config.json").read_text())["config"]["meta"]
    assert meta["trained_on"]["labels"] == str(Path(labels).resolve()) and meta["trained_on"]["mode"] == "frozen"
    summary = json.loads((out / "test_metrics.json").read_text())
    assert summary["test"]["overall"]["n"] == len(pd.read_csv(out / "test_predictions.csv"))
    assert set(summary["test"]["by_modality"]) == {"CT", "MR", "PATH"}


def test_checkpoint_scores_files_as_training_predicted_them(frozen_run):
    """The scoring path (read → letterbox → full model) agrees with the cached-feature path of training."""
    cfg, _, _ = frozen_run
    preds = pd.read_csv(Path(cfg.out) / "test_predictions.csv")
    model = MedQMI.from_pretrained(cfg.out)
    assert not model.training and model.cfg.img_size == IMG
    scored = Scorer(cfg.out, runtime="torch").score_files(preds.path.tolist())
    np.testing.assert_allclose(scored.quality.to_numpy(), preds.pred.to_numpy(), atol=5e-3)  # fp16 feature cache


def test_feature_cache_is_keyed_by_content_and_reused(labels, tmp_path):
    model = create_model("medqm_i_baseline", pretrained_backbone=False, img_size=IMG)
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    paths = rows.path.tolist()[:6]
    cache = FeatureCache(tmp_path, model)
    keys, failures = cache.ensure(paths)
    assert not failures and all(cache.file_for(k).is_file() for k in keys)
    feats = cache.load(keys[:2])
    assert [tuple(f.shape) for f in feats] == [(2, c, h, w) for c, h, w in cache.shapes]
    calls = []
    model.forward_backbone = lambda x: calls.append(x)  # a rerun must not touch the backbone
    assert FeatureCache(tmp_path, model).ensure(paths)[0] == keys and not calls
    # another backbone gets its own folder
    other = create_model("medqm_i_baseline", pretrained_backbone=False, img_size=IMG, out_indices=(2, 3, 4))
    assert FeatureCache(tmp_path, other).dir != cache.dir


def test_finetune_mode_trains_the_backbone(labels, tmp_path):
    out = tmp_path / "ft"
    cfg = TrainConfig(labels=str(labels), out=str(out), model="medqm_i_baseline", mode="finetune",
                      model_kwargs={"img_size": IMG}, epochs=1, batch_size=8, max_images=24, patience=0)
    train(cfg, log=None)
    trained = MedQMI.from_pretrained(out)
    fresh = create_model("medqm_i_baseline", img_size=IMG)  # the ImageNet starting point
    assert not torch.equal(trained.backbone.conv_stem.weight, fresh.backbone.conv_stem.weight)


def test_cli_train_refuses_a_leaking_split(labels, tmp_path):
    rows = pd.read_parquet(Path(labels) / "labels.parquet")
    cases = sorted(rows.case_id.unique())
    split = pd.DataFrame({"case_id": cases + cases[:1], "split": ["train"] * len(cases) + ["test"]})
    split.to_csv(tmp_path / "split.csv", index=False)
    r = subprocess.run([str(Path(sys.executable).with_name("medqm")), "train", "--labels", str(labels), "--out",
                        str(tmp_path / "run"), "--split", str(tmp_path / "split.csv"), "--epochs", "1"],
                       capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 2 and "more than one part" in r.stdout
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_learns_noise_severity_on_unseen_images(labels, tmp_path):
    """Fast learning check (default suite): after a short frozen training on the synthetic table, the model
    ranks Gaussian-noise severity on references it never saw (other demo cases), per image, as it must:
    more noise, lower quality (the table's quality falls with the level; see synthetic.py)."""
    from scipy.stats import spearmanr

    from medqm.distort import distort
    from medqm.distort.calibration import reference_sample
    from medqm.io.collection import default_collection

    torch.manual_seed(0)
    cfg = TrainConfig(labels=str(labels), out=str(tmp_path / "run"), model_kwargs={"img_size": IMG}, epochs=8,
                      batch_size=16, lr=3e-3, patience=0, cache_dir=str(tmp_path / "cache"))
    train(cfg, log=None)
    seen = set(pd.read_parquet(Path(labels) / "labels.parquet").case_id)
    unseen = [r for r in reference_sample(default_collection(), n_per_modality=6, seed=1)
              if r.modality in ("CT", "MR") and r.case_id not in seen][:4]
    assert len(unseen) == 4
    scorer = Scorer(cfg.out, runtime="torch")
    rhos = []
    for ref in unseen:
        px = [ref.pixels] + [distort(ref, "gaussian_noise", lv, seed=3).pixels for lv in (1, 3, 5)]
        q = [r.quality for r in scorer.score_pixels([np.clip(p, 0, 1).astype(np.float32) for p in px])]
        rhos.append(spearmanr([0, 1, 3, 5], q)[0])
    assert np.mean(rhos) < -0.7, rhos


@pytest.mark.slow
def test_the_model_learns_the_synthetic_quality(tmp_path):
    """On held-out cases, the full model ranks distortion severity well after a short frozen training."""
    labels = make_synthetic_labels(tmp_path / "labels", n_per_modality=3, modalities=("CT", "MR", "PATH", "US"))
    cfg = TrainConfig(labels=str(labels), out=str(tmp_path / "run"), model_kwargs={"img_size": 224}, epochs=15,
                      batch_size=16, lr=2e-3, patience=0, cache_dir=str(tmp_path / "cache"))
    result = train(cfg, log=None)
    assert result.test["overall"]["srcc"] > 0.7, result.test["overall"]


def test_cli_train_end_to_end(labels, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([str(Path(sys.executable).with_name("medqm")), "train", "--labels", str(labels), "--out",
                        str(out),
                        "--model", "medqm_i_no_queries", "--img-size", str(IMG), "--epochs", "2", "--batch-size", "16",
                        "--cache", str(tmp_path / "cache"), "--fractions", "0.6,0.2,0.2", "--seed", "1"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "epoch   2" in r.stdout and "held-out SRCC" in r.stdout
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["model"] == "medqm_i_no_queries" and cfg["fractions"] == [0.6, 0.2, 0.2] and cfg["seed"] == 1
    assert MedQMI.from_pretrained(out).cfg.use_implicit is False


def test_warmup_cosine_schedule_values():
    """Linear warm-up, then cosine to min_lr_ratio × lr, per group, from torch's LambdaLR; stepped per batch."""
    import math

    from medqm.train.trainer import warmup_cosine_schedule

    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w], "lr": 1e-3}, {"params": [b], "lr": 1e-4}], lr=1e-3)
    total, warmup, floor = 20, 4, 0.01
    sched = warmup_cosine_schedule(opt, total_steps=total, warmup_steps=warmup, min_lr_ratio=floor)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    seen = []
    for _ in range(total + 3):  # past the end the rate stays at the floor
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()

    def expected(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([1e-3 * expected(step), 1e-4 * expected(step)], rel=1e-12)
    assert seen[0][0] == pytest.approx(2.5e-4) and seen[warmup][0] == pytest.approx(1e-3)
    assert seen[total][0] == pytest.approx(1e-5) and seen[-1][0] == pytest.approx(1e-5)
