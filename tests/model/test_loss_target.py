"""The 'loss' target of MedQM-I: the head regresses the diagnostic loss on a log scale, the scores stay qualities."""

import json
import math

import numpy as np
import pytest
import torch

from medqm.model import MedQMI, Scorer, create_model, list_models, target_log_loss

IMG = 64
LN2, LN9 = math.log(2.0), math.log(9.0)


def _quality(d):
    """The default quality map written out: Q = 1 / (1 + 9^(D / ln 2 − 1))."""
    return 1.0 / (1.0 + 9.0 ** (np.asarray(d, dtype=np.float64) / LN2 - 1.0))


def _model(name="medqm_i", **kw):
    torch.manual_seed(0)
    return create_model(name, pretrained_backbone=False, img_size=IMG, target="loss", **kw).eval()


def test_the_head_output_maps_to_the_quality_of_the_loss_it_stands_for():
    """raw z → y = loc + scale·z → D = −2·eps·sinh(y) → the quality map; checked at losses written by hand."""
    model = _model(target_loc=-1.5, target_scale=2.0, loss_eps=1e-3)
    losses = np.array([0.0, 1e-3, 0.05, LN2, 2 * LN2, 3.0, -0.1])
    y = -np.arcsinh(losses / 2e-3)
    z = torch.tensor((y + 1.5) / 2.0, dtype=torch.float32)
    q = model.raw_to_quality(z).numpy()
    np.testing.assert_allclose(q, _quality(losses), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(q[[0, 3, 4]], [0.9, 0.5, 0.1], atol=1e-4)  # D = 0, ln 2, 2 ln 2
    assert q[-1] > 0.9  # a negative loss (the answer became more likely): better than unchanged


def test_qualities_to_targets_inverts_the_output_map():
    model = _model(target_loc=0.7, target_scale=1.3, loss_eps=1e-3)
    q = np.array([0.9, 0.8999, 0.85, 0.5, 0.1, 1e-9, 0.95, np.nan])
    z = model.quality_to_raw(q)
    assert np.isnan(z[-1]) and z.dtype == np.float32
    back = model.raw_to_quality(torch.from_numpy(z[:-1].astype(np.float32))).numpy()
    np.testing.assert_allclose(back, q[:-1], rtol=1e-4, atol=1e-7)
    # monotone: a better quality is a larger target, so the ranks a model learns are the ranks of the quality
    order = np.argsort(q[:-1])
    assert np.all(np.diff(z[:-1][order]) > 0)
    # y = −asinh(D / 2 eps) of the quality's loss, D = ln 2 − (ln 2 / ln 9)·logit(Q)
    d = LN2 - LN2 / LN9 * np.log(0.85 / 0.15)
    assert target_log_loss([0.85], model.cfg)[0] == pytest.approx(-np.arcsinh(d / 2e-3), rel=1e-9)


@pytest.mark.parametrize("name", list_models("medqm_i*"))
def test_every_variant_scores_qualities_and_trains_on_its_raw_output(name):
    model = _model(name, tasks=["tumour"]).train()
    out = model(torch.rand(3, 3, IMG, IMG))
    assert set(out) >= {"score", "raw", "task_raw", "task_scores", "expert_scores"}
    assert ((out["score"] > 0) & (out["score"] < 1)).all() and ((out["expert_scores"] >= 0) &
                                                                (out["expert_scores"] <= 1)).all()
    torch.testing.assert_close(out["score"], model.raw_to_quality(out["raw"]))
    # the task output is the overall one plus a correction that starts at zero
    torch.testing.assert_close(out["task_raw"][:, 0], out["raw"].detach())
    out["raw"].sum().backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_quality_target_models_keep_their_sigmoid_heads_and_config():
    torch.manual_seed(0)
    model = create_model("medqm_i", pretrained_backbone=False, img_size=IMG).eval()
    assert model.cfg.target == "quality"
    out = model(torch.rand(2, 3, IMG, IMG))
    assert torch.equal(out["raw"], out["score"])
    d = model.cfg.to_dict()
    assert not {"target", "loss_eps", "target_loc", "target_scale", "quality_map"} & set(d)


def test_a_loss_target_checkpoint_round_trips(tmp_path):
    model = _model(target_loc=-2.0, target_scale=1.7, quality_map=(0.6, 0.3))
    d = model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())["config"]
    assert cfg["target"] == "loss" and cfg["quality_map"] == [0.6, 0.3] and cfg["target_scale"] == 1.7
    loaded = MedQMI.from_pretrained(d)
    imgs = [np.random.default_rng(i).random((50, 70), dtype=np.float32) for i in range(3)]
    a = [r.quality for r in Scorer(d, runtime="torch", workers=0).score_pixels(imgs)]
    b = [r.quality for r in Scorer(model, runtime="torch").score_pixels(imgs)]
    assert a == b and loaded.cfg.quality_map == (0.6, 0.3)


@pytest.mark.parametrize("bad", [{"target": "logit"}, {"target_scale": 0.0}, {"loss_eps": -1.0},
                                 {"quality_map": (0.6,)}, {"quality_map": (0.6, -0.3)}, {"target_loc": math.inf}])
def test_bad_target_settings_are_refused(bad):
    with pytest.raises(ValueError):
        create_model("medqm_i_baseline", pretrained_backbone=False, img_size=IMG, **{"target": "loss", **bad})


def test_onnx_export_of_a_loss_target_model_agrees_with_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model(target_loc=-2.0, target_scale=1.5, tasks=["tumour"])
    d = model.save_pretrained(tmp_path / "ckpt")
    imgs = [np.random.default_rng(i).random((60, 60), dtype=np.float32) for i in range(2)]
    t = Scorer(d, runtime="torch", workers=0).score_pixels(imgs)
    o = Scorer(d, runtime="onnx", workers=0).score_pixels(imgs)
    np.testing.assert_allclose([r.quality for r in o], [r.quality for r in t], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r.tasks["tumour"] for r in o], [r.tasks["tumour"] for r in t], rtol=1e-4, atol=1e-5)
