"""MedQM-I: the blind quality model (textual priors, implicit queries, gated mixture of experts).

Build by name with `create_model` (``list_models()`` shows the registered names, the full model and its
ablations), load a trained checkpoint folder with `MedQMI.from_pretrained`, and score with `Scorer` or
`medqm.score`.
"""

from ._registry import create_model, is_model, list_models, model_default_cfg, register_model
from .medqm_i import (
    ABLATIONS,
    TARGETS,
    GatedMoE,
    ImplicitQueries,
    MedQMI,
    MedQMIConfig,
    Router,
    TextualPriors,
    default_cfgs,
    target_log_loss,
    task_column,
    variant_kind,
)
from .priors import PromptBank, embed_sentences, list_prompt_banks, load_prompt_bank
from .scoring import (
    CheckpointInfo,
    QualityScore,
    Scorer,
    checkpoint_info,
    default_checkpoint,
    heatmap_to_image,
    load_model,
    preprocess,
    score,
    write_scores,
)

__all__ = [
    "create_model",
    "list_models",
    "is_model",
    "model_default_cfg",
    "register_model",
    "MedQMI",
    "MedQMIConfig",
    "TextualPriors",
    "ImplicitQueries",
    "GatedMoE",
    "Router",
    "ABLATIONS",
    "variant_kind",
    "task_column",
    "TARGETS",
    "target_log_loss",
    "default_cfgs",
    "PromptBank",
    "load_prompt_bank",
    "list_prompt_banks",
    "embed_sentences",
    "Scorer",
    "QualityScore",
    "score",
    "preprocess",
    "heatmap_to_image",
    "load_model",
    "default_checkpoint",
    "checkpoint_info",
    "CheckpointInfo",
    "write_scores",
]
