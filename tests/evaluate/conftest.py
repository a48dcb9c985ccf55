"""Fixtures for the evaluation tests (builders in evalfixtures.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from evalfixtures import CASES, SPLIT, make_checkpoint, make_labels  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Feature caches and ONNX exports go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("MEDQM_CACHE", str(tmp_path_factory.getbasetemp() / "medqm-cache"))


@pytest.fixture(scope="session")
def labels(tmp_path_factory) -> Path:
    return make_labels(tmp_path_factory.mktemp("eval-labels") / "labels")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A main model with heatmaps (implicit queries), a plain-head deep baseline, and one trained on a test case."""
    root = tmp_path_factory.mktemp("eval-ckpt")
    leaky = dict(SPLIT)
    leaky[CASES[6]] = "train"  # a test case of the main split
    return {"main": make_checkpoint(root / "main", "medqm_i_no_priors", SPLIT),
            "plain": make_checkpoint(root / "plain", "medqm_i_baseline", SPLIT, seed=1),
            "leaky": make_checkpoint(root / "leaky", "medqm_i_baseline", leaky, seed=2)}
