"""medqm.testing.vlm.build_qwen2_vl: a Qwen2-VL of any size built in memory, scored through the HF backend."""

import numpy as np
import pytest
import torch

from medqm.label.hf import HFDiagnosticModel
from medqm.testing.vlm import QWEN2_VL_2B_DIMS, build_qwen2_vl

TINY = {"vision_depth": 1, "vision_embed_dim": 32, "vision_heads": 4, "vision_mlp_ratio": 2, "hidden_size": 64,
        "intermediate_size": 96, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 1000}


def test_the_default_shape_is_qwen2_vl_2b():
    model, _ = build_qwen2_vl(device="meta")  # shapes only, no memory
    n = sum(p.numel() for p in model.parameters())
    assert 2.20e9 < n < 2.22e9  # Qwen2-VL-2B-Instruct: 2.21 B parameters (tied embeddings)
    assert model.config.text_config.num_key_value_heads == QWEN2_VL_2B_DIMS["num_kv_heads"]
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]  # as in the real config


def test_a_tiny_build_scores_answers_like_full_logits_and_is_seeded():
    model, processor = build_qwen2_vl(TINY, dtype="float32", seed=3)
    assert next(model.parameters()).dtype == torch.float32 and torch.get_default_dtype() == torch.float32
    vlm = HFDiagnosticModel(model, processor, model_id="tiny", revision="random", batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.random((256, 256), dtype=np.float32), rng.random((100, 140, 3), dtype=np.float32)]
    qs, ans = ["Is there a lesion?", "Which organ is shown?"], ["yes", "left lung"]
    nll = vlm.answer_nll(images, qs, ans)
    np.testing.assert_allclose(nll, vlm.full_logit_nll(images, qs, ans), rtol=1e-4)
    again, _ = build_qwen2_vl(TINY, dtype="float32", seed=3)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_dimensions_are_refused():
    with pytest.raises(ValueError, match="unknown dimension"):
        build_qwen2_vl({"layers": 2}, device="meta")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_qwen2_vl({**TINY, "hidden_size": 72}, device="meta")
