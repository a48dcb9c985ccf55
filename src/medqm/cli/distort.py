"""`medqm distort` and `medqm distortions`: apply a distortion plan; list the distortion types."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from medqm.cli._common import get_console, print_error


def distort(
    collection: Path = typer.Option(None, help="Collection folder with manifest.csv (default: the bundled data/demo)."),
    plan: str = typer.Option("default", help="Plan file (YAML/TOML) or a shipped plan name: default, quick."),
    out: Path = typer.Option(..., help="Output folder (images/, manifest.parquet, ledger.jsonl); rerun to resume."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: all cores)."),
):
    """Apply a distortion plan to a collection: distorted PNGs plus a Parquet manifest, resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medqm.io import MedQMReadError
    from medqm.io.collection import default_collection

    console = get_console()
    try:
        from medqm.distort.plan import Plan, run_plan

        the_plan = Plan.load(plan)
    except (ValueError, ImportError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    columns = (TextColumn("distort"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("distort", total=None)
        try:
            summary = run_plan(collection or default_collection(), the_plan, out, workers=workers,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (MedQMReadError, ValueError) as e:
            print_error(console, e)
            raise typer.Exit(code=2) from e
    console.print(f"{summary.total} distorted images in {out} ({summary.done_before} already done, "
                  f"{summary.written} written, {len(summary.failed)} failed); manifest: {out / 'manifest.parquet'}")
    for f in summary.failed[:10]:
        console.print(f"[red]✗[/red] {escape(str(f['dist_id']))}: {escape(str(f['reason']))}", highlight=False)
    if summary.failed:
        console.print(f"failures listed in {out / 'failures.csv'}; rerun to retry them")
        raise typer.Exit(code=1)



def distortions(modality: Optional[str] = typer.Argument(None, help="Only types that apply to this modality.")):
    """List the distortion types, the modalities each models, and their level parameters."""
    from rich.table import Table

    from medqm.io import canonical_modality

    try:
        from medqm.distort import create_distortion, list_distortions
    except ImportError as e:
        print_error(get_console(), e)
        raise typer.Exit(code=2) from e

    t = Table("type", "family", "modalities", "level 1", "level 5", "what it simulates")
    for name in list_distortions(canonical_modality(modality) if modality else None):
        d = create_distortion(name)
        t.add_row(name, d.family, " ".join(d.modalities) if len(d.modalities) < 10 else "all",
                  _fmt(d.levels[0]), _fmt(d.levels[-1]), d.description)
    get_console().print(t)


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
