"""`medqm label --engine ray`: the same labelling job on Ray Data, one model replica per worker.

The driver cuts the work into the same shards as the local engine; each block of shards becomes a Ray
Dataset of (image, question, answer) rows that an actor pool scores with ``map_batches`` — every actor
loads the model once (one per GPU with ``gpus_per_worker=1``, or one per CPU worker). The driver turns the
scores into label rows and writes the same atomic Parquet shards, so the two engines give the same labels
and a Ray run resumes like a local one.

Pointing it at a cluster: start Ray on the nodes (``ray start --head`` / ``ray start --address=HEAD:6379``),
make the model folder and images reachable at the same paths on every node (shared filesystem), then run
``medqm label ... --engine ray --ray-address HEAD:6379 --workers N [--gpus-per-worker 1]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medqm.io import MedQMReadError, read_image


@dataclass(frozen=True)
class ModelSpec:
    """How to load a diagnostic model; picklable, so each Ray actor can load its own replica."""

    name_or_path: str
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8

    def load(self):
        from .hf import load_model

        return load_model(self.name_or_path, device=self.device, dtype=self.dtype, batch_size=self.batch_size)

    def identity(self):
        """(model_id, revision) without loading weights in the driver: what the label rows record."""
        from .hf import model_identity

        return model_identity(self.name_or_path)


class _NLLActor:
    """Ray actor: one model replica; scores batches of rows, marking unreadable images instead of failing."""

    def __init__(self, spec: dict[str, Any]):
        self.model = ModelSpec(**spec).load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .runner import apply_view

        images, keep, reasons = [], [], np.full(len(batch["idx"]), "", dtype=object)
        views = batch["view"] if "view" in batch else np.zeros(len(batch["idx"]), dtype=int)
        for k, path in enumerate(batch["path"]):
            try:
                images.append(apply_view(read_image(str(path)).pixels, int(views[k])))
                keep.append(k)
            except MedQMReadError as e:
                reasons[k] = e.reason
        nll = np.full(len(batch["idx"]), np.nan)
        if keep:
            q = [str(batch["question"][k]) for k in keep]
            a = [str(batch["answer"][k]) for k in keep]
            nll[keep] = self.model.answer_nll(images, q, a)
        return {"idx": batch["idx"], "nll": nll, "reason": reasons.astype(str)}


class RayScorer:
    """Scores (owner, image, question, answer[, view]) triples on a Ray actor pool; see the module docstring."""

    def __init__(self, spec: ModelSpec, *, workers: int = 2, gpus_per_worker: float = 0.0,
                 address: str | None = None, rows_per_batch: int | None = None):
        try:
            import ray
        except ImportError as e:  # optional extra
            raise ImportError("the Ray engine needs Ray Data: pip install 'medqm[ray]'") from e
        self.spec, self.workers, self.gpus = spec, int(workers), float(gpus_per_worker)
        self.rows_per_batch = rows_per_batch or spec.batch_size
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = max(self.workers, 1)
            ray.init(**kwargs)
            ray.data.DataContext.get_current().enable_progress_bars = False

    def __call__(self, triples, errors: list[dict]):
        import ray

        if not triples:
            return [], np.zeros(0)
        rows = [{"idx": i, "path": t[1], "question": t[2], "answer": t[3], "view": t[4] if len(t) > 4 else 0}
                for i, t in enumerate(triples)]
        ds = ray.data.from_items(
            rows, override_num_blocks=max(1, min(len(rows) // self.rows_per_batch, 4 * self.workers)))
        scored = ds.map_batches(
            _NLLActor,
            fn_constructor_kwargs={"spec": asdict(self.spec)},
            batch_size=self.rows_per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=1 if self.gpus == 0 else 0,
            num_gpus=self.gpus,
        ).to_pandas().sort_values("idx")
        kept, nll = [], []
        for idx, value, reason in zip(scored["idx"], scored["nll"], scored["reason"], strict=True):
            t = triples[int(idx)]
            if reason:
                errors.append({"dist_id": t[0], "path": t[1], "reason": reason})
            else:
                kept.append(t)
                nll.append(value)
        return kept, np.asarray(nll, dtype=np.float64)
