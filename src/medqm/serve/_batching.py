"""Micro-batching: images from concurrent requests share forward passes, run in one worker thread.

The first image to arrive opens a batch and waits at most ``window_ms`` for others (up to ``max_batch``);
the batch then runs through `Scorer.score_pixels` while the next one fills. With batching off every image
gets its own forward pass, in arrival order, in the same worker thread (the baseline the load benchmark
compares against).

The queue is bounded (``max_queue`` images waiting for the model): `MicroBatcher.submit_all` refuses, with
`QueueFull`, a request whose images would not all fit, so an overloaded service answers 503 at once instead of
holding ever more images in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from medqm.io import MedImage
from medqm.model.scoring import QualityScore, Scorer

log = logging.getLogger("medqm.serve")


@dataclass(frozen=True)
class Scored:
    """One image's score and how it was computed: time spent queued, the batch's run time and size."""

    score: QualityScore
    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass
class _Item:
    image: MedImage
    heatmap: bool
    future: Future
    enqueued: float


_STOP = object()


class QueueFull(RuntimeError):
    """The batcher's queue has no room for the images offered: try again later."""

    def __init__(self, offered: int, depth: int, capacity: int):
        super().__init__(f"{offered} image(s) offered, {depth} already waiting for the model; the queue holds "
                         f"{capacity}")
        self.offered, self.depth, self.capacity = offered, depth, capacity


class MicroBatcher:
    """Runs a `Scorer` in one background thread, batching images submitted from any thread.

    Args:
        scorer: the model.
        enabled: batch across requests; False scores every image on its own.
        window_ms: longest wait of a batch's first image for more images.
        max_batch: most images per forward pass.
        max_queue: most images waiting for the model (not counting the batch being scored); `submit_all`
            raises `QueueFull` beyond.
    """

    def __init__(self, scorer: Scorer, *, enabled: bool = True, window_ms: float = 5.0, max_batch: int = 32,
                 max_queue: int = 256):
        if window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.scorer = scorer
        self.enabled = enabled
        self.window = window_ms / 1000.0
        self.max_batch = max_batch if enabled else 1
        self.scorer.batch_size = max(self.scorer.batch_size, self.max_batch)  # one forward pass per batch
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()  # bounded by submit_all, so that the stop signal always fits
        self._admit = threading.Lock()  # submitters check the room and queue their images as one step
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        """Images waiting for the model (not counting the batch being scored)."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="medqm-scorer", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued work and stop the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, image: MedImage, *, heatmap: bool = False) -> Future:
        """Queue one image; the future resolves to a `Scored`. Raises `QueueFull` when the queue is full."""
        return self.submit_all([image], heatmap=heatmap)[0]

    def submit_all(self, images: list[MedImage], *, heatmap: bool = False) -> list[Future]:
        """Queue all of ``images`` or none: `QueueFull` when they do not all fit. Futures resolve to `Scored`."""
        if self._thread is None:
            raise RuntimeError("MicroBatcher.start() has not been called")
        with self._admit:  # only submitters add, so the depth seen here can only shrink before the puts
            depth = self._queue.qsize()
            if depth + len(images) > self.max_queue:
                raise QueueFull(len(images), depth, self.max_queue)
            now = time.perf_counter()
            items = [_Item(image, heatmap, Future(), now) for image in images]
            for item in items:
                self._queue.put(item)
        return [item.future for item in items]

    # ----------------------------------------------------------------------------------------------- worker

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        """The batch ``first`` opens, and whether the stop signal was seen."""
        batch = [first]
        deadline = time.perf_counter() + self.window
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            # images asking for a heatmap run separately: the others skip its cost
            for group in ([i for i in batch if i.heatmap], [i for i in batch if not i.heatmap]):
                if group:
                    self._score(group)

    def _score(self, group: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            scores = self.scorer.score_pixels([i.image for i in group], heatmaps=group[0].heatmap)
        except Exception:  # one bad image must not fail its batch-mates: retry one by one
            if len(group) > 1:
                for item in group:
                    self._score([item])
                return
            log.exception("scoring failed")
            group[0].future.set_exception(RuntimeError("the model failed on this image"))
            return
        ms = (time.perf_counter() - start) * 1000.0
        for item, s in zip(group, scores, strict=True):
            item.future.set_result(Scored(s, (start - item.enqueued) * 1000.0, ms, len(group)))
