"""Score images with a MedQM-I checkpoint: in-memory images, files, folders, DICOM series, volume slices.

`Scorer` batches images through the model (PyTorch, or ONNX Runtime for speed on CPU) and maps the
attention heatmap back onto each image's own pixel grid; `score` is the one-call Python API
(`medqm.score`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medqm._fs import file_sha256
from medqm.io import MedImage, ReadFailure, iter_images, resize_pad, walk_image_files

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = "medqm-i-demo"
DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Letterbox:
    """Where an image sits inside the square model input: original size, scale and padding offsets."""

    height: int
    width: int
    scale: float
    top: int
    left: int
    inner_height: int
    inner_width: int


def _as_pixels(image: MedImage | np.ndarray) -> np.ndarray:
    if isinstance(image, MedImage):
        return image.pixels
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a MedImage or a numpy array, got {type(image).__name__}")
    a = image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"an image array must be H×W, H×W×1 or H×W×3, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if lo < -1e-6 or hi > 1 + 1e-6 or not np.isfinite(a).all():
            raise ValueError(f"float image values must lie in [0, 1] (got {lo:g}…{hi:g}); window CT/MR data first "
                             "(medqm.io.read_image(..., window=...) or medqm.io.apply_window)")
        return a.astype(np.float32, copy=False)
    raise ValueError(f"image arrays must be uint8 or float in [0, 1], got {a.dtype}; for raw units (HU, MR signal) "
                     "read the file with medqm.io.read_image or window the array first")


def preprocess(image: MedImage | np.ndarray, img_size: int) -> tuple[np.ndarray, Letterbox]:
    """An image → (3, S, S) float32 in [0, 1], letterboxed with its aspect kept, and where it sits.

    Grayscale is replicated to three channels (the backbone's input).
    """
    px = _as_pixels(image)
    h, w = px.shape[:2]
    boxed, scale, (top, left) = resize_pad(px, img_size, order="area")
    boxed = np.clip(boxed, 0.0, 1.0)
    chw = np.repeat(boxed[None], 3, axis=0) if boxed.ndim == 2 else np.ascontiguousarray(boxed.transpose(2, 0, 1))
    inner_h, inner_w = max(1, round(h * scale)), max(1, round(w * scale))
    return chw.astype(np.float32, copy=False), Letterbox(h, w, scale, top, left, inner_h, inner_w)


def heatmap_to_image(heatmap: np.ndarray, box: Letterbox) -> np.ndarray:
    """A model-input heatmap (S, S) → the image's own (H, W) grid: padding cropped, resized, summing to 1."""
    import torch
    import torch.nn.functional as F

    crop = heatmap[box.top : box.top + box.inner_height, box.left : box.left + box.inner_width]
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(box.height, box.width), mode="bilinear", align_corners=False)[0, 0].clamp_min(0)
    total = float(out.sum())
    out = out / total if total > 0 else torch.full_like(out, 1.0 / out.numel())
    return out.numpy()


def heatmap_overlay(pixels: np.ndarray, heatmap: np.ndarray, *, max_side: int = 1024, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 picture of the image with the heatmap (scaled to its maximum) blended over it."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels
    hm = heatmap / max(float(heatmap.max()), 1e-12)
    colour = colormaps["inferno"](hm)[..., :3].astype(np.float32)
    out = ((1 - alpha) * rgb + alpha * colour).clip(0, 1)
    img = Image.fromarray(np.round(out * 255).astype(np.uint8))
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BOX)
    return np.asarray(img)


# --------------------------------------------------------------------------------------------------- input pipeline


@dataclass
class PreparedImage:
    """An image read and letterboxed for the model: the `MedImage`, its (3, S, S) float32 input and where it sits."""

    image: MedImage
    input: np.ndarray
    box: Letterbox


def prepare_file(path: str | os.PathLike, img_size: int, **read_kwargs) -> list[PreparedImage | ReadFailure]:
    """Read one file (every frame / slice, as `medqm.io.iter_images` does) and letterbox each image.

    What a scoring worker does per file. A file that cannot be read is one `ReadFailure`; an image that cannot
    be letterboxed is a `ReadFailure` at its place ("scoring failed (...)", as the single-threaded path says).
    """
    out: list[PreparedImage | ReadFailure] = []
    for item in iter_images([path], **read_kwargs):
        if isinstance(item, ReadFailure):
            out.append(item)
            continue
        try:
            chw, box = preprocess(item, img_size)
        except Exception as e:
            out.append(ReadFailure(item.path, f"scoring failed ({type(e).__name__}: {e})"))
            continue
        out.append(PreparedImage(item, chw, box))
    return out


_IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(MedImage) if f.name != "pixels")


class PreparedFiles:
    """Map-style dataset for `torch.utils.data.DataLoader` workers: item i = ``files_per_item`` files read and
    letterboxed.

    Each item travels as three tensors in shared memory (the grey inputs as one channel, the colour inputs, and
    all pixels in one flat buffer) plus small metadata: no pickling of pixel arrays, no file descriptor per
    image, a third of the bytes for grey images. `unpack_prepared` turns it back into `prepare_file` lists.
    With ``pixels=False`` the images' own pixels stay in the worker (a score table needs only their shape):
    the `MedImage` that comes back holds a read-only zero view of the right shape instead.
    """

    def __init__(self, files: Sequence[str | os.PathLike], img_size: int, read_kwargs: dict[str, Any] | None = None,
                 *, files_per_item: int = 1, pixels: bool = True):
        if files_per_item < 1:
            raise ValueError(f"files_per_item must be >= 1, got {files_per_item}")
        self.files = [str(f) for f in files]
        self.img_size = img_size
        self.read_kwargs = dict(read_kwargs or {})
        self.files_per_item = files_per_item
        self.pixels = pixels

    def __len__(self) -> int:
        return -(-len(self.files) // self.files_per_item)

    def __getitem__(self, i: int):
        import torch

        k = self.files_per_item
        items = [p for f in self.files[i * k : (i + 1) * k] for p in prepare_file(f, self.img_size, **self.read_kwargs)]
        ok = [p for p in items if isinstance(p, PreparedImage)]
        grey = [p.input[0] for p in ok if p.image.pixels.ndim == 2]
        colour = [p.input for p in ok if p.image.pixels.ndim == 3]

        def shared(arrays):
            return torch.from_numpy(np.stack(arrays)) if arrays else None

        flat = (torch.from_numpy(np.concatenate([p.image.pixels.ravel() for p in ok]))
                if ok and self.pixels else None)
        records = [it if isinstance(it, ReadFailure)
                   else (it.image.pixels.shape, {k: getattr(it.image, k) for k in _IMAGE_FIELDS}, it.box)
                   for it in items]
        return records, shared(grey), shared(colour), flat


def unpack_prepared(packed) -> list[PreparedImage | ReadFailure]:
    """A `PreparedFiles` item → the `prepare_file` list (arrays are views of the shared tensors, no copies)."""
    records, grey, colour, flat = packed
    out: list[PreparedImage | ReadFailure] = []
    g, c, at = 0, 0, 0
    pixels = flat.numpy() if flat is not None else None
    for rec in records:
        if isinstance(rec, ReadFailure):
            out.append(rec)
            continue
        shape, fields, box = rec
        n = int(np.prod(shape))
        px = pixels[at : at + n].reshape(shape) if pixels is not None else np.broadcast_to(np.float32(0), shape)
        image = MedImage(pixels=px, **fields)
        at += n
        if len(shape) == 2:  # grey: the three identical channels as a read-only view of one
            one = grey[g].numpy()
            x, g = np.broadcast_to(one[None], (3, *one.shape)), g + 1
        else:
            x, c = colour[c].numpy(), c + 1
        out.append(PreparedImage(image, x, box))
    return out


def _keep(x):  # DataLoader collate: items are already what the parent wants (a lambda would not pickle)
    return x


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run the iterator ``items`` in a background thread, ``depth`` results ahead of the consumer.

    Exceptions reach the consumer at the position they happened; closing the consumer stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for x in items:
                if not put((True, x)):
                    return
            put((True, done))
        except BaseException as e:  # handed to the consumer, re-raised there
            put((False, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=run, name="medqm-prefetch", daemon=True)
    t.start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                raise x
            if x is done:
                return
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


# --------------------------------------------------------------------------------------------------- model loading


def default_checkpoint() -> Path:
    """The checkpoint shipped in the package (trained on the demo labels; see its config.json ``meta``)."""
    path = CHECKPOINT_DIR / DEFAULT_CHECKPOINT
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no default MedQM-I checkpoint is installed ({path}); pass a checkpoint folder "
            "(--model DIR / model=DIR), e.g. one written by `medqm train --labels LABELS --out runs/NAME`"
        )
    return path


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder says about itself, read without loading the model.

    Attributes:
        path: the checkpoint folder.
        meta: its ``config.json``: ``architecture``, ``medqm_version``, ``num_params``, ``config`` (the model
            settings, with ``meta.trained_on`` when the trainer recorded it)…
        weights_sha256: hex SHA-256 of ``model.safetensors``: identifies the weights.
    """

    path: Path
    meta: dict[str, Any]
    weights_sha256: str

    @property
    def trained_on(self) -> dict[str, Any] | None:
        """What the model was trained on (labels, quality map…), as the trainer recorded it; None if not recorded."""
        return (self.meta.get("config", {}).get("meta") or {}).get("trained_on")


def checkpoint_info(model: str | os.PathLike | None = None) -> CheckpointInfo:
    """The `CheckpointInfo` of a checkpoint folder (None: the shipped default), without loading the weights."""
    path = Path(model) if model is not None else default_checkpoint()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: not a MedQM-I checkpoint folder (no config.json)")
    return CheckpointInfo(path, json.loads(cfg.read_text(encoding="utf-8")), file_sha256(path / "model.safetensors"))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float, device: str):
    from .medqm_i import MedQMI

    return MedQMI.from_pretrained(path, map_location=device)


def load_model(model=None, *, device: str = "cpu"):
    """A MedQMI from None (the shipped default), a checkpoint folder, or a model object (returned as is)."""
    from .medqm_i import MedQMI

    if isinstance(model, MedQMI):
        return model
    path = Path(model) if model is not None else default_checkpoint()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: not a MedQM-I checkpoint folder (no config.json)")
    return _load_cached(str(path.resolve()), (path / "model.safetensors").stat().st_mtime, device)


# --------------------------------------------------------------------------------------------------- scoring


@dataclass
class QualityScore:
    """One image's score: ``quality`` in [0, 1] (higher is better), the expert gates and, on request, the heatmap.

    ``tasks`` holds the quality for each answer type the checkpoint was trained on ({'tumour': 0.83, …}; empty
    for a checkpoint without tasks): how well the MLLM can still answer that kind of question, on the same scale.
    """

    quality: float
    gates: np.ndarray
    expert_scores: np.ndarray
    heatmap: np.ndarray | None = None
    id: str | None = None
    path: str | None = None
    index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)

    @property
    def expert(self) -> int:
        """The expert with the largest gate weight."""
        return int(np.argmax(self.gates))

    def __float__(self) -> float:
        return float(self.quality)


class Scorer:
    """Batched MedQM-I scoring.

    Args:
        model: a checkpoint folder, a `MedQMI`, or None for the shipped default checkpoint.
        device: ``'cpu'``, ``'cuda'``… (the torch runtime).
        batch_size: images per forward pass.
        runtime: ``'torch'`` (eager PyTorch), ``'onnx'`` (ONNX Runtime on CPU; the graph is exported once per
            set of weights and cached, see `medqm.model.onnx`) or ``'auto'``: ONNX Runtime on CPU when it is
            installed (several times faster) and ``dtype`` is float32, else PyTorch.
        num_threads: CPU threads for the runtime (default: the runtime's own choice, one per core).
        workers: processes that read, window and letterbox files for `score_files` / `iter_files` while the
            model runs (a `torch.utils.data.DataLoader` over the file list; batches are assembled in a
            background thread). 0: everything in the calling thread, one file after the other. None (default):
            1 when there is more than one batch of files and more than one CPU, else 0 (on this project's two
            shared cores at load ≈ 4 one worker lifted end-to-end scoring from 75 % to 95 % of the model's own
            rate; on a busier machine less, see docs/medqm-i.md).
        dtype: ``'float32'``, or ``'bfloat16'`` / ``'float16'`` for PyTorch autocast (CUDA; bfloat16 also on
            CPU). Agreement with float32 is measured in docs/medqm-i.md.
        channels_last: NHWC activations for PyTorch (default: on for CPU, where it is about twice as fast for
            EfficientNet's depthwise convolutions; off for CUDA until bench/gpu.py shows it helps there).
    """

    def __init__(self, model=None, *, device: str = "cpu", batch_size: int = 32, runtime: str = "auto",
                 num_threads: int | None = None, workers: int | None = None, dtype: str = "float32",
                 channels_last: bool | None = None):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if runtime not in ("auto", "torch", "onnx"):
            raise ValueError(f"runtime must be 'auto', 'torch' or 'onnx', got {runtime!r}")
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
            raise ValueError(f"workers must be an integer >= 0 or None (auto), got {workers!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if runtime == "onnx" and dtype != "float32":
            raise ValueError(f"dtype={dtype!r} needs runtime='torch' (the ONNX graph is float32)")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available here (torch.cuda.is_available() is "
                             "False); use device='cpu'")
        if dtype == "float16" and self.device.type != "cuda":
            raise ValueError("dtype='float16' is for CUDA; on the CPU use 'bfloat16' or 'float32'")
        self.model = load_model(model, device=device).eval()
        self.batch_size = batch_size
        self.workers = workers
        self.dtype = dtype
        self.img_size = self.model.cfg.img_size
        self._onnx = None
        ckpt_dir = model if isinstance(model, (str, os.PathLike)) else (default_checkpoint() if model is None else None)
        if runtime == "onnx" and self.device.type != "cpu":
            raise ValueError(f"runtime='onnx' runs on the CPU; use runtime='torch' for device {device!r}")
        if runtime == "onnx" or (runtime == "auto" and self.device.type == "cpu" and dtype == "float32"):
            from .onnx import OnnxScorer, onnx_available

            if runtime == "onnx" or onnx_available():
                try:
                    self._onnx = OnnxScorer.for_model(self.model, ckpt_dir, threads=num_threads)
                except Exception as e:  # 'auto' falls back to PyTorch (e.g. onnx/onnxscript missing for the export)
                    if runtime == "onnx":
                        raise
                    import warnings

                    warnings.warn(f"ONNX Runtime unavailable for this model ({type(e).__name__}: {e}); scoring with "
                                  "PyTorch", stacklevel=2)
        self.runtime = "onnx" if self._onnx is not None else "torch"
        if self.runtime == "torch" and num_threads:
            torch.set_num_threads(num_threads)
        self.channels_last = (self.device.type == "cpu") if channels_last is None else bool(channels_last)
        if self._onnx is None and self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._pin = self.runtime == "torch" and self.device.type == "cuda"

    @property
    def heatmaps_available(self) -> bool:
        return self.model.cfg.use_priors or self.model.cfg.use_implicit

    @property
    def tasks(self) -> tuple[str, ...]:
        """The answer types this checkpoint scores separately (``QualityScore.tasks``, ``quality_<task>`` columns)."""
        return tuple(self.model.cfg.tasks)

    def _autocast(self):
        import torch

        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))

    def forward(self, batch, *, heatmaps: bool = False) -> dict[str, np.ndarray]:
        """The runtime alone: one forward pass over letterboxed (B, 3, S, S) float32 inputs (numpy, or a CPU tensor,
        pinned when bound for a GPU) → score, gates, expert_scores (+ task_scores, heatmap) as float32 arrays."""
        import torch

        if self._onnx is not None:
            return self._onnx.run(batch.numpy() if isinstance(batch, torch.Tensor) else batch, heatmaps=heatmaps)
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            out = self.model(x, return_heatmap=heatmaps and self.heatmaps_available)
        return {k: v.float().cpu().numpy() for k, v in out.items() if k != "balance_loss"}

    def _assemble(self, group: list[PreparedImage]):
        """Stack a group's inputs into one batch tensor (pinned when it goes to a GPU)."""
        import torch

        batch = torch.from_numpy(np.stack([p.input for p in group]))
        return group, (batch.pin_memory() if self._pin else batch)

    def _results(self, group: list[PreparedImage], batch, heatmaps: bool) -> list[QualityScore]:
        out = self.forward(batch, heatmaps=heatmaps)
        results = []
        for j, p in enumerate(group):
            hm = heatmap_to_image(out["heatmap"][j], p.box) if "heatmap" in out else None
            r = QualityScore(float(out["score"][j]), out["gates"][j].copy(), out["expert_scores"][j].copy(), hm)
            if "task_scores" in out:
                r.tasks = {t: float(v) for t, v in zip(self.tasks, out["task_scores"][j], strict=True)}
            im = p.image
            if isinstance(im, MedImage):
                r.id, r.path, r.index = im.id, im.path, im.index
                r.meta = {"modality": im.modality, "case_id": im.case_id}
            results.append(r)
        return results

    def score_pixels(self, images: Sequence[MedImage | np.ndarray], *, heatmaps: bool = False) -> list[QualityScore]:
        """Score in-memory images (MedImage, uint8, or float arrays in [0, 1]) in batches."""
        results: list[QualityScore] = []
        for i in range(0, len(images), self.batch_size):
            group = [PreparedImage(im, *preprocess(im, self.img_size)) for im in images[i : i + self.batch_size]]
            results += self._results(*self._assemble(group), heatmaps)
        return results

    def _reader(self, paths, read_kwargs: dict[str, Any], pixels: bool) -> tuple[Iterator, int]:
        """(every image under ``paths`` read and letterboxed, in file order; the number of worker processes)."""
        read_kwargs = dict(read_kwargs)
        on_skip = read_kwargs.pop("on_skip", None)
        if self.workers == 0:  # streamed: the first batch is scored while the walk goes on
            return self._read_here(walk_image_files(paths, on_skip=on_skip), read_kwargs), 0
        files = list(walk_image_files(paths, on_skip=on_skip))
        workers = self.workers
        if workers is None:  # auto: one worker pays off once there is more than one batch to read
            workers = 1 if len(files) > self.batch_size and (os.cpu_count() or 1) > 1 else 0
        if workers == 0:
            return self._read_here(files, read_kwargs), 0
        return self._read_in_workers(files, workers, read_kwargs, pixels), workers

    def _read_here(self, files: Iterable, read_kwargs: dict[str, Any]) -> Iterator[PreparedImage | ReadFailure]:
        for f in files:
            yield from prepare_file(f, self.img_size, **read_kwargs)

    def _read_in_workers(self, files: list[Path], workers: int, read_kwargs: dict[str, Any],
                         pixels: bool) -> Iterator[PreparedImage | ReadFailure]:
        from torch.utils.data import DataLoader

        # a few files per item amortise the per-item cost (shared-memory segments, queue hops); every worker
        # still gets work when there are few files
        per_item = max(1, min(8, len(files) // (4 * workers)))
        data = PreparedFiles(files, self.img_size, read_kwargs, files_per_item=per_item, pixels=pixels)
        loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=min(workers, len(data)),
                            collate_fn=_keep, prefetch_factor=4)
        for packed in loader:
            yield from unpack_prepared(packed)

    def _groups(self, prepared: Iterator[PreparedImage | ReadFailure]):
        """Batches of ``batch_size`` (assembled) and failures, in file order; a failure ends the batch before it."""
        pending: list[PreparedImage] = []
        for item in prepared:
            if isinstance(item, ReadFailure):
                if pending:
                    yield self._assemble(pending)
                    pending = []
                yield item
                continue
            pending.append(item)
            if len(pending) >= self.batch_size:
                yield self._assemble(pending)
                pending = []
        if pending:
            yield self._assemble(pending)

    def iter_files(self, paths, *, heatmaps: bool = False, pixels: bool = True,
                   **read_kwargs) -> Iterator[tuple[MedImage | ReadFailure, QualityScore | None]]:
        """Read every image under ``paths`` (as `medqm.io.iter_images` does) and yield (image, score) pairs;
        a file that cannot be read yields (ReadFailure, None). With ``workers`` > 0 files are read in worker
        processes and batches assembled in a background thread while the model runs; the order is the same.
        ``pixels=False`` lets workers keep the images' pixels (the yielded images then hold a zero view of the
        right shape): for callers that need only metadata and scores, as `score_files` without heatmaps."""
        prepared, workers = self._reader(paths, read_kwargs, pixels)
        groups = self._groups(prepared)
        if workers > 0:
            groups = prefetch(groups, depth=2)
        for g in groups:
            if isinstance(g, ReadFailure):
                yield g, None
                continue
            yield from self._flush(*g, heatmaps)

    def _flush(self, group: list[PreparedImage], batch, heatmaps: bool):
        try:
            scores = self._results(group, batch, heatmaps)
        except Exception:  # one bad image must not take its batch down: retry one by one, record the culprit
            for p in group:
                try:
                    yield p.image, self._results(*self._assemble([p]), heatmaps)[0]
                except Exception as e:
                    yield ReadFailure(p.image.path, f"scoring failed ({type(e).__name__}: {e})"), None
            return
        yield from zip((p.image for p in group), scores, strict=True)

    def score_files(self, paths, *, heatmap_dir: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None, **read_kwargs):
        """Score every image under ``paths`` into a table (pandas DataFrame), one row per image or failure.

        Columns: path, index, id, modality, case_id, height, width, quality, ``quality_<task>`` for each task of
        the checkpoint (`tasks`; none without), expert, gates (JSON list), heatmap (PNG path when
        ``heatmap_dir``), error (empty for scored images). ``progress(done, failed)`` is called after each row.
        """
        import pandas as pd

        from .medqm_i import task_column

        rows = []
        task_cols = [task_column(t) for t in self.tasks]
        hdir = Path(heatmap_dir) if heatmap_dir is not None else None
        if hdir is not None:
            hdir.mkdir(parents=True, exist_ok=True)
        failed = 0
        for n, (item, res) in enumerate(self.iter_files(paths, heatmaps=hdir is not None, pixels=hdir is not None,
                                                        **read_kwargs)):
            if res is None:
                failed += 1
                rows.append({"path": item.path, "index": None, "id": Path(item.path).name, "modality": None,
                             "case_id": None, "height": None, "width": None, "quality": float("nan"), "expert": None,
                             "gates": None, "heatmap": None, "error": item.reason,
                             **{c: float("nan") for c in task_cols}})
            else:
                hm_path = None
                if hdir is not None and res.heatmap is not None:
                    from PIL import Image

                    stem = Path(item.path).name.split(".")[0] + ("" if item.index is None else f"-{item.index}")
                    hm_path = hdir / f"{n:05d}-{_safe_name(stem)}.png"
                    Image.fromarray(heatmap_overlay(item.pixels, res.heatmap)).save(hm_path)
                rows.append({"path": item.path, "index": item.index, "id": item.id, "modality": item.modality,
                             "case_id": item.case_id, "height": int(item.shape[0]), "width": int(item.shape[1]),
                             "quality": res.quality, "expert": res.expert,
                             "gates": json.dumps([round(float(g), 6) for g in res.gates]),
                             "heatmap": str(hm_path) if hm_path else None, "error": "",
                             **{task_column(t): v for t, v in res.tasks.items()}})
            if progress is not None:
                progress(len(rows) - failed, failed)
        cols = ["path", "index", "id", "modality", "case_id", "height", "width", "quality", *task_cols, "expert",
                "gates", "heatmap", "error"]
        df = pd.DataFrame(rows, columns=cols)
        df["index"] = df["index"].astype("Int64")
        df["expert"] = df["expert"].astype("Int64")
        df["height"] = df["height"].astype("Int64")
        df["width"] = df["width"].astype("Int64")
        return df


@functools.lru_cache(maxsize=4)
def _cached_scorer(path: str, mtime: float, device: str, batch_size: int, runtime: str, workers: int | None,
                   dtype: str) -> Scorer:
    return Scorer(path, device=device, batch_size=batch_size, runtime=runtime, workers=workers, dtype=dtype)


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:120]


def write_scores(df, out: str | os.PathLike) -> Path:
    """Write a score table as CSV, Parquet or JSON (records), chosen by the suffix of ``out``."""
    out = Path(out)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        df.to_csv(out, index=False)
    elif suffix in (".parquet", ".pq"):
        df.to_parquet(out, index=False)
    elif suffix == ".json":
        out.write_text(df.to_json(orient="records", indent=1), encoding="utf-8")
    else:
        raise ValueError(f"--out must end in .csv, .parquet or .json, got {out.name!r}")
    return out


def score(x, *, model=None, heatmaps: bool = False, batch_size: int = 32, device: str = "cpu", runtime: str = "auto",
          workers: int | None = None, dtype: str = "float32", **read_kwargs):
    """Score image quality for a multimodal LLM (MedQM-I): 0 = the MLLM cannot diagnose from it, 1 = perfect.

    Args:
        x: a `MedImage` or an array (uint8, or float in [0, 1]; H×W or H×W×3) → one `QualityScore`;
            a list of those → a list of `QualityScore`; a path (file or folder) or a list of paths → a pandas
            DataFrame with one row per image (every frame / slice) and one per unreadable file (``error`` set).
            A checkpoint trained with tasks adds the quality per answer type: ``QualityScore.tasks``
            ({'tumour': 0.83, …}) and the table's ``quality_<task>`` columns.
        model: checkpoint folder (default: the checkpoint shipped with medqm).
        heatmaps: also compute where the model looked (``QualityScore.heatmap``, on the image's own grid,
            summing to 1). For paths, pass ``heatmap_dir=`` to write overlay PNGs instead.
        batch_size, device, runtime, workers, dtype: see `Scorer` (``workers`` matters for paths only).
        **read_kwargs: for paths: `medqm.io.read_images` options (window, axis, modality…), plus heatmap_dir.
    """
    def scorer():
        if model is None or isinstance(model, (str, os.PathLike)):  # reuse the session across calls
            path = Path(model) if model is not None else default_checkpoint()
            mtime = (path / "model.safetensors").stat().st_mtime if (path / "model.safetensors").is_file() else 0.0
            return _cached_scorer(str(path.resolve()), mtime, device, batch_size, runtime, workers, dtype)
        return Scorer(model, device=device, batch_size=batch_size, runtime=runtime, workers=workers, dtype=dtype)

    if isinstance(x, (np.ndarray, MedImage)):
        return scorer().score_pixels([x], heatmaps=heatmaps)[0]
    if isinstance(x, (str, os.PathLike)):
        return scorer().score_files([x], **read_kwargs)
    if isinstance(x, Iterable):
        items = list(x)
        if all(isinstance(i, (np.ndarray, MedImage)) for i in items):
            return scorer().score_pixels(items, heatmaps=heatmaps)
        if all(isinstance(i, (str, os.PathLike)) for i in items):
            return scorer().score_files(items, **read_kwargs)
        raise TypeError("a list to score must hold only images (arrays / MedImage) or only paths")
    raise TypeError(f"cannot score a {type(x).__name__}; give a path, a numpy array or a MedImage")


__all__ = ["Scorer", "QualityScore", "Letterbox", "score", "preprocess", "heatmap_to_image", "heatmap_overlay",
           "PreparedImage", "PreparedFiles", "prepare_file", "unpack_prepared", "prefetch", "DTYPES",
           "load_model", "default_checkpoint", "checkpoint_info", "CheckpointInfo", "write_scores", "CHECKPOINT_DIR",
           "DEFAULT_CHECKPOINT"]
