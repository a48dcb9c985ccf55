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
