"""The Hugging Face `DiagnosticModel` backend on tiny random LLaVA, Qwen2-VL and SmolVLM checkpoints.

The checkpoints are built once per session by `medqm.testing.build_tiny_vlm`, saved to a temporary folder
and loaded back through `load_model(folder)`, as a user would load a real model.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medqm.label._protocol import DiagnosticModel
from medqm.label.hf import HFDiagnosticModel, load_model
from medqm.testing import TINY_FAMILIES, build_tiny_vlm

# what each family's template writes between its generation prompt and the answer, and after the answer
SEPARATOR = {"llava": " ", "qwen2_vl": "", "smolvlm": " "}
END_TOKEN = {"llava": "</s>", "qwen2_vl": "<|im_end|>", "smolvlm": "<end_of_utterance>"}

QUESTIONS = [
    "Is there a lesion?",
    "What modality is this image? Answer with one word.",
    "Which plane is shown in this slice of the brain scan?",
    "Is the chest normal?",
]
ANSWERS = ["yes", "ct", "axial plane", "no there is a small nodule in the left upper lung"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {fam: build_tiny_vlm(fam, root / f"tiny-{fam}", seed=0) for fam in TINY_FAMILIES}


@pytest.fixture(scope="session")
def models(tiny_dirs):
    return {fam: load_model(d, batch_size=8) for fam, d in tiny_dirs.items()}


@pytest.fixture(params=TINY_FAMILIES)
def family(request):
    return request.param


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(64, 80), (48, 48, 3), (100, 70), (90, 90, 3), (40, 120), (128, 128)]
    return [rng.random(shapes[i % len(shapes)]).astype(np.float32) for i in range(n)]


def _pil(x: np.ndarray) -> Image.Image:
    u8 = np.round(x * 255).astype(np.uint8)
    return Image.fromarray(u8).convert("RGB")


def _reference_nll(m: HFDiagnosticModel, family: str, image, question: str, answer: str) -> tuple[float, int]:
    """Sum of the answer's token NLLs from a plain forward pass with labels masked to the answer."""
    proc, model = m.processor, m.model
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    prompt = proc.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = prompt + SEPARATOR[family] + answer + END_TOKEN[family]
    pil = [[_pil(image)]]
    n_prompt = proc(text=[prompt], images=pil, return_tensors="pt")["input_ids"].shape[1]
    inputs = proc(text=[full], images=pil, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    n = int((labels != -100).sum())
    return float(out.loss) * n, n


def test_is_a_diagnostic_model(models, family):
    m = models[family]
    assert isinstance(m, DiagnosticModel)
    assert m.model_id == f"tiny-{family}"
    assert m.revision.startswith("local-") and len(m.revision) == len("local-") + 12
    assert not m.model.training


def test_matches_full_forward_with_masked_labels(models, family):
    m = models[family]
    imgs = _images(len(QUESTIONS))
    got = m.score(imgs, QUESTIONS, ANSWERS)
    for i, (img, q, a) in enumerate(zip(imgs, QUESTIONS, ANSWERS, strict=True)):
        ref, n = _reference_nll(m, family, img, q, a)
        assert got.n_tokens[i] == n
        assert abs(got.nll[i] - ref) <= 1e-4, (family, i, got.nll[i], ref)


def test_answer_only_equals_full_logit_scoring(models, family):
    m = models[family]
    imgs = _images(len(QUESTIONS), seed=1)
    np.testing.assert_allclose(
        m.answer_nll(imgs, QUESTIONS, ANSWERS), m.full_logit_nll(imgs, QUESTIONS, ANSWERS), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_one_by_one(models, family, padding_side):
    m = models[family]
    imgs = _images(5, seed=2)
    qs = QUESTIONS + ["Where is the fracture?"]
    ans = ANSWERS + ["left knee"]
    one_by_one = np.array([m.answer_nll([i], [q], [a])[0] for i, q, a in zip(imgs, qs, ans, strict=True)])
    batched = HFDiagnosticModel(
        m.model, m.processor, model_id=m.model_id, revision=m.revision, batch_size=3, padding_side=padding_side
    )
    np.testing.assert_allclose(batched.answer_nll(imgs, qs, ans), one_by_one, rtol=0, atol=1e-5)


def test_integer_logits_to_keep_fallback_agrees(tiny_dirs, models, family):
    m = models[family]
    fallback = HFDiagnosticModel(m.model, m.processor, model_id=m.model_id, revision=m.revision)
    fallback._keep_mode = "last"  # as for models whose forward only takes an integer logits_to_keep
    imgs = _images(4, seed=3)
    np.testing.assert_allclose(
        fallback.answer_nll(imgs, QUESTIONS, ANSWERS), m.answer_nll(imgs, QUESTIONS, ANSWERS), rtol=0, atol=1e-5
    )


def test_only_answer_and_end_token_are_scored(models, family):
    m = models[family]
    tok = m.tokenizer
    # "im", "end", "sys": answers that also occur inside the templates' own text
    for answer in ["yes", "left upper lung", "im", "end", "sys"]:
        expected = tok.convert_ids_to_tokens(tok(SEPARATOR[family] + answer, add_special_tokens=False)["input_ids"])
        expected.append(END_TOKEN[family])
        short = m.scored_tokens("Is it?", answer)
        long = m.scored_tokens("Is there any lesion visible in the upper part of this chest image?", answer)
        assert short == long == expected
        scores = m.score(_images(2), ["Is it?", "Which organ is shown in the image, and is it normal?"], [answer] * 2)
        assert scores.n_tokens.tolist() == [len(expected)] * 2


def test_prompt_words_do_not_change_what_is_scored(models, family):
    """Changing the question changes the NLL's conditioning but never which tokens it sums over."""
    m = models[family]
    img = _images(1)
    a = m.score(img * 2, ["Is there a lesion?", "Is there a mass?"], ["no", "no"])
    assert a.n_tokens[0] == a.n_tokens[1]
    assert a.nll[0] != a.nll[1]  # the question is seen (a random model still conditions on it)


def test_longer_answer_scores_more_tokens_and_higher_nll(models, family):
    m = models[family]
    imgs = _images(2)
    s = m.score(imgs, ["Is there a lesion?"] * 2, ["yes", "yes yes yes yes"])
    assert s.n_tokens[1] > s.n_tokens[0]
    assert s.nll[1] > s.nll[0] > 0


@pytest.mark.parametrize("bad", ["", "   ", "\n"])
def test_empty_answer_raises(models, bad):
    with pytest.raises(ValueError, match="empty"):
        models["llava"].answer_nll(_images(1), ["Is there a lesion?"], [bad])


def test_answers_are_stripped(models):
    m = models["qwen2_vl"]
    img = _images(1)
    assert m.answer_nll(img, ["Q?"], ["  yes \n"])[0] == m.answer_nll(img, ["Q?"], ["yes"])[0]


def test_save_load_round_trip(tmp_path, tiny_dirs, models, family):
    m = models[family]
    copy = tmp_path / "copy"
    m.model.save_pretrained(copy)
    m.processor.save_pretrained(copy)
    again = load_model(copy)
    assert again.model_id == "copy"
    imgs = _images(4, seed=4)
    np.testing.assert_array_equal(again.answer_nll(imgs, QUESTIONS, ANSWERS), m.answer_nll(imgs, QUESTIONS, ANSWERS))
    moved = shutil.copytree(tiny_dirs[family], tmp_path / f"tiny-{family}")
    assert load_model(moved).revision == m.revision  # the fingerprint ignores mtimes and location


def test_rebuild_is_deterministic(tmp_path, models, family):
    rebuilt = load_model(build_tiny_vlm(family, tmp_path / f"tiny-{family}", seed=0))
    imgs, qs, ans = _images(2, seed=5), QUESTIONS[:2], ANSWERS[:2]
    np.testing.assert_array_equal(rebuilt.answer_nll(imgs, qs, ans), models[family].answer_nll(imgs, qs, ans))


def test_grey_and_rgb_inputs(models, family):
    m = models[family]
    grey = _images(1, seed=6)[0]  # 64×80
    variants = [grey, grey[..., None], np.repeat(grey[..., None], 3, axis=2), grey.astype(np.float64)]
    nll = m.answer_nll(variants, ["Is there a lesion?"] * 4, ["no"] * 4)
    np.testing.assert_allclose(nll, nll[0], rtol=0, atol=1e-5)
    colour = np.random.default_rng(7).random((64, 80, 3)).astype(np.float32)
    assert np.isfinite(m.answer_nll([colour], ["Is there a lesion?"], ["no"])).all()


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((8, 8), np.uint8), TypeError, "float"),
        (np.full((8, 8), 1.5, np.float32), ValueError, r"\[0, 1\]"),
        (np.full((8, 8), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((8, 8, 4), np.float32), ValueError, "H×W"),
        (np.zeros((2, 8, 8, 3), np.float32), ValueError, "H×W"),
    ],
)
def test_bad_images_raise(models, image, error, match):
    with pytest.raises(error, match=match):
        models["llava"].answer_nll([image], ["Is there a lesion?"], ["no"])


def test_mismatched_lengths_and_empty_input(models):
    m = models["llava"]
    with pytest.raises(ValueError, match="same length"):
        m.answer_nll(_images(2), ["q"], ["a", "b"])
    out = m.answer_nll([], [], [])
    assert out.shape == (0,)


def test_load_model_validates_arguments(tmp_path, tiny_dirs):
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_dirs["llava"], dtype="float64")
    with pytest.raises(ValueError, match="device"):
        load_model(tiny_dirs["llava"], device="tpu")
    with pytest.raises(ValueError, match="not a model folder"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load an image-text-to-text model from the folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="padding_side"):
        load_model(tiny_dirs["llava"], padding_side="middle")


def test_bfloat16_weights(tiny_dirs):
    m = load_model(tiny_dirs["smolvlm"], dtype="bfloat16")
    assert m.model.dtype == torch.bfloat16
    ref = load_model(tiny_dirs["smolvlm"])
    imgs = _images(2, seed=8)
    low, high = m.answer_nll(imgs, QUESTIONS[:2], ANSWERS[:2]), ref.answer_nll(imgs, QUESTIONS[:2], ANSWERS[:2])
    assert np.isfinite(low).all()
    np.testing.assert_allclose(low, high, rtol=0.05)


def test_build_tiny_vlm_vocab_size_and_errors(tmp_path):
    from transformers import AutoConfig

    d = build_tiny_vlm("qwen2_vl", tmp_path / "wide", vocab_size=5000, hidden_size=32)
    assert AutoConfig.from_pretrained(d).text_config.vocab_size == 5000
    assert np.isfinite(load_model(d).answer_nll(_images(1), ["Is there a lesion?"], ["no"])).all()
    with pytest.raises(ValueError, match="family"):
        build_tiny_vlm("blip", tmp_path / "x")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_vlm("llava", tmp_path / "y", vocab_size=10)


# ---------------------------------------------------------------------- all choices at speed (shared prefix)


def vision_tower(model):
    """The module that encodes images, whatever the family calls it."""
    inner = model.model
    for name in ("vision_tower", "visual", "vision_model"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise AssertionError(f"no vision tower found on {type(model).__name__}")


def count_calls(module) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def grouped_workload(seed: int):
    """Images 0–2 (grey and RGB, of different sizes) with every question × every answer (answers of 1 to 11 words),
    image 3 once; shuffled; each sample holds its own copy of the array (equal content, different objects)."""
    imgs = _images(4, seed=seed)
    answers = ["yes", "no", "axial plane", "no there is a small nodule in the left upper lung"]
    samples = [(k, q, a) for k in range(3) for q in QUESTIONS[:3] for a in answers]
    samples.append((3, QUESTIONS[3], "no"))
    order = np.random.default_rng(seed).permutation(len(samples))
    samples = [samples[i] for i in order]
    return [imgs[k].copy() for k, _, _ in samples], [q for _, q, _ in samples], [a for _, _, a in samples]


def with_options(m: HFDiagnosticModel, **options) -> HFDiagnosticModel:
    return HFDiagnosticModel(m.model, m.processor, model_id=m.model_id, revision=m.revision, **options)


@pytest.mark.parametrize("batch_size", [3, 8])
def test_shared_prefix_equals_scoring_each_sample_alone(models, family, batch_size):
    m = with_options(models[family], batch_size=batch_size)
    imgs, qs, ans = grouped_workload(seed=11)
    alone = np.array([m.answer_nll([i], [q], [a])[0] for i, q, a in zip(imgs, qs, ans, strict=True)])  # groups of one
    got = m.score(imgs, qs, ans)
    np.testing.assert_allclose(got.nll, alone, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got.n_tokens, with_options(m, share_prefix=False).score(imgs, qs, ans).n_tokens)
    # any sample order gives the same per-sample NLLs
    perm = np.random.default_rng(1).permutation(len(imgs))
    again = m.answer_nll([imgs[i] for i in perm], [qs[i] for i in perm], [ans[i] for i in perm])
    np.testing.assert_allclose(again, got.nll[perm], rtol=0, atol=1e-4)


def test_shared_prefix_runs_the_vision_tower_once_per_image(models, family):
    imgs, qs, ans = grouped_workload(seed=12)
    tower = vision_tower(models[family].model)
    for share, expected in ((True, 4), (False, len(imgs))):  # 3 shared prefills + the image seen once
        m = with_options(models[family], batch_size=1, share_prefix=share)
        calls, hook = count_calls(tower)
        try:
            m.answer_nll(imgs, qs, ans)
        finally:
            hook.remove()
        assert len(calls) == expected, (family, share, len(calls))


def test_shared_prefix_failure_falls_back_with_a_warning(models, monkeypatch):
    m = models["llava"]
    original = m.model.forward

    def no_cache(*args, **kwargs):  # a forward that refuses a key/value cache
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise TypeError("this model takes no cache")
        return original(*args, **kwargs)

    monkeypatch.setattr(m.model, "forward", no_cache)
    imgs, qs, ans = grouped_workload(seed=13)
    broken = with_options(m)
    with pytest.warns(UserWarning, match="shared prompt prefix failed"):
        got = broken.answer_nll(imgs, qs, ans)
    np.testing.assert_allclose(got, with_options(m, share_prefix=False).answer_nll(imgs, qs, ans), rtol=0, atol=1e-5)
