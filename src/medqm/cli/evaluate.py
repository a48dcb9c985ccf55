"""`medqm evaluate`: MedQM-I against classical and deep BIQA on held-out images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error, stage_bars


def evaluate(
    labels: Path = typer.Option(..., help="A `medqm label` output folder (labels.parquet)."),
    model: Path = typer.Option(..., help="The MedQM-I checkpoint to evaluate; its split.csv names the test cases."),
    out: Path = typer.Option(..., help="Report folder: metrics.json, report.md, report.html, figures/, cache/."),
    compare: Optional[list[str]] = typer.Option(None, help="Another checkpoint to score on the same images, NAME=DIR "
                                                "(repeatable); a DIR holding checkpoint folders adds each of them."),
    name: str = typer.Option("MedQM-I", help="Display name of the evaluated model."),
    baselines: Optional[str] = typer.Option(None, help="Comma-separated classical baselines (default: all; see "
                                            "medqm.evaluate.list_baselines)."),
    split: Optional[Path] = typer.Option(None, help="Use this split file instead of the checkpoint's split.csv."),
    max_images: Optional[int] = typer.Option(None, help="Evaluate a case-stratified random subset of this many test "
                                             "images (for speed)."),
    n_boot: int = typer.Option(1000, help="Bootstrap replicates (cases resampled) for CIs and the paired test."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and of --max-images sampling."),
    workers: int = typer.Option(1, help="Processes for the classical baselines and the per-method statistics."),
    batch_size: int = typer.Option(32, help="Images per MedQM-I forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    runtime: str = typer.Option("auto", help="auto (ONNX Runtime on CPU when installed, else PyTorch), torch or onnx."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for MedQM-I scoring."),
    gallery: int = typer.Option(8, help="Heatmap examples in the report (0: none)."),
    group_ci: bool = typer.Option(True, "--group-ci/--no-group-ci", help="Bootstrap the SRCC of every modality, "
                                  "distortion type and level too."),
):
    """Evaluate MedQM-I against classical (NIQE, BRISQUE, PIQE, …) and deep BIQA on the same held-out images."""
    from rich.table import Table

    console = get_console()
    try:
        from medqm.evaluate import EvalConfig
        from medqm.evaluate import evaluate as run_evaluation
        from medqm.evaluate.report import HEADLINE_HEADER, headline_rows
        from medqm.train import SplitLeakageError

        cfg = EvalConfig(labels=str(labels), model=str(model), out=str(out), compare=list(compare or ()), name=name,
                         baselines=[b.strip() for b in baselines.split(",") if b.strip()] if baselines else None,
                         split_file=str(split) if split else None, max_images=max_images, n_boot=n_boot, seed=seed,
                         workers=workers, batch_size=batch_size, device=device, runtime=runtime, num_threads=threads,
                         gallery=gallery, group_ci=group_ci)
        with stage_bars(console, prefix="score ") as progress:
            result = run_evaluation(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)
    except (ValueError, FileNotFoundError, ImportError, SplitLeakageError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    table = Table(*HEADLINE_HEADER, title="agreement with the labels on the held-out cases")
    for row in headline_rows(result.metrics):
        table.add_row(*row)
    console.print(table)
    for line in result.metrics["alignment"]["text"] + result.metrics.get("label_reliability", {}).get("text", []):
        console.print(f"• {line}", highlight=False)
    console.print(f"report: {result.files['report.html']} · {result.files['report.md']} · "
                  f"{result.files['metrics.json']}", highlight=False)
