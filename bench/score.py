"""Scoring throughput and memory of MedQM-I beside BRISQUE, NIQE and PIQE, on the same 224×224 images.

Prints one JSON line: for each method, images/s batched and one image at a time, and the peak resident
memory of the process that ran it (each method runs in its own subprocess, so imports and models count
and nothing is shared). MedQM-I runs on ONNX Runtime (the default CPU runtime) and on eager PyTorch.
The goal: ≥ 60 images/s batched on two CPU cores, and never slower than BRISQUE.

    python bench/score.py [--model CKPT] [--n 64] [--threads 2] [--batch-size 32]

Without ``--model`` an untrained MedQM-I with the ImageNet backbone is measured (speed does not depend on
the weights). BRISQUE, NIQE and PIQE are medqm's reference-exact NumPy implementations (medqm.evaluate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 224
GOAL = 60.0


def _images(n: int) -> np.ndarray:
    """``n`` demo images (every modality), letterboxed to 224×224×3 float32 in [0, 1]."""
    from medqm.distort.calibration import reference_sample
    from medqm.io.collection import default_collection
    from medqm.model.scoring import preprocess

    refs = reference_sample(default_collection(), n_per_modality=max(1, -(-n // 7)), seed=0)
    imgs = [preprocess(r, SIZE)[0].transpose(1, 2, 0) for r in refs]
    while len(imgs) < n:
        imgs += imgs
    return np.stack(imgs[:n]).astype(np.float32)


def _rate(fn, items, min_seconds: float = 5.0) -> float:
    """Images per second of ``fn`` over ``items`` (lists of images), repeated until ``min_seconds`` have passed."""
    count, t0 = 0, time.perf_counter()
    while True:
        for it in items:
            fn(it)
            count += len(it)
        if time.perf_counter() - t0 >= min_seconds:
            break
    return count / (time.perf_counter() - t0)


def worker(method: str, images_path: str, model: str | None, threads: int, batch_size: int, n_single: int) -> dict:
    imgs = np.load(images_path)
    gray = (np.isclose(imgs[..., 0], imgs[..., 1]).all(axis=(1, 2))
            & np.isclose(imgs[..., 1], imgs[..., 2]).all(axis=(1, 2)))
    as_images = [im[..., 0] if g else im for im, g in zip(imgs, gray, strict=True)]
    batches = [as_images[i : i + batch_size] for i in range(0, len(as_images), batch_size)]
    singles = [[im] for im in as_images[:n_single]]
    if method.startswith("medqm"):
        import torch

        from medqm.model import Scorer

        torch.set_num_threads(threads)

        runtime = method.split("-", 1)[1]
        scorer = Scorer(model, runtime=runtime, batch_size=batch_size, num_threads=threads)
        fn = scorer.score_pixels
    else:  # a classical baseline: one image at a time (they have no batched form)
        from medqm.evaluate import create_baseline

        metric = create_baseline(method)

        def fn(batch):
            return [metric(b) for b in batch]
    fn(batches[0])  # warm-up: imports, session creation, one-off allocations
    batch_rate = _rate(fn, batches)
    single_rate = _rate(fn, singles)
    return {"batch_images_per_s": round(batch_rate, 1), "single_images_per_s": round(single_rate, 1),
            "peak_rss_mb": round(_peak_rss_kb() / 1024, 1)}


def _peak_rss_kb() -> int:
    """This process's peak resident memory. VmHWM belongs to the process's own memory map; getrusage's
    ru_maxrss would also count the parent's size at fork, which Linux carries across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="MedQM-I checkpoint folder (default: an untrained medqm_i)")
    ap.add_argument("--n", type=int, default=64, help="images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--single", type=int, default=16, help="images timed one at a time")
    ap.add_argument("--methods", default="medqm-onnx,medqm-torch,brisque,niqe,piqe")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.images, args.model, args.threads, args.batch_size, args.single)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npy"
        np.save(images, _images(args.n))
        model = args.model
        if model is None:
            from medqm.model import create_model

            model = str(create_model("medqm_i").eval().save_pretrained(Path(tmp) / "medqm-i-untrained"))
        results, errors = {}, {}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, "--images", str(images), "--model", model,
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--single", str(args.single)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode == 0:
                results[method] = json.loads(r.stdout.strip().splitlines()[-1])
            else:
                errors[method] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    best = max((results[m]["batch_images_per_s"] for m in results if m.startswith("medqm")), default=None)
    brisque_rate = results.get("brisque", {}).get("batch_images_per_s")
    load = os.getloadavg()[0]
    print(json.dumps({
        "bench": "score", "image_size": SIZE, "n_images": args.n, "threads": args.threads,
        "batch_size": args.batch_size,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "load_avg_1min": round(load, 2),
        "model": args.model or "untrained medqm_i (speed only)", "methods": results, "errors": errors,
        "goal_batch_images_per_s": GOAL, "meets_goal": bool(best and best >= GOAL),
        "faster_than_brisque": bool(best and brisque_rate and best >= brisque_rate),
    }))


if __name__ == "__main__":
    main()
