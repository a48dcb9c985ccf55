"""Train MedQM-I on a MedQM-D label table: case-level split, frozen-backbone or fine-tuning, early stopping.

The output folder is a checkpoint (``MedQMI.from_pretrained(out)`` / ``medqm score --model out``) that also
holds the run's record: ``split.csv``, ``metrics.csv`` (one row per epoch), ``test_metrics.json``
(held-out SRCC/KRCC/PLCC_raw/RMSE_raw, overall and per modality and distortion type, and per task),
``test_predictions.csv`` and ``train_config.json``.

Tasks: beside the overall quality the model learns one quality per answer type of the labels (``tumour``,
``modality``…; `medqm.train.data.task_qualities`), for the answer types with at least ``task_min_images``
labelled images (or the ``tasks`` named). Their loss terms, masked where an image has no question of that type,
are added to the overall loss with weight ``task_weight``; the overall head, the best-epoch choice and early
stopping stay on the overall quality. Validation and test report each task's SRCC.

Modes:
    frozen    the backbone stays at its ImageNet weights; its features are computed once and cached on disk
              (`medqm.train.data.FeatureCache`), so epochs only run the queries and the head. CPU default.
    finetune  the whole network trains on images read on the fly (the backbone at ``backbone_lr_mult`` × lr),
              with mixed precision (bfloat16 autocast) on CUDA.

Multi-GPU (fine-tuning): launch the same command with torchrun; each process trains on its shard of the
training set through DistributedDataParallel, and rank 0 evaluates and writes the checkpoint::

    torchrun --nproc_per_node 4 -m medqm.cli train --labels runs/labels --out runs/medqm-i-ft \\
        --mode finetune --device cuda

(``accelerate launch -m medqm.cli train ...`` works the same way: both set RANK / WORLD_SIZE / LOCAL_RANK.)
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medqm.metrics import correlations, grouped_correlations

# QualityLoss weights by target (`TrainConfig.target`): the MSE weight matches the spread of what is regressed.
DEFAULT_LOSS: dict[str, dict[str, Any]] = {
    "quality": {"w_reg": 10.0, "w_rank": 1.0, "rank": "plcc", "w_balance": 0.01},
    "loss": {"w_reg": 1.0, "w_rank": 1.0, "rank": "plcc", "w_balance": 0.01},
}


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``train_config.json``.

    Args:
        labels: a `medqm label` output folder (labels.parquet).
        out: output folder (becomes the checkpoint).
        model: registered model name (``medqm_i`` or an ablation: see `medqm.model.list_models`).
        model_kwargs: configuration overrides for `create_model` (img_size, embed_dim, gating…).
        mode: ``'frozen'`` or ``'finetune'``.
        fractions: (train, val, test) shares of each modality's cases; seed: split and training seed.
        split_file: reuse a saved split (case_id, split) instead of making one.
        epochs, batch_size, lr, weight_decay, warmup_epochs: AdamW with linear warm-up then cosine decay
            to ``min_lr_ratio`` × lr, stepped per batch.
        patience: stop after this many epochs without a better validation SRCC (0: never stop early); without
            a validation part the training-set SRCC is used.
        target: what the model's head regresses (`medqm.model.MedQMIConfig.target`): ``'loss'`` (default) the
            diagnostic loss on a log scale, standardised on the training images; ``'quality'`` the quality itself
            (every model trained before targets existed). The scores are qualities either way.
        loss: QualityLoss weights (w_reg, w_rank, rank, w_balance), applied to what the head regresses; None
            (default): the target's defaults, `DEFAULT_LOSS` (MSE weight 10 for qualities, whose spread is a few
            hundredths; 1 for the standardised log loss).
        backbone_lr_mult: learning-rate factor for the backbone when fine-tuning.
        calibrate: ``'loss'`` target only: after training, fit y ≈ a + b·(head output) by least squares on the
            validation images (the best epoch's weights) and fold it into the model's ``target_loc`` /
            ``target_scale``, so that the scores are on the label scale rather than shrunk towards the mean by
            early stopping (models of different folds or seeds then agree in scale); skipped without a
            validation part of at least 20 images or when the fitted slope is not positive.
        ema_decay: keep an exponential moving average of the weights (timm's ``ModelEmaV3``, updated every step
            with this decay, reached after a warm-up in which it is the plain mean of the steps so far) and
            evaluate, keep and save the averaged weights instead of the last ones; 0: off.
            On a few thousand images one epoch's weights are noisy, and which epoch looks best on a small
            validation part is noisier still; the average over the last ~1 / (1 − decay) steps is steadier.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'``; amp: bfloat16 autocast on CUDA.
        cache_dir: frozen-feature cache (default ``~/.cache/medqm/features`` or ``$MEDQM_CACHE``).
        max_images: train on a seeded random subset of this many images (spread over the parts); for quick runs.
        num_workers: DataLoader workers for fine-tuning.
        tasks: answer types that get their own quality output; None (default): every answer type with at least
            ``task_min_images`` labelled images among the usable label rows; ``[]``: none (the overall quality
            only, as before tasks existed).
        task_min_images: see ``tasks``.
        task_weight: weight of the per-task loss terms beside the overall loss.
        task_refit_epochs: after training, the task heads alone are refitted for up to this many epochs on the best
            epoch's representation (computed once; the rest of the model, the overall quality included, stays as
            it is), keeping the head with the best mean validation task SRCC, the jointly trained one included;
            0: no refit. Early stopping as for training (``patience``).
    """

    labels: str
    out: str
    model: str = "medqm_i"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str = "frozen"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    split_file: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    patience: int = 6
    target: str = "loss"
    loss: dict[str, Any] | None = None
    backbone_lr_mult: float = 0.1
    calibrate: bool = True
    ema_decay: float = 0.99
    device: str = "cpu"
    amp: bool = True
    cache_dir: str | None = None
    max_images: int | None = None
    num_workers: int = 0
    tasks: list[str] | None = None
    task_min_images: int = 50
    task_weight: float = 0.5
    task_refit_epochs: int = 40

    def __post_init__(self):
        if self.mode not in ("frozen", "finetune"):
            raise ValueError(f"mode must be 'frozen' or 'finetune', got {self.mode!r}")
        if self.target not in DEFAULT_LOSS:
            raise ValueError(f"target must be one of {sorted(DEFAULT_LOSS)}, got {self.target!r}")
        if "target" in self.model_kwargs and self.model_kwargs["target"] != self.target:
            raise ValueError(f"model_kwargs sets target={self.model_kwargs['target']!r} but the training's target is "
                             f"{self.target!r}; set TrainConfig.target")
        self.loss = {**DEFAULT_LOSS[self.target], **(self.loss or {})}
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        self.fractions = tuple(float(f) for f in self.fractions)
        if self.tasks is not None:
            if isinstance(self.tasks, str):
                raise ValueError(f"tasks must be a list of answer types, got the string {self.tasks!r}")
            self.tasks = [str(t) for t in self.tasks]
        if self.task_min_images < 1:
            raise ValueError(f"task_min_images must be >= 1, got {self.task_min_images}")
        if not (self.task_weight >= 0 and math.isfinite(self.task_weight)):
            raise ValueError(f"task_weight must be a finite number >= 0, got {self.task_weight}")
        if self.task_refit_epochs < 0:
            raise ValueError(f"task_refit_epochs must be >= 0, got {self.task_refit_epochs}")


@dataclass
class TrainResult:
    out: Path
    best_epoch: int
    best_val: dict[str, float]
    test: dict[str, Any]
    epochs_run: int
    history: list[dict[str, Any]]


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_schedule(optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """A `torch.optim.lr_scheduler.LambdaLR`: linear warm-up over ``warmup_steps`` (step ``s`` at
    ``(s + 1) / warmup_steps`` of each group's lr), then a cosine decay to ``min_lr_ratio`` × lr at
    ``total_steps``; call ``step()`` once per batch, after ``optimizer.step()``."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, partial(_lr_factor, total=total_steps, warmup=warmup_steps, min_ratio=min_lr_ratio))


def _param_groups(model, lr: float, weight_decay: float, backbone_lr_mult: float):
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "queries" in name or "scale_embed" in name
        groups.setdefault((name.startswith("backbone."), no_decay), []).append(p)
    return [{"params": ps, "lr": lr * (backbone_lr_mult if bb else 1.0), "weight_decay": 0.0 if nd else weight_decay}
            for (bb, nd), ps in groups.items()]


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class _Log:
    def __init__(self, log: Callable[[str], None] | None, rank: int):
        self.fn, self.rank = log, rank

    def __call__(self, msg: str) -> None:
        if self.fn is not None and self.rank == 0:
            self.fn(msg)


@dataclass
class _Run:
    """What the steps of one training share: its settings, this process's place in the group, data and model."""

    cfg: TrainConfig
    out: Path
    device: Any  # torch.device
    rank: int
    world: int
    say: _Log
    rows: Any = None  # pandas.DataFrame of the training rows, with their split
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # row indices of train / val / test
    targets: np.ndarray | None = None
    tasks: list[str] = field(default_factory=list)  # answer types with their own output
    task_targets: np.ndarray | None = None  # (rows, tasks) per-task quality targets, NaN where absent
    quality_map: tuple[float, float] | None = None  # (center, scale) of the labels (`quality_map_of`)
    fit_targets: np.ndarray | None = None  # ``targets`` as the head regresses them (MedQMI.quality_to_raw)
    fit_task_targets: np.ndarray | None = None  # ``task_targets`` likewise
    model: Any = None
    cache: Any = None  # FeatureCache (frozen mode)
    keys: np.ndarray | None = None  # feature-cache key of every row (frozen mode)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def frozen(self) -> bool:
        return self.cfg.mode == "frozen"


class _EarlyStopping:
    """The best epoch so far by SRCC, a copy of its weights, and the epochs since it."""

    def __init__(self, patience: int):
        self.patience = patience
        self.srcc, self.epoch, self.state, self.metrics, self.stale = -math.inf, 0, None, {}, 0

    def update(self, epoch: int, metrics: dict[str, float], model) -> bool:
        """Record an epoch's evaluation; True when it is the best so far."""
        srcc = metrics["srcc"] if not math.isnan(metrics["srcc"]) else -math.inf
        improved = srcc > self.srcc or self.state is None
        if improved:
            self.srcc, self.epoch, self.metrics = srcc, epoch, metrics
            self.state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            self.stale = 0
        else:
            self.stale += 1
        return improved

    @property
    def exhausted(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = print,
          progress: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Run one training: split, (cache), epochs with early stopping, held-out test; returns the summary.

    ``log`` receives human-readable lines (epoch metrics); ``progress(stage, done, total)`` reports feature
    caching and epochs.
    """
    import torch

    device, rank, world = _init_process(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, out, device, rank, world, _Log(log, rank))
    label_meta = _load_rows(run)
    _build_model(run, label_meta)
    if run.frozen:
        _prepare_features(run, progress)
    history, best = _fit(run, progress)
    result_test: dict[str, Any] = {}
    if rank == 0:
        run.model.load_state_dict(best.state)
        run.model.to(device)
        calibration = _calibrate(run)
        refit = _refit_task_heads(run)
        if len(run.parts["test"]):
            result_test = _test(run)
        if refit:
            result_test["task_refit"] = refit
        if calibration:
            result_test["calibration"] = calibration
        _save(run, best, result_test, len(history))
    if run.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainResult(out, best.epoch, best.metrics, result_test, len(history), history)


def _init_process(cfg: TrainConfig):
    """This process's device, rank and world size; joins the process group under torchrun / accelerate."""
    import torch

    rank, world, local_rank = _dist_info()
    device = torch.device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def _load_rows(run: _Run) -> dict[str, Any]:
    """Read the labels, split them by case (rank 0 saves ``split.csv``); returns the label set's metadata."""
    from medqm.label.runner import read_labels

    from .data import quality_map_of, training_rows
    from .split import assign_split, load_split, make_split, save_split

    cfg = run.cfg
    labels = read_labels(cfg.labels)
    rows, dropped = training_rows(labels)
    run.quality_map = quality_map_of(labels)
    if dropped:
        run.say(f"note: {dropped} label rows dropped (no quality or image file missing)")
    split = load_split(cfg.split_file) if cfg.split_file else make_split(rows, fractions=cfg.fractions, seed=cfg.seed)
    rows = assign_split(rows, split)  # refuses leaking splits
    counted = rows
    if cfg.max_images and cfg.max_images < len(rows):
        rows = rows.sample(n=cfg.max_images, random_state=cfg.seed).sort_index().reset_index(drop=True)
    if run.rank == 0:
        save_split(split, run.out / "split.csv")
    parts = {s: rows.index[rows["split"] == s].to_numpy() for s in ("train", "val", "test")}
    if len(parts["train"]) == 0:
        raise ValueError("the split left no training images")
    run.say(f"{len(rows)} images from {rows.case_id.nunique()} cases: "
            + ", ".join(f"{s} {len(ix)} images / {rows.loc[ix, 'case_id'].nunique()} cases" for s, ix in parts.items()))
    run.rows, run.parts, run.targets = rows, parts, rows["quality"].to_numpy(np.float32)
    _choose_tasks(run, counted)
    return labels.attrs.get("medqm", {})


def _choose_tasks(run: _Run, counted) -> None:
    """The model's tasks (``cfg.tasks``, or the answer types with enough labelled images among ``counted``, the
    usable rows before any ``max_images`` sampling) and their target matrix."""
    from medqm.model import task_column

    from .data import select_tasks

    cfg = run.cfg
    if cfg.tasks is None:
        tasks = select_tasks(counted, min_images=cfg.task_min_images)
    else:
        present = select_tasks(counted, min_images=1)
        absent = [t for t in cfg.tasks if t not in present]
        if absent:
            raise ValueError(f"tasks {absent}: no labelled image of {cfg.labels} has a question of that answer type; "
                             f"answer types present: {', '.join(present) or 'none'}")
        tasks = list(cfg.tasks)
    run.tasks = tasks
    cols = [task_column(t) for t in tasks]
    # a writable copy: torch.from_numpy refuses (with a warning) pandas' read-only views
    run.task_targets = (np.array(run.rows[cols].to_numpy(np.float32)) if cols
                        else np.zeros((len(run.rows), 0), np.float32))
    if tasks:
        n = {t: int(np.isfinite(run.task_targets[run.parts["train"], k]).sum()) for k, t in enumerate(tasks)}
        run.say("tasks: " + ", ".join(f"{t} ({n[t]} training images)" for t in tasks))


def _build_model(run: _Run, label_meta: dict[str, Any]) -> None:
    """Create the model, record what it is trained on, freeze or unfreeze the backbone, move it to the device."""
    from medqm import __version__
    from medqm.model import create_model

    cfg = run.cfg
    kwargs = {**cfg.model_kwargs, "tasks": list(run.tasks), "target": cfg.target}
    if cfg.target == "loss":
        kwargs["quality_map"] = run.quality_map
    model = create_model(cfg.model, **kwargs)
    if cfg.target == "loss":
        _standardise_target(run, model)
    model.cfg.meta.update({"trained_on": {
        "labels": str(Path(cfg.labels).resolve()), "label_model_id": label_meta.get("model_id"),
        "label_model_revision": label_meta.get("model_revision"), "quality_map": label_meta.get("quality_map"),
        "n_images": int(len(run.rows)), "split_seed": cfg.seed, "fractions": list(cfg.fractions), "mode": cfg.mode,
        "medqm_version": __version__,
        "tasks": {t: int(np.isfinite(run.task_targets[:, k]).sum()) for k, t in enumerate(run.tasks)},
    }})
    model.set_backbone_trainable(not run.frozen)
    model.to(run.device)
    _set_fit_targets(run, model)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.say(f"model {cfg.model}: {n_params / 1e6:.2f} M parameters, "
            f"{n_train / 1e6:.2f} M trained ({cfg.mode} backbone)")
    run.model = model


def _standardise_target(run: _Run, model) -> None:
    """``'loss'`` target: ``target_loc`` / ``target_scale`` = the mean and standard deviation of the target
    y = −asinh(D / 2·eps) over the training images, so the head starts regressing a standardised value."""
    from medqm.model import target_log_loss

    y = target_log_loss(run.rows["quality"].to_numpy(np.float64)[run.parts["train"]], model.cfg)
    sd = float(np.std(y))
    model.cfg.target_loc, model.cfg.target_scale = float(np.mean(y)), (sd if sd > 1e-6 else 1.0)


def _set_fit_targets(run: _Run, model) -> None:
    """The targets as the head regresses them (`MedQMI.quality_to_raw`), from the float64 label columns: near
    Q = 0.9 a float32 quality resolves the loss only to ~1e-7 nats."""
    from medqm.model import task_column

    run.fit_targets = model.quality_to_raw(run.rows["quality"].to_numpy(np.float64))
    run.fit_task_targets = (model.quality_to_raw(run.rows[[task_column(t) for t in run.tasks]].to_numpy(np.float64))
                            if run.tasks else np.zeros((len(run.rows), 0), np.float32))


def _prepare_features(run: _Run, progress: Callable[[str, int, int], None] | None) -> None:
    """Frozen mode: cache the backbone features of every row (rank 0 computes, the others wait and read);
    unreadable images leave the parts."""
    import torch

    from .data import FeatureCache, default_cache_dir

    rows, model, device = run.rows, run.model, run.device
    cache = FeatureCache(run.cfg.cache_dir or default_cache_dir(), model)
    keys, failures = None, []
    if run.rank == 0:
        run.say(f"backbone features: {cache.dir}")
        if device.type == "cpu":
            model.backbone.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        keys, failures = cache.ensure(rows["path"].tolist(), batch_size=32, device=str(device),
                                      progress=partial(progress, "features") if progress else None)
        run.say(f"features ready in {time.perf_counter() - t0:.0f} s ({len(failures)} unreadable)")
    if run.distributed:
        torch.distributed.barrier()
        if run.rank != 0:
            keys, failures = cache.ensure(rows["path"].tolist(), device=str(device))
    if failures:
        bad = {p for p, _ in failures}
        run.say(f"dropping {len(bad)} unreadable images, e.g. {failures[0][0]}: {failures[0][1]}")
        for s in run.parts:
            run.parts[s] = np.array([i for i in run.parts[s] if rows.at[i, "path"] not in bad], dtype=np.int64)
    run.cache, run.keys = cache, np.asarray(keys)


def _forward(run: _Run, m, batch_idx: np.ndarray, x=None, heat: bool = False):
    """One forward pass of ``m`` (the model or its DDP wrapper) on the rows ``batch_idx`` (cached features in
    frozen mode, else the images ``x``); bfloat16 autocast on CUDA when ``amp``."""
    import torch

    use_amp = run.cfg.amp and run.device.type == "cuda"
    with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=use_amp):
        if run.frozen:
            feats = [f.to(run.device, non_blocking=True) for f in run.cache.load(run.keys[batch_idx])]
            return m(backbone_features=feats, return_heatmap=heat)
        return m(x.to(run.device, non_blocking=True), return_heatmap=heat)


def _batches(run: _Run, idx: np.ndarray, shuffle: bool, epoch: int = 0):
    """Yields (row indices, images or None) over the rows ``idx``; shuffled batches are sharded across ranks."""
    cfg = run.cfg
    if run.frozen:
        order = idx.copy()
        if shuffle:
            np.random.default_rng(cfg.seed + epoch).shuffle(order)
        if run.distributed and shuffle:
            order = order[run.rank::run.world]
        for i in range(0, len(order), cfg.batch_size):
            yield order[i : i + cfg.batch_size], None
        return
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from .data import ImageDataset

    ds = ImageDataset(run.rows.loc[idx, "path"].tolist(), run.targets[idx], run.model.cfg.img_size, flip=shuffle,
                      seed=cfg.seed + epoch)
    sampler = DistributedSampler(ds, shuffle=shuffle, seed=cfg.seed) if (run.distributed and shuffle) else None
    if sampler is not None:
        sampler.set_epoch(epoch)
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    dl = DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                    num_workers=cfg.num_workers, generator=g, pin_memory=run.device.type == "cuda")
    for x, _, j in dl:
        yield idx[j.numpy()], x


def _predict(run: _Run, idx: np.ndarray, model=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, expert gates and task scores (rows × tasks) of the rows ``idx`` by ``model`` (default: the bare
    trained model), in eval mode."""
    import torch

    model, n = model if model is not None else run.model, len(run.rows)
    model.eval()
    preds, gates = np.zeros(n, np.float32), np.zeros((n, model.num_experts), np.float32)
    tasks = np.zeros((n, len(run.tasks)), np.float32)
    with torch.inference_mode():
        for bi, x in _batches(run, idx, shuffle=False):
            o = _forward(run, model, bi, x)
            preds[bi] = o["score"].float().cpu().numpy()
            gates[bi] = o["gates"].float().cpu().numpy()
            if run.tasks:
                tasks[bi] = o["task_scores"].float().cpu().numpy()
    return preds[idx], gates[idx], tasks[idx]


MIN_CALIBRATION_IMAGES = 20


def _calibrate(run: _Run) -> dict[str, Any] | None:
    """Rank 0, after the best weights are back (``'loss'`` target): the least-squares line from the head's output
    to the standardised target on the validation images, folded into ``target_loc`` / ``target_scale``; the
    training targets are re-expressed on the new scale (the task-head refit uses them). None when skipped."""
    cfg, model = run.cfg, run.model
    val = np.array(run.parts["val"])
    if not cfg.calibrate or model.cfg.target != "loss" or len(val) < MIN_CALIBRATION_IMAGES:
        return None
    _, raw = _fused(run, val)
    x, t = raw[val].astype(np.float64), run.fit_targets[val].astype(np.float64)
    if float(np.std(x)) < 1e-8:
        return None
    slope, intercept = np.polyfit(x, t, 1)
    if not slope > 0:
        run.say(f"calibration skipped: the validation fit has slope {slope:.3f}")
        return None
    mc = model.cfg
    before = {"target_loc": mc.target_loc, "target_scale": mc.target_scale}
    mc.target_loc, mc.target_scale = float(mc.target_loc + mc.target_scale * intercept), float(mc.target_scale * slope)
    _set_fit_targets(run, model)
    out = {"on": "val", "n": int(len(val)), "slope": float(slope), "intercept": float(intercept), "before": before}
    run.say(f"calibrated on {len(val)} validation images: y = {intercept:+.3f} + {slope:.3f} × output "
            f"(target_loc {before['target_loc']:.3f} -> {mc.target_loc:.3f}, "
            f"target_scale {before['target_scale']:.3f} -> {mc.target_scale:.3f})")
    return out


def _fused(run: _Run, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head's input (rows × D, eval mode: no dropout) and the head's overall output (``raw``) of the rows
    ``idx``, indexed by row like ``run.rows``."""
    import torch

    model, n = run.model, len(run.rows)
    model.eval()
    fused, raw = np.zeros((n, model.cfg.embed_dim), np.float32), np.zeros(n, np.float32)
    with torch.inference_mode():
        for bi, x in _batches(run, idx, shuffle=False):
            if run.frozen:
                f = model.forward_features(backbone_features=[t.to(run.device) for t in run.cache.load(run.keys[bi])])
            else:
                f = model.forward_features(x.to(run.device))
            fused[bi] = f["fused"].float().cpu().numpy()
            raw[bi] = model.forward_head(f["fused"])["raw"].float().cpu().numpy()
    return fused, raw


def _refit_task_heads(run: _Run) -> dict[str, Any] | None:
    """Rank 0, after the best weights are back: refit the task heads alone on that epoch's representation.

    The joint training picks its best epoch by the overall SRCC, often before the task heads have learned much.
    Here the head's input and the overall quality are computed once for the training and validation rows; the
    task heads (nothing else) then train on them with the masked task loss (AdamW at ``lr``, seeded order), and
    the head with the best mean validation task SRCC is kept, the jointly trained one included. None when the
    model has no tasks or ``task_refit_epochs`` is 0.
    """
    import torch

    from .losses import QualityLoss

    cfg, model = run.cfg, run.model
    if not run.tasks or not cfg.task_refit_epochs:
        return None
    t0 = time.perf_counter()
    has_val = len(run.parts["val"]) >= 3
    # writable copies: indexing a tensor with a read-only array (pandas' index) makes torch warn
    train_idx, eval_idx = np.array(run.parts["train"]), np.array(run.parts["val"] if has_val else run.parts["train"])
    fused_np, raw_np = _fused(run, np.concatenate([train_idx, run.parts["val"]]))
    # copies: the cached arrays may be read-only, which torch.from_numpy warns about
    fused, raw = torch.tensor(fused_np, device=run.device), torch.tensor(raw_np, device=run.device)
    targets = torch.tensor(run.fit_task_targets, device=run.device)
    head = model.task_head
    criterion = QualityLoss(**{**cfg.loss, "w_task": 1.0})
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def mean_eval_srcc() -> tuple[float, dict[str, float]]:
        with torch.no_grad():
            pred = model.raw_to_quality(model.task_raw(fused[eval_idx], raw[eval_idx])).cpu().numpy()
        per = {t: m["srcc"] for t, m in task_correlations(pred, run.task_targets[eval_idx], run.tasks).items()}
        ok = [v for v in per.values() if np.isfinite(v)]
        return (float(np.mean(ok)) if ok else -math.inf), per

    best_srcc, best_per = mean_eval_srcc()
    best_state, best_epoch, stale, epoch = copy.deepcopy(head.state_dict()), 0, 0, 0
    start = best_srcc
    for epoch in range(1, cfg.task_refit_epochs + 1):
        order = train_idx.copy()
        np.random.default_rng(cfg.seed + 7919 * epoch).shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            b = torch.from_numpy(order[i : i + cfg.batch_size]).to(run.device)
            loss = criterion.task_loss(model.task_raw(fused[b], raw[b]), targets[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        srcc, per = mean_eval_srcc()
        if srcc > best_srcc:
            best_srcc, best_per, best_epoch, stale = srcc, per, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    head.load_state_dict(best_state)
    which = "val" if has_val else "train"
    run.say(f"task heads refitted: mean {which} task SRCC {start:.4f} (joint training) -> {best_srcc:.4f} "
            f"(refit epoch {best_epoch} of {epoch}), {time.perf_counter() - t0:.1f} s")
    return {"epochs_run": epoch, "best_epoch": best_epoch, "on": which,
            "mean_srcc_before": start if math.isfinite(start) else None,
            "mean_srcc_after": best_srcc if math.isfinite(best_srcc) else None, "srcc": best_per}


def task_correlations(pred: np.ndarray, target: np.ndarray, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task: `correlations` of the task outputs (rows × tasks) with the targets, on the rows with a target."""
    out = {}
    for k, t in enumerate(tasks):
        ok = np.isfinite(target[:, k])
        out[t] = correlations(pred[ok, k], target[ok, k]) if ok.sum() >= 2 else {"n": int(ok.sum()),
                                                                                   "srcc": float("nan")}
    return out


def _fit(run: _Run, progress: Callable[[str, int, int], None] | None) -> tuple[list[dict[str, Any]], _EarlyStopping]:
    """The epochs: train, evaluate on validation (rank 0), keep the best weights, stop early; ``metrics.csv``."""
    import torch

    from .losses import QualityLoss

    cfg, say = run.cfg, run.say
    train_model = _wrap_distributed(run)
    criterion = QualityLoss(**{**cfg.loss, "w_task": cfg.task_weight})
    opt = torch.optim.AdamW(_param_groups(run.model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_mult), lr=cfg.lr)
    n_train_local = len(run.parts["train"]) // run.world if run.distributed else len(run.parts["train"])
    steps_per_epoch = max(1, math.ceil(n_train_local / cfg.batch_size))
    schedule = warmup_cosine_schedule(opt, total_steps=steps_per_epoch * cfg.epochs, min_lr_ratio=cfg.min_lr_ratio,
                                      warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)))
    history: list[dict[str, Any]] = []
    best = _EarlyStopping(cfg.patience)
    has_val = len(run.parts["val"]) >= 3
    if not has_val:
        say("note: fewer than 3 validation images; the best epoch and early stopping use the training-set SRCC")
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        # warm-up power 1: the plain mean of all weights so far until that mean's decay, 1 − 1/(step + 1), reaches
        # ema_decay; so a short training is averaged over its own steps, not pulled back to its initial weights
        ema = ModelEmaV3(run.model, decay=cfg.ema_decay, use_warmup=True, warmup_gamma=1.0, warmup_power=1.0)
    lr = opt.param_groups[0]["initial_lr"]
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        row = _train_epoch(run, train_model, opt, schedule, criterion, epoch, lr, ema, steps_per_epoch)
        lr = row["lr"]
        evaluated = run.model if ema is None else ema.module
        improved = _evaluate_epoch(run, row, best, has_val, evaluated) if run.rank == 0 else False
        row["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        if run.rank == 0:
            _write_csv(run.out / "metrics.csv", history)
            say(_fmt_epoch(row, improved))
            if progress:
                progress("epochs", epoch, cfg.epochs)
        if _should_stop(run, best):
            say(f"early stop: validation SRCC has not improved for {cfg.patience} epochs "
                f"(best {best.srcc:.4f} at epoch {best.epoch})")
            break
    return history, best


def _wrap_distributed(run: _Run):
    """The model to train: the model itself, or its DistributedDataParallel wrapper in a process group."""
    if not run.distributed:
        return run.model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
               find_unused_parameters=run.model.cfg.gating == "noisy_topk")


def _train_epoch(run: _Run, train_model, opt, schedule, criterion, epoch: int, lr: float,
                 ema=None, steps_per_epoch: int = 0) -> dict[str, Any]:
    """One pass over this rank's training batches (updating the weight average ``ema`` after every step); the
    epoch's row with the last step's lr (``lr`` when the epoch had no batch) and the mean loss terms."""
    import torch

    run.model.train()
    sums: dict[str, float] = {}
    nb = 0
    for bi, x in _batches(run, run.parts["train"], shuffle=True, epoch=epoch):
        lr = opt.param_groups[0]["lr"]
        o = _forward(run, train_model, bi, x)
        task_target = torch.from_numpy(run.fit_task_targets[bi]).to(run.device) if run.tasks else None
        loss, terms = criterion(o, torch.from_numpy(run.fit_targets[bi]).to(run.device), task_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if ema is not None:
            ema.update(run.model, step=(epoch - 1) * steps_per_epoch + nb + 1)
        nb += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
    row: dict[str, Any] = {"epoch": epoch, "lr": lr}
    row.update({f"train_{k}": v / max(nb, 1) for k, v in sums.items()})
    return row


def _evaluate_epoch(run: _Run, row: dict[str, Any], best: _EarlyStopping, has_val: bool, model) -> bool:
    """Rank 0: the validation metrics of ``model`` (the trained model or its weight average; training-set
    metrics without a validation part) into ``row``; True when the epoch is the best so far."""
    eval_idx = run.parts["val"] if has_val else run.parts["train"]
    pv, gv, tv = _predict(run, eval_idx, model)
    m = correlations(pv, run.targets[eval_idx])
    prefix = "val" if has_val else "train_eval"
    row.update({f"{prefix}_{k}": v for k, v in m.items() if k != "n"})
    for t, tm in task_correlations(tv, run.task_targets[eval_idx], run.tasks).items():
        row[f"{prefix}_srcc_{t}"] = tm["srcc"]
    row["expert_load"] = json.dumps([round(float(v), 4) for v in gv.mean(0)])
    return best.update(row["epoch"], m, model)


def _should_stop(run: _Run, best: _EarlyStopping) -> bool:
    """Rank 0 decides (patience spent); in a process group every rank gets its decision."""
    stop = best.exhausted
    if run.distributed:
        import torch

        flag = torch.tensor([1 if stop else 0], device=run.device)
        torch.distributed.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


def _test(run: _Run) -> dict[str, Any]:
    """Rank 0: score the held-out cases with the best weights; writes ``test_predictions.csv``."""
    test_idx = run.parts["test"]
    pt, gt, tt = _predict(run, test_idx)
    test_rows = run.rows.loc[test_idx].copy()
    test_rows["pred"] = pt
    for k, t in enumerate(run.tasks):
        test_rows[f"pred_{t}"] = tt[:, k]
    test_rows["expert"] = gt.argmax(1)
    test_rows.to_csv(run.out / "test_predictions.csv", index=False)
    y = run.targets[test_idx]
    result = {
        "overall": correlations(pt, y),
        "by_modality": grouped_correlations(pt, y, test_rows["modality"].astype(str)),
        "by_type": grouped_correlations(pt, y, test_rows["type"].astype(str)),
        "expert_load": [round(float(v), 4) for v in gt.mean(0)],
        "test_cases": sorted(test_rows.case_id.unique().tolist()),
    }
    if run.tasks:
        result["tasks"] = task_correlations(tt, run.task_targets[test_idx], run.tasks)
    o = result["overall"]
    run.say(f"test (held-out cases, n={o['n']}): SRCC {o['srcc']:.4f}  PLCC_raw {o['plcc_raw']:.4f}  "
            f"KRCC {o['krcc']:.4f}  RMSE_raw {o['rmse_raw']:.4f}")
    for t, tm in result.get("tasks", {}).items():
        run.say(f"  task {t} (n={tm['n']}): SRCC {tm['srcc']:.4f}")
    return result


def _save(run: _Run, best: _EarlyStopping, result_test: dict[str, Any], epochs_run: int) -> None:
    """Rank 0: the checkpoint, with ``train_config.json`` and ``test_metrics.json``."""
    cfg, model = run.cfg, run.model
    summary = {"model": cfg.model, "best_epoch": best.epoch, "val": best.metrics, "test": result_test,
               "epochs_run": epochs_run}
    model.cfg.meta["trained_on"]["best_epoch"] = best.epoch
    model.cfg.meta["trained_on"]["val_srcc"] = best.metrics.get("srcc")
    model.cfg.meta["trained_on"]["test_srcc"] = result_test.get("overall", {}).get("srcc")
    model.cpu().save_pretrained(run.out, extra_files={
        "train_config.json": json.dumps(asdict(cfg), indent=2, default=list) + "\n",
        "test_metrics.json": json.dumps(summary, indent=2) + "\n",
    })


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    from medqm._fs import write_records_csv

    cols: list[str] = []
    for r in history:
        cols += [k for k in r if k not in cols]
    write_records_csv(path, history, cols)


def _fmt_epoch(row: dict[str, Any], improved: bool) -> str:
    ev = "val" if "val_srcc" in row else "train_eval"
    s = (f"epoch {row['epoch']:3d}  lr {row['lr']:.2e}  loss {row.get('train_loss', float('nan')):.4f} "
         f"(mse {row.get('train_mse', float('nan')):.4f}, rank {row.get('train_rank', float('nan')):.4f}, "
         f"balance {row.get('train_balance', float('nan')):.3f})  "
         f"{ev} SRCC {row.get(f'{ev}_srcc', float('nan')):.4f} PLCC_raw {row.get(f'{ev}_plcc_raw', float('nan')):.4f} "
         f"RMSE_raw {row.get(f'{ev}_rmse_raw', float('nan')):.4f}  experts {row.get('expert_load', '')}  "
         f"{row['seconds']:.1f}s")
    tasks = [(k[len(f"{ev}_srcc_"):], v) for k, v in row.items() if k.startswith(f"{ev}_srcc_")]
    if tasks:
        s += "  tasks " + " ".join(f"{t} {v:.3f}" for t, v in tasks)
    return s + ("  *" if improved else "")


__all__ = ["TrainConfig", "TrainResult", "train", "warmup_cosine_schedule", "task_correlations"]
