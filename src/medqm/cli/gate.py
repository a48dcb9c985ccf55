"""`medqm gate …`: quality-gate thresholds with a guarantee about the labelling MLLM (`medqm.evaluate.gate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medqm.cli._common import get_console, print_error

gate_app = typer.Typer(help="Calibrate the quality gate's thresholds with a risk guarantee.", no_args_is_help=True)


@gate_app.command("calibrate")
def gate_calibrate(
    labels: Path = typer.Option(..., help="A `medqm label` output folder of cases the model was not trained on."),
    out: Path = typer.Option(..., help="The gate file to write (gate.json), for `medqm serve --gate`."),
    model: Optional[Path] = typer.Option(None, help="MedQM-I checkpoint (default: the one shipped with medqm)."),
    risk: str = typer.Option("lost-answer-rate",
                             help="lost-answer-rate (share of passed images whose correct answer became less than "
                                  "half as likely) or mean-loss (mean diagnostic loss of passed images, nats)."),
    alpha: float = typer.Option(..., help="The risk level to guarantee (a rate for lost-answer-rate, nats for "
                                          "mean-loss)."),
    delta: float = typer.Option(0.1, help="ltt: the guarantee holds with probability at least 1 − delta."),
    method: str = typer.Option("ltt", help="ltt (Learn then Test: high probability, among passed images) or crc "
                                           "(conformal risk control: in expectation, per submitted image)."),
    by_modality: bool = typer.Option(False, "--by-modality", help="One threshold per modality with enough cases."),
    min_cases: int = typer.Option(20, help="--by-modality: calibration cases a modality needs for its own threshold."),
    loss_cap: float = typer.Option(2.772588722239781, help="mean-loss: cap on one image's loss, nats (4 ln 2)."),
    split: Optional[Path] = typer.Option(None, help="The split the model was trained with (default: its split.csv)."),
    cache: Optional[Path] = typer.Option(None, help="Score cache folder (default: $MEDQM_CACHE/scores)."),
):
    """Choose the lowest pass threshold whose risk on passed images is controlled at alpha (docs/serve.md)."""
    from medqm.evaluate.gate import METHODS, RISKS, gate_from_labels

    console = get_console()
    try:
        if risk not in RISKS:
            raise ValueError(f"--risk must be one of {', '.join(RISKS)}, got {risk!r}")
        if method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        gate = gate_from_labels(labels, model, alpha=alpha, delta=delta, risk=risk, method=method,
                                loss_cap=loss_cap, by_modality=by_modality, min_cases=min_cases, split_file=split,
                                cache_dir=cache, say=lambda m: console.print(m, highlight=False))
        gate.save(out)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print_error(console, e)
        raise typer.Exit(code=2) from e
    d = gate.default
    if d.attained:
        console.print(f"pass at quality ≥ {d.pass_min:g}: {d.pass_rate:.1%} of the calibration images pass; "
                      f"calibration risk {d.calibration_risk:.3f}", highlight=False)
    console.print(d.guarantee(), highlight=False)
    for mod, g in gate.by_modality.items():
        console.print(f"{mod}: pass at quality ≥ {g.pass_min:g} ({g.pass_rate:.1%} pass, {g.n_cases} cases)",
                      highlight=False)
    for mod, why in gate.fallbacks.items():
        console.print(f"{mod}: {why}", highlight=False)
    console.print(f"→ {out}")
    if not d.attained:
        raise typer.Exit(code=1)
