"""Wall-clock time of `medqm demo`, stage by stage, on a fresh output folder; then of the cached rerun.

Runs ``medqm demo`` as a user would (a separate process, every CPU core unless ``--threads``), reads the
stage times it records in ``OUT/demo.json``, runs it a second time on the same folder (every stage reused),
and prints one JSON line: seconds per stage and in total, the process's wall-clock time (imports included),
the rerun's, the sizes (images distorted and labelled, VLM throughput) and whether the run kept within the
budget (``make demo``: 15 minutes on a 2-core machine without GPU; ``--quick``: the end-to-end test's 3 minutes).
Run it on an otherwise idle machine.

    python bench/demo.py                  # the full demo (what `make demo` runs)
    python bench/demo.py --quick          # the quick preset (what the end-to-end test runs)
    python bench/demo.py --model DIR      # another diagnostic VLM; --keep to keep the output folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = {"full": 15 * 60, "quick": 3 * 60}  # `make demo` on 2 cores; the end-to-end test in `make test`


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick preset")
    ap.add_argument("--model", default=None, help="diagnostic VLM folder (default: the shipped stand-in)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", default=None, help="output folder; must not exist (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the output folder")
    args = ap.parse_args()

    if args.out:
        out = Path(args.out)
        if out.exists():
            raise SystemExit(f"--out {out} exists; the benchmark needs a fresh folder")
    else:
        out = Path(tempfile.mkdtemp(prefix="medqm-demo-bench-")) / "demo"
    cmd = [sys.executable, "-m", "medqm.cli", "demo", "--out", str(out)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    try:
        wall = run(cmd)
        record = json.loads((out / "demo.json").read_text(encoding="utf-8"))
        rerun = run(cmd)
        rerun_record = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    finally:
        if not args.keep:
            shutil.rmtree(out if args.out else out.parent, ignore_errors=True)
    stages = record["stages"]
    seconds = record["seconds"]
    print(json.dumps({
        "bench": "demo", "preset": record["config"]["preset"], "threads": args.threads or os.cpu_count(),
        "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "stages_s": {k: v for k, v in seconds.items() if k != "total"}, "total_s": seconds["total"],
        "wall_s": round(wall, 2), "rerun_wall_s": round(rerun, 2), "rerun_total_s": rerun_record["seconds"]["total"],
        "rerun_all_reused": all(s["cached"] for s in rerun_record["stages"].values()),
        "reference_images": stages["select"]["summary"]["images"],
        "distorted_images": stages["distort"]["summary"]["images"],
        "labelled_images": stages["label"]["summary"]["rows"],
        "label_images_per_s": stages["label"]["summary"]["images_per_s"],
        "questions_per_image": stages["label"]["summary"]["questions_per_image"],
        "label_model": stages["label"]["summary"]["model_id"],
        "test_images": stages["evaluate"]["summary"]["test_images"],
        "budget_s": BUDGET_S[record["config"]["preset"]], "within_budget": wall <= BUDGET_S[record["config"]["preset"]],
        "out": str(out) if args.keep else None,
    }))


if __name__ == "__main__":
    main()
