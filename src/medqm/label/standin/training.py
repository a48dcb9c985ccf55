"""Training the stand-in: teacher forcing on the answer tokens from cached frozen-tower features, AdamW with a
linear warm-up then cosine decay (`torch.optim.lr_scheduler`), a training-only lesion probe on the image tokens."""

from __future__ import annotations

import csv
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medqm._fs import write_json

from .augment import sampling_weights
from .data import Data, lesion_masks, read_pixels
from .features import Encoder, FeatureBank, build_views, closed_set, sequence_nll
from .model import DEMO_VLM_ARCH, build_demo_vlm, save_demo_vlm, tokenizer_corpus
from .scoring import accuracy_table, spread

__all__ = ["TYPES", "TrainConfig", "lr_scheduler", "train", "with_tumour_share"]

# "tumour": Br35H's "Is there a tumour in this brain MR image?", only when trained with a Br35H collection
TYPES = ("modality", "body_part", "plane", "lesion_present", "lesion_quadrant", "tumour")


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2
    eval_every: int = 400  # steps between held-out monitoring
    # share of the samples per question type (within a type, each (answer, modality) group ∝ sqrt(its size))
    type_share: dict = field(default_factory=lambda: {
        "modality": 0.1, "body_part": 0.2, "plane": 0.1, "lesion_present": 0.3, "lesion_quadrant": 0.3})
    # the frozen vision tower's features are computed once per augmented view of every training image
    views: int = 4  # view 0 is the image itself
    shift: int = 12  # px at the model's input resolution
    hflip: bool = True
    affine_p: float = 0.5  # share of views that get a rotation/scale (the others an integer shift only)
    rotate: float = 8.0  # degrees
    scale: float = 0.08
    gain: float = 0.1  # brightness: pixels × U(1 − gain, 1 + gain)
    contrast: float = 0.1  # contrast about the image mean × U(1 − contrast, 1 + contrast)
    # auxiliary training-only loss: a linear probe on the projector's image tokens predicts which tokens' patches
    # hold lesion pixels (BCE, positives weighted); it is discarded after training
    aux_weight: float = 0.5
    aux_pos_weight: float = 5.0
    aux_min_fraction: float = 0.02  # a patch is positive when this share of its pixels is lesion
    # regularisers against an overconfident, brittle decoder (0 = off): label smoothing of the answer tokens'
    # targets, and image-token dropout (a token's features zeroed before the projector, training only)
    label_smoothing: float = 0.0
    token_dropout: float = 0.0
    val_fraction: float = 0.3
    split_seed: int = 0
    lesion_per_modality: dict = field(default_factory=lambda: {"CT": 99, "MR": 161, "XR": 20, "FUNDUS": 13})
    lesion_variants: int = 8
    lesion_seed: int = 0
    # smoke runs only: keep at most this many images per (source, modality); None keeps all
    max_images_per_modality: int | None = None
    arch: dict = field(default_factory=lambda: dict(DEMO_VLM_ARCH))
    # the Br35H collection (folder) trained on with its tumour question; None: the demo recipe alone. When given,
    # ``type_share`` gets a "tumour" share (`with_tumour_share`)
    br35h: str | None = None


def with_tumour_share(share: dict, tumour: float) -> dict:
    """``share`` with "tumour" at ``tumour`` and the other types scaled to fill the rest (their ratios kept)."""
    if not 0 < tumour < 1:
        raise ValueError(f"the tumour share must be in (0, 1), got {tumour}")
    rest = {k: v for k, v in share.items() if k != "tumour"}
    total = sum(rest.values())
    return {**{k: v * (1 - tumour) / total for k, v in rest.items()}, "tumour": tumour}


def lr_scheduler(opt, cfg: TrainConfig):
    """Linear warm-up over ``cfg.warmup`` steps (step s at (s + 1) / warmup of the peak lr), then a cosine decay to
    ``cfg.min_lr_ratio`` × peak at ``cfg.steps``; call ``.step()`` after every optimiser step."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = [CosineAnnealingLR(opt, T_max=max(1, cfg.steps - cfg.warmup), eta_min=cfg.lr * cfg.min_lr_ratio)]
    if cfg.warmup <= 0:
        return cosine[0]
    warm = LinearLR(opt, start_factor=1.0 / cfg.warmup, end_factor=1.0, total_iters=max(1, cfg.warmup - 1))
    return SequentialLR(opt, [warm, *cosine], milestones=[cfg.warmup])


@dataclass
class _Prepared:
    """Everything a training run needs besides the optimiser: model, inputs and cached features."""

    model: object
    processor: object
    enc: Encoder
    bank: FeatureBank
    train_items: list
    val_items: list
    feature_s: float


def _prepare(data: Data, cfg: TrainConfig, work: Path) -> _Prepared:
    """Build the untrained model, the inputs as the backend encodes them, and the frozen tower's features of
    ``cfg.views`` views of every training image and of the held-out images themselves."""
    train_items = [it for it in data.items if data.split[it.case_id] == "train"]
    val_items = [it for it in data.items if data.split[it.case_id] == "val"]
    print(f"items: {len(train_items)} train, {len(val_items)} held-out", flush=True)
    model, processor = build_demo_vlm(tokenizer_corpus(data.items), seed=cfg.seed, arch=cfg.arch)
    init_dir = work / "init"
    save_demo_vlm(model, processor, init_dir, dtype="float32")
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()
    t = time.perf_counter()
    pixels = read_pixels(sorted({it.image for it in data.items}))
    enc = Encoder(init_dir, data.items, pixels)
    masks = lesion_masks(data, enc.size)
    quadrant_answer = {it.image: it.answer for it in data.items if it.answer_type == "lesion_quadrant"}
    print(f"inputs: {len(pixels)} images at {enc.size} px, {len(enc.prompt_ids)} questions "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    bank = FeatureBank()
    train_images = sorted({it.image for it in train_items})
    val_images = sorted({it.image for it in val_items})
    build_views(model, enc, train_images, masks, quadrant_answer, cfg, cfg.views, cfg.seed, bank)
    build_views(model, enc, val_images, masks, quadrant_answer, cfg, 1, cfg.seed, bank)
    bank.freeze()
    feature_s = time.perf_counter() - t
    print(f"vision features: {len(bank.rows)} views in {feature_s:.0f} s", flush=True)
    return _Prepared(model, processor, enc, bank, train_items, val_items, feature_s)


def _optimizer(model, cfg: TrainConfig):
    """AdamW over the trained parameters and the training-only lesion probe (weight decay on matrices only);
    returns (optimiser, its named parameters, the probe)."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    torch.manual_seed(cfg.seed + 1)
    aux_head = torch.nn.Linear(int(cfg.arch["text_hidden"]), 1)  # training-only probe, discarded
    named = [*trainable, *(("aux." + n, p) for n, p in aux_head.named_parameters())]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    return opt, named, aux_head


class _Stepper:
    """One optimisation step on a sampled batch: answer NLL (optionally smoothed, with image-token dropout) plus
    the weighted lesion-probe BCE on images whose lesion status is known."""

    def __init__(self, prep: _Prepared, cfg: TrainConfig):
        import torch

        self.prep, self.cfg = prep, cfg
        self.opt, self.named, self.aux_head = _optimizer(prep.model, cfg)
        self.sched = lr_scheduler(self.opt, cfg)
        self.pos_weight = torch.tensor(cfg.aux_pos_weight)
        self.probs = sampling_weights(prep.train_items, cfg.type_share)
        self.rng = np.random.default_rng(cfg.seed)
        self.drop_gen = torch.Generator().manual_seed(cfg.seed + 2)

    def __call__(self) -> tuple[float, float | None]:
        """Returns (answer NLL, probe loss or None)."""
        import torch
        import torch.nn.functional as F

        cfg, prep, bank = self.cfg, self.prep, self.prep.bank
        idx = self.rng.choice(len(prep.train_items), size=cfg.batch_size, p=self.probs)
        view = self.rng.integers(0, cfg.views, size=cfg.batch_size)
        items = [prep.train_items[i] for i in idx]
        keys = [(it.image, int(v)) for it, v in zip(items, view, strict=True)]
        answers = [bank.quadrant[k] if it.answer_type == "lesion_quadrant" else it.answer
                   for it, k in zip(items, keys, strict=True)]
        ids, attn, scored = prep.enc.tokens([it.question for it in items], answers)
        feats = bank.get(keys)
        if cfg.token_dropout:
            keep = torch.rand(feats.shape[:2], generator=self.drop_gen) >= cfg.token_dropout
            feats = feats * keep[..., None]
        nll, tokens = sequence_nll(prep.model, feats, ids, attn, scored, return_tokens=True,
                                   smoothing=cfg.label_smoothing)
        nll = nll.mean()
        loss, aux_value = nll, None
        known = [b for b, k in enumerate(keys) if bank.targets[k] is not None]
        if known and cfg.aux_weight > 0:
            logits = self.aux_head(tokens[known]).squeeze(-1)
            target = torch.stack([bank.targets[keys[b]] for b in known])
            aux = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
            loss = loss + cfg.aux_weight * aux
            aux_value = float(aux.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(nll.detach()), aux_value


LOG_FIELDS = ["step", "samples", "lr", "train_loss", "train_aux", "val_loss", *[f"acc_{t}" for t in TYPES],
              "elapsed_s", "cpu_s"]


def _monitor(prep: _Prepared, monitor: list, *, step: int, lr: float, run: tuple[float, float, int], cfg: TrainConfig,
             t0: float, cpu0: float) -> dict:
    """Closed-set accuracy and mean answer NLL on the monitored held-out items: one row of the training log."""
    scores = closed_set(prep.model, prep.enc, prep.bank, monitor)
    acc = accuracy_table(monitor, scores)
    vl = float(np.mean([s["answer_nll"] for s in scores]))
    prep.model.train()
    prep.model.model.vision_tower.eval()
    run_loss, run_aux, run_n = run
    row = {"step": step + 1, "samples": (step + 1) * cfg.batch_size, "lr": f"{lr:.2e}",
           "train_loss": f"{run_loss / run_n:.4f}", "train_aux": f"{run_aux / run_n:.4f}", "val_loss": f"{vl:.4f}",
           **{f"acc_{t}": f"{acc[t]['accuracy']:.3f}" if t in acc else "" for t in TYPES},
           "elapsed_s": f"{time.perf_counter() - t0:.0f}", "cpu_s": f"{time.process_time() - cpu0:.0f}"}
    print(f"step {step + 1:>5}  train {row['train_loss']} aux {row['train_aux']}  val {row['val_loss']}  acc "
          + " ".join(f"{t[:8]} {row['acc_' + t]}" for t in TYPES) + f"  ({row['elapsed_s']} s)", flush=True)
    return row


def train(data: Data, cfg: TrainConfig, work: Path, out_dir: Path) -> dict:
    """Train the stand-in on ``data`` (log in ``work``/train_log.csv), save it in half precision to ``out_dir``;
    returns the training summary (config, sizes, timings, last log row)."""
    import torch

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    prep = _prepare(data, cfg, work)
    model = prep.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {n_params / 1e6:.2f} M parameters, {n_trained / 1e6:.2f} M trained", flush=True)
    stepper = _Stepper(prep, cfg)
    ordered = sorted(prep.val_items, key=lambda it: (it.case_id, it.image_id, it.question))
    monitor = spread([it for it in ordered if it.answer_type != "tumour"], 400,
                     key=lambda it: (it.answer_type, it.case_id))
    # Br35H's many clusters would crowd the tumour question out of the round-robin above: it gets its own 100
    monitor += spread([it for it in ordered if it.answer_type == "tumour"], 100, key=lambda it: it.case_id)
    model.train()
    model.model.vision_tower.eval()
    t0, cpu0 = time.perf_counter(), time.process_time()
    run_loss, run_aux, run_n, history = 0.0, 0.0, 0, []
    with open(work / "train_log.csv", "w", newline="") as log_f:
        log = csv.DictWriter(log_f, fieldnames=LOG_FIELDS)
        log.writeheader()
        for step in range(cfg.steps):
            lr = stepper.opt.param_groups[0]["lr"]
            nll, aux = stepper()
            run_loss, run_aux, run_n = run_loss + nll, run_aux + (aux or 0.0), run_n + 1
            if step == 9:
                print(f"  {(time.perf_counter() - t0) / 10:.3f} s/step", flush=True)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                row = _monitor(prep, monitor, step=step, lr=lr, run=(run_loss, run_aux, run_n), cfg=cfg, t0=t0,
                               cpu0=cpu0)
                log.writerow(row)
                log_f.flush()
                history.append(row)
                run_loss, run_aux, run_n = 0.0, 0.0, 0
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    model.eval()
    save_demo_vlm(model, prep.processor, out_dir, dtype="float16")
    summary = {
        "config": asdict(cfg), "arch": cfg.arch, "n_params": n_params, "n_trained_params": n_trained,
        "feature_seconds": prep.feature_s, "train_seconds": train_s, "train_cpu_seconds": train_cpu_s,
        "n_train_items": len(prep.train_items), "n_val_items": len(prep.val_items), "n_monitor_items": len(monitor),
        "n_views": len(prep.bank.rows), "final": history[-1], "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "threads": cfg.threads,
    }
    write_json(summary, work / "train_summary.json", indent=1)
    print(f"trained {cfg.steps} steps in {train_s / 60:.1f} min (+ {prep.feature_s / 60:.1f} min features); "
          f"saved {out_dir}", flush=True)
    return summary
