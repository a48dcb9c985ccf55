"""Scoring and labelling rates on one GPU: every figure of issue 19's table, one command, one JSON line.

    python bench/gpu.py                       # on a machine with a CUDA GPU, ≤ 3 min on one H200
    python bench/gpu.py --device cpu --tiny   # the same code path at tiny sizes on a CPU (a check that it runs)

Without a CUDA device (and without ``--device cpu``) it prints ``{"bench": "gpu", "skipped": ...}`` and exits 0.

Figures (each section is timed on its own; a section that fails is named in ``errors`` and the rest still run):

- ``medqm_i_forward``: the MedQM-I checkpoint (default: the shipped one) alone on random 224² inputs already on
  the device: batch 512 in float32 and bfloat16 autocast, each with contiguous and channels-last inputs, and
  batch 1 in float32 (images/s).
- ``score_pixels``: `Scorer.score_pixels` on the demo images in memory, batch 64, float32, with and without
  heatmaps (the issue's 609 and 482 images/s: preprocessing one image at a time in the calling thread).
- ``end_to_end``: `Scorer.score_files` (what ``medqm score`` runs) over the demo PNGs, repeated to ~4,000 files,
  batch 256, bfloat16, with 0, 4, 8 and 16 reader workers (capped at the CPU count), beside the model-only rate
  of the same scorer (`Scorer.forward` on letterboxed batches). Goal: ≥ 5,000 images/s.
- ``standin_answer_nll``: the shipped stand-in VLM (``medqm-vlm-demo``) through
  ``medqm.label.hf.load_model(...).answer_nll``, batch 64, 128 and 256 (samples/s).
- ``qwen2_vl_2b_shaped``: a random Qwen2-VL with Qwen2-VL-2B's dimensions (`medqm.testing.vlm.build_qwen2_vl`,
  built on the device in bfloat16), 256² images, batch 128: answer_nll samples/s and the extra GPU memory of
  answer-only logits against full logits (`full_logit_nll`). Goal (issue 19): ≥ 2 × 157 samples/s, which
  needs the labelling-side work (image preprocessing in workers); this script measures the model as it is.

``--tiny`` shrinks every batch and model (for the CPU check); the figures are then not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from pathlib import Path

import numpy as np

E2E_GOAL = 5000.0
LABEL_GOAL = 2 * 157.0
TINY_QWEN = {"vision_depth": 2, "vision_embed_dim": 32, "vision_heads": 4, "vision_mlp_ratio": 2, "hidden_size": 64,
             "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 1000}
QUESTIONS = [("Is there a lesion in this image?", "yes"), ("Which modality is this image?", "ct"),
             ("Is the scan normal?", "no"), ("Where is the mass?", "left upper lung")]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, items_per_call: int, seconds: float, device, warmup: int = 2) -> float:
    """Items/s of ``fn()`` repeated for at least ``seconds`` (and at least twice), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
        _sync(device)
    return calls * items_per_call / (time.perf_counter() - t0)


def _demo_files(folder: str | None) -> list[Path]:
    from medqm.io import walk_image_files
    from medqm.io.collection import default_collection

    return list(walk_image_files(folder or default_collection() / "images"))


def forward_rates(model_dir, device, tiny: bool, seconds: float) -> dict:
    import torch

    from medqm.model.scoring import load_model

    model = load_model(model_dir, device=str(device)).eval()
    S = model.cfg.img_size
    big = 8 if tiny else 512
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = {"image_size": S, "batch": big}
    for dtype in ("float32", "bfloat16"):
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            m = model.to(memory_format=fmt)
            x = torch.rand(big, 3, S, S, generator=gen).to(device).contiguous(memory_format=fmt)
            ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                   else torch.autocast(device.type, enabled=False))

            def step(m=m, x=x, ctx=ctx):
                with torch.inference_mode(), ctx:
                    m(x)

            out[f"{dtype}_{layout}_images_per_s"] = round(_rate(step, big, seconds, device), 1)
    model = model.to(memory_format=torch.contiguous_format)
    x1 = torch.rand(1, 3, S, S, generator=gen).to(device)

    def one():
        with torch.inference_mode():
            model(x1)

    out["float32_batch1_images_per_s"] = round(_rate(one, 1, seconds, device, warmup=5), 1)
    return out


def score_pixels_rates(model_dir, device, files, tiny: bool, seconds: float) -> dict:
    from medqm.io import read_image
    from medqm.model import Scorer

    images = [read_image(f) for f in files[: 16 if tiny else len(files)]]
    scorer = Scorer(model_dir, device=str(device), runtime="torch", batch_size=8 if tiny else 64)
    out = {"batch": scorer.batch_size, "n_images": len(images)}
    for heat in (False, True):
        rate = _rate(lambda h=heat: scorer.score_pixels(images, heatmaps=h), len(images), seconds, device, warmup=1)
        out["heatmaps_images_per_s" if heat else "images_per_s"] = round(rate, 1)
    return out


def end_to_end_rates(model_dir, device, files, tiny: bool, seconds: float) -> dict:
    from medqm.model import Scorer
    from medqm.model.scoring import prepare_file

    batch = 8 if tiny else 256
    target = 32 if tiny else 4096
    pass_files = (files * (-(-target // len(files))))[:target]
    cpus = os.cpu_count() or 1
    counts = [0, 1, 2] if tiny else [0, 4, 8, 16]
    dtype = "bfloat16"
    out = {"batch": batch, "dtype": dtype, "files_per_pass": len(pass_files), "cpu_count": cpus, "workers": {}}
    base = Scorer(model_dir, device=str(device), runtime="torch", batch_size=batch, dtype=dtype)
    inputs = np.stack([p.input for f in files[:batch] for p in prepare_file(f, base.img_size)][:batch])
    out["model_only_images_per_s"] = round(_rate(lambda: base.forward(inputs), len(inputs), seconds, device), 1)
    for w in counts:
        if w > cpus:
            out["workers"][str(w)] = {"skipped": f"more workers than the {cpus} CPUs"}
            continue
        scorer = Scorer(model_dir, device=str(device), runtime="torch", batch_size=batch, dtype=dtype, workers=w)
        scorer.forward(inputs)  # warm-up: kernels, allocator
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:  # whole passes: worker start-up counts
            df = scorer.score_files(pass_files)
            n += len(df)
        rate = n / (time.perf_counter() - t0)
        out["workers"][str(w)] = {"images_per_s": round(rate, 1),
                                  "fraction_of_model": round(rate / out["model_only_images_per_s"], 3),
                                  "failed_rows": int((df.error != "").sum())}
    return out


def _vlm_inputs(files, n: int):
    from medqm.io import read_image, resize_pad

    imgs = [resize_pad(read_image(f).pixels, 256)[0].clip(0, 1) for f in files[: min(n, len(files))]]
    imgs = (imgs * (-(-n // len(imgs))))[:n]
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return imgs, [q for q, _ in qs], [a for _, a in qs]


def standin_rates(device, files, tiny: bool, seconds: float) -> dict:
    import medqm.label
    from medqm.label.hf import load_model

    folder = Path(medqm.label.__file__).resolve().parent / "models" / "medqm-vlm-demo"
    out = {"model": folder.name, "dtype": "float32"}
    for b in ([4, 8] if tiny else [64, 128, 256]):
        vlm = load_model(folder, device=str(device), batch_size=b)
        imgs, qs, ans = _vlm_inputs(files, 2 * b)
        rate = _rate(lambda v=vlm, i=imgs, q=qs, a=ans: v.answer_nll(i, q, a), len(imgs), seconds, device, warmup=1)
        out[f"batch{b}_samples_per_s"] = round(rate, 1)
    return out


def qwen2_vl_rates(device, files, tiny: bool, seconds: float) -> dict:
    import torch

    from medqm.label.hf import HFDiagnosticModel
    from medqm.testing.vlm import build_qwen2_vl

    batch = 4 if tiny else 128
    t0 = time.perf_counter()
    model, processor = build_qwen2_vl(TINY_QWEN if tiny else None, device=str(device), dtype="bfloat16")
    built = time.perf_counter() - t0
    vlm = HFDiagnosticModel(model, processor, model_id="qwen2-vl-2b-shaped-random", revision="random",
                            batch_size=batch)
    imgs, qs, ans = _vlm_inputs(files, batch)
    out = {"shape": "tiny" if tiny else "Qwen2-VL-2B", "dtype": "bfloat16", "image_size": 256, "batch": batch,
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "build_s": round(built, 1)}
    out["samples_per_s"] = round(_rate(lambda: vlm.answer_nll(imgs, qs, ans), batch, seconds, device, warmup=1), 1)
    if device.type == "cuda":
        for name, fn in (("answer_only", vlm.answer_nll), ("full_logits", vlm.full_logit_nll)):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            nll = fn(imgs, qs, ans)
            torch.cuda.synchronize(device)
            out[f"{name}_extra_gb"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 2)
            out[f"{name}_mean_nll"] = round(float(np.mean(nll)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny: a check that it runs)")
    ap.add_argument("--tiny", action="store_true", help="tiny batches and models (for a CPU check)")
    ap.add_argument("--model", default=None, help="MedQM-I checkpoint folder (default: the shipped one)")
    ap.add_argument("--folder", default=None, help="images for the scoring figures (default: the demo PNGs)")
    ap.add_argument("--seconds", type=float, default=None, help="timing per figure (default 2, tiny 0.3)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    args = ap.parse_args()

    import torch

    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu", "skipped": "no CUDA device here (torch.cuda.is_available() is False); "
                          "run `python bench/gpu.py --device cpu --tiny` to check the code path"}))
        return
    torch.manual_seed(0)
    seconds = args.seconds if args.seconds is not None else (0.3 if args.tiny else 2.0)
    files = _demo_files(args.folder)
    sections = {
        "medqm_i_forward": lambda: forward_rates(args.model, device, args.tiny, seconds),
        "score_pixels": lambda: score_pixels_rates(args.model, device, files, args.tiny, seconds),
        "end_to_end": lambda: end_to_end_rates(args.model, device, files, args.tiny, seconds),
        "standin_answer_nll": lambda: standin_rates(device, files, args.tiny, seconds),
        "qwen2_vl_2b_shaped": lambda: qwen2_vl_rates(device, files, args.tiny, seconds),
    }
    wanted = args.only.split(",") if args.only else list(sections)
    unknown = set(wanted) - set(sections)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(sections)}")
    result: dict = {"bench": "gpu", "tiny": args.tiny, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "n_demo_files": len(files)}
    errors, timing = {}, {}
    for name in wanted:
        t0 = time.perf_counter()
        try:
            result[name] = sections[name]()
        except Exception as e:  # one failing figure must not cost the others
            errors[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        timing[name] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    e2e = result.get("end_to_end", {}).get("workers", {})
    best_e2e = max((v.get("images_per_s", 0.0) for v in e2e.values()), default=None)
    label = result.get("qwen2_vl_2b_shaped", {}).get("samples_per_s")
    result["goals"] = {
        "end_to_end_images_per_s": E2E_GOAL, "best_end_to_end_images_per_s": best_e2e,
        "meets_end_to_end": None if args.tiny or best_e2e is None else best_e2e >= E2E_GOAL,
        "qwen2_vl_2b_samples_per_s": LABEL_GOAL,
        "meets_qwen2_vl_2b": None if args.tiny or label is None else label >= LABEL_GOAL,
    }
    result.update(errors=errors, section_seconds=timing, seconds=round(time.perf_counter() - t_start, 1),
                  load_avg_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
