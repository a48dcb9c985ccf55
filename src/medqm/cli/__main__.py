"""``python -m medqm.cli`` (what torchrun and accelerate launch): the same command line as ``medqm``."""

from medqm.cli import app

app()
