"""The scoring input pipeline: worker processes, shared-memory transport, prefetching, bfloat16 autocast, CLI checks."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medqm.cli import app
from medqm.io import ReadFailure, read_image, walk_image_files
from medqm.model import Scorer, create_model
from medqm.model.scoring import PreparedFiles, PreparedImage, prefetch, prepare_file, unpack_prepared

IMG = 64
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "images"

# bfloat16 keeps 8 bits of mantissa. On the 315 held-out demo images the shipped checkpoint's bf16-autocast scores
# (CPU) differ from float32 by at most 0.0593, mean 0.0040, 99th percentile 0.034, Spearman ρ between the runs
# 0.997 (bench/dtype_agreement.py, docs/medqm-i.md); the 14 images of the test below differ by ≤ 0.028, mean 0.0034.
# The bounds: the largest single difference seen on the 315 images, and 2.5× their mean difference.
BF16_MAX_DIFF = 0.06
BF16_MEAN_DIFF = 0.01


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("medqm_i", pretrained_backbone=False, img_size=IMG)
    return model.eval().save_pretrained(tmp_path_factory.mktemp("ckpt") / "medqm-i-test")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Grey and colour PNGs, a 10-frame DICOM, a corrupt DICOM in the middle, an RGB DICOM and a sidecar file."""
    d = tmp_path_factory.mktemp("mixed")
    shutil.copy(DEMO / "CT" / "ct-head-j2k.png", d / "01-ct.png")
    shutil.copy(sorted((DEMO / "FUNDUS").glob("*.png"))[0], d / "02-fundus.png")
    shutil.copy(get_testdata_file("emri_small.dcm"), d / "03-emri.dcm")
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (d / "04-corrupt.dcm").write_bytes(data[: len(data) // 2])
    shutil.copy(get_testdata_file("SC_rgb.dcm"), d / "05-rgb.dcm")
    (d / "06-notes.csv").write_text("not,an,image\n")
    shutil.copy(sorted((DEMO / "XR").glob("*.png"))[0], d / "07-xr.png")
    return d


def test_workers_give_the_same_rows_scores_and_heatmaps_as_the_single_threaded_path(checkpoint, mixed_folder,
                                                                                      tmp_path):
    tables = {}
    for workers in (0, 2):
        scorer = Scorer(checkpoint, runtime="torch", batch_size=3, workers=workers)
        tables[workers] = scorer.score_files([mixed_folder], heatmap_dir=tmp_path / f"heat{workers}")
    single, parallel = tables[0], tables[2]
    # 1 + 1 + 10 frames + 1 failure + 1 + 1; the sidecar csv is skipped
    assert len(single) == 15 and (single.error != "").sum() == 1
    assert single.error.iloc[12] != "" and single.path.iloc[12].endswith("04-corrupt.dcm")  # the failure at its place
    assert list(single["index"].iloc[2:12]) == list(range(10))
    pd.testing.assert_frame_equal(single.drop(columns="heatmap"), parallel.drop(columns="heatmap"))
    # the overlays are drawn from the pixels that came back from the workers: byte-identical files
    for a, b in zip(single.heatmap.dropna(), parallel.heatmap.dropna(), strict=True):
        assert Path(a).name == Path(b).name and Path(a).read_bytes() == Path(b).read_bytes()
    # without heatmaps the workers keep the pixels (only shapes travel): the same table
    lean = Scorer(checkpoint, runtime="torch", batch_size=3, workers=2).score_files([mixed_folder])
    pd.testing.assert_frame_equal(single.drop(columns="heatmap"), lean.drop(columns="heatmap"))
    # the default (None: one worker here, six files being more than one batch of three) gives the same table
    auto = Scorer(checkpoint, runtime="torch", batch_size=3)
    assert auto.workers is None
    auto_table = auto.score_files([mixed_folder]).drop(columns="heatmap")
    pd.testing.assert_frame_equal(single.drop(columns="heatmap"), auto_table)


def test_shared_memory_items_unpack_to_what_prepare_file_gives(mixed_folder):
    files = list(walk_image_files(mixed_folder))
    data = PreparedFiles(files, IMG, files_per_item=4)
    assert len(data) == 2  # 6 image files, four per item
    got = unpack_prepared(data[0]) + unpack_prepared(data[1])
    want = [p for f in files for p in prepare_file(f, IMG)]
    assert len(got) == len(want) == 15
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w)
        if isinstance(w, ReadFailure):
            assert g == w
            continue
        assert isinstance(g, PreparedImage)
        np.testing.assert_array_equal(g.input, w.input)
        np.testing.assert_array_equal(g.image.pixels, w.image.pixels)
        assert g.box == w.box and g.image.id == w.image.id and g.image.modality == w.image.modality


def test_items_without_pixels_keep_the_shapes_and_metadata(mixed_folder):
    files = list(walk_image_files(mixed_folder))
    items = unpack_prepared(PreparedFiles(files, IMG, files_per_item=6, pixels=False)[0])
    want = [p for f in files for p in prepare_file(f, IMG)]
    for g, w in zip(items, want, strict=True):
        if isinstance(w, PreparedImage):
            assert g.image.shape == w.image.shape and g.image.id == w.image.id and not g.image.pixels.any()
            np.testing.assert_array_equal(g.input, w.input)


def test_iter_files_with_workers_can_be_left_early(checkpoint, mixed_folder):
    it = Scorer(checkpoint, runtime="torch", batch_size=2, workers=2).iter_files([mixed_folder])
    first = next(it)
    it.close()  # stops the prefetch thread and the DataLoader workers; must not hang
    assert first[0].path.endswith("01-ct.png") and 0 <= first[1].quality <= 1


def test_prefetch_keeps_order_and_raises_where_the_producer_failed():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield from range(5)
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for x in prefetch(failing()):
            seen.append(x)
    assert seen == [0, 1, 2, 3, 4]


def test_bfloat16_autocast_on_cpu_agrees_with_float32():
    """The shipped checkpoint on real demo images (two per modality): bf16 autocast runs and stays close."""
    images = [read_image(p) for m in sorted(DEMO.iterdir()) for p in sorted(m.glob("*.png"))[:2]]
    fp32 = np.array([r.quality for r in Scorer(runtime="torch", batch_size=8).score_pixels(images)])
    scorer = Scorer(runtime="auto", batch_size=8, dtype="bfloat16")
    assert scorer.runtime == "torch"  # 'auto' does not pick the float32 ONNX graph for bf16
    bf16 = np.array([r.quality for r in scorer.score_pixels(images)])
    diff = np.abs(fp32 - bf16)
    assert 0 < diff.max() <= BF16_MAX_DIFF  # > 0: autocast really ran in bf16
    assert diff.mean() <= BF16_MEAN_DIFF
    assert ((bf16 >= 0) & (bf16 <= 1)).all()


def test_scorer_rejects_bad_workers_dtype_and_device(checkpoint):
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        Scorer(checkpoint, workers=-1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Scorer(checkpoint, dtype="float64")
    with pytest.raises(ValueError, match="needs runtime='torch'"):
        Scorer(checkpoint, runtime="onnx", dtype="bfloat16")
    with pytest.raises(ValueError, match="float16' is for CUDA"):
        Scorer(checkpoint, dtype="float16")
    with pytest.raises(ValueError, match="device must be"):
        Scorer(checkpoint, device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match="no CUDA device is available"):
        Scorer(checkpoint, device="cuda", runtime="torch")


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "-2"], "--workers must be >= 0, got -2"),
    (["--dtype", "float64"], "--dtype must be float32, bfloat16 or float16, got 'float64'"),
    (["--dtype", "bfloat16", "--runtime", "onnx"], "--dtype bfloat16 needs --runtime torch"),
])
def test_cli_score_validates_workers_and_dtype(checkpoint, mixed_folder, tmp_path, args, message):
    r = CliRunner().invoke(app, ["score", str(mixed_folder), "--model", str(checkpoint), "--out",
                                 str(tmp_path / "s.csv"), *args])
    assert r.exit_code == 2 and message in r.output.replace("\n", "")


def test_cli_score_with_workers_and_bfloat16(checkpoint, mixed_folder, tmp_path):
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(app, ["score", str(mixed_folder), "--model", str(checkpoint), "--out", str(out),
                                 "--runtime", "torch", "--workers", "2", "--dtype", "bfloat16", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    assert "14 images scored, 1 failed" in r.output
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 15 and df.path.iloc[12].endswith("04-corrupt.dcm") and df.error.iloc[12] != ""
