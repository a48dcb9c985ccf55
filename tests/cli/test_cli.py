"""The `medqm` command line, run as a user runs it (a subprocess of the installed console script)."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

import medqm

MEDQM = [str(Path(sys.executable).with_name("medqm"))]


def run(*args, cwd=None):
    return subprocess.run(MEDQM + list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"medqm {medqm.__version__}"
    r = run("--help")
    assert r.returncode == 0
    for sub in ("data", "info"):
        assert sub in r.stdout


def test_info_lists_images_and_failures(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"")
    r = run("info", get_testdata_file("CT_small.dcm"), str(bad), "--window", "lung")
    assert r.returncode == 0
    assert "CT_small.dcm" in r.stdout and "-600/1500" in r.stdout
    assert "bad.dcm" in r.stdout and "0 bytes" in r.stdout


def test_data_summary_on_a_small_collection(tmp_path):
    root = tmp_path / "coll"
    (root / "images").mkdir(parents=True)
    rows = ["id,case_id,modality,body_part,path,lesion"]
    rng = np.random.default_rng(0)
    for i, (mod, case) in enumerate([("CT", "p1"), ("CT", "p1"), ("MR", "p2"), ("XR", "p3")]):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        rows.append(f"im{i},{case},{mod},chest,images/{i}.png,{i % 2}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    sheet = tmp_path / "sheet.png"
    r = run("data", "summary", str(root), "--sheet", str(sheet))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 images, 3 cases" in r.stdout
    assert sheet.is_file() and Image.open(sheet).size[1] == 3 * 128  # one row per modality
    (root / "images" / "3.png").unlink()
    r = run("data", "summary", str(root), "--sheet", str(sheet))
    assert r.returncode == 1 and "missing" in r.stdout


def test_data_summary_without_manifest_is_a_clear_error(tmp_path):
    r = run("data", "summary", str(tmp_path))
    assert r.returncode == 2 and "manifest.csv" in r.stdout


def test_label_end_to_end_with_a_tiny_model(tmp_path):
    """`medqm label --plan quick` on a three-image collection with a tiny LLaVA built and saved locally."""
    import pandas as pd

    from medqm.io.collection import default_collection, load_manifest
    from medqm.label.tiny import build_tiny_vlm

    model = build_tiny_vlm("llava", tmp_path / "tiny-llava", seed=0)
    df = load_manifest(default_collection())
    sub = df[df.modality.isin(["CT", "US", "PATH"])].groupby("modality").head(1).drop(columns=["abs_path"])
    coll = tmp_path / "coll"
    for p in sub.path:
        (coll / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(default_collection() / p, coll / p)
    sub.to_csv(coll / "manifest.csv", index=False)
    out = tmp_path / "labels"
    r = run("label", "--tasks", "demo", "--collection", str(coll), "--plan", "quick", "--model", str(model),
            "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    labels = pd.read_parquet(out / "labels.parquet")
    dist = pd.read_parquet(out / "distorted" / "manifest.parquet")
    assert len(labels) == len(dist) + 3 and set(labels.ref_id) == set(sub.id)
    assert labels.quality.between(0, 1).all() and (labels.model_id == "tiny-llava").all()
    assert (labels[labels.type == "reference"].quality.round(6) == 0.9).all()
    r2 = run("label", "--tasks", "demo", "--collection", str(coll), "--plan", "quick", "--model", str(model),
             "--out", str(out))
    assert r2.returncode == 0 and "already done" in r2.stdout
    pd.testing.assert_frame_equal(labels, pd.read_parquet(out / "labels.parquet"))
