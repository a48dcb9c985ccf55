"""DICOM reading against pydicom's own test corpus (pydicom + pydicom-data)."""

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from medqm.io import MedImage, MedQMReadError, read_image, read_images


def _check_valid(im: MedImage):
    assert im.pixels.dtype == np.float32
    assert np.isfinite(im.pixels).all()
    assert im.pixels.min() >= 0.0 and im.pixels.max() <= 1.0
    assert im.pixels.ndim == 2 or im.pixels.shape[2] == 3
    assert im.modality and im.case_id and im.path and im.bits_stored > 0
    assert len(im.value_range) == 2 and im.value_range[0] <= im.value_range[1]


def test_every_pydicom_testdata_file_loads_or_fails_cleanly(capsys):
    files = get_testdata_files()
    assert len(files) > 200, "pydicom-data should be installed (test extra)"
    loaded, refused = [], []
    for f in files:
        try:
            images = read_images(f)
        except MedQMReadError as e:
            assert e.path == str(f) and e.reason
            refused.append((f, e.reason))
            continue
        assert images
        for im in images:
            _check_valid(im)
        loaded.append(f)
    with capsys.disabled():
        print(f"\npydicom test corpus: {len(loaded)} of {len(files)} files load, {len(refused)} refused")
    dicom_like = [f for f in files if not f.endswith((".txt", ".json", ".dump", ".icc", ".gz")) and "README" not in f]
    assert len(loaded) >= 0.55 * len(dicom_like)
    # non-image objects are refused with the reason, not decoded
    reasons = dict((f.rsplit("/", 1)[-1], r) for f, r in refused)
    assert "RT Plan" in reasons["rtplan.dcm"]
    assert "ECG" in reasons["waveform_ecg.dcm"]
    assert "SR" in reasons["test-SR.dcm"]


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
             "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"]
)
def test_mr_small_variants_agree_with_uncompressed(name):
    ref = read_image(get_testdata_file("MR_small.dcm"))
    im = read_image(get_testdata_file(name))
    # all these variants are lossless: the decoded display image must be identical
    np.testing.assert_array_equal(im.pixels, ref.pixels)
    assert im.value_range == ref.value_range


@pytest.mark.parametrize("lossless,lossy,tol", [("RG1_UNCR.dcm", "RG1_J2KR.dcm", 0.0),
                                                ("MR2_UNCR.dcm", "MR2_J2KR.dcm", 0.0),
                                                ("US1_UNCR.dcm", "US1_J2KR.dcm", 0.0),
                                                ("MR2_UNCI.dcm", "MR2_J2KI.dcm", 1e-6)])
def test_jpeg2000_matches_uncompressed(lossless, lossy, tol):
    a, b = read_image(get_testdata_file(lossless)), read_image(get_testdata_file(lossy))
    assert np.abs(a.pixels - b.pixels).max() <= tol


def test_rescale_and_window_ct():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    im = read_image(get_testdata_file("CT_small.dcm"), window="lung")
    assert im.value_range == (hu.min(), hu.max())
    expected = np.clip((hu - (-600 - 750)) / 1500, 0, 1)
    np.testing.assert_allclose(im.pixels, expected, atol=1e-6)
    assert im.window == (-600.0, 1500.0)
    im2 = read_image(get_testdata_file("CT_small.dcm"), window=(40, 400))
    np.testing.assert_allclose(im2.pixels, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)
    assert im.spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert im.case_id == ds.PatientID and im.modality == "CT"


def test_monochrome1_is_inverted(tmp_path):
    src = get_testdata_file("RG3_UNCR.dcm")  # CR, MONOCHROME1
    im = read_image(src)
    assert im.meta["source_photometric"] == "MONOCHROME1" and im.modality == "CR"  # the DICOM code is kept
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "MONOCHROME2"
    p = tmp_path / "as_mono2.dcm"
    ds.save_as(p)
    mono2 = read_image(p)
    np.testing.assert_allclose(im.pixels, 1.0 - mono2.pixels, atol=1e-6)
    # in MONOCHROME1 the lowest stored value is white
    raw = ds.pixel_array
    r, c = np.unravel_index(np.argmin(raw), raw.shape)
    assert im.pixels[r, c] == pytest.approx(1.0)


def test_multiframe_frames_and_index():
    f = get_testdata_file("emri_small.dcm")
    frames = read_images(f)
    assert len(frames) == 10 and [im.index for im in frames] == list(range(10))
    raw = pydicom.dcmread(f).pixel_array
    one = read_image(f, index=7)
    assert one.index == 7
    np.testing.assert_array_equal(one.pixels, frames[7].pixels)
    assert not np.array_equal(frames[0].pixels, frames[7].pixels)
    assert np.corrcoef(one.pixels.ravel(), raw[7].ravel())[0, 1] > 0.999
    with pytest.raises(MedQMReadError, match="out of range"):
        read_image(f, index=10)


def test_ybr_and_palette_become_rgb():
    ybr = read_images(get_testdata_file("examples_ybr_color.dcm"))
    assert len(ybr) == 30 and all(im.pixels.shape == (240, 320, 3) for im in ybr)
    pal = read_image(get_testdata_file("OBXXXX1A.dcm"))
    assert pal.photometric == "RGB" and pal.pixels.shape == (600, 800, 3)
    # YBR_FULL uncompressed must decode to the same colours as the RGB original (8-bit rounding only)
    a, b = read_image(get_testdata_file("SC_rgb.dcm")), read_image(get_testdata_file("SC_ybr_full_uncompressed.dcm"))
    assert np.abs(a.pixels - b.pixels).max() <= 6 / 255


def test_voi_lut_sequence_is_applied():
    im = read_image(get_testdata_file("vlut_04.dcm"))
    _check_valid(im)
    assert im.window is None  # a LUT, not a linear window


def test_truncated_and_huge_dicom(tmp_path):
    src = get_testdata_file("CT_small.dcm")
    data = open(src, "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(MedQMReadError) as e:
        read_image(cut)
    assert e.value.path == str(cut)

    ds = pydicom.dcmread(src)
    ds.Rows = ds.Columns = 65535
    big = tmp_path / "bomb.dcm"
    ds.save_as(big)
    with pytest.raises(MedQMReadError, match="exceeds the limit"):
        read_image(big)


def test_dicom_without_extension_and_preamble(tmp_path):
    p = tmp_path / "IMG0001"
    shutil.copy(get_testdata_file("CT_small.dcm"), p)
    assert read_image(p).modality == "CT"


def test_zero_pixel_spacing_is_unknown_not_zero():
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    im = read_image(get_testdata_file("RG1_UNCR.dcm"))
    imager = ds.get("ImagerPixelSpacing")
    expected = (float(imager[0]), float(imager[1])) if imager and float(imager[0]) > 0 else None
    assert im.spacing == expected


# -------------------------------------------------------------------------------------------------- content, not suffix


def _random_bytes(n=4096, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("content", [
    _random_bytes(),
    b"patient notes, not an image at all\n" * 40,
    b"\x00" * 512,  # zeros parse as DICOM command-group elements when forced
])
def test_non_dicom_named_dcm_is_an_unsupported_format(tmp_path, content):
    from medqm.io import MedQMUnsupportedFormatError

    p = tmp_path / "x.dcm"
    p.write_bytes(content)
    with pytest.raises(MedQMUnsupportedFormatError) as e:
        read_image(p)
    assert isinstance(e.value, MedQMReadError) and e.value.path == str(p)
    assert e.value.reason == "not a DICOM file (no DICM preamble or valid dataset)"
    # the same bytes under another name: the documented unrecognised-format error, also unsupported-format
    q = tmp_path / "x.bin"
    q.write_bytes(content)
    with pytest.raises(MedQMUnsupportedFormatError, match="unrecognised file format"):
        read_image(q)


def test_dicom_without_preamble_still_reads(tmp_path):
    from pydicom.filewriter import write_dataset

    src = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(src)
    raw = tmp_path / "raw.dcm"  # a bare dataset: no preamble, no DICM, no file meta (ACR-NEMA style)
    with open(raw, "wb") as f:
        fp = pydicom.filebase.DicomFileLike(f)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
    assert raw.read_bytes()[128:132] != b"DICM"
    im, ref = read_image(raw), read_image(src)
    assert im.modality == "CT" and im.shape == ref.shape
    np.testing.assert_array_equal(im.pixels, ref.pixels)
    for name in ("OT-PAL-8-face.dcm",):  # pydicom's own preamble-less image
        f = get_testdata_file(name)
        assert open(f, "rb").read(132)[128:132] != b"DICM"
        assert read_image(f).shape == (int(pydicom.dcmread(f, force=True).Rows),
                                       int(pydicom.dcmread(f, force=True).Columns))
    # a preamble-less non-image object keeps the non-image reason (422 in the service), not "not a DICOM file"
    plan = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    bare = tmp_path / "plan.dcm"
    with open(bare, "wb") as f:
        fp = pydicom.filebase.DicomFileLike(f)
        fp.is_little_endian, fp.is_implicit_VR = True, plan.file_meta.TransferSyntaxUID.is_implicit_VR
        write_dataset(fp, plan)
    with pytest.raises(MedQMReadError, match="no pixel data") as e:
        read_image(bare)
    assert type(e.value) is MedQMReadError


# ----------------------------------------------------------------------------------------------- projection X-ray codes


@pytest.mark.parametrize("code", ["XA", "RF", "DX", "CR", "MG"])
def test_xray_dicom_modalities_stay_distinct_and_get_xray_distortions(tmp_path, code):
    from medqm.distort import create_distortion, list_distortions
    from medqm.io import modality_family

    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # multi-frame (10 frames), MR in the file
    ds.Modality = code
    p = tmp_path / f"{code.lower()}.dcm"
    ds.save_as(p)
    images = read_images(p)
    assert len(images) == 10 and all(im.modality == code for im in images)
    assert images[0].meta["dicom_modality"] == code
    types = list_distortions(images[0].modality)
    assert {"xray_scatter", "grid_lines"} <= set(types)
    assert not {"ghosting", "spike", "ct_ring", "ct_metal_streaks"} & set(types)
    scatter = create_distortion("xray_scatter")
    scatter.check(images[0])  # applicable: no DistortionNotApplicable
    assert scatter(images[0], level=3, seed=0).pixels.shape == images[0].pixels.shape
    assert modality_family(code) == ("MG" if code == "MG" else "XR")
