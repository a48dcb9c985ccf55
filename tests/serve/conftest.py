"""Fixtures for the quality gate: a small MedQM-I checkpoint, a live uvicorn server, test volumes."""

from __future__ import annotations

from pathlib import Path

import torch

torch.set_num_threads(1)  # small tensors, shared machine: see tests/model/conftest.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("fastapi", reason="the quality gate needs the 'serve' extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the quality gate needs the 'serve' extra (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx (pip install -e '.[test]')")

from serve_helpers import IMG, LiveServer, make_config  # noqa: E402

from medqm.serve import create_app  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """ONNX exports (runtime 'auto') go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("MEDQM_CACHE", str(tmp_path_factory.getbasetemp() / "medqm-cache"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained MedQM-I (priors + implicit queries, so it has heatmaps) at 64×64: fast, deterministic."""
    from medqm.model import create_model

    torch.manual_seed(0)
    model = create_model("medqm_i", pretrained_backbone=False, img_size=IMG).eval()
    return model.save_pretrained(tmp_path_factory.mktemp("serve-ckpt") / "medqm-i-serve-test")


@pytest.fixture(scope="session")
def server(checkpoint):
    """The shared live server: small limits, a per-modality threshold for US (always passes)."""
    cfg = make_config(checkpoint, modality_thresholds={"US": {"pass_min": 0.0, "review_min": 0.0}})
    with LiveServer(create_app(cfg)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def nifti_bytes(tmp_path_factory) -> bytes:
    """A 40×32×10 NIfTI volume (gzip), a bright square moving along the slices."""
    import nibabel as nib

    vol = np.zeros((40, 32, 10), np.float32)
    for k in range(10):
        vol[5 + k : 20 + k, 8:24, k] = 100.0 + k
    path = tmp_path_factory.mktemp("nifti") / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    return path.read_bytes()
