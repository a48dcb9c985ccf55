"""`medqm info`: read images and print their metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from medqm.cli._common import get_console, parse_window


def info(
    paths: list[Path] = typer.Argument(..., help="Files or folders (walked recursively)."),
    window: Optional[str] = typer.Option(None,
                                         help="Window preset (lung, soft_tissue, bone, brain, …) or CENTER,WIDTH."),
    axis: str = typer.Option("axial", help="Slicing axis for volumes: axial, coronal or sagittal."),
    modality: Optional[str] = typer.Option(None, help="Modality for files that carry none (PNG, NIfTI…)."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Also list the files skipped as not images (txt, json, icc…)."),
):
    """Read images and print their metadata; unreadable files are listed with the reason.

    Images are named by their path relative to the folder argument they were found in (a file argument: its
    name), plus #frame for multi-frame files. The summary line counts every file found: image files +
    unreadable + skipped (not an image format; --verbose lists them).
    """
    from rich.table import Table

    from medqm.io import ReadFailure, iter_images

    win = parse_window(window)
    table = Table("image", "modality", "body part", "size", "bits", "value range", "window", "spacing", "case")
    failures: list[tuple[str, str]] = []
    skipped: list[str] = []
    image_files: set[str] = set()
    n_images = 0
    for root in paths:
        def label(path: str, root: Path = root) -> str:
            if root.is_dir():
                try:
                    return Path(path).relative_to(root).as_posix()
                except ValueError:
                    pass
            return Path(path).name

        for item in iter_images(root, window=win, axis=axis, modality=modality,
                                on_skip=lambda f: skipped.append(label(str(f)))):
            if isinstance(item, ReadFailure):
                failures.append((label(item.path), item.reason))
                continue
            n_images += 1
            image_files.add(item.path)
            s = item.summary()
            name = label(item.path)
            table.add_row(
                name if item.index is None else f"{name}#{item.index}",
                s["modality"] or "-",
                s["body_part"] or "-",
                f"{s['height']}×{s['width']}×{s['channels']}",
                str(s["bits_stored"]),
                f"{s['value_range'][0]:g}…{s['value_range'][1]:g}",
                "-" if not s["window"] else f"{s['window'][0]:g}/{s['window'][1]:g}",
                "-" if not s["spacing"] else f"{s['spacing'][0]:.3g}×{s['spacing'][1]:.3g}",
                s["case_id"] or "-",
            )
    console = get_console()
    console.print(table)
    for name, reason in failures:
        console.print(f"[red]✗[/red] {escape(str(name))}: {escape(str(reason))}", highlight=False)
    if verbose:
        for name in skipped:
            console.print(f"- skipped {name} (not an image format)", highlight=False)
    found = len(image_files) + len(failures) + len(skipped)
    hint = " (--verbose lists them)" if skipped and not verbose else ""
    console.print(f"{found} files found: {len(image_files)} read ({n_images} images), {len(failures)} unreadable, "
                  f"{len(skipped)} skipped as not images{hint}", highlight=False)
    if failures and table.row_count == 0:
        raise typer.Exit(code=1)
