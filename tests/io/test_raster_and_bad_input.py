"""PNG/TIFF/NPY reading, the bad-input classes, and fault-tolerant folder walking."""

import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file

from medqm.io import MedQMReadError, ReadFailure, iter_images, read_image, resize_pad


def test_png_16bit_keeps_range(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 64).reshape(64, 256).astype(np.uint16)
    p = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(p)  # Pillow writes a 16-bit grayscale PNG from uint16
    assert Image.open(p).mode.startswith("I")
    im = read_image(p)
    assert im.bits_stored == 16 and im.value_range == (0.0, 65535.0)
    np.testing.assert_allclose(im.pixels, ramp / 65535.0, atol=1e-7)
    assert len(np.unique(im.pixels)) > 256  # more levels than any 8-bit image can hold


def test_png_8bit_rgb_and_grey_as_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    im = read_image(tmp_path / "c.png", modality="fundus")
    assert im.pixels.shape == (20, 30, 3) and im.modality == "FUNDUS"
    np.testing.assert_allclose(im.pixels, rgb / 255.0, atol=1e-7)
    grey = np.repeat(rgb[..., :1], 3, axis=2)
    Image.fromarray(grey).save(tmp_path / "g.bmp")
    assert read_image(tmp_path / "g.bmp").pixels.shape == (20, 30)


def test_tiff_16bit_and_npy(tmp_path):
    a = (np.arange(100 * 80) % 4096).reshape(100, 80).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a)
    im = read_image(tmp_path / "a.tif")
    assert im.bits_stored == 16 and im.value_range == (0.0, 4095.0)
    np.testing.assert_allclose(im.pixels, a / 65535.0, atol=1e-7)
    f = np.linspace(-1000, 3000, 50 * 40, dtype=np.float32).reshape(50, 40)
    np.save(tmp_path / "hu.npy", f)
    ct = read_image(tmp_path / "hu.npy", modality="CT", window="bone")
    np.testing.assert_allclose(ct.pixels, np.clip((f - (400 - 900)) / 1800, 0, 1), atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_pixels_refused(tmp_path, bad):
    a = np.zeros((10, 10), np.float32)
    a[3, 3] = bad
    np.save(tmp_path / "x.npy", a)
    with pytest.raises(MedQMReadError, match="NaN or infinite"):
        read_image(tmp_path / "x.npy")


def _png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    def decode(*_a, **_k):
        raise AssertionError("the pixels were decoded: the size check must come first")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)  # refusing from the header alone is what keeps it fast
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(MedQMReadError, match="exceeds the limit") as e:
        read_image(p)
    assert "bomb.png" in str(e.value)


def test_bad_inputs_name_file_and_reason(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    good = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.dcm").write_text("not an image at all\n" * 20)
    cases = {
        "empty.dcm": "0 bytes",
        "trunc.png": "unreadable image",
        "notes.dcm": "",
        "missing.png": "cannot open",
    }
    for name, reason in cases.items():
        with pytest.raises(MedQMReadError) as e:
            read_image(tmp_path / name)
        assert e.value.path == str(tmp_path / name) and reason in e.value.reason
    for name in ("rtplan.dcm", "waveform_ecg.dcm", "test-SR.dcm"):
        with pytest.raises(MedQMReadError, match="not an image"):
            read_image(get_testdata_file(name))


def test_caller_argument_errors_are_value_errors(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="unknown window"):
        read_image(tmp_path / "a.png", window="lungs-ish")
    with pytest.raises(ValueError, match="unknown modality"):
        read_image(tmp_path / "a.png", modality="photo")


def test_iter_images_never_stops_on_bad_files(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "sub" / "b.dcm").write_bytes(b"")
    (tmp_path / "sub" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "sub" / "d.npy").write_bytes(np.lib.format.magic(1, 0) + b"broken")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "sub" / "z.png")
    (tmp_path / "manifest.csv").write_text("id,path\n")  # sidecars in folders are not images: skipped
    items = list(iter_images([tmp_path, get_testdata_file("emri_small.dcm")]))
    failures = [i for i in items if isinstance(i, ReadFailure)]
    images = [i for i in items if not isinstance(i, ReadFailure)]
    assert sorted(f.path.rsplit("/", 1)[-1] for f in failures) == ["b.dcm", "c.png", "d.npy"]
    assert all(f.reason for f in failures)
    assert len(images) == 2 + 10  # two PNGs and the ten frames of emri_small, after the bad files


def test_resize_pad_keeps_aspect():
    a = np.zeros((100, 200), np.float32)
    a[:, :100] = 1.0
    out, scale, (top, left) = resize_pad(a, 256)
    assert out.shape == (256, 256) and scale == pytest.approx(1.28)
    assert (top, left) == (64, 0)
    assert out[:64].max() == 0 and out[64 + 128 :].max() == 0  # padding
    assert out[128, 10] == pytest.approx(1.0) and out[128, 250] == 0.0
    rgb = np.random.default_rng(0).random((300, 150, 3)).astype(np.float32)
    out, _, (top, left) = resize_pad(rgb, 64)
    assert out.shape == (64, 64, 3) and (top, left) == (0, 16)
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 90:110] = 1
    m, _, _ = resize_pad(mask, 256, order="nearest")
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
