"""Load test of the quality gate (`medqm serve`) on loopback: micro-batching on vs off, and overload, in one run.

For each mode a fresh server process starts (`python -m medqm.cli serve`), is warmed up, and then
``--clients`` concurrent clients post one image each, back to back over keep-alive connections, for
``--duration`` seconds. Prints one JSON line: per mode requests/s, p50/p95/p99 latency as the client sees it
(and the server's own ``total_ms``), the answers by HTTP status, errors (4xx, 5xx, transport failures), the
mean model batch size the server reported, and the server's resident memory before and after the load and
at its peak.

The ``overload`` mode (batching on) sends ``--overload-clients`` clients against a queue of
``--overload-queue`` images: the service must answer only 200 or 503 (``Retry-After``), never another 5xx
or a dropped connection, and its memory must stay bounded. Its clients retry at once after a 503 (the
worst case: they ignore ``Retry-After``), or with ``--honour-retry-after`` wait as told.

    python bench/serve_load.py [--clients 50] [--duration 60] [--model CKPT] [--image FILE] [--modes on,off]
    python bench/serve_load.py --modes overload --overload-clients 200 --overload-queue 16 --duration 30

The clients are a plain asyncio HTTP/1.1 loop that sends one pre-built multipart request, so that the load
generator, which shares the machine, costs far less CPU than the server it measures. Without ``--model``
the shipped checkpoint is used, or, when there is none, an untrained 224×224 MedQM-I (speed does not depend
on the weights). Bounded: each mode ends ``--duration`` seconds after its warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / "data" / "demo" / "images" / "XR" / "xr-chest-c01.png"
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory of a live process, MiB: now (``VmRSS``) or at its peak (``VmHWM``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _model(arg: str | None, tmp: Path) -> str:
    if arg:
        return arg
    from medqm.model import create_model
    from medqm.model.scoring import default_checkpoint

    try:
        return str(default_checkpoint())
    except FileNotFoundError:
        return str(create_model("medqm_i", pretrained_backbone=False).eval().save_pretrained(tmp / "medqm-i-untrained"))


def _score_request(port: int, image: bytes, name: str) -> bytes:
    """One complete ``POST /v1/score`` (multipart, one file), built once and sent again and again."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _exchange(reader, writer, request: bytes) -> tuple[int, bytes, bool, float]:
    """Send ``request``; read the response: (status, body, whether the server keeps the connection open,
    its ``Retry-After`` in seconds or 0)."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, keep, retry_after = 0, True, 0.0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        key = key.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "connection" and value.strip().lower() == "close":
            keep = False
        elif key == "retry-after":
            retry_after = float(value)
    return status, await reader.readexactly(length), keep, retry_after


async def _load(port: int, request: bytes, clients: int, duration: float, honour_retry_after: bool = False) -> dict:
    latencies: list[float] = []
    server_ms: list[float] = []
    batch_sizes: list[int] = []
    errors = {"http_4xx": 0, "http_503": 0, "http_5xx_other": 0, "transport": 0}
    statuses: dict[str, int] = {}  # every answer by HTTP status
    kinds: dict[str, int] = {}  # transport failures by exception type
    stop_at = time.perf_counter() + duration

    async def one_client():
        conn = None
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(HOST, port)
                status, body, keep, retry_after = await asyncio.wait_for(_exchange(*conn, request), 120)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                errors["transport"] += 1
                kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - t0)
                out = json.loads(body)
                server_ms.append(out["total_ms"])
                batch_sizes.append(out["results"][0]["timing"]["batch_size"])
            else:
                errors["http_503" if status == 503 else "http_5xx_other" if status >= 500 else "http_4xx"] += 1
                if honour_retry_after and retry_after:
                    await asyncio.sleep(min(retry_after, max(0.0, stop_at - time.perf_counter())))
            if not keep:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    lat, srv = np.asarray(latencies) * 1000.0, np.asarray(server_ms)

    def pct(a, p):
        return round(float(np.percentile(a, p)), 1) if len(a) else None

    n_err = sum(errors.values())
    return {
        "requests": len(latencies) + n_err, "ok": len(latencies), "errors": n_err, **errors,
        "statuses": dict(sorted(statuses.items())),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
        "server_p50_ms": pct(srv, 50), "server_p95_ms": pct(srv, 95), "server_p99_ms": pct(srv, 99),
        "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
        **({"transport_kinds": kinds} if kinds else {}),
    }


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _start_server(args, model: str, batching: bool, env: dict, tmp: Path,
                  max_queue: int | None = None) -> tuple[subprocess.Popen, int]:
    """A `medqm serve` process on a free port, once its ``/healthz`` answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "medqm.cli", "serve", "--model", model, "--port", str(port), "--log-level", "warning",
           "--runtime", args.runtime, "--batching" if batching else "--no-batching",
           "--batch-window-ms", str(args.window_ms), "--max-batch", str(args.max_batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if max_queue is not None:  # through a config file: the setting every deployment has
        cfg = tmp / f"gate-{port}.json"
        cfg.write_text(json.dumps({"batching": {"max_queue": max_queue}, "limits": {"max_files": min(max_queue, 16)}}))
        cmd += ["--config", str(cfg)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"server exited ({server.returncode}): {server.stderr.read()[-2000:]}")
        try:
            _get_json(f"http://{HOST}:{port}/healthz")
            return server, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("server did not start in time")
        time.sleep(0.25)


def run_mode(mode: str, args, model: str, image: bytes, env: dict, tmp: Path) -> dict:
    """One mode: ``on`` or ``off`` (micro-batching), or ``overload`` (batching on, a small queue, many clients)."""
    overload = mode == "overload"
    server, port = _start_server(args, model, mode != "off", env, tmp, args.overload_queue if overload else None)
    url = f"http://{HOST}:{port}"
    try:
        request = _score_request(port, image, Path(args.image).name)
        rss_started = _rss_mb(server.pid)
        asyncio.run(_load(port, request, min(args.clients, 8), args.warmup))  # warm-up: sessions, allocations
        rss_before = _rss_mb(server.pid)
        clients = args.overload_clients if overload else args.clients
        result = asyncio.run(_load(port, request, clients, args.duration, args.honour_retry_after))
        health = _get_json(url + "/healthz")
        result.update(rss_started_mb=rss_started, rss_before_mb=rss_before, rss_after_mb=_rss_mb(server.pid),
                      server_peak_rss_mb=_rss_mb(server.pid, "VmHWM"), runtime=_get_json(url + "/v1/model")["runtime"],
                      queue_capacity=health["queue_capacity"], queued_after=health["queued"])
        if overload:
            result.update(clients=args.overload_clients, honour_retry_after=args.honour_retry_after)
            result["only_200_and_503"] = set(result["statuses"]) <= {"200", "503"} and result["transport"] == 0
        return result
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of light load before measuring")
    ap.add_argument("--model", default=None, help="MedQM-I checkpoint (default: shipped, else an untrained one)")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE), help="the image every client posts")
    ap.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"))
    ap.add_argument("--threads", type=int, default=None, help="server model threads (default: the runtime's choice)")
    ap.add_argument("--window-ms", type=float, default=5.0, help="micro-batching window")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--modes", default="on,off,overload",
                    help="modes to measure, in order: on, off (micro-batching), overload (a small queue, many clients)")
    ap.add_argument("--overload-clients", type=int, default=200, help="concurrent clients of the overload mode")
    ap.add_argument("--overload-queue", type=int, default=16, help="the server's queue (images) in the overload mode")
    ap.add_argument("--honour-retry-after", action="store_true",
                    help="clients wait a 503's Retry-After before the next request (default: retry at once)")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    args = ap.parse_args()
    if args.clients < 1 or args.duration <= 0:
        ap.error("--clients must be >= 1 and --duration > 0")
    modes = [m.strip() for m in args.modes.split(",")]
    if not modes or set(modes) - {"on", "off", "overload"}:
        ap.error(f"--modes takes on, off, overload or several of them, comma-separated; got {args.modes!r}")
    image = Path(args.image).read_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        model = _model(args.model, Path(tmp))
        # ONNX exports go to a private cache that both servers read
        env = {**os.environ, "MEDQM_CACHE": os.environ.get("MEDQM_CACHE") or str(Path(tmp) / "cache")}
        if args.runtime != "torch":  # export the ONNX graph here, so neither server's peak memory includes it
            from medqm.model.scoring import Scorer

            os.environ["MEDQM_CACHE"] = env["MEDQM_CACHE"]
            Scorer(model, runtime=args.runtime)
        results = {m if m == "overload" else f"batching_{m}": run_mode(m, args, model, image, env, Path(tmp))
                   for m in modes}
    on, off = (results.get(f"batching_{m}", {}).get("requests_per_s") for m in ("on", "off"))
    print(json.dumps({
        "bench": "serve_load", "clients": args.clients, "duration_s": args.duration, "image": Path(args.image).name,
        "model": args.model or "default (shipped, else untrained medqm_i 224)", "window_ms": args.window_ms,
        "max_batch": args.max_batch, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2), **results,
        "speedup_requests_per_s": round(on / off, 2) if on and off else None,
        "server_errors": sum(m["http_5xx_other"] + m["transport"] for m in results.values()),  # 503 is not one
    }))


if __name__ == "__main__":
    main()
