"""Wall-clock time of `medqm evaluate --folds K` on a label set, in a fresh output folder; then of the rerun.

Runs the command as a user would (a separate process), reads the stage times it records in ``metrics.json``,
runs it again on the same folder (every model of every fold already trained: only the statistics and the report
are redone) and prints one JSON line: the wall-clock seconds of both runs, the stage times (features and training
per fold and model, baselines, metrics, gate, report), the pooled SRCC of every method with its interval, the
sizes, the thread count and the load average before and after (the machine may be shared).

    python bench/crossval.py --labels runs/demo/latest/labels                 # k = 5, 1 thread
    python bench/crossval.py --labels DIR --folds 3 --threads 2 --keep OUT   # keep the output folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", required=True, help="a `medqm label` output folder")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and BLAS threads) of the run")
    ap.add_argument("--keep", default=None, help="output folder to keep (default: a temporary one, deleted)")
    ap.add_argument("extra", nargs="*", help="more `medqm evaluate` options, after --")
    a = ap.parse_args()
    out = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="medqm-cv-")) / "cv"
    if out.exists():
        raise SystemExit(f"{out} exists; the benchmark needs a fresh folder")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "OPENBLAS_NUM_THREADS": str(a.threads), "MEDQM_CACHE": str(out.parent / "medqm-cache")}
    cmd = [sys.executable, "-m", "medqm.cli", "evaluate", "--labels", a.labels, "--out", str(out), "--folds",
           str(a.folds), "--threads", str(a.threads), *a.extra]
    load_before = os.getloadavg()
    try:
        first = run(cmd, env)
        second = run(cmd, env)
    finally:
        if not a.keep and not (out / "metrics.json").is_file():
            shutil.rmtree(out.parent, ignore_errors=True)
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))  # the rerun's: same figures, its timing
    training = {k: v["seconds"] for k, v in m["training"].items()}
    record = {
        "bench": "crossval", "labels": str(Path(a.labels).resolve()), "folds": a.folds, "threads": a.threads,
        "cpu_count": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "n_images": m["test_set"]["n_images"], "n_cases": m["test_set"]["n_cases"],
        "wall_s": round(first, 1), "rerun_wall_s": round(second, 1),
        "train_s": round(sum(training.values()), 1), "train_s_by_model": training,
        "rerun_timing_s": {k: round(v, 1) for k, v in m["timing"].items() if isinstance(v, (int, float))},
        "pooled_srcc": {n: [round(meth["overall"]["srcc"], 4) if meth["overall"].get("srcc") is not None else None,
                            meth["overall"].get("srcc_ci")] for n, meth in m["methods"].items()},
        "oracle_srcc": m["label_reliability"]["distortion_oracle"].get("srcc"),
    }
    print(json.dumps(record))
    if not a.keep:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
