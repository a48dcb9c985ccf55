"""Tiny, randomly initialised vision-language models for tests and benchmarks (no downloads).

`build_tiny_vlm(family, out_dir)` builds a complete Hugging Face checkpoint folder — model weights, config,
tokenizer, image processor and chat template — that `medqm.label.hf.load_model(out_dir)` (and
`AutoProcessor` / `AutoModelForImageTextToText`) load exactly as they would a real model:

- ``"llava"``: LLaVA-1.5 layout (CLIP vision tower, Llama decoder), the llava-hf chat template
  (``USER: <image>\\n... ASSISTANT:``), a BOS added by the tokenizer and no end-of-turn token in the template;
- ``"qwen2_vl"``: Qwen2-VL (windowless ViT with 2×2 patch merging, M-RoPE decoder), the ChatML template with
  its default system turn, ``<|im_end|>`` closing each turn, no BOS;
- ``"smolvlm"``: SmolVLM (SigLIP-style tower, pixel shuffle, Llama decoder), image splitting into tiles plus
  a global view, ``<end_of_utterance>`` closing each turn.

The tokenizer is a byte-level BPE trained in memory on a small built-in corpus (medical words, digits); its
real vocabulary is small (~600 entries), while ``vocab_size`` sets the rows of the model's embedding and LM
head (ids past the tokenizer's vocabulary simply never occur in inputs, but they do take part in every
softmax — which is what a 150k-vocabulary memory benchmark needs). A build takes < 0.1 s once transformers
is imported (the first import ≈ 2.5 s) and < 1 MB on disk (≈ 75 MB with a 150k vocabulary).
"""

from __future__ import annotations

from pathlib import Path

from medqm.label.bpe import train_bpe_tokenizer
from medqm.label.chat_templates import CHAT_TEMPLATES

__all__ = ["TINY_FAMILIES", "build_tiny_vlm", "QWEN2_VL_2B_DIMS", "build_qwen2_vl"]

TINY_FAMILIES = ("llava", "qwen2_vl", "smolvlm")

_CORPUS_WORDS = ["yes", "no", "none", "normal", "abnormal", "left", "right", "upper", "lower", "middle", "anterior",
                 "posterior", "axial", "coronal", "sagittal", "image", "scan", "slice", "view", "chest", "abdomen",
                 "brain", "head", "neck", "spine", "pelvis", "knee", "hand", "lung", "liver", "kidney", "heart",
                 "lesion", "mass", "nodule", "fracture", "effusion", "pneumonia", "tumor", "cyst", "hemorrhage",
                 "edema", "opacity", "calcification", "ct", "mri", "mr", "x-ray", "xray", "ultrasound", "pet",
                 "dermoscopy", "histology", "fundus", "mammography", "modality", "plane", "organ", "what", "which",
                 "where", "is", "there", "are", "the", "a", "an", "of", "in", "this", "shown", "does", "show",
                 "visible", "present", "absent", "quadrant", "body", "part", "contrast", "enhanced", "t1", "t2",
                 "flair", "dwi", "weighted", "sequence", "window", "bone", "soft", "tissue", "quality", "noise", "blur",
                 "motion", "artifact", "ghosting", "aliasing", "streak", "ring", "bias", "field", "compression",
                 "resolution"]

# SmolVLM's processor writes these between image tiles (real checkpoints have them as added tokens)
_SMOLVLM_TILE_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

_SPECIAL_TOKENS = {
    "llava": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "qwen2_vl": [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|image_pad|>", "<|video_pad|>",
    ],
    "smolvlm": [
        "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
        "<global-img>", "<video>", *_SMOLVLM_TILE_TOKENS,
    ],
}


def _corpus() -> list[str]:
    # words both at line starts and after spaces, so that BPE learns "yes" and " yes" alike
    words = list(_CORPUS_WORDS)
    lines = []
    for shift in range(0, len(words), 7):
        rolled = words[shift:] + words[:shift]
        lines += [" ".join(rolled[i:i + 9]) for i in range(0, len(rolled), 9)]
    lines += [w.capitalize() + "?" for w in words] + [w.upper() for w in words]
    lines += [" ".join(str(d) for d in range(k, k + 10)) for k in range(0, 100, 10)]
    lines += ["USER: ASSISTANT: User: Assistant: system user assistant You are a helpful assistant."] * 5
    return lines


def _train_tokenizer(family: str, real_vocab: int):
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe_tokenizer(_corpus(), real_vocab, _SPECIAL_TOKENS[family])
    template = CHAT_TEMPLATES[family]
    if family == "llava":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            add_bos_token=True, chat_template=template, extra_special_tokens={"image_token": "<image>"},
        )
    if family == "qwen2_vl":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            chat_template=template,
            extra_special_tokens={
                "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
            },
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        chat_template=template,
        extra_special_tokens={
            "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
            "video_token": "<video>",
        },
    )


def _text_kwargs(tok, vocab_size: int, hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def _build_llava(tok, vocab_size: int, hidden: int, layers: int):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_size, patch = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=patch, projection_dim=32,
    )
    text = LlamaConfig(**_text_kwargs(tok, vocab_size, hidden, layers))
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-2, pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276],
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATES["llava"],
    )
    return model, processor


def _build_qwen2_vl(tok, vocab_size: int, hidden: int, layers: int):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    patch, merge = 14, 2
    unit = patch * merge
    vision = dict(
        depth=2, embed_dim=32, hidden_size=hidden, mlp_ratio=2, num_heads=4, patch_size=patch,
        spatial_merge_size=merge, temporal_patch_size=2,
    )
    text = _text_kwargs(tok, vocab_size, hidden, layers)
    # M-RoPE splits the rotary half-dimension (head_dim/2 = hidden/8) into temporal/height/width sections
    half = hidden // 4 // 2
    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
    }
    config = Qwen2VLConfig(
        vision_config=vision, text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config)
    # 4×4 merged tokens at most (an image of ≤ 112×112 px after smart resizing)
    pixels = {"shortest_edge": (2 * unit) ** 2, "longest_edge": (4 * unit) ** 2}
    image_processor = Qwen2VLImageProcessor(size=pixels, patch_size=patch, merge_size=merge, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=pixels, patch_size=patch, merge_size=merge, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        chat_template=CHAT_TEMPLATES["qwen2_vl"],
    )
    return model, processor


def _build_smolvlm(tok, vocab_size: int, hidden: int, layers: int):
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
        SmolVLMVisionConfig,
    )

    tile, patch, scale = 32, 8, 2
    vision = SmolVLMVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=tile,
        patch_size=patch,
    )
    text = LlamaConfig(**_text_kwargs(tok, vocab_size, hidden, layers))
    config = SmolVLMConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale, pad_token_id=tok.pad_token_id,
    )
    model = SmolVLMForConditionalGeneration(config)
    # images are resized to ≤ 64 px and split into ≤ 2×2 tiles of 32 px plus a 32-px global view
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True,
    )
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": tile}, max_image_size={"longest_edge": tile})
    processor = SmolVLMProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        image_seq_len=(tile // patch) ** 2 // scale**2, chat_template=CHAT_TEMPLATES["smolvlm"],
    )
    return model, processor


_BUILDERS = {"llava": _build_llava, "qwen2_vl": _build_qwen2_vl, "smolvlm": _build_smolvlm}


def build_tiny_vlm(
    family: str,
    out_dir: str | Path,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    tokenizer_vocab: int = 600,
) -> Path:
    """Build a tiny random image-text-to-text model with its processor and save both to ``out_dir``.

    Args:
        family: ``"llava"``, ``"qwen2_vl"`` or ``"smolvlm"``.
        out_dir: folder to write (created; existing files with the same names are overwritten).
        vocab_size: rows of the embedding and LM head; ``None`` uses the tokenizer's vocabulary size. A larger
            value (e.g. 150_000) gives a model with a realistic softmax width and a tiny real vocabulary.
        seed: seeds torch's global RNG for the weight initialisation (restored afterwards).
        hidden_size: decoder width (a multiple of 8: 4 attention heads, even rotary sections).
        num_layers: decoder layers.
        tokenizer_vocab: target size of the trained BPE vocabulary (special tokens included).

    Returns:
        The folder, ready for ``medqm.label.hf.load_model``.
    """
    import torch

    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    if hidden_size % 8 or hidden_size < 16:
        raise ValueError(f"hidden_size must be a multiple of 8 and ≥ 16, got {hidden_size}")
    tok = _train_tokenizer(family, tokenizer_vocab)
    n_tok = len(tok)
    if vocab_size is None:
        vocab_size = n_tok
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size must be ≥ the tokenizer's {n_tok} entries, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model, processor = _BUILDERS[family](tok, vocab_size, hidden_size, num_layers)
    finally:
        torch.random.set_rng_state(state)
    from medqm.label.hf import save_quietly

    return save_quietly(model, processor, out)


# Qwen2-VL-2B-Instruct's dimensions (its config.json): a 675 M-parameter ViT with 2×2 patch merging and a 1.5 B
# decoder with grouped-query attention and a 151,936-row vocabulary; 2.2 B parameters in all.
QWEN2_VL_2B_DIMS = {
    "vision_depth": 32, "vision_embed_dim": 1280, "vision_heads": 16, "vision_mlp_ratio": 4,
    "hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2,
    "vocab_size": 151_936, "rope_theta": 1_000_000.0,
}


def build_qwen2_vl(dims: dict | None = None, *, device: str = "cpu", dtype: str = "bfloat16", seed: int = 0,
                   max_pixels: int = 28 * 28 * 1280):
    """A randomly initialised Qwen2-VL of any size, built in memory on ``device`` → (model, processor).

    For speed and memory benchmarks of models too large to build on a CPU and save (`build_tiny_vlm` writes a
    folder): the weights are created directly on ``device`` in ``dtype``. ``dims`` overrides keys of
    `QWEN2_VL_2B_DIMS` (default: the 2B model's shape). The processor is the real Qwen2-VL one (patch 14,
    merge 2, ``max_pixels`` as Qwen's default) with the tiny byte-level BPE tokenizer and the ChatML template;
    wrap both in ``medqm.label.hf.HFDiagnosticModel`` to score answers.
    """
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    d = {**QWEN2_VL_2B_DIMS, **(dims or {})}
    unknown = set(d) - set(QWEN2_VL_2B_DIMS)
    if unknown:
        raise ValueError(f"unknown dimension(s) {sorted(unknown)}; expected keys of QWEN2_VL_2B_DIMS")
    if d["hidden_size"] % d["num_heads"] or (d["hidden_size"] // d["num_heads"]) % 16:
        raise ValueError("hidden_size / num_heads must be a multiple of 16 (M-RoPE sections)")
    tok = _train_tokenizer("qwen2_vl", 600)
    patch, merge = 14, 2
    vision = dict(depth=d["vision_depth"], embed_dim=d["vision_embed_dim"], hidden_size=d["hidden_size"],
                  mlp_ratio=d["vision_mlp_ratio"], num_heads=d["vision_heads"], patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2)
    text = _text_kwargs(tok, d["vocab_size"], d["hidden_size"], d["num_layers"])
    text.update(intermediate_size=d["intermediate_size"], num_attention_heads=d["num_heads"],
                num_key_value_heads=d["num_kv_heads"], max_position_embeddings=32768)
    half = d["hidden_size"] // d["num_heads"] // 2  # the rotary half-dimension, split temporal / height / width
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": d["rope_theta"],
                               "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]}
    config = Qwen2VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=True,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    state = torch.random.get_rng_state()
    default = torch.get_default_dtype()
    try:
        torch.manual_seed(seed)
        torch.set_default_dtype(getattr(torch, dtype))
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
        torch.random.set_rng_state(state)
    pixels = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=pixels, patch_size=patch, merge_size=merge, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=pixels, patch_size=patch, merge_size=merge, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 chat_template=CHAT_TEMPLATES["qwen2_vl"])
    return model.eval(), processor
