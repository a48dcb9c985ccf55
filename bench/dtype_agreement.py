"""Agreement of MedQM-I scores under bfloat16 autocast with float32 (PyTorch on CPU), on the demo test set.

Prints one JSON line: max and mean absolute score difference, Spearman's ρ between the two runs, and each
run's SRCC with the labels. The images are the held-out rows of a training run's ``test_predictions.csv``
(``path`` and ``quality`` columns); the model is the checkpoint given (default: the shipped one).

    python bench/dtype_agreement.py --predictions runs/demo/latest/medqm-i/test_predictions.csv [--model CKPT]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--predictions", required=True, help="test_predictions.csv of a training run")
    ap.add_argument("--model", default=None, help="MedQM-I checkpoint folder (default: the shipped one)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import pandas as pd
    import torch
    from scipy.stats import spearmanr

    from medqm.io import read_image
    from medqm.model import Scorer

    torch.set_num_threads(args.threads)
    df = pd.read_csv(args.predictions)
    images = [read_image(p) for p in df["path"]]
    scores, seconds = {}, {}
    for dtype in ("float32", args.dtype):
        scorer = Scorer(args.model, runtime="torch", device=args.device, dtype=dtype, batch_size=args.batch_size)
        t0 = time.perf_counter()
        scores[dtype] = np.array([r.quality for r in scorer.score_pixels(images)])
        seconds[dtype] = time.perf_counter() - t0
    a, b = scores["float32"], scores[args.dtype]
    diff = np.abs(a - b)
    print(json.dumps({
        "bench": "dtype_agreement", "dtype": args.dtype, "device": args.device, "n_images": len(images),
        "model": args.model or "shipped default", "max_abs_diff": round(float(diff.max()), 6),
        "mean_abs_diff": round(float(diff.mean()), 6), "p99_abs_diff": round(float(np.quantile(diff, 0.99)), 6),
        "srcc_between": round(float(spearmanr(a, b).statistic), 6),
        "srcc_labels": {k: round(float(spearmanr(v, df["quality"]).statistic), 4) for k, v in scores.items()},
        "images_per_s": {k: round(len(images) / v, 1) for k, v in seconds.items()},
        "threads": args.threads, "load_avg_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
