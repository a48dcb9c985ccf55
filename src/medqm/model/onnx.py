"""ONNX export of MedQM-I and scoring with ONNX Runtime (the fast CPU path).

Eager PyTorch runs EfficientNet-Lite0 at roughly 15–30 images/s on two CPU cores; ONNX Runtime's fused
depthwise kernels run the same graph several times faster. The exported graph takes letterboxed images
(B, 3, S, S) in [0, 1] and returns score, gates, expert_scores, (when the model has tasks) task_scores and
(when the model has queries) heatmap, equal to the PyTorch outputs within float rounding (tests/model/test_onnx.py).

Exports are cached: a checkpoint folder may carry ``model.onnx`` (+ ``model.onnx.json`` naming the weights
it was made from); otherwise the graph is exported once into ``$MEDQM_CACHE/onnx`` (default
``~/.cache/medqm/onnx``) under the SHA-256 of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from medqm._fs import atomic_path, cache_dir, write_json

ONNX_NAME = "model.onnx"
OPSET = 18


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def weights_digest(model) -> str:
    """SHA-256 over the state dict (names, shapes, bytes): identifies the weights an export was made from."""
    h = hashlib.sha256()
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _cache_dir() -> Path:
    return cache_dir("onnx")


def output_names(model) -> list[str]:
    names = ["score", "gates", "expert_scores"]
    if model.cfg.tasks:
        names.append("task_scores")
    if model.cfg.use_priors or model.cfg.use_implicit:
        names.append("heatmap")
    return names


def export_onnx(model, path: str | os.PathLike) -> Path:
    """Export ``model`` (eval mode, CPU, float32) to ``path`` with a dynamic batch axis; returns the path."""
    import copy

    import torch

    names = output_names(model)

    class _Graph(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixels):
            o = self.m(pixels, return_heatmap="heatmap" in names)
            return tuple(o[n] for n in names)

    m = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    graph = _Graph(m).eval()
    path = Path(path)
    S = model.cfg.img_size
    x = torch.rand(2, 3, S, S)
    with warnings.catch_warnings(), atomic_path(path) as tmp:  # a reader never sees half a graph
        warnings.simplefilter("ignore")
        try:  # the torch.export-based exporter (needs onnxscript) gives the faster graph
            torch.onnx.export(graph, (x,), str(tmp), input_names=["pixels"], output_names=names, opset_version=OPSET,
                              dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                              verbose=False, external_data=False)
        except Exception:
            torch.onnx.export(graph, (x,), str(tmp), input_names=["pixels"], output_names=names, opset_version=OPSET,
                              dynamo=False, dynamic_axes={n: {0: "batch"} for n in ["pixels", *names]})
    return path


class OnnxScorer:
    """An ONNX Runtime session over an exported MedQM-I graph; `run` mirrors the PyTorch outputs.

    Two settings measured on a 2-core CPU (bench/score.py): the session runs ``chunk`` images at a time
    (4 by default; larger batches run slower, their activations no longer fit the caches), and its threads
    do not spin while waiting (spinning threads stall when the cores are shared with other work).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, chunk: int = 4):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("runtime='onnx' needs ONNX Runtime: pip install 'medqm[onnx]'") from e
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            so.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.chunk = max(1, int(chunk))

    @classmethod
    def for_model(cls, model, checkpoint_dir: str | os.PathLike | None = None, *,
                  threads: int | None = None) -> OnnxScorer:
        """The session for ``model``: the checkpoint's own ``model.onnx`` when it matches, else a cached export."""
        digest = weights_digest(model)
        if checkpoint_dir is not None:
            p = Path(checkpoint_dir) / ONNX_NAME
            side = p.with_suffix(".onnx.json")
            if p.is_file() and side.is_file() and json.loads(side.read_text()).get("weights_sha256") == digest:
                return cls(p, threads=threads)
        p = _cache_dir() / f"medqm-i-{digest[:24]}.onnx"
        if not p.is_file():
            export_onnx(model, p)
        return cls(p, threads=threads)

    def run(self, batch: np.ndarray, *, heatmaps: bool = False) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts = [self.session.run(None, {"pixels": batch[i : i + self.chunk]})
                 for i in range(0, len(batch), self.chunk)]
        res = {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(self.names)}
        if not heatmaps:
            res.pop("heatmap", None)
        return res


def save_onnx(model, checkpoint_dir: str | os.PathLike) -> Path:
    """Export into a checkpoint folder as ``model.onnx`` (+ ``model.onnx.json``), so scoring needs no export step."""
    d = Path(checkpoint_dir)
    p = export_onnx(model, d / ONNX_NAME)
    import torch

    write_json({"weights_sha256": weights_digest(model), "opset": OPSET, "torch": torch.__version__},
               d / "model.onnx.json", indent=1)
    return p


__all__ = ["export_onnx", "save_onnx", "OnnxScorer", "onnx_available", "weights_digest", "output_names"]
