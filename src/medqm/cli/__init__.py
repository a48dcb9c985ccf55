"""The `medqm` command line: thin callers of the stages' public functions.

One module per command group (info, data, distort, label, train, score, serve, gate, evaluate, demo); this module
assembles them into the Typer ``app`` (the ``medqm`` entry point, ``medqm.cli:app``). Heavy imports happen
inside the commands so `medqm --help` is instant.
"""

from __future__ import annotations

import typer

from medqm import __version__
from medqm.cli import data, demo, distort, evaluate, gate, info, label, score, serve, train

app = typer.Typer(
    name="medqm",
    help="MedQM: is a medical image good enough for a multimodal LLM to diagnose from?",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(data.data_app, name="data")
app.add_typer(gate.gate_app, name="gate")


def _version(value: bool):
    if value:
        typer.echo(f"medqm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
):
    """MedQM command line."""


# registration order is the order of `medqm --help`
for _command in (info.info, distort.distort, label.label, distort.distortions, train.train, score.score, serve.serve,
                 evaluate.evaluate, demo.demo):
    app.command()(_command)
del _command

default_model = label.default_model
_default_model = default_model  # the name earlier releases (and tests/label) import

__all__ = ["app", "default_model", "main"]


if __name__ == "__main__":
    app()
