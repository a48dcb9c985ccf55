"""Train MedQM-I on a MedQM-D label table: case-level split, frozen-backbone or fine-tuning, early stopping.

The output folder is a checkpoint (``MedQMI.from_pretrained(out)`` / ``medqm score --model out``) that also
holds the run's record: ``split.csv``, ``metrics.csv`` (one row per epoch), ``test_metrics.json``
(held-out SRCC/PLCC/KRCC/RMSE, overall and per modality and distortion type), ``test_predictions.csv`` and
``train_config.json``.

Modes:
    frozen    the backbone stays at its ImageNet weights; its features are computed once and cached on disk
              (`medqm.train.data.FeatureCache`), so epochs only run the queries and the head. CPU default.
    finetune  the whole network trains on images read on the fly (the backbone at ``backbone_lr_mult`` × lr),
              with mixed precision (bfloat16 autocast) on CUDA.

Multi-GPU (fine-tuning): launch the same command with torchrun; each process trains on its shard of the
training set through DistributedDataParallel, and rank 0 evaluates and writes the checkpoint::

    torchrun --nproc_per_node 4 -m medqm.cli train --labels runs/labels --out runs/medqm-i-ft --mode finetune --device cuda

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
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import correlations, grouped_correlations


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
        loss: QualityLoss weights (w_reg, w_rank, rank, w_balance).
        backbone_lr_mult: learning-rate factor for the backbone when fine-tuning.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'``; amp: bfloat16 autocast on CUDA.
        cache_dir: frozen-feature cache (default ``~/.cache/medqm/features`` or ``$MEDQM_CACHE``).
        max_images: train on a seeded random subset of this many images (spread over the parts); for quick runs.
        num_workers: DataLoader workers for fine-tuning.
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
    loss: dict[str, Any] = field(default_factory=lambda: {"w_reg": 10.0, "w_rank": 1.0, "rank": "plcc", "w_balance": 0.01})
    backbone_lr_mult: float = 0.1
    device: str = "cpu"
    amp: bool = True
    cache_dir: str | None = None
    max_images: int | None = None
    num_workers: int = 0

    def __post_init__(self):
        if self.mode not in ("frozen", "finetune"):
            raise ValueError(f"mode must be 'frozen' or 'finetune', got {self.mode!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        self.fractions = tuple(float(f) for f in self.fractions)


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


def _param_groups(model, lr: float, weight_decay: float, backbone_lr_mult: float):
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "queries" in name or "scale_embed" in name
        groups.setdefault((name.startswith("backbone."), no_decay), []).append(p)
    return [{"params": ps, "lr": lr * (backbone_lr_mult if bb else 1.0), "base_lr": lr * (backbone_lr_mult if bb else 1.0),
             "weight_decay": 0.0 if nd else weight_decay} for (bb, nd), ps in groups.items()]


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class _Log:
    def __init__(self, log: Callable[[str], None] | None, rank: int):
        self.fn, self.rank = log, rank

    def __call__(self, msg: str) -> None:
        if self.fn is not None and self.rank == 0:
            self.fn(msg)


def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = print,
          progress: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Run one training: split, (cache), epochs with early stopping, held-out test; returns the summary.

    ``log`` receives human-readable lines (epoch metrics); ``progress(stage, done, total)`` reports feature
    caching and epochs.
    """
    import torch

    from medqm import __version__
    from medqm.label.runner import read_labels
    from medqm.model import create_model

    from .data import FeatureCache, ImageDataset, default_cache_dir, training_rows
    from .losses import QualityLoss
    from .split import assign_split, load_split, make_split, save_split

    rank, world, local_rank = _dist_info()
    say = _Log(log, rank)
    distributed = world > 1
    device = torch.device(cfg.device)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    labels = read_labels(cfg.labels)
    label_meta = labels.attrs.get("medqm", {})
    rows, dropped = training_rows(labels)
    if dropped:
        say(f"note: {dropped} label rows dropped (no quality or image file missing)")
    split = load_split(cfg.split_file) if cfg.split_file else make_split(rows, fractions=cfg.fractions, seed=cfg.seed)
    rows = assign_split(rows, split)  # refuses leaking splits
    if cfg.max_images and cfg.max_images < len(rows):
        rows = rows.sample(n=cfg.max_images, random_state=cfg.seed).sort_index().reset_index(drop=True)
    if rank == 0:
        save_split(split, out / "split.csv")
    parts = {s: rows.index[rows["split"] == s].to_numpy() for s in ("train", "val", "test")}
    if len(parts["train"]) == 0:
        raise ValueError("the split left no training images")
    say(f"{len(rows)} images from {rows.case_id.nunique()} cases: "
        + ", ".join(f"{s} {len(ix)} images / {rows.loc[ix, 'case_id'].nunique()} cases" for s, ix in parts.items()))

    model = create_model(cfg.model, **cfg.model_kwargs)
    model.cfg.meta.update({"trained_on": {
        "labels": str(Path(cfg.labels).resolve()), "label_model_id": label_meta.get("model_id"),
        "label_model_revision": label_meta.get("model_revision"), "quality_map": label_meta.get("quality_map"),
        "n_images": int(len(rows)), "split_seed": cfg.seed, "fractions": list(cfg.fractions), "mode": cfg.mode,
        "medqm_version": __version__,
    }})
    frozen = cfg.mode == "frozen"
    model.set_backbone_trainable(not frozen)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model {cfg.model}: {n_params / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trained ({cfg.mode} backbone)")

    targets = rows["quality"].to_numpy(np.float32)
    cache = keys = None
    if frozen:
        cache = FeatureCache(cfg.cache_dir or default_cache_dir(), model)
        if rank == 0:
            say(f"backbone features: {cache.dir}")
            if device.type == "cpu":
                model.backbone.to(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            keys, failures = cache.ensure(rows["path"].tolist(), batch_size=32, device=str(device),
                                          progress=(lambda d, t: progress("features", d, t)) if progress else None)
            say(f"features ready in {time.perf_counter() - t0:.0f} s ({len(failures)} unreadable)")
        if distributed:
            torch.distributed.barrier()
            if rank != 0:
                keys, failures = cache.ensure(rows["path"].tolist(), device=str(device))
        if failures:
            bad = {p for p, _ in failures}
            say(f"dropping {len(bad)} unreadable images, e.g. {failures[0][0]}: {failures[0][1]}")
            for s in parts:
                parts[s] = np.array([i for i in parts[s] if rows.at[i, "path"] not in bad], dtype=np.int64)
        keys = np.asarray(keys)

    train_model = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=model.cfg.gating == "noisy_topk")
    use_amp = cfg.amp and device.type == "cuda"

    def forward(m, batch_idx, x=None, heat=False):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            if frozen:
                feats = [f.to(device, non_blocking=True) for f in cache.load(keys[batch_idx])]
                return m(backbone_features=feats, return_heatmap=heat)
            return m(x.to(device, non_blocking=True), return_heatmap=heat)

    def loader(idx: np.ndarray, shuffle: bool, epoch: int = 0):
        """Yields (row indices, images or None)."""
        if frozen:
            order = idx.copy()
            if shuffle:
                np.random.default_rng(cfg.seed + epoch).shuffle(order)
            if distributed and shuffle:
                order = order[rank::world]
            for i in range(0, len(order), cfg.batch_size):
                yield order[i : i + cfg.batch_size], None
            return
        from torch.utils.data import DataLoader, DistributedSampler

        ds = ImageDataset(rows.loc[idx, "path"].tolist(), targets[idx], model.cfg.img_size, flip=shuffle, seed=cfg.seed + epoch)
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=cfg.seed) if (distributed and shuffle) else None
        if sampler is not None:
            sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        dl = DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                        num_workers=cfg.num_workers, generator=g, pin_memory=device.type == "cuda")
        for x, _, j in dl:
            yield idx[j.numpy()], x

    def predict(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        preds, gates = np.zeros(len(rows), np.float32), np.zeros((len(rows), model.num_experts), np.float32)
        with torch.inference_mode():
            for bi, x in loader(idx, shuffle=False):
                o = forward(model, bi, x)
                preds[bi] = o["score"].float().cpu().numpy()
                gates[bi] = o["gates"].float().cpu().numpy()
        return preds[idx], gates[idx]

    criterion = QualityLoss(**cfg.loss)
    opt = torch.optim.AdamW(_param_groups(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_mult), lr=cfg.lr)
    n_train_local = len(parts["train"]) // world if distributed else len(parts["train"])
    steps_per_epoch = max(1, math.ceil(n_train_local / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    history: list[dict[str, Any]] = []
    best_srcc, best_epoch, best_state, best_val = -math.inf, 0, None, {}
    stale, step = 0, 0
    has_val = len(parts["val"]) >= 3
    if not has_val:
        say("note: fewer than 3 validation images; the best epoch and early stopping use the training-set SRCC")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        nb = 0
        for bi, x in loader(parts["train"], shuffle=True, epoch=epoch):
            f = _lr_factor(step, total_steps, warmup, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            o = forward(train_model, bi, x)
            loss, parts_ = criterion(o, torch.from_numpy(targets[bi]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            nb += 1
            for k, v in parts_.items():
                sums[k] = sums.get(k, 0.0) + v
        row: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
        row.update({f"train_{k}": v / max(nb, 1) for k, v in sums.items()})
        if rank == 0:
            eval_idx = parts["val"] if has_val else parts["train"]
            pv, gv = predict(eval_idx)
            m = correlations(pv, targets[eval_idx])
            prefix = "val" if has_val else "train_eval"
            row.update({f"{prefix}_{k}": v for k, v in m.items() if k != "n"})
            row["expert_load"] = json.dumps([round(float(v), 4) for v in gv.mean(0)])
            srcc = m["srcc"] if not math.isnan(m["srcc"]) else -math.inf
            improved = srcc > best_srcc or best_state is None
            if improved:
                best_srcc, best_epoch, best_val = srcc, epoch, m
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                stale = 0
            else:
                stale += 1
        row["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        if rank == 0:
            _write_csv(out / "metrics.csv", history)
            say(_fmt_epoch(row, improved))
            if progress:
                progress("epochs", epoch, cfg.epochs)
        stop = cfg.patience and stale >= cfg.patience
        if distributed:
            flag = torch.tensor([1 if stop else 0], device=device)
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            say(f"early stop: validation SRCC has not improved for {cfg.patience} epochs (best {best_srcc:.4f} at epoch {best_epoch})")
            break

    result_test: dict[str, Any] = {}
    if rank == 0:
        model.load_state_dict(best_state)
        model.to(device)
        if len(parts["test"]):
            pt, gt = predict(parts["test"])
            test_rows = rows.loc[parts["test"]].copy()
            test_rows["pred"] = pt
            test_rows["expert"] = gt.argmax(1)
            test_rows.to_csv(out / "test_predictions.csv", index=False)
            result_test = {
                "overall": correlations(pt, targets[parts["test"]]),
                "by_modality": grouped_correlations(pt, targets[parts["test"]], test_rows["modality"].astype(str)),
                "by_type": grouped_correlations(pt, targets[parts["test"]], test_rows["type"].astype(str)),
                "expert_load": [round(float(v), 4) for v in gt.mean(0)],
                "test_cases": sorted(test_rows.case_id.unique().tolist()),
            }
            o = result_test["overall"]
            say(f"test (held-out cases, n={o['n']}): SRCC {o['srcc']:.4f}  PLCC {o['plcc']:.4f}  "
                f"KRCC {o['krcc']:.4f}  RMSE {o['rmse']:.4f}")
        summary = {"model": cfg.model, "best_epoch": best_epoch, "val": best_val, "test": result_test,
                   "epochs_run": len(history)}
        model.cfg.meta["trained_on"]["best_epoch"] = best_epoch
        model.cfg.meta["trained_on"]["val_srcc"] = best_val.get("srcc")
        model.cfg.meta["trained_on"]["test_srcc"] = result_test.get("overall", {}).get("srcc")
        model.cpu().save_pretrained(out, extra_files={
            "train_config.json": json.dumps(asdict(cfg), indent=2, default=list) + "\n",
            "test_metrics.json": json.dumps(summary, indent=2) + "\n",
        })
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainResult(out, best_epoch, best_val, result_test, len(history), history)


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
         f"{ev} SRCC {row.get(f'{ev}_srcc', float('nan')):.4f} PLCC {row.get(f'{ev}_plcc', float('nan')):.4f} "
         f"RMSE {row.get(f'{ev}_rmse', float('nan')):.4f}  experts {row.get('expert_load', '')}  {row['seconds']:.1f}s")
    return s + ("  *" if improved else "")


__all__ = ["TrainConfig", "TrainResult", "train"]
