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

``--definitions OUT`` instead compares the MedQM-D label definitions (docs/medqm-d.md, "Choosing the label
definition"): one reference image per case of the bundled collection (``--cases``, spread over the
modalities), distorted by three generic types at levels 1, 3, 5, labelled with the shipped stand-in VLM
under nll, kl T=1 and kl T=3, each with 1 and ``--views`` views, through `run_labels` (every triple is
scored once and shared by the six label sets, so the figures equal those of six `medqm label` runs up to
float32 rounding). Prints one JSON line per label set with its ``reliability.json`` figures.

    python bench/label.py --definitions runs/definitions [--cases 8] [--views 2] [--threads 2]

``--all-choices`` instead measures `--loss kl` scoring on the shipped stand-in VLM (`medqm.label.standin.DEMO_VLM_DIR`):
``--images`` demo images (one per case, spread over the modalities), every choice of each of their demo questions
(`LabelDefinition(loss='kl').answers`) on each of ``--views`` views, cut into calls as `LocalScorer` does
(`image_chunks`, 32 samples), scored by the per-sample path (``share_prefix=False``: the whole model, vision tower
included, per sample) and by the grouped path (one prefill of the common prompt prefix per image, see
`medqm.label.hf`) in the same process, alternating, median of ``--repeats`` runs each; then the same for
``--loss nll`` (the correct answers only). Prints one JSON line with, per loss, both throughputs (samples/s), the
speed-up, the time per image and view, and the largest absolute NLL difference between the two paths, and what kl
costs over nll with each path.

    python bench/label.py --all-choices [--images 16] [--views 1] [--threads 1] [--repeats 3]
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


DEFINITIONS = {"nll": {"loss": "nll"}, "kl-T1": {"loss": "kl", "temperature": 1.0},
               "kl-T3": {"loss": "kl", "temperature": 3.0}}
DEFINITION_PLAN = {"name": "definitions", "types": ["gaussian_noise", "gaussian_blur", "jpeg"], "levels": [1, 3, 5],
                   "seeds": 1}


def _definitions(out: Path, cases: int, views: int, batch_size: int) -> None:
    """The reliability figures of each label definition on one small distorted subset of the demo collection."""
    from medqm.cli.label import default_model
    from medqm.distort.plan import Plan, run_plan
    from medqm.io.collection import default_collection, load_manifest
    from medqm.label.hf import load_model
    from medqm.label.runner import LocalScorer, run_labels
    from medqm.label.tasks import demo_questions

    out.mkdir(parents=True, exist_ok=True)
    df = load_manifest(default_collection()).sort_values("id")
    first = df.groupby("case_id", sort=True).head(1)  # one reference image per case
    order = first.assign(k=first.groupby("modality").cumcount()).sort_values(["k", "modality", "case_id"])
    sub = order.head(cases).drop(columns=["k"])
    sub = sub.assign(path=[str(Path(a).resolve()) for a in sub.abs_path]).drop(columns=["abs_path"])
    (out / "collection").mkdir(exist_ok=True)
    sub.to_csv(out / "collection" / "manifest.csv", index=False)
    run_plan(out / "collection", Plan(**DEFINITION_PLAN), out / "distorted", workers=1)
    items = demo_questions(default_collection())
    model = load_model(str(default_model()), batch_size=batch_size)
    base, memo = LocalScorer(model, chunk=32), {}
    timing = {"scored": 0, "seconds": 0.0}
    store = out / "scores.jsonl"  # every score, appended as it is made: a rerun continues where one stopped
    if store.is_file():
        for line in store.read_text().splitlines():
            *key, v = json.loads(line)
            memo[tuple(key)] = v

    def scorer(triples, errors):  # each distinct (image, view, question, answer) scored once for all sets
        todo = [t[1:] for t in triples if t[1:] not in memo]
        t0 = time.perf_counter()
        kept, nll = base([("memo", *t) for t in dict.fromkeys(todo)], errors)
        timing["seconds"] += time.perf_counter() - t0
        timing["scored"] += len(kept)
        if todo:
            print(f"scored {timing['scored']} triples in {timing['seconds']:.0f} s", file=sys.stderr, flush=True)
        memo.update((t[1:], v) for t, v in zip(kept, nll, strict=True))
        with store.open("a") as f:
            f.writelines(json.dumps([*t[1:], float(v)]) + "\n" for t, v in zip(kept, nll, strict=True))
        done = [t for t in triples if t[1:] in memo]
        return done, np.array([memo[t[1:]] for t in done], dtype=np.float64)

    for k in sorted({1, views}, reverse=True):  # the most views first: the others reuse its scores
        for name in ("kl-T1", "kl-T3", "nll"):
            s = run_labels(items, model, out / f"{name}-views{k}", distorted=out / "distorted", scorer=scorer,
                           shard_size=1, views=k, **DEFINITIONS[name])
            rel = s.reliability or {}
            mono, oracle = rel.get("severity_monotonicity", {}), rel.get("oracle_loco", {})
            print(json.dumps({"definition": name, "views": k, "rows": s.rows,
                              "oracle_loco_srcc": round(oracle.get("srcc", float("nan")), 3),
                              "oracle_cases": oracle.get("n_cases"),
                              "monotonicity_mean_rho": round(mono.get("mean_rho", float("nan")), 3),
                              "series": mono.get("n_series"), "flat_series": mono.get("n_flat"),
                              "test_retest": {a: round(b, 3) if a != "n_images" else b
                                              for a, b in (rel.get("test_retest") or {}).items()},
                              "scored_triples": timing["scored"], "scoring_s": round(timing["seconds"], 1)}),
                  flush=True)


def _all_choices(n_images: int, views: int, batch_size: int, repeats: int, threads: int) -> None:
    """Per-sample vs grouped (shared prompt prefix) scoring of every choice, on the stand-in VLM."""
    import torch

    from medqm.io import read_image
    from medqm.io.collection import default_collection, load_manifest
    from medqm.label.hf import HFDiagnosticModel, load_model
    from medqm.label.runner import LabelDefinition, apply_view, image_chunks
    from medqm.label.standin import DEMO_VLM_DIR
    from medqm.label.tasks import demo_questions

    demo = default_collection()
    df = load_manifest(demo).sort_values("id")
    first = df.groupby("case_id", sort=True).head(1)  # one image per case, modalities interleaved
    order = first.assign(k=first.groupby("modality").cumcount()).sort_values(["k", "modality", "case_id"])
    chosen = list(order.id.head(n_images))
    by_image: dict[str, list] = {}
    for it in demo_questions(demo):
        if it.image_id in chosen:
            by_image.setdefault(it.image_id, []).append(it)
    pixels = {image_id: read_image(by_image[image_id][0].image).pixels for image_id in chosen}
    grouped = load_model(DEMO_VLM_DIR, batch_size=batch_size)
    per_sample = HFDiagnosticModel(grouped.model, grouped.processor, model_id=grouped.model_id,
                                   revision=grouped.revision, batch_size=batch_size, share_prefix=False)

    def workload(loss: str) -> tuple[list, list, list]:
        definition = LabelDefinition(loss=loss, views=views)
        images, questions, answers = [], [], []
        for image_id in chosen:
            its = by_image[image_id]
            view_pixels = [apply_view(pixels[image_id], v) for v in range(views)]  # one array per view
            for t in definition.triples(image_id, its[0].image, its):
                images.append(view_pixels[t[4]])
                questions.append(t[2])
                answers.append(t[3])
        return images, questions, answers

    def measure(loss: str) -> dict:
        images, questions, answers = workload(loss)
        chunks = image_chunks(images, 32)  # the calls LocalScorer makes

        def run(m) -> tuple[float, np.ndarray]:
            t0 = time.perf_counter()
            nll = np.concatenate([m.answer_nll(images[a:b], questions[a:b], answers[a:b]) for a, b in chunks])
            return time.perf_counter() - t0, nll

        for m in (per_sample, grouped):  # warm-up
            m.answer_nll(images[:24], questions[:24], answers[:24])
        seconds: dict[str, list[float]] = {"per_sample": [], "grouped": []}
        nlls = {}
        for _ in range(repeats):  # alternating, so that both paths see the same machine load
            for name, m in (("per_sample", per_sample), ("grouped", grouped)):
                t, nlls[name] = run(m)
                seconds[name].append(t)
        ps, gr = float(np.median(seconds["per_sample"])), float(np.median(seconds["grouped"]))
        n = len(images)
        return {
            "samples": n, "samples_per_image_view": round(n / (len(chosen) * views), 2), "calls": len(chunks),
            "per_sample_samples_per_s": round(n / ps, 1), "grouped_samples_per_s": round(n / gr, 1),
            "speedup": round(ps / gr, 2),
            "per_sample_ms_per_image_view": round(1000 * ps / (len(chosen) * views), 1),
            "grouped_ms_per_image_view": round(1000 * gr / (len(chosen) * views), 1),
            "max_abs_nll_diff": float(np.max(np.abs(nlls["grouped"] - nlls["per_sample"]))),
        }

    kl, nll = measure("kl"), measure("nll")
    print(json.dumps({
        "bench": "label_all_choices", "model": "medqm-vlm-demo (shipped stand-in)", "threads": threads,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "images": len(chosen), "views": views, "batch": batch_size, "repeats": repeats,
        "kl": kl, "nll": nll,
        # what choosing --loss kl over --loss nll costs in scoring time, with each path
        "kl_over_nll_time": {
            "per_sample": round(kl["per_sample_ms_per_image_view"] / nll["per_sample_ms_per_image_view"], 2),
            "grouped": round(kl["grouped_ms_per_image_view"] / nll["grouped_ms_per_image_view"], 2)},
    }))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--definitions", type=Path, help="compare the label definitions; results under this folder")
    ap.add_argument("--all-choices", action="store_true",
                    help="per-sample vs grouped scoring of every choice on the stand-in VLM")
    ap.add_argument("--images", type=int, default=16, help="--all-choices: demo images (one per case)")
    ap.add_argument("--cases", type=int, default=8, help="--definitions: cases (one reference image each)")
    ap.add_argument("--views", type=int, default=None,
                    help="--definitions: views of the multi-view label sets (default 2); --all-choices: views (1)")
    ap.add_argument("--batch-size", type=int, default=8, help="--definitions, --all-choices: stand-in VLM batch size")
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
    if args.definitions:
        import torch

        torch.set_num_threads(args.threads)
        _definitions(args.definitions, args.cases, args.views or 2, args.batch_size)
        return
    if args.all_choices:
        import torch

        torch.set_num_threads(args.threads)
        _all_choices(args.images, args.views or 1, args.batch_size, args.repeats, args.threads)
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
