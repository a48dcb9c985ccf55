import torch

# These tests run many small forward/backward passes. One intra-op thread is faster for such small tensors
# and keeps the suite from stalling when the machine is shared (OpenMP threads spin-waiting on a busy CPU).
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Feature caches and ONNX exports go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("MEDQM_CACHE", str(tmp_path_factory.getbasetemp() / "medqm-cache"))
