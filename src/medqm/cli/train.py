"""`medqm train`: train MedQM-I on a label set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error, read_settings, stage_bars


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
    patience: Optional[int] = typer.Option(None,
                                           help="Early stopping: epochs without a better validation SRCC (default 6)."),
    seed: Optional[int] = typer.Option(None, help="Split and training seed (default 0)."),
    fractions: Optional[str] = typer.Option(None, help="Train,val,test shares of each modality's cases "
                                                       "(default 0.7,0.15,0.15)."),
    split: Optional[Path] = typer.Option(None,
                                         help="Reuse a split file (case_id,split), e.g. another run's split.csv."),
    img_size: Optional[int] = typer.Option(None, help="Model input size (default 224)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N."),
    cache: Optional[Path] = typer.Option(None, help="Backbone feature cache "
                                                    "(default ~/.cache/medqm/features or $MEDQM_CACHE)."),
    max_images: Optional[int] = typer.Option(None, help="Use a random subset of this many images (quick runs)."),
    tasks: Optional[str] = typer.Option(None, help="Answer types that get their own quality output, comma-separated "
                                                   "(e.g. tumour,modality), or 'none'; default: every answer type "
                                                   "with at least --task-min-images labelled images."),
    task_min_images: Optional[int] = typer.Option(None, help="Labelled images an answer type needs to become a task "
                                                             "(default 50)."),
    task_weight: Optional[float] = typer.Option(None, help="Weight of the per-task losses beside the overall loss "
                                                           "(default 0.5)."),
    task_refit_epochs: Optional[int] = typer.Option(None, help="After training, refit the task heads alone on the "
                                                               "best epoch's representation for up to this many "
                                                               "epochs (default 40; 0: no refit)."),
    target: Optional[str] = typer.Option(None, help="What the head regresses: loss (default; the diagnostic loss on a "
                                                    "log scale, calibrated on the validation part) or quality (the "
                                                    "checkpoints trained before targets existed). Scores are "
                                                    "qualities either way."),
    ema_decay: Optional[float] = typer.Option(None, help="Evaluate and save a moving average of the weights with this "
                                                         "decay per step (default 0.99; 0: the last weights)."),
    calibrate: Optional[bool] = typer.Option(None, "--calibrate/--no-calibrate", help="With --target loss: fit the "
                                             "scores to the labels' scale on the validation part (default on)."),
):
    """Train MedQM-I on a label set; prints per-epoch metrics and the held-out-case SRCC."""
    import dataclasses


    console = get_console()
    try:
        settings = read_settings(config) if config else {}
        cli = {"mode": mode, "epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience, "seed": seed,
               "split_file": str(split) if split else None, "device": device,
               "cache_dir": str(cache) if cache else None,
               "max_images": max_images, "task_min_images": task_min_images, "task_weight": task_weight,
               "task_refit_epochs": task_refit_epochs, "target": target, "ema_decay": ema_decay,
               "calibrate": calibrate}
        if tasks is not None:
            names = [t.strip() for t in tasks.split(",") if t.strip()]
            cli["tasks"] = [] if names in ([], ["none"]) else names
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
        cfg = TrainConfig(labels=str(labels), out=str(out),
                          **{k: v for k, v in settings.items() if k not in ("labels", "out")})
        with stage_bars(console) as progress:
            result = run_train(cfg, log=lambda m: console.print(m, highlight=False), progress=progress)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    o = result.test.get("overall", {})
    console.print(f"checkpoint: {result.out} (best epoch {result.best_epoch} of {result.epochs_run}); "
                  f"held-out SRCC {o.get('srcc', float('nan')):.4f}, PLCC_raw {o.get('plcc_raw', float('nan')):.4f}",
                  highlight=False)
    per_task = result.test.get("tasks") or {}
    if per_task:
        console.print("held-out SRCC per task: " + ", ".join(f"{t} {m.get('srcc', float('nan')):.4f} (n={m.get('n')})"
                                                             for t, m in per_task.items()), highlight=False)
