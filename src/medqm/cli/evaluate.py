"""`medqm evaluate`: MedQM-I against classical and deep BIQA on held-out images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error, stage_bars


def evaluate(
    labels: Path = typer.Option(..., help="A `medqm label` output folder (labels.parquet)."),
    model: Optional[Path] = typer.Option(None, help="The MedQM-I checkpoint to evaluate; its split.csv names the test "
                                         "cases (single-split mode; without --folds it is required)."),
    out: Path = typer.Option(..., help="Report folder: metrics.json, report.md, report.html, figures/, cache/."),
    folds: Optional[int] = typer.Option(None, help="Cross-validate instead: K case-level folds (2 … number of cases; "
                                        "5 is usual). Every model of --models is trained in every fold and every "
                                        "case is tested once; figures are pooled over the folds. Resumes in --out."),
    compare: Optional[list[str]] = typer.Option(None, help="Another checkpoint to score on the same images, NAME=DIR "
                                                "(repeatable); a DIR holding checkpoint folders adds each of them."),
    name: str = typer.Option("MedQM-I", help="Display name of the evaluated model."),
    baselines: Optional[str] = typer.Option(None, help="Comma-separated classical baselines (default: all; see "
                                            "medqm.evaluate.list_baselines)."),
    split: Optional[Path] = typer.Option(None, help="Use this split file instead of the checkpoint's split.csv."),
    max_images: Optional[int] = typer.Option(None, help="Evaluate a case-stratified random subset of this many test "
                                             "images (for speed)."),
    n_boot: int = typer.Option(1000, help="Bootstrap replicates (cases resampled) for CIs and the paired test."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and of --max-images sampling (with --folds: also of "
                             "the folds and the training)."),
    workers: int = typer.Option(1, help="Processes for the classical baselines and the per-method statistics."),
    batch_size: int = typer.Option(32, help="Images per MedQM-I forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    runtime: str = typer.Option("auto", help="auto (ONNX Runtime on CPU when installed, else PyTorch), torch or onnx."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for MedQM-I scoring (with --folds: training)."),
    gallery: int = typer.Option(8, help="Heatmap examples in the report (0: none)."),
    group_ci: bool = typer.Option(True, "--group-ci/--no-group-ci", help="Bootstrap the SRCC of every modality, "
                                  "distortion type and level too."),
    models: Optional[str] = typer.Option(None, help="With --folds: comma-separated registered variants to train in "
                                         "every fold, the evaluated one first (default: medqm_i and its ablations "
                                         "and the deep baseline)."),
    epochs: int = typer.Option(20, help="With --folds: training epochs at most."),
    patience: int = typer.Option(5, help="With --folds: early-stopping patience (epochs)."),
    img_size: int = typer.Option(224, help="With --folds: model input size."),
    val_fraction: float = typer.Option(0.15, help="With --folds: share of each fold's training cases kept for early "
                                       "stopping."),
    cache_dir: Optional[Path] = typer.Option(None, help="With --folds: frozen-feature cache (default: "
                                             "$MEDQM_CACHE/features)."),
    target: str = typer.Option("loss", help="With --folds: what every model's head regresses (loss or quality; "
                               "`medqm train --target`)."),
    ema_decay: float = typer.Option(0.99, help="With --folds: weight averaging of every training (`medqm train "
                                    "--ema-decay`)."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="With --folds and --target loss: "
                                   "calibrate every model on its validation part (`medqm train --calibrate`)."),
):
    """Evaluate MedQM-I against classical (NIQE, BRISQUE, PIQE, …) and deep BIQA on the same held-out images.

    Single split (default): score trained checkpoints on the test cases of the main checkpoint's split.
    Cross-validation (--folds K): train and score every model on K case-level folds, figures pooled over them.
    """
    from rich.table import Table

    console = get_console()
    try:
        from medqm.evaluate.report import HEADLINE_HEADER, headline_rows, headline_title
        from medqm.train import SplitLeakageError

        names = [b.strip() for b in baselines.split(",") if b.strip()] if baselines else None
        if folds is None:
            if model is None:
                raise ValueError("--model is required (the checkpoint to evaluate), or pass --folds K to "
                                 "cross-validate")
            result = _single_split(console, labels=labels, model=model, out=out, compare=compare, name=name,
                                   baselines=names, split=split, max_images=max_images, n_boot=n_boot, seed=seed,
                                   workers=workers, batch_size=batch_size, device=device, runtime=runtime,
                                   threads=threads, gallery=gallery, group_ci=group_ci)
        else:
            given = [flag for flag, v in (("--model", model), ("--compare", compare), ("--split", split),
                                          ("--max-images", max_images)) if v]
            if given:
                raise ValueError(f"{', '.join(given)}: single-split options; --folds trains its own models on its "
                                 "own folds")
            result = _cross_validate(console, labels=labels, out=out, folds=folds, models=models, name=name,
                                     baselines=names, n_boot=n_boot, seed=seed, workers=workers, device=device,
                                     threads=threads, group_ci=group_ci, epochs=epochs, patience=patience,
                                     img_size=img_size, val_fraction=val_fraction, cache_dir=cache_dir,
                                     target=target, ema_decay=ema_decay, calibrate=calibrate)
    except (ValueError, FileNotFoundError, ImportError, SplitLeakageError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    table = Table(*HEADLINE_HEADER, title=headline_title(result.metrics))
    for row in headline_rows(result.metrics):
        table.add_row(*row)
    console.print(table)
    for line in result.metrics["alignment"]["text"] + result.metrics.get("label_reliability", {}).get("text", []):
        console.print(f"• {line}", highlight=False)
    console.print(f"report: {result.files['report.html']} · {result.files['report.md']} · "
                  f"{result.files['metrics.json']}", highlight=False)


def _single_split(console, *, labels, model, out, compare, name, baselines, split, max_images, n_boot, seed, workers,
                  batch_size, device, runtime, threads, gallery, group_ci):
    from medqm.evaluate import EvalConfig
    from medqm.evaluate import evaluate as run_evaluation

    cfg = EvalConfig(labels=str(labels), model=str(model), out=str(out), compare=list(compare or ()), name=name,
                     baselines=baselines, split_file=str(split) if split else None, max_images=max_images,
                     n_boot=n_boot, seed=seed, workers=workers, batch_size=batch_size, device=device, runtime=runtime,
                     num_threads=threads, gallery=gallery, group_ci=group_ci)
    with stage_bars(console, prefix="score ") as progress:
        return run_evaluation(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)


def _cross_validate(console, *, labels, out, folds, models, name, baselines, n_boot, seed, workers, device, threads,
                    group_ci, epochs, patience, img_size, val_fraction, cache_dir, target, ema_decay, calibrate):
    from medqm.evaluate import CVConfig, cross_validate
    from medqm.evaluate.crossval import DEFAULT_MODELS, DISPLAY_NAMES

    variants = [m.strip() for m in models.split(",") if m.strip()] if models else list(DEFAULT_MODELS)
    if not variants:
        raise ValueError("--models: no model given")
    cfg = CVConfig(labels=str(labels), out=str(out), folds=folds, models=variants, main=variants[0],
                   names={**DISPLAY_NAMES, variants[0]: name}, baselines=baselines, val_fraction=val_fraction,
                   img_size=img_size, epochs=epochs, patience=patience, cache_dir=str(cache_dir) if cache_dir else None,
                   target=target, ema_decay=ema_decay, calibrate=calibrate,
                   device=device, num_threads=threads, n_boot=n_boot, seed=seed, workers=workers, group_ci=group_ci)
    with stage_bars(console) as progress:
        return cross_validate(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)
