"""Helpers for the quality-gate tests: a live uvicorn server in a thread, configs, crafted images."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from medqm.serve import ServeConfig

IMG = 64
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "images"
DEMO_PNG = DEMO / "XR" / "xr-chest-c01.png"

# The shared server's limits are small so every limit can be hit with small files.
LIMITS = {"max_upload_bytes": 1 * 2**20, "max_files": 3, "max_pixels": 512 * 512}


class LiveServer:
    """A uvicorn server for ``app`` on a free loopback port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def make_config(checkpoint: Path, **kw) -> ServeConfig:
    base = {"model": checkpoint, "runtime": "torch", "num_threads": 1, "limits": LIMITS,
            "batching": {"window_ms": 30, "max_batch": 8}}
    return ServeConfig.model_validate({**base, **kw})


# --------------------------------------------------------------------------------------------------- test files


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width``×``height`` pixels, with almost no pixel data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------- gate files


def gate_threshold(pass_min: float | None, *, n_cases: int = 40, method: str = "ltt", alpha: float = 0.1,
                   delta: float = 0.1, risk: str = "lost-answer-rate"):
    """A calibrated threshold as `medqm.evaluate.gate.calibrate` would record it (numbers made up, consistent)."""
    from medqm.evaluate.gate import GateThreshold

    return GateThreshold(pass_min=pass_min, method=method, risk=risk, alpha=alpha,
                         delta=delta if method == "ltt" else None, n_cases=n_cases, n_images=3 * n_cases,
                         calibration_risk=0.05 if pass_min is not None else None,
                         pass_rate=0.7 if pass_min is not None else 0.0, grid=[0.05, 0.5, 0.95])


def write_gate(path: Path, default, by_modality=None, fallbacks=None, **kw) -> Path:
    """A gate file with these thresholds (`medqm.evaluate.gate.Gate.save`)."""
    from medqm.evaluate.gate import Gate

    gate = Gate(risk=default.risk, method=default.method, alpha=default.alpha, delta=default.delta, loss_cap=None,
                default=default, by_modality=dict(by_modality or {}), fallbacks=dict(fallbacks or {}),
                provenance={"labels": "synthetic", **kw})
    gate.save(path)
    return path
