"""`medqm score`: score images with a MedQM-I checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from medqm.cli._common import get_console, parse_window, print_error


def score(
    paths: list[Path] = typer.Argument(...,
                                       help="Image files or folders (DICOM series, NIfTI/NRRD volumes → every slice)."),
    out: Path = typer.Option(..., help="Score table: .csv, .parquet or .json."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: the one shipped with medqm)."),
    heatmaps: Optional[Path] = typer.Option(None, help="Also write heatmap overlay PNGs into this folder."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    runtime: str = typer.Option("auto", help="auto (ONNX Runtime on CPU when installed, else PyTorch), torch or onnx."),
    workers: Optional[int] = typer.Option(None, help="Processes that read and letterbox files while the model runs "
                                                     "(0: in the calling thread; default: 1 when there is more than "
                                                     "one batch of files)."),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 / float16 autocast (PyTorch runtime; float16 "
                                              "on CUDA only)."),
    window: Optional[str] = typer.Option(None,
                                         help="Window preset (lung, soft_tissue, bone, brain, …) or CENTER,WIDTH."),
    axis: str = typer.Option("axial", help="Slicing axis for volumes: axial, coronal or sagittal."),
    modality: Optional[str] = typer.Option(None, help="Modality for files that carry none (PNG, NIfTI…)."),
):
    """Score the MLLM-oriented quality of images (MedQM-I); unreadable files become error rows."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = get_console()
    try:
        if out.suffix.lower() not in (".csv", ".parquet", ".pq", ".json"):
            raise ValueError(f"--out must end in .csv, .parquet or .json, got {out.name!r}")
        from medqm.model.scoring import Scorer, write_scores

        if workers is not None and workers < 0:
            raise ValueError(f"--workers must be >= 0, got {workers}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if dtype != "float32" and runtime == "onnx":
            raise ValueError(f"--dtype {dtype} needs --runtime torch (the ONNX graph is float32)")
        scorer = Scorer(model, device=device, batch_size=batch_size, runtime=runtime, workers=workers, dtype=dtype)
        columns = (SpinnerColumn(), TextColumn("score {task.fields[done]} images, {task.fields[failed]} failed"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("score", total=None, done=0, failed=0)
            df = scorer.score_files(paths, heatmap_dir=heatmaps, window=parse_window(window), axis=axis,
                                    modality=modality,
                                    progress=lambda d, f: bar.update(task, done=d, failed=f))
        write_scores(df, out)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    ok = df[df.error == ""]
    console.print(f"{len(ok)} images scored, {len(df) - len(ok)} failed → {out}"
                  + (f" (mean quality {ok.quality.mean():.3f})" if len(ok) else ""), highlight=False)
    if len(ok) and scorer.tasks:
        console.print("mean quality per task: " + ", ".join(f"{t} {ok[f'quality_{t}'].mean():.3f}"
                                                           for t in scorer.tasks), highlight=False)
    for _, r in df[df.error != ""].head(10).iterrows():
        console.print(f"[red]✗[/red] {escape(str(r.path))}: {escape(str(r.error))}", highlight=False)
    if heatmaps is not None and len(ok):
        console.print(f"heatmaps: {heatmaps}")
    if len(ok) == 0:
        raise typer.Exit(code=1)
