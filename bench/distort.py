"""Throughput of every distortion type on 256×256 demo images, one process, one thread.

Prints one JSON line: images/s per type (median over levels 1–5 of the rate on a few images), the goal
(≥ 50/s, ≥ 5/s for the CT sinogram types) and which types miss it.

    python bench/distort.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from medqm.distort import create_distortion, list_distortions  # noqa: E402
from medqm.distort.calibration import reference_sample  # noqa: E402
from medqm.io.collection import default_collection  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    refs = reference_sample(default_collection(), n_per_modality=3, seed=0)
    rates, goals = {}, {}
    for name in list_distortions():
        d = create_distortion(name)
        imgs = [r for r in refs if d.applies_to(r.modality, color=r.is_color)][:3]
        d(imgs[0], 3, seed=0)  # warm-up (imports, caches)
        per_level = []
        for level in range(1, 6):
            t0 = time.perf_counter()
            count = 0
            for rep in range(args.repeats):
                for img in imgs:
                    d(img, level, seed=rep)
                    count += 1
            per_level.append(count / (time.perf_counter() - t0))
        rates[name] = round(float(np.median(per_level)), 1)
        goals[name] = 5.0 if d.family == "ct" else 50.0
    misses = sorted(n for n in rates if rates[n] < goals[n])
    print(json.dumps({
        "bench": "distort", "image_size": 256, "threads": 1, "cpu": platform.processor() or platform.machine(),
        "images_per_s": rates, "goal_images_per_s": goals, "misses": misses,
        "slowest": min(rates, key=rates.get),
    }))


if __name__ == "__main__":
    main()
