"""Training data: the label table as training rows (with per-task targets), and the cache of frozen-backbone features.

Per-task targets: a label row holds, per question, its answer type (``answer_types``) and its diagnostic loss
(``loss_items``, nats, averaged over views); the row's ``diag_loss`` is their mean and its ``quality`` the
quality map of that. For an answer type t the task target is the same map applied to the mean loss of the
row's questions of type t, Q_t = σ((c − mean_{j: type j = t} D_j) / s), NaN when the row has no question of
type t (`task_qualities`). The tasks of a model are the answer types with enough labelled images
(`select_tasks`).

In frozen-backbone mode (the CPU default) every image goes through the backbone once; its multi-scale
feature maps are stored as float16 ``.npy`` files keyed by the SHA-256 of the image file's bytes, under a
folder named after the backbone, its weights, the input size and the preprocessing. A rerun, another
ablation, or a new label set over the same images reads them back instead of recomputing; a changed
file gets a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medqm._fs import atomic_path, cache_dir, write_json
from medqm._fs import file_sha256 as file_digest
from medqm.io import MedQMReadError, read_image

PREPROCESS_VERSION = 1  # bump when `medqm.model.preprocess` changes what the backbone sees
TRAIN_COLUMNS = ("path", "quality", "case_id", "modality", "type", "level", "ref_id", "dist_id")
MIN_TASK_IMAGES = 50  # an answer type becomes a task of the model with at least this many labelled images


def default_cache_dir() -> Path:
    """``$MEDQM_CACHE/features``, else ``~/.cache/medqm/features``."""
    return cache_dir("features")


def _set_map(labels) -> tuple[float, float]:
    """The label set's quality map (``labels.attrs``), else `medqm.label.quality.DEFAULT_MAP`."""
    from medqm.label.quality import DEFAULT_MAP

    qm = (labels.attrs.get("medqm") or {}).get("quality_map") or {}
    return float(qm.get("center", DEFAULT_MAP.center)), float(qm.get("scale", DEFAULT_MAP.scale))


def _row_maps(labels):
    """Per row (center, scale) of the quality map: the row's map_center/map_scale, else the label set's map."""
    center, scale = _set_map(labels)
    n = len(labels)
    c = labels["map_center"].to_numpy(np.float64) if "map_center" in labels else np.full(n, center)
    s = labels["map_scale"].to_numpy(np.float64) if "map_scale" in labels else np.full(n, scale)
    return np.where(np.isfinite(c), c, center), np.where(np.isfinite(s) & (s > 0), s, scale)


def quality_map_of(labels) -> tuple[float, float]:
    """The label table's quality map (center, scale): the one its rows share (their ``map_center`` /
    ``map_scale``, the label set's where a row has none), else the label set's."""
    centers, scales = _row_maps(labels)
    pairs = set(zip(centers.tolist(), scales.tolist(), strict=True))
    return pairs.pop() if len(pairs) == 1 else _set_map(labels)


def task_qualities(labels):
    """Per-task quality targets: a DataFrame indexed like ``labels``, one column per answer type (sorted, named by
    the type), Q_t = the row's quality map applied to the mean loss of its questions of type t; NaN where the row
    has no question of that type. Empty (no columns) for label tables without ``answer_types``.

    A row whose lists do not match (lengths differ, or not JSON) gets NaN for every task and a warning naming
    its ``dist_id``; one bad row never stops the others.
    """
    import pandas as pd

    from medqm.label.reliability import task_losses

    if "answer_types" not in labels or len(labels) == 0:
        return pd.DataFrame(index=labels.index)
    centers, scales = _row_maps(labels)
    bad: list[str] = []
    losses = pd.DataFrame(task_losses(labels, bad=bad), index=labels.index)
    if bad:
        warnings.warn(f"{len(bad)} label rows have unusable per-question losses, no task targets for them: "
                      + "; ".join(bad[:3]) + (" …" if len(bad) > 3 else ""), stacklevel=2)
    z = (losses.to_numpy(np.float64) - centers[:, None]) / scales[:, None]
    q = 0.5 * (1.0 - np.tanh(0.5 * z))  # the quality map σ((c − D) / s), as medqm.label.quality.QualityMap
    return pd.DataFrame(q, index=labels.index, columns=losses.columns)


def select_tasks(rows, *, min_images: int = MIN_TASK_IMAGES, candidates: Sequence[str] | None = None) -> list[str]:
    """The tasks of a model: answer types whose target column (``quality_<type>`` in ``rows``, as `training_rows`
    adds them) is set on at least ``min_images`` rows, sorted. ``candidates`` restricts the types considered."""
    from medqm.model import task_column

    prefix = task_column("")
    have = [c[len(prefix):] for c in rows.columns if c.startswith(prefix)]
    if candidates is not None:
        have = [t for t in have if t in set(candidates)]
    return sorted(t for t in have if int(rows[task_column(t)].notna().sum()) >= min_images)


def training_rows(labels, *, drop_missing: bool = True):
    """The columns training needs, one row per labelled image; rows without a quality are dropped.

    Beside `TRAIN_COLUMNS`, a ``quality_<type>`` column per answer type holds the per-task target
    (`task_qualities`; NaN where the image has no question of that type).
    Returns (rows, dropped) where ``dropped`` counts rows removed for a missing quality or image file.
    """
    from medqm.model import task_column

    missing = [c for c in ("path", "quality", "case_id") if c not in labels]
    if missing:
        raise ValueError(f"the label table lacks columns {missing} (expected a `medqm label` output)")
    cols = [c for c in TRAIN_COLUMNS if c in labels]
    rows = labels[cols].copy()
    tq = task_qualities(labels)
    for t in tq.columns:
        rows[task_column(t)] = tq[t].to_numpy()
    for c in TRAIN_COLUMNS:
        if c not in rows:
            rows[c] = None
    rows["case_id"] = rows["case_id"].astype(str)
    keep = rows["quality"].notna()
    if drop_missing:
        keep &= rows["path"].map(lambda p: isinstance(p, str) and Path(p).is_file())
    dropped = int((~keep).sum())
    rows = rows[keep].drop_duplicates("path").reset_index(drop=True)
    if rows.empty:
        raise ValueError("no usable label rows (quality present and image file found)")
    q = rows["quality"].to_numpy(dtype=np.float64)
    if q.min() < 0 or q.max() > 1:
        raise ValueError(f"quality labels must lie in [0, 1], got {q.min():g}…{q.max():g}")
    return rows, dropped


def load_training_image(path: str, img_size: int) -> np.ndarray:
    """Read an image file and preprocess it exactly as scoring does: (3, S, S) float32 in [0, 1]."""
    from medqm.model.scoring import preprocess

    return preprocess(read_image(path), img_size)[0]


class FeatureCache:
    """Frozen-backbone features on disk, keyed by image content.

    Args:
        root: cache folder (shared by runs; see `default_cache_dir`).
        model: the `MedQMI` whose backbone makes the features; its backbone weights, input size and stages
            name the sub-folder, so features of another backbone are never mixed in.
    """

    def __init__(self, root: str | os.PathLike, model):
        import torch

        self.model = model
        cfg = model.cfg
        h = hashlib.sha256()
        for k, v in model.backbone.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        ident = {"backbone": cfg.backbone, "img_size": cfg.img_size, "out_indices": list(cfg.out_indices),
                 "weights": h.hexdigest()[:16], "preprocess": PREPROCESS_VERSION, "dtype": "float16"}
        tag = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = Path(root) / f"{cfg.backbone}-{cfg.img_size}-{tag}"
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(ident, self.dir / "cache.json", indent=1)
        S = cfg.img_size
        self.shapes = [(c, S // r, S // r)
                       for c, r in zip(model.feature_channels, model.feature_reductions, strict=True)]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self._torch = torch

    def file_for(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def ensure(self, paths: Sequence[str], *, batch_size: int = 32, device: str = "cpu",
               progress: Callable[[int, int], None] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
        """Make sure features exist for ``paths``; returns (key per path or "" when it failed, failures)."""
        torch = self._torch
        keys = [file_digest(p) for p in paths]
        todo = [(p, k) for p, k in zip(paths, keys, strict=True) if not self.file_for(k).is_file()]
        todo = list(dict((k, (p, k)) for p, k in todo).values())  # identical files once
        failures: list[tuple[str, str]] = []
        done = len(paths) - len(todo)
        if progress:
            progress(done, len(paths))
        if todo:
            backbone_was_training = self.model.backbone.training
            self.model.backbone.eval()
            try:
                for i in range(0, len(todo), batch_size):
                    chunk = todo[i : i + batch_size]
                    imgs, ok = [], []
                    for p, k in chunk:
                        try:
                            imgs.append(load_training_image(p, self.model.cfg.img_size))
                            ok.append(k)
                        except (MedQMReadError, ValueError) as e:
                            failures.append((p, str(e)))
                    if imgs:
                        x = torch.from_numpy(np.stack(imgs)).to(device)
                        if device == "cpu":
                            x = x.contiguous(memory_format=torch.channels_last)
                        with torch.inference_mode():
                            feats = self.model.forward_backbone(x)
                        flat = torch.cat([f.flatten(1) for f in feats], dim=1).to(torch.float16).cpu().numpy()
                        for k, v in zip(ok, flat, strict=True):
                            with atomic_path(self.file_for(k)) as tmp, open(tmp, "wb") as fh:
                                np.save(fh, v, allow_pickle=False)
                    done += len(chunk)
                    if progress:
                        progress(done, len(paths))
            finally:
                self.model.backbone.train(backbone_was_training)
        bad = {p for p, _ in failures}
        return [("" if p in bad else k) for p, k in zip(paths, keys, strict=True)], failures

    def load(self, keys: Sequence[str]) -> list:
        """Stacked features of ``keys`` as float32 tensors, one (B, C, h, w) per backbone stage."""
        torch = self._torch
        flat = np.stack([np.load(self.file_for(k), allow_pickle=False) for k in keys]).astype(np.float32)
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes, strict=True):
            out.append(torch.from_numpy(np.ascontiguousarray(flat[:, start : start + size])).reshape(len(keys), *shape))
            start += size
        return out


class ImageDataset:
    """Images read and preprocessed on the fly (fine-tuning mode); optional horizontal flips."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, img_size: int, *, flip: bool = False, seed: int = 0):
        self.paths, self.targets, self.img_size, self.flip = (list(paths), np.asarray(targets, np.float32),
                                                              img_size, flip)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = load_training_image(self.paths[i], self.img_size)
        if self.flip and self.rng.random() < 0.5:  # quality does not depend on left/right
            x = np.ascontiguousarray(x[:, :, ::-1])
        return x, self.targets[i], i


__all__ = ["FeatureCache", "ImageDataset", "training_rows", "task_qualities", "quality_map_of", "select_tasks",
           "MIN_TASK_IMAGES",
           "load_training_image", "default_cache_dir", "file_digest",
           "PREPROCESS_VERSION"]
