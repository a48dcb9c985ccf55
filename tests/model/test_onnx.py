"""The ONNX Runtime scoring path gives the PyTorch scores (the fast CPU runtime must not change results)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from medqm.model import Scorer, create_model  # noqa: E402
from medqm.model.onnx import OnnxScorer, save_onnx, weights_digest  # noqa: E402

IMG = 64


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("medqm_i", pretrained_backbone=False, img_size=IMG, gating="noisy_topk").eval()
    with torch.no_grad():  # a trained router: the zero-initialised one ties every expert, and ties break arbitrarily
        model.head.router.gate.weight.normal_(0, 0.5)
    d = model.save_pretrained(tmp_path_factory.mktemp("onnx") / "ckpt")
    save_onnx(model, d)
    return model, d


def test_onnx_matches_pytorch(model_and_dir):
    model, d = model_and_dir
    assert json.loads((d / "model.onnx.json").read_text())["weights_sha256"] == weights_digest(model)
    x = np.random.default_rng(0).random((5, 3, IMG, IMG), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x), return_heatmap=True)
    got = OnnxScorer(d / "model.onnx").run(x, heatmaps=True)
    for k in ("score", "gates", "expert_scores", "heatmap"):
        np.testing.assert_allclose(got[k], ref[k].numpy(), atol=1e-5, rtol=1e-4, err_msg=k)
    one = OnnxScorer(d / "model.onnx").run(x[:1])  # dynamic batch axis
    assert one["score"].shape == (1,) and "heatmap" not in one


def test_scorer_runtimes_agree(model_and_dir):
    _, d = model_and_dir
    imgs = [np.random.default_rng(i).random((70, 50), dtype=np.float32) for i in range(3)]
    fast = Scorer(d, runtime="onnx").score_pixels(imgs, heatmaps=True)
    slow = Scorer(d, runtime="torch").score_pixels(imgs, heatmaps=True)
    for f, s in zip(fast, slow, strict=True):
        assert f.quality == pytest.approx(s.quality, abs=1e-5)
        np.testing.assert_allclose(f.heatmap, s.heatmap, atol=1e-6)
    assert Scorer(d).runtime == "onnx"  # 'auto' picks ONNX Runtime on CPU when it is installed
