"""The stand-in diagnostic VLM that ships with MedQM (``src/medqm/label/models/medqm-vlm-demo``).

It must be an ordinary Hugging Face folder that the generic hf backend loads like any real MLLM, and it must
reproduce the numbers of its model card: ``eval_subset.json`` (written by ``scripts/train_diagnostic_vlm.py``)
lists held-out items — demo images and images of a small prefix of the synthetic lesion set, regenerated here
with the same deterministic `make_lesion_set` call — with every choice's NLL as measured at training time.

`test_heldout_target` does not read the card: it builds held-out items itself (the case split and the lesion-set
prefix below), scores them with the shipped weights and compares the accuracies with the targets stated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medqm.io import read_image
from medqm.io.collection import default_collection, load_manifest
from medqm.label.standin import (
    DEMO_VLM_DIR,
    case_split,
    closed_set_scores,
    file_sha256,
    folder_size,
)
from medqm.label.tasks import VQAItem, demo_questions
from medqm.synth import make_lesion_set

MODEL = DEMO_VLM_DIR
TARGETS = {"modality": 0.97, "lesion_present": 0.85, "lesion_quadrant": 0.7, "body_part": 0.90}  # issue 17
# the lesion questions are judged on balanced accuracy too (several lesion-positive hybrids per negative copy)
BALANCED = ("lesion_present", "lesion_quadrant")
# targets the shipped model is known to miss, and why (strict xfail: meeting one later forces an update here)
MISSED = {
    "lesion_present": "frozen ImageNet EfficientNet-Lite0 tower read in 32-px cells cannot see 8-20 px lesions of "
                      "CNR 1.8-5 (held-out balanced accuracy ~0.6 at training time; MODEL_CARD.md, Limitations)",
    "lesion_quadrant": "same cause as lesion_present: the quadrant of a lesion the tower does not see is a guess",
    "modality": "held-out MR slices of data/demo and its lesion set are read as MRI 0.92 of the time (Br35H and CT "
                "1.00; MODEL_CARD.md, Limitations): few MR patients besides Br35H's brains",
}
# the training run's case split and the prefix of its synthetic lesion set that is cheap to regenerate
SPLIT = {"fraction": 0.3, "seed": 0}
LESION_PREFIX = {"per_modality": {"CT": 12, "MR": 28}, "variants": 8, "seed": 0}
HELDOUT_PER_TYPE = 30  # held-out items per answer type, drawn with a fixed seed


@pytest.fixture(scope="module")
def subset_doc():
    return json.loads((MODEL / "eval_subset.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dm():
    from medqm.label.hf import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def lesion_prefix(tmp_path_factory) -> Path:
    les_root = tmp_path_factory.mktemp("lesion-prefix")
    make_lesion_set(default_collection(), les_root, **LESION_PREFIX)
    return les_root


@pytest.fixture(scope="module")
def subset(subset_doc, lesion_prefix):
    """(items, pixels) of the subset, with the lesion-set prefix regenerated in a temporary folder."""
    assert subset_doc["lesion_set"] == LESION_PREFIX, "the card was measured on another lesion-set prefix"
    les_root = lesion_prefix
    roots = {"demo": Path(default_collection()), "lesions": les_root}
    items, pixels, changed = [], {}, []
    for rec in subset_doc["items"]:
        path = roots[rec["source"]] / rec["image"]
        assert path.is_file(), f"{rec['source']} image {rec['image']} was not (re)generated"
        if file_sha256(path) != rec["sha256"]:
            changed.append(rec["image"])
        items.append(VQAItem(str(path), rec["question"], rec["answer"], rec["case_id"], rec["answer_type"],
                             rec["image_id"], rec["modality"], rec["choices"]))
        pixels.setdefault(str(path), read_image(path).pixels)
    assert not changed, f"images differ from those the model card was measured on: {changed[:5]}"
    return items, pixels


def test_folder_is_a_plain_hf_checkpoint():
    assert (MODEL / "config.json").is_file(), f"the shipped model is missing: {MODEL}"
    names = {p.name for p in MODEL.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md",
                     "eval_subset.json"):
        assert required in names
    assert not [p for p in MODEL.rglob("*.py")], "no custom code in the model folder"
    for p in MODEL.glob("*.json"):
        assert "auto_map" not in p.read_text(encoding="utf-8"), f"{p.name} asks for remote code"
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "fast_vlm"  # the LLaVA layout with a timm (EfficientNet) vision tower
    assert folder_size(MODEL) <= 25 * 2**20


def test_loads_with_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(MODEL), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(MODEL), local_files_only=True)
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.chat_template


def test_load_model_upcasts_and_is_deterministic(dm, subset):
    import torch

    assert {p.dtype for p in dm.model.parameters()} == {torch.float32}  # stored as float16, loaded as float32
    items, pixels = subset
    few = items[:6]
    args = ([pixels[it.image] for it in few], [it.question for it in few], [it.answer for it in few])
    first, second = dm.answer_nll(*args), dm.answer_nll(*args)
    assert np.array_equal(first, second)
    assert np.all(np.isfinite(first)) and np.all(first > 0)


def test_reproduces_the_cards_subset(dm, subset, subset_doc):
    items, pixels = subset
    scores = closed_set_scores(dm, items, pixels)
    tol = subset_doc["tolerance"]
    worst = 0.0
    # relative to max(1, |NLL|): the card's NLLs come from batched vision features (the training script's path,
    # checked against answer_nll to 1e-6 on a probe), the test's from answer_nll's own batches; the convolutions
    # round differently per batch shape, which a wrong answer's NLL of ~15 nats amplifies to ~2e-3
    for it, rec, s in zip(items, subset_doc["items"], scores, strict=True):
        for choice, expected in rec["nll"].items():
            worst = max(worst, abs(s["nll"][choice] - expected) / max(1.0, abs(expected)))
        assert s["prediction"] == rec["prediction"], (it.image_id, it.question)
    assert worst <= tol, f"NLLs differ from eval_subset.json by up to {worst:.2e} relative (> {tol})"
    for answer_type in TARGETS:
        got = [s["correct"] for it, s in zip(items, scores, strict=True) if it.answer_type == answer_type]
        assert got, f"no {answer_type} items in the subset"
        assert float(np.mean(got)) == pytest.approx(subset_doc["accuracy"][answer_type])


def test_card_reports_the_heldout_accuracy_and_reaction(subset_doc):
    card = (MODEL / "MODEL_CARD.md").read_text(encoding="utf-8")
    held = subset_doc["heldout_accuracy"]
    for answer_type in TARGETS:
        row = held[answer_type]
        assert f"| {answer_type} | {row['accuracy']:.3f} | {row['balanced_accuracy']:.3f} |" in card
        if answer_type in subset_doc["missed"]:
            assert "Targets missed" in card and answer_type in card.split("Targets missed", 1)[1].splitlines()[0]
    assert subset_doc["reaction_fraction"] >= 0.8
    assert f"({subset_doc['reaction_fraction']:.0%}) react" in card


@pytest.fixture(scope="module")
def heldout_scores(dm, lesion_prefix):
    """Closed-set scores of a seeded sample of held-out items (cases the training split held out: demo images and
    the lesion-prefix hybrids of their backgrounds), by answer type, through the shipped weights."""
    demo = default_collection()
    split = case_split(load_manifest(demo), **SPLIT)
    items = [it for it in demo_questions([demo, lesion_prefix]) if split[it.case_id] == "val"]
    rng = np.random.default_rng(0)
    out = {}
    for answer_type in TARGETS:
        pool = sorted((it for it in items if it.answer_type == answer_type), key=lambda it: (it.image, it.question))
        assert pool, f"no held-out {answer_type} items"
        pick = [pool[i] for i in sorted(rng.choice(len(pool), size=min(HELDOUT_PER_TYPE, len(pool)), replace=False))]
        pixels = {it.image: read_image(it.image).pixels for it in pick}
        out[answer_type] = (pick, closed_set_scores(dm, pick, pixels))
    return out


@pytest.mark.slow  # scores ~120 held-out items × every choice through the full model (minutes on 2 cores)
@pytest.mark.parametrize("answer_type", [
    pytest.param(t, marks=pytest.mark.xfail(strict=True, reason=MISSED[t])) if t in MISSED else t for t in TARGETS])
def test_heldout_target(heldout_scores, answer_type):
    """The issue's targets, on accuracy (and on balanced accuracy, the mean recall over the answers, for the
    lesion questions), measured here on held-out items with the shipped weights."""
    items, scores = heldout_scores[answer_type]
    correct = np.array([s["correct"] for s in scores])
    got = float(correct.mean())
    if answer_type in BALANCED:
        answers = np.array([it.answer for it in items])
        got = min(got, float(np.mean([correct[answers == a].mean() for a in np.unique(answers)])))
    assert got >= TARGETS[answer_type], f"{answer_type}: {got:.3f} on {len(items)} held-out items"


def test_cli_uses_it_by_default():
    from medqm.cli import default_model

    assert default_model().resolve() == MODEL.resolve()


BR35H = Path(__file__).resolve().parents[2] / "data" / "br35h"
TUMOUR_SAMPLE = 60  # held-out Br35H images, seeded


@pytest.mark.skipif(not (BR35H / "manifest.csv").is_file(), reason="data/br35h is not built (make data)")
def test_tumour_question_on_heldout_br35h_clusters(dm):
    """The issue's tumour targets (balanced accuracy ≥ 0.95, AUC ≥ 0.98), recomputed here from the shipped
    weights on a seeded sample of the clusters its training split held out; also the occlusion check's head
    variant (the answer must fall to chance without the inside of the head)."""
    from medqm.label.standin.evaluation import occlude, roc_auc

    br = load_manifest(BR35H)
    split = case_split(br, **SPLIT)
    items = [it for it in demo_questions([default_collection(), BR35H])
             if it.answer_type == "tumour" and split.get(it.case_id) == "val"]
    rng = np.random.default_rng(0)
    pick = [items[i] for i in sorted(rng.choice(len(items), size=TUMOUR_SAMPLE, replace=False))]
    y = np.array([it.answer == "yes" for it in pick])
    assert 0.3 < y.mean() < 0.7
    pixels = {it.image: read_image(it.image).pixels for it in pick}

    def p_yes(images):
        scores = closed_set_scores(dm, pick, images)
        return np.array([1.0 / (1.0 + np.exp(s["nll"]["yes"] - s["nll"]["no"])) for s in scores]), scores

    p, scores = p_yes(pixels)
    hit = np.array([s["correct"] for s in scores])
    balanced = float(np.mean([hit[y].mean(), hit[~y].mean()]))
    assert balanced >= 0.95 and roc_auc(y, p) >= 0.98, (balanced, roc_auc(y, p))
    blank, _ = p_yes({k: occlude(v, "head_blanked") for k, v in pixels.items()})
    assert roc_auc(y, blank) <= 0.60


def test_all_choices_through_a_shared_prefix_equal_per_sample_scoring(dm):
    """`--loss kl` scoring on the stand-in: every choice of every demo question of three images (grey and RGB)
    plus one question of a fourth image (a group of one), shuffled, scored with one vision pass per image, equals
    each sample scored alone to 1e-4."""
    from medqm.label.hf import HFDiagnosticModel
    from medqm.label.runner import LabelDefinition

    demo = default_collection()
    chosen = ["ct-head-j2k", "path-cmu1-t01", "xr-chest", "us-echo"]
    items = [it for it in demo_questions(demo) if it.image_id in chosen]
    definition = LabelDefinition(loss="kl")
    samples = [(it.image, it.question, a) for it in items if it.image_id != chosen[3]
               for a in definition.answers(it)[0]]
    samples.append(next((it.image, it.question, it.answer) for it in items if it.image_id == chosen[3]))
    samples = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    pixels = {p: read_image(p).pixels for p in dict.fromkeys(s[0] for s in samples)}
    assert {x.ndim for x in pixels.values()} == {2, 3}
    imgs, qs, ans = [pixels[s[0]] for s in samples], [s[1] for s in samples], [s[2] for s in samples]
    one_pass = HFDiagnosticModel(dm.model, dm.processor, model_id=dm.model_id, revision=dm.revision, batch_size=1)
    calls = []
    hook = dm.model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = one_pass.answer_nll(imgs, qs, ans)
    finally:
        hook.remove()
    assert len(calls) == 4  # one per distinct image: the grouped path ran
    alone = np.array([dm.answer_nll([i], [q], [a])[0] for i, q, a in zip(imgs, qs, ans, strict=True)])
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-4)
    np.testing.assert_allclose(dm.answer_nll(imgs, qs, ans), alone, rtol=0, atol=1e-4)  # batches of 8
