"""A cheap deterministic stand-in for a diagnostic model, for testing the label runner's bookkeeping.

The NLL grows with how much fine structure the image lost (a smoothness measure) and with the answer's
length, so distorted images get a positive, reproducible diagnostic loss without running a network.
"""

import numpy as np


class FakeDiagnosticModel:
    model_id = "fake-sharpness"
    revision = "1"

    def __init__(self, delay: float = 0.0, stall_after: int | None = None, stall_marker: str | None = None):
        self.calls = 0
        self.samples = 0
        self.delay = delay
        self.stall_after = stall_after  # after this many calls, write stall_marker and block until killed
        self.stall_marker = stall_marker

    def answer_nll(self, images, questions, answers):
        import time
        from pathlib import Path

        if self.stall_after is not None and self.calls >= self.stall_after:
            Path(self.stall_marker).write_text(str(self.calls))
            while True:  # a process killed at a known point, whatever the machine's speed
                time.sleep(1)
        self.calls += 1
        self.samples += len(images)
        time.sleep(self.delay)
        out = []
        for img, q, a in zip(images, questions, answers, strict=True):
            g = img.mean(axis=2) if img.ndim == 3 else img
            detail = np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()
            out.append(0.3 * len(a) + 2.0 / (0.05 + detail) + 0.01 * (len(q) % 7))
        return np.asarray(out)


class Stop(Exception):
    """Raised by `stop_past_half`: an interruption in the middle of a run."""


def stop_past_half(done: int, total: int) -> None:
    """A `run_labels` progress callback that interrupts the run once more than half of it is done."""
    if done > total // 2:
        raise Stop
