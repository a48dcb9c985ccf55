"""Scoring throughput and memory of MedQM-I beside BRISQUE, NIQE and PIQE, on the same 224×224 images.

Prints one JSON line: for each method, images/s batched and one image at a time, and the peak resident
memory of the process that ran it (each method runs in its own subprocess, so imports and models count
and nothing is shared). MedQM-I runs on ONNX Runtime (the default CPU runtime) and on eager PyTorch.
The goal: ≥ 60 images/s batched on two CPU cores, and never slower than BRISQUE.

``end_to_end``: `Scorer.score_files` (what ``medqm score`` runs) on a folder of demo PNGs, reading included,
with 0, 1 and 2 reader workers, beside the model-only rate of the same runtime (`Scorer.forward` on
letterboxed batches) and their ratio (goal: ≥ 0.9), in interleaved rounds (medians; the machine is shared).
``preprocess``: reading + windowing + letterboxing alone, in the calling thread and through the DataLoader
workers the scorer uses (1, 2), and the scaling.

    python bench/score.py [--model CKPT] [--n 64] [--threads 2] [--batch-size 32] [--folder data/demo/images]

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
E2E_GOAL = 0.9


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


def end_to_end(runtime: str, folder: str, model: str | None, threads: int, batch_size: int, workers: list[int],
               n_files: int, min_seconds: float, rounds: int) -> dict:
    """Model-only and end-to-end (files → score table) images/s of one runtime.

    The machine is shared, so the load drifts: each round times the model alone and then every worker count
    right after it, and a round's fractions compare rates taken within seconds of each other. Medians over
    the rounds are reported.
    """
    import torch

    from medqm.io import walk_image_files
    from medqm.model import Scorer
    from medqm.model.scoring import prepare_file

    torch.set_num_threads(threads)
    files = list(walk_image_files(folder))[:n_files]
    scorers = {w: Scorer(model, runtime=runtime, batch_size=batch_size, num_threads=threads, workers=w)
               for w in workers}
    first = scorers[workers[0]]
    inputs = np.stack([p.input for f in files[: 2 * batch_size] for p in prepare_file(f, first.img_size)])
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    for scorer in scorers.values():
        scorer.forward(batches[0])  # warm-up: session creation, one-off allocations
    model_rates, rates, fractions = [], {w: [] for w in workers}, {w: [] for w in workers}
    for _ in range(rounds):
        model_rate = _rate(first.forward, batches, min_seconds)
        model_rates.append(model_rate)
        for w, scorer in scorers.items():
            count, t0 = 0, time.perf_counter()
            while True:  # whole passes over the folder: worker start-up and the last partial batch count
                count += len(scorer.score_files(files))
                if time.perf_counter() - t0 >= min_seconds:
                    break
            rate = count / (time.perf_counter() - t0)
            rates[w].append(rate)
            fractions[w].append(rate / model_rate)
    return {"model_only_images_per_s": round(float(np.median(model_rates)), 1), "n_files": len(files),
            "rounds": rounds,
            "workers": {str(w): {"images_per_s": round(float(np.median(rates[w])), 1),
                                 "fraction_of_model": round(float(np.median(fractions[w])), 3),
                                 "fraction_per_round": [round(f, 3) for f in fractions[w]]} for w in workers}}


def preprocess_rates(folder: str, img_size: int, workers: list[int], min_seconds: float) -> dict:
    """Images/s of reading + letterboxing alone: in this thread (0) and through N DataLoader workers."""
    from torch.utils.data import DataLoader

    from medqm.io import walk_image_files
    from medqm.model.scoring import PreparedFiles, prepare_file, unpack_prepared

    files = list(walk_image_files(folder))
    out = {}
    for w in workers:
        count, t0 = 0, time.perf_counter()
        while True:
            if w == 0:
                count += sum(len(prepare_file(f, img_size)) for f in files)
            else:  # as Scorer.score_files sets it up (no heatmaps: the pixels stay in the workers)
                data = PreparedFiles(files, img_size, files_per_item=max(1, min(8, len(files) // (4 * w))),
                                     pixels=False)
                loader = DataLoader(data, batch_size=None, num_workers=w, collate_fn=lambda x: x, prefetch_factor=4)
                count += sum(len(unpack_prepared(item)) for item in loader)
            if time.perf_counter() - t0 >= min_seconds:
                break
        out[str(w)] = round(count / (time.perf_counter() - t0), 1)
    return out


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
    ap.add_argument("--folder", default=None, help="folder of images for the end-to-end and preprocessing rates "
                    "(default: the demo collection's PNGs)")
    ap.add_argument("--e2e-runtimes", default="onnx,torch", help="runtimes timed end to end ('' to skip)")
    ap.add_argument("--workers", default="0,1,2", help="reader worker counts timed end to end")
    ap.add_argument("--e2e-files", default="onnx:402,torch:48",
                    help="files scored per pass, per runtime (eager PyTorch is slow on a CPU)")
    ap.add_argument("--min-seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end rounds (medians reported)")
    ap.add_argument("--e2e", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.images, args.model, args.threads, args.batch_size, args.single)))
        return
    workers = [int(w) for w in args.workers.split(",")]
    n_files = {k: int(v) for k, v in (kv.split(":") for kv in args.e2e_files.split(","))}
    if args.e2e:
        print(json.dumps(end_to_end(args.e2e, args.folder, args.model, args.threads, args.batch_size, workers,
                                    n_files.get(args.e2e, 10**9), args.min_seconds, args.rounds)))
        return
    if args.folder is None:
        from medqm.io.collection import default_collection

        args.folder = str(default_collection() / "images")

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npy"
        np.save(images, _images(args.n))
        model = args.model
        if model is None:
            from medqm.model import create_model

            model = str(create_model("medqm_i").eval().save_pretrained(Path(tmp) / "medqm-i-untrained"))
        results, errors = {}, {}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for method in filter(None, args.methods.split(",")):
            cmd = [sys.executable, __file__, "--worker", method, "--images", str(images), "--model", model,
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--single", str(args.single)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode == 0:
                results[method] = json.loads(r.stdout.strip().splitlines()[-1])
            else:
                errors[method] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        e2e = {}
        for runtime in filter(None, args.e2e_runtimes.split(",")):
            cmd = [sys.executable, __file__, "--e2e", runtime, "--folder", args.folder, "--model", model,
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--workers", args.workers,
                   "--e2e-files", args.e2e_files, "--min-seconds", str(args.min_seconds), "--rounds", str(args.rounds)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode == 0:
                e2e[runtime] = json.loads(r.stdout.strip().splitlines()[-1])
            else:
                errors[f"end_to_end-{runtime}"] = (r.stderr.strip().splitlines()[-1] if r.stderr.strip()
                                                   else f"exit {r.returncode}")
    prep = preprocess_rates(args.folder, SIZE, sorted({0, *workers}), args.min_seconds)
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
        "folder": args.folder, "end_to_end": e2e,
        "end_to_end_goal_fraction": E2E_GOAL,
        "meets_end_to_end_goal": {rt: max(v["fraction_of_model"] for v in d["workers"].values()) >= E2E_GOAL
                                  for rt, d in e2e.items()},
        "preprocess_images_per_s": {"workers": prep,
                                    "scaling_2_over_1": (round(prep["2"] / prep["1"], 2)
                                                         if "1" in prep and "2" in prep else None)},
    }))


if __name__ == "__main__":
    main()
