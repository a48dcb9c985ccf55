"""Scoring: files, folders and in-memory images through a saved checkpoint; heatmaps; per-file errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import medqm
from medqm.io import read_image
from medqm.model import QualityScore, Scorer, create_model, load_prompt_bank, preprocess
from medqm.model.scoring import Letterbox, heatmap_to_image

IMG = 64
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.py: one thread for small tensors
DICOMS = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("medqm_i", pretrained_backbone=False, img_size=IMG)
    model.eval()
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "medqm-i-test")


@pytest.fixture
def dicom_folder(tmp_path):
    d = tmp_path / "series"
    d.mkdir()
    for name in DICOMS:
        shutil.copy(get_testdata_file(name), d / name)
    data = (d / "CT_small.dcm").read_bytes()
    (d / "corrupt.dcm").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut short
    return d


def test_dicom_folder_with_one_corrupt_file_gives_scores_and_one_error_row(checkpoint, dicom_folder):
    df = Scorer(checkpoint, runtime="torch", batch_size=2).score_files([dicom_folder])
    assert len(df) == len(DICOMS) + 1
    errors = df[df.error != ""]
    assert len(errors) == 1 and errors.path.iloc[0].endswith("corrupt.dcm") and np.isnan(errors.quality.iloc[0])
    ok = df[df.error == ""]
    assert sorted(Path(p).name for p in ok.path) == sorted(DICOMS)
    assert ok.quality.between(0, 1).all() and (ok.modality.isin(["CT", "MR"])).all()


def test_cli_score_writes_table_and_heatmaps(checkpoint, dicom_folder, tmp_path):
    out, hm = tmp_path / "scores.csv", tmp_path / "heat"
    medqm_bin = str(Path(sys.executable).with_name("medqm"))
    r = subprocess.run([medqm_bin, "score", str(dicom_folder), "--model", str(checkpoint), "--out", str(out),
                        "--heatmaps", str(hm), "--runtime", "torch"], capture_output=True, text=True, env=ENV,
                        timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 images scored, 1 failed" in r.stdout and "corrupt.dcm" in r.stdout
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 4 and (df.error != "").sum() == 1
    ok = df[df.error == ""]
    for _, row in ok.iterrows():  # one overlay per scored image, at the image's own size
        assert Image.open(row.heatmap).size == (int(row.width), int(row.height))
    r = subprocess.run([medqm_bin, "score", str(dicom_folder), "--model", str(checkpoint), "--out",
                        str(tmp_path / "x.txt")],
                       capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 2 and ".csv, .parquet or .json" in r.stdout


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_score_table_formats(checkpoint, dicom_folder, tmp_path, suffix):
    from medqm.model import write_scores

    df = Scorer(checkpoint, runtime="torch").score_files([dicom_folder])
    p = write_scores(df, tmp_path / f"s{suffix}")
    back = pd.read_parquet(p) if suffix == ".parquet" else pd.read_json(p)
    assert len(back) == len(df) and set(df.columns) <= set(back.columns)


def test_heatmap_has_the_image_shape_and_sums_to_one(checkpoint):
    rng = np.random.default_rng(0)
    img = rng.random((50, 83), dtype=np.float32)  # non-square: letterboxed, then mapped back
    res = medqm.score(img, model=checkpoint, heatmaps=True, runtime="torch")
    assert isinstance(res, QualityScore) and 0 <= res.quality <= 1
    assert res.heatmap.shape == (50, 83) and (res.heatmap >= 0).all()
    assert res.heatmap.sum() == pytest.approx(1.0, abs=1e-4)
    colour = medqm.score((rng.random((40, 30, 3)) * 255).astype(np.uint8), model=checkpoint, heatmaps=True,
                         runtime="torch")
    assert colour.heatmap.shape == (40, 30)


def test_heatmap_mass_follows_the_attention():
    """Mapping back keeps where the mass is: all mass in the top-left of the content stays top-left."""
    box = Letterbox(height=40, width=80, scale=0.8, top=16, left=0, inner_height=32, inner_width=64)
    hm = np.zeros((64, 64), np.float32)
    hm[16:24, 0:16] = 1.0
    out = heatmap_to_image(hm, box)
    assert out.shape == (40, 80) and out.sum() == pytest.approx(1.0, abs=1e-5)
    assert out[:10, :20].sum() > 0.9


def test_python_api_accepts_paths_arrays_medimages_and_lists(checkpoint, dicom_folder):
    ct = read_image(dicom_folder / "CT_small.dcm")
    one = medqm.score(ct, model=checkpoint, runtime="torch")
    assert one.path.endswith("CT_small.dcm") and one.gates.shape == (4,) and one.expert in range(4)
    many = medqm.score([ct, ct.pixels], model=checkpoint, runtime="torch")
    assert [type(r) for r in many] == [QualityScore, QualityScore]
    assert many[0].quality == pytest.approx(one.quality, abs=1e-6) == pytest.approx(many[1].quality, abs=1e-6)
    table = medqm.score(dicom_folder / "CT_small.dcm", model=checkpoint, runtime="torch")
    assert isinstance(table, pd.DataFrame) and table.quality.iloc[0] == pytest.approx(one.quality, abs=1e-6)
    with pytest.raises(ValueError, match="uint8 or float"):
        medqm.score(np.zeros((8, 8), np.uint16), model=checkpoint, runtime="torch")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        medqm.score(np.full((8, 8), 300.0, np.float32), model=checkpoint, runtime="torch")
    with pytest.raises(TypeError, match="only images"):
        medqm.score([ct, "x.png"], model=checkpoint)


def test_batching_does_not_change_scores(checkpoint):
    rng = np.random.default_rng(1)
    imgs = [rng.random((60, 60), dtype=np.float32) for _ in range(5)]
    a = [r.quality for r in Scorer(checkpoint, batch_size=1, runtime="torch").score_pixels(imgs)]
    b = [r.quality for r in Scorer(checkpoint, batch_size=4, runtime="torch").score_pixels(imgs)]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_preprocess_letterboxes_and_replicates_grayscale():
    x, box = preprocess(np.ones((30, 60), np.float32), 64)
    assert x.shape == (3, 64, 64) and box.inner_width == 64 and box.inner_height == 32 and box.top == 16
    assert x[:, :16].max() == 0 and x[:, 16:48].min() > 0.99


def test_missing_default_checkpoint_is_a_clear_error(monkeypatch, tmp_path):
    from medqm.model import scoring

    monkeypatch.setattr(scoring, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="medqm train"):
        Scorer()


def test_prompt_bank_travels_with_the_checkpoint(checkpoint):
    assert (checkpoint / "prompts.txt").read_text().count("\n") > len(load_prompt_bank())


def test_checkpoint_info_reads_the_folder_without_the_model(checkpoint, tmp_path):
    import hashlib

    from medqm.model import checkpoint_info

    info = checkpoint_info(checkpoint)
    assert info.path == checkpoint and info.meta["architecture"] == "medqm_i"
    assert info.meta["config"]["img_size"] == IMG and info.meta["num_params"] > 0
    assert info.weights_sha256 == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert info.trained_on is None  # an untrained model records no training data
    with pytest.raises(FileNotFoundError, match="not a MedQM-I checkpoint"):
        checkpoint_info(tmp_path)
    shipped = checkpoint_info()  # the shipped default records what it was trained on
    assert shipped.path.name == "medqm-i-demo" and shipped.trained_on["quality_map"]["center"] > 0
