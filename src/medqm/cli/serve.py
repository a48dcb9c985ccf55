"""`medqm serve`: the HTTP quality gate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error


def serve(
    model: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: the one shipped with medqm)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, help="TCP port."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON settings (thresholds, per-modality thresholds, limits, "
                                          "batching, CORS; see docs/serve.md); the options below override it."),
    gate: Optional[Path] = typer.Option(None, help="Calibrated gate file (medqm gate calibrate): the pass thresholds, "
                                        "with their guarantee, come from it; not with --pass-min or "
                                        "modality_thresholds (review_min stays)."),
    runtime: Optional[str] = typer.Option(None, help="auto (default), torch or onnx."),
    device: Optional[str] = typer.Option(None, help="cpu (default), cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the model."),
    pass_min: Optional[float] = typer.Option(None, help="Quality at or above which an image passes (default 0.5)."),
    review_min: Optional[float] = typer.Option(None,
                                               help="Quality at or above which it goes to review, else reject (0.25)."),
    batching: Optional[bool] = typer.Option(None, "--batching/--no-batching",
                                            help="Micro-batch concurrent requests (on)."),
    batch_window_ms: Optional[float] = typer.Option(None, help="Micro-batching window, ms (5)."),
    max_batch: Optional[int] = typer.Option(None, help="Most images per forward pass (32)."),
    max_queue: Optional[int] = typer.Option(None, help="Most images waiting for the model; beyond, 503 (256)."),
    max_upload_mb: Optional[float] = typer.Option(None, help="Largest request body, MiB (32)."),
    max_files: Optional[int] = typer.Option(None, help="Most files per request (16)."),
    max_pixels: Optional[int] = typer.Option(None, help="Most pixels per image, checked before decoding (4096²)."),
    cors_origin: Optional[list[str]] = typer.Option(None, help="Allow browser calls from this origin (repeatable); "
                                                    "CORS is off by default."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
):
    """Run the quality gate: an HTTP service that scores images (pass / review / reject) before an MLLM sees them."""
    console = get_console()
    try:
        from medqm.serve import load_config, run

        cfg = load_config(config, {
            "gate": gate, "model": model, "runtime": runtime, "device": device, "num_threads": threads,
            "thresholds": {"pass_min": pass_min, "review_min": review_min},
            "batching": {"enabled": batching, "window_ms": batch_window_ms, "max_batch": max_batch,
                         "max_queue": max_queue},
            "limits": {"max_upload_bytes": None if max_upload_mb is None else int(max_upload_mb * 2**20),
                       "max_files": max_files, "max_pixels": max_pixels},
            "cors_origins": cors_origin or None,
        })
        run(cfg, host=host, port=port, log_level=log_level)
    except (ValueError, FileNotFoundError, ImportError) as e:  # pydantic's ValidationError is a ValueError
        print_error(console, _settings_error(e))
        raise typer.Exit(code=2) from e


def _settings_error(e: Exception) -> str:
    """A pydantic ValidationError as 'invalid settings: where: what' lines (no input dumps); others as they are."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "invalid settings: " + "; ".join(lines)
