"""`medqm label`: label distorted images by a diagnostic VLM's loss (MedQM-D)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error


def label(
    out: Path = typer.Option(..., help="Output folder: labels.parquet, shards/, cache/; rerun to resume."),
    tasks: str = typer.Option("demo", help="Task file (JSONL/CSV of image, question, answer, case_id…) or 'demo' "
                                           "for the bundled collection's diagnostic questions."),
    model: Optional[str] = typer.Option(None,
                                        help="Local HF model folder or hub id (default: the shipped stand-in VLM)."),
    distorted: Optional[Path] = typer.Option(None, help="A `medqm distort` output folder to label."),
    plan: Optional[str] = typer.Option(None, help="Make the distortions first with this plan (into OUT/distorted)."),
    collection: Optional[Path] = typer.Option(None,
                                              help="Collection for --tasks demo and --plan (default: data/demo)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    batch_size: int = typer.Option(8, help="Images per model forward pass."),
    engine: str = typer.Option("local", help="local, or ray (Ray Data actor pool)."),
    workers: int = typer.Option(2, help="Ray engine: model replicas (actors)."),
    gpus_per_worker: float = typer.Option(0.0, help="Ray engine: GPUs per replica (1 = one replica per GPU)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray engine: cluster address (default: start a local Ray)."),
    shard_size: int = typer.Option(4, help="Reference images per atomic output shard."),
    center: float = typer.Option(0.6931471805599453, help="Quality map: loss (nats) where Q = 0.5 (default ln 2)."),
    scale: float = typer.Option(0.31546487678572877, help="Quality map: sigmoid scale in nats (default ln 2 / ln 9)."),
    loss: str = typer.Option("kl", help="Label definition: kl (KL(clean ‖ distorted) over each question's choices, "
                                        "the default) or nll (mean NLL increase of the correct answers); see "
                                        "docs/medqm-d.md."),
    temperature: Optional[float] = typer.Option(None, help="--loss kl: softmax temperature of the choice "
                                                           "probabilities (default 3)."),
    views: int = typer.Option(1, help="Harmless views averaged per label: 1, 2 (+ mirrored) or 4 (+ shifted, both)."),
):
    """Label distorted images by the diagnostic loss of a vision-language model (MedQM-D)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medqm.io import MedQMReadError
    from medqm.io.collection import default_collection
    from medqm.label.quality import QualityMap

    console = get_console()
    coll = collection or default_collection()
    try:
        from medqm._extras import require

        require("label", "medqm label")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the rich bar below is the one progress display
        from medqm.label import runner
        from medqm.label.tasks import demo_questions, read_tasks

        items = demo_questions(coll) if tasks == "demo" else read_tasks(tasks)
        if distorted is None:
            if plan is None:
                raise ValueError("give --distorted (a `medqm distort` output) or --plan to make the distortions")
            from medqm.distort.plan import Plan, run_plan

            distorted = out / "distorted"
            console.print(f"distorting {coll} with plan {plan!r} into {distorted}")
            run_plan(coll, Plan.load(plan), distorted)
        model_path = model or str(default_model())
        if engine == "ray":
            from medqm.label.ray_engine import ModelSpec, RayScorer

            spec = ModelSpec(model_path, device=device, dtype=dtype, batch_size=batch_size)
            identity = spec.identity()
            scorer = RayScorer(spec, workers=workers, gpus_per_worker=gpus_per_worker, address=ray_address)
            extra = {"scorer": scorer, "shards_per_call": max(1, 4 * workers)}
        elif engine == "local":
            from medqm.label.hf import load_model

            identity = load_model(model_path, device=device, dtype=dtype, batch_size=batch_size)
            extra = {}
        else:
            raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
        columns = (TextColumn("label"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("label", total=None, rate="")
            import time

            t0, first = time.perf_counter(), [None]

            def progress(done, total):
                first[0] = done if first[0] is None else first[0]
                rate = (done - first[0]) / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=done, total=total, rate=f"{rate:.1f} img/s")

            summary = runner.run_labels(items, identity, out, distorted=distorted,
                                        quality_map=QualityMap(center, scale),
                                        shard_size=shard_size, progress=progress, loss=loss,
                                        temperature=temperature, views=views, **extra)
    except (MedQMReadError, ValueError, ImportError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    console.print(f"{summary.rows} labels in {out / 'labels.parquet'} ({summary.shards} shards, "
                  f"{summary.shards_done_before} already done, {len(summary.errors)} errors)")
    m = summary.monotonicity or {}
    if m.get("n_series"):
        per = ", ".join(f"{k} {v['mean_rho']:.2f}" for k, v in (m.get("by_answer_type") or {}).items())
        console.print(f"severity monotonicity (does the loss grow with the level?): mean ρ {m['mean_rho']:.2f} over "
                      f"{m['n_series']} series" + (f"; per question type {per}" if per else "")
                      + f" ({out / 'reliability.json'})", highlight=False)
    for line in describe_label_reliability(summary.reliability or {}):
        console.print(line, highlight=False)
    if summary.errors:
        console.print(f"errors listed in {out / 'errors.csv'}")
        raise typer.Exit(code=1)


def describe_label_reliability(rel: dict) -> list[str]:
    """The leave-one-case-out oracle ceiling and the test–retest Spearman, one line each (when computed)."""
    lines = []
    o = rel.get("oracle_loco") or {}
    if o.get("n_images"):
        lines.append(f"distortion-oracle ceiling (leave one case out, {o['n_cases']} cases): SRCC {o['srcc']:.3f} "
                     f"over {o['n_images']} images" + (f" ({o['n_uncovered']} uncovered)" if o["n_uncovered"] else ""))
    r = rel.get("test_retest") or {}
    if r.get("n_images"):
        pairs = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "n_images")
        lines.append(f"test–retest SRCC of D, original view against: {pairs} ({r['n_images']} images)")
    return lines


def default_model() -> Path:
    """The stand-in VLM that ships with MedQM (see its MODEL_CARD.md)."""
    path = Path(__file__).resolve().parents[1] / "label" / "models" / "medqm-vlm-demo"
    if not (path / "config.json").is_file():
        raise ValueError(f"no --model given and the shipped model is missing ({path}); pass --model DIR_OR_HUB_ID")
    return path
