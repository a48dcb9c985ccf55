"""Helpers shared by the command modules: the console, window parsing, settings files."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer


def get_console():
    """Rich console; when output is piped or captured, wide enough that tables are not truncated."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def print_error(console, message, hint: str = "") -> None:
    """Print ``error: message`` in red; the message is escaped (paths and ``medqm[extra]`` are not markup)."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(str(message))}" + (f"\n{escape(hint)}" if hint else ""),
                  highlight=False)


@contextmanager
def stage_bars(console, *, prefix: str = "", transient: bool = True, eta: bool = True):
    """A rich progress display with one bar per stage; yields ``progress(stage, done, total)`` for the library."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn() if eta else TimeElapsedColumn())
    with Progress(*columns, console=console, transient=transient) as bar:
        tasks = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{prefix}{stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield progress


def parse_window(window: Optional[str]):
    if window is None:
        return None
    if "," in window:
        try:
            center, width = (float(v) for v in window.split(","))
        except ValueError:
            raise typer.BadParameter(f"window {window!r}: expected a preset name or CENTER,WIDTH") from None
        return (center, width)
    return window


def read_settings(path: Path) -> dict:
    import json

    import yaml

    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of training settings")
    return data
