"""Speed and memory of answer-NLL scoring with the Hugging Face backend on tiny random models (CPU).

Prints one JSON line:

- ``labels_per_s``: `HFDiagnosticModel.answer_nll` throughput (samples/s, median of a few runs) with the tiny
  LLaVA model, batch 8, 256×256 images (half grey, half RGB), short questions and answers, one thread;
- ``memory``: peak resident memory of scoring a batch of 4 prompts of ≥ 512 tokens on a tiny LLaVA whose
  embedding and LM head have 150k rows, answer-only logits (the backend) vs logits at every position then
  log-softmax and gather (`HFDiagnosticModel.full_logit_nll`). Each variant runs in a fresh subprocess that
  reports its own ``ru_maxrss`` after loading the model (``baseline_mb``) and after scoring (``peak_mb``);
  ``ratio`` compares the scoring increments (peak − baseline, goal ≥ 5), ``ratio_total`` the whole
  processes' peaks. ``max_abs_nll_diff`` is the largest difference between the two variants' NLLs (≈ 0).

    python bench/label.py [--samples 64] [--threads 1]
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

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

_WORDS = (
    "is there a lesion in the left upper lung of this chest ct image and does the scan show any nodule "
    "mass effusion fracture or edema in the axial coronal or sagittal plane of the brain abdomen pelvis spine"
).split()


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.random((size, size) if i % 2 == 0 else (size, size, 3)).astype(np.float32) for i in range(n)
    ]


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_child(model_dir: str, variant: str, prompt_tokens: int, batch: int) -> None:
    """Run one variant in this (fresh) process and print its measurements as JSON."""
    import torch

    from medqm.label.hf import load_model

    torch.set_num_threads(1)
    m = load_model(model_dir, batch_size=batch)
    # a question long enough that every sequence holds ≥ prompt_tokens text tokens before its answer
    n_words = 16
    while True:
        question = " ".join((_WORDS * (n_words // len(_WORDS) + 1))[:n_words])
        prompt, answer_ids = m._split(question, "no")
        if len(m.tokenizer(prompt)["input_ids"]) >= prompt_tokens:
            break
        n_words += 16
    questions = [question] * batch
    answers = ["no", "yes there is a small nodule", "axial", "left upper lung"][:batch]
    answers += ["no"] * (batch - len(answers))
    images = _images(batch, 256, seed=1)
    m.answer_nll(images[:1], ["Is there a lesion?"], ["no"])  # warm-up on a short input (allocator, caches)
    process_peak_before = _max_rss_mb()
    # the peak of this call alone: reset the high-water mark to the current RSS, read it back afterwards;
    # without /proc, fall back to the process's ru_maxrss (the load's own peak then hides small increments)
    exact = _reset_peak_rss()
    baseline = _proc_status_mb("VmRSS") if exact else process_peak_before
    t0 = time.perf_counter()
    fn = m.answer_nll if variant == "answer_only" else m.full_logit_nll
    nll = fn(images, questions, answers)
    seconds = time.perf_counter() - t0
    peak = _proc_status_mb("VmHWM") if exact else _max_rss_mb()
    from medqm.label.hf import to_pil

    seq = int(m._encode([to_pil(images[0], 0)], [prompt], [answer_ids]).inputs["input_ids"].shape[1])
    print(json.dumps({
        "variant": variant, "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
        "process_peak_mb": round(max(_max_rss_mb(), process_peak_before), 1), "peak_method":
        "VmHWM after clear_refs" if exact else "ru_maxrss",
        "seconds": round(seconds, 3), "seq_len": seq, "nll": nll.tolist(),
        "vocab": int(m.model.get_output_embeddings().weight.shape[0]),
    }))


def _run_child(model_dir: Path, variant: str, args) -> dict:
    cmd = [
        sys.executable, __file__, "--_child", variant, "--_model-dir", str(model_dir),
        "--prompt-tokens", str(args.prompt_tokens), "--mem-batch", str(args.mem_batch),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64, help="samples per throughput run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--mem-batch", type=int, default=4)
    ap.add_argument("--_child", choices=["answer_only", "full_logits"], help=argparse.SUPPRESS)
    ap.add_argument("--_model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        _memory_child(args._model_dir, args._child, args.prompt_tokens, args.mem_batch)
        return

    import torch

    from medqm.label.hf import load_model
    from medqm.testing import build_tiny_vlm

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # (a) throughput
        m = load_model(build_tiny_vlm("llava", Path(tmp) / "tiny-llava"), batch_size=8)
        images = _images(args.samples, 256, seed=0)
        questions = [["Is there a lesion?", "What modality is this image?", "Which plane is shown?"][i % 3]
                     for i in range(args.samples)]
        answers = [["no", "ct", "axial plane", "yes"][i % 4] for i in range(args.samples)]
        m.answer_nll(images[:8], questions[:8], answers[:8])  # warm-up
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m.answer_nll(images, questions, answers)
            rates.append(args.samples / (time.perf_counter() - t0))

        # (b) memory, one fresh process per variant
        wide = build_tiny_vlm("llava", Path(tmp) / "tiny-llava-150k", vocab_size=args.vocab)
        res = {v: _run_child(wide, v, args) for v in ("answer_only", "full_logits")}
    a, f = res["answer_only"], res["full_logits"]
    inc_a, inc_f = a["peak_mb"] - a["baseline_mb"], f["peak_mb"] - f["baseline_mb"]
    print(json.dumps({
        "bench": "label", "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "labels_per_s": round(float(np.median(rates)), 1),
        "labels_per_s_setup": {"model": "tiny llava (random)", "batch": 8, "image_size": 256,
                               "samples": args.samples, "repeats": args.repeats},
        "memory": {
            "vocab": a["vocab"], "batch": args.mem_batch, "seq_len_answer_no": a["seq_len"],
            "answer_only": {**{k: a[k] for k in ("baseline_mb", "peak_mb", "process_peak_mb", "seconds")},
                            "scoring_mb": round(inc_a, 1)},
            "full_logits": {**{k: f[k] for k in ("baseline_mb", "peak_mb", "process_peak_mb", "seconds")},
                            "scoring_mb": round(inc_f, 1)},
            "peak_method": a["peak_method"],
            # scoring_mb = peak RSS during the call − RSS before it; floored at 1 MB for the ratio
            "ratio": round(inc_f / max(inc_a, 1.0), 1),
            "ratio_total": round(f["process_peak_mb"] / a["process_peak_mb"], 2),
            "goal_ratio": 5.0,
            "max_abs_nll_diff": float(np.max(np.abs(np.array(a["nll"]) - np.array(f["nll"])))),
        },
    }))


if __name__ == "__main__":
    main()
