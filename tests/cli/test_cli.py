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
    from medqm.testing import build_tiny_vlm

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


def test_info_names_images_by_relative_path_and_counts_skipped_files(tmp_path):
    """Same-named files in different folders are told apart; sidecars are counted (and listed with --verbose)."""
    from typer.testing import CliRunner

    from medqm.cli import app

    root = tmp_path / "study"
    for sub, value in (("a", 10), ("b/c", 200)):
        (root / sub).mkdir(parents=True)
        Image.fromarray(np.full((8, 12), value, np.uint8)).save(root / sub / "x.png")
    shutil.copy(get_testdata_file("emri_small.dcm"), root / "a" / "mri.dcm")  # 10 frames
    (root / "README.txt").write_text("about this study\n")
    (root / "b" / "meta.json").write_text("{}")
    (root / "b" / "profile.icc").write_bytes(b"\x00\x00\x02\x0cacspAPPL" + b"\x00" * 100)
    (root / "b" / "junk.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    single = tmp_path / "other" / "x.png"
    single.parent.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(single)

    runner = CliRunner()
    r = runner.invoke(app, ["info", str(root), str(single)])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if "x.png" in line]
    names = sorted(line.split("│")[1].strip() for line in rows)
    assert names == ["a/x.png", "b/c/x.png", "x.png"]  # folder argument: relative path; file argument: its name
    assert "a/mri.dcm#0" in r.output and "a/mri.dcm#9" in r.output
    assert "b/junk.dcm: not a DICOM file (no DICM preamble or valid dataset)" in r.output
    # 4 image files (a/x.png, b/c/x.png, a/mri.dcm, other/x.png) + 1 unreadable + 3 skipped = 8 files
    assert "8 files found: 4 read (13 images), 1 unreadable, 3 skipped as not images (--verbose lists them)" in r.output
    assert "README.txt" not in r.output

    r = runner.invoke(app, ["info", str(root), "--verbose"])
    assert r.exit_code == 0, r.output
    for name in ("README.txt", "b/meta.json", "b/profile.icc"):
        assert f"skipped {name} (not an image format)" in r.output
    assert "7 files found: 3 read (12 images), 1 unreadable, 3 skipped as not images" in r.output


def test_distortions_for_angiography_lists_the_xray_types():
    from typer.testing import CliRunner

    from medqm.cli import app

    r = CliRunner().invoke(app, ["distortions", "XA"])
    assert r.exit_code == 0, r.output
    assert "xray_scatter" in r.output and "grid_lines" in r.output and "gaussian_noise" in r.output
    assert "ct_ring" not in r.output and "ghosting" not in r.output
