"""The stand-in diagnostic VLM that ships with MedQM (``src/medqm/label/models/medqm-vlm-demo``).

It must be an ordinary Hugging Face folder that the generic hf backend loads like any real MLLM, and it must
reproduce the numbers of its model card: ``eval_subset.json`` (written by ``scripts/train_diagnostic_vlm.py``)
lists held-out items — demo images and images of a small prefix of the synthetic lesion set, regenerated here
with the same deterministic `make_lesion_set` call — with every choice's NLL as measured at training time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", minversion="5.0")

from medqm.io import read_image  # noqa: E402
from medqm.io.collection import default_collection  # noqa: E402
from medqm.label.demo_vlm import DEMO_VLM_DIR, closed_set_scores, file_sha256, folder_size  # noqa: E402
from medqm.label.tasks import VQAItem  # noqa: E402

MODEL = DEMO_VLM_DIR
if not (MODEL / "config.json").is_file():
    pytest.skip("the stand-in VLM is not trained and shipped yet (issue 5 is open)", allow_module_level=True)
TARGETS = {"modality": 0.95, "lesion_present": 0.85, "lesion_quadrant": 0.7, "body_part": 0.8}  # the targets


@pytest.fixture(scope="module")
def subset_doc():
    return json.loads((MODEL / "eval_subset.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dm():
    from medqm.label.hf import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def subset(subset_doc, tmp_path_factory):
    """(items, pixels) of the subset, with the lesion-set prefix regenerated in a temporary folder."""
    from medqm.label.lesions import make_lesion_set

    spec = subset_doc["lesion_set"]
    les_root = tmp_path_factory.mktemp("lesion-prefix")
    make_lesion_set(default_collection(), les_root, per_modality=spec["per_modality"], variants=spec["variants"],
                    seed=spec["seed"])
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
    for it, rec, s in zip(items, subset_doc["items"], scores):
        for choice, expected in rec["nll"].items():
            worst = max(worst, abs(s["nll"][choice] - expected) / max(1.0, abs(expected)))
        assert s["prediction"] == rec["prediction"], (it.image_id, it.question)
    assert worst <= tol, f"NLLs differ from eval_subset.json by up to {worst:.2e} relative (> {tol})"
    for answer_type in TARGETS:
        got = [s["correct"] for it, s in zip(items, scores) if it.answer_type == answer_type]
        assert got, f"no {answer_type} items in the subset"
        assert float(np.mean(got)) == pytest.approx(subset_doc["accuracy"][answer_type])


def _missed() -> set[str]:
    doc = json.loads((MODEL / "eval_subset.json").read_text(encoding="utf-8"))
    return set(doc.get("missed", []))


def test_card_reports_the_heldout_accuracy_and_reaction(subset_doc):
    card = (MODEL / "MODEL_CARD.md").read_text(encoding="utf-8")
    held = subset_doc["heldout_accuracy"]
    for answer_type in TARGETS:
        row = held[answer_type]
        assert f"| {answer_type} | {row['accuracy']:.3f} | {row['balanced_accuracy']:.3f} |" in card
        if answer_type in _missed():
            assert "Targets missed" in card and answer_type in card.split("Targets missed", 1)[1].splitlines()[0]
    assert subset_doc["reaction_fraction"] >= 0.8
    assert f"({subset_doc['reaction_fraction']:.0%}) react" in card


@pytest.mark.parametrize("answer_type", [
    pytest.param(t, marks=pytest.mark.xfail(t in _missed(), strict=True,
                                            reason="the model card reports this target as missed (see Limitations)"))
    for t in TARGETS])
def test_heldout_target(subset_doc, answer_type):
    """The issue's targets, on accuracy (and on balanced accuracy for the lesion questions). A target the
    card declares missed is an expected failure; strict, so meeting it later forces the card and this test to
    be updated."""
    row = subset_doc["heldout_accuracy"][answer_type]
    got = row["accuracy"]
    if answer_type in subset_doc["balanced_targets"]:
        got = min(got, row["balanced_accuracy"])
    assert got >= TARGETS[answer_type]


def test_cli_uses_it_by_default():
    from medqm.cli import _default_model

    assert _default_model().resolve() == MODEL.resolve()
