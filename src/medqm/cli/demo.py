"""`medqm demo`: the whole pipeline, offline, with a summary of its stages and headline metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error, read_settings, stage_bars


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder; rerun to reuse finished stages or resume."),
    quick: bool = typer.Option(False, "--quick", help="A handful of cases, 2 levels, few epochs (about a minute)."),
    model: Optional[str] = typer.Option(None, help="Diagnostic VLM: local HF folder or hub id (default: the shipped "
                                                   "stand-in VLM)."),
    collection: Optional[Path] = typer.Option(None, help="Collection folder with manifest.csv (default: data/demo)."),
    tumour_collection: Optional[Path] = typer.Option(None, help="Collection asked the tumour question (default: "
                                                                "data/br35h, built by `make data`)."),
    tumour_cases: Optional[int] = typer.Option(None, help="Cases (near-duplicate clusters) drawn from the tumour "
                                                          "collection, half with a tumour (default: 60)."),
    no_tumour: bool = typer.Option(False, "--no-tumour", help="Leave the tumour collection out."),
    threads: Optional[int] = typer.Option(None, help="CPU threads and worker processes (default: all cores)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of demo settings (medqm.demo.DemoConfig fields: "
                                                      "refs_per_case, plan, epochs, n_boot…) over the preset."),
):
    """The whole pipeline, offline: distort → label (MedQM-D) → train MedQM-I and baselines → evaluate → report."""
    from rich.table import Table

    console = get_console()
    try:
        from medqm.demo import STAGES, DemoError, demo_config, headline, run_demo

        settings = read_settings(config) if config else {}
        settings.update({k: v for k, v in {"out": str(out), "vlm": model, "threads": threads,
                                           "collection": str(collection) if collection else None,
                                           "tumour_collection": str(tumour_collection) if tumour_collection else None,
                                           "tumour_cases": tumour_cases}.items()
                         if v is not None})
        if no_tumour:
            settings["tumour_cases"] = 0
        cfg = demo_config("quick" if quick else "full", **settings)
        console.print(f"medqm demo ({cfg.preset}) → {out}", highlight=False)
        with stage_bars(console, transient=False, eta=False) as progress:
            result = run_demo(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)
    except (DemoError, ValueError, FileNotFoundError, ImportError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    times = Table("stage", "status", "seconds", "folder", title="stages")
    for name in STAGES:
        r = result.stages[name]
        times.add_row(name, "reused" if r.cached else "ran", f"{r.seconds:.1f}", r.dir.name)
    times.add_row("total", "", f"{result.seconds:.1f}", str(out))
    console.print(times)
    header, rows = headline(result.metrics)
    info = result.metrics["test_set"]
    table = Table(*header, title=f"agreement with the MedQM-D labels on {info['n_images']} held-out images "
                                 f"of {info['n_cases']} cases")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in result.metrics.get("label_reliability", {}).get("text", [])[:2]:
        console.print(f"• {line}", highlight=False)
    console.print(f"report: {result.report_html} (stage folder {result.stages['evaluate'].dir})", highlight=False)
