"""Physics checks of hand-written distortions against independently known values."""

import numpy as np
import pytest

from medqm.distort import create_distortion


def flat(value=0.5, shape=(128, 128)):
    return np.full(shape, value, np.float32)


def test_gaussian_noise_sigma():
    out = create_distortion("gaussian_noise")(flat(), 4, seed=0).pixels
    assert out.std() == pytest.approx(0.10, rel=0.05) and out.mean() == pytest.approx(0.5, abs=0.005)


def test_poisson_noise_variance_is_mean_over_photons():
    d = create_distortion("poisson_noise")
    for value in (0.2, 0.8):
        out = d(flat(value), 3, seed=1).pixels  # 80 photons at full scale
        assert out.var() == pytest.approx(value / 80, rel=0.08)


def test_bit_depth_levels():
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1))
    for level, bits in zip(range(1, 6), (6, 5, 4, 3, 2), strict=True):
        assert len(np.unique(create_distortion("bit_depth")(ramp, level).pixels)) == 2**bits


def test_blur_preserves_mean_and_kills_high_frequencies():
    checker = (np.indices((128, 128)).sum(0) % 2).astype(np.float32)
    for name in ("gaussian_blur", "defocus"):
        out = create_distortion(name)(checker, 5, force=True).pixels
        assert out.mean() == pytest.approx(0.5, abs=0.01)
        assert out[16:-16, 16:-16].std() < 0.05


def test_motion_blur_smears_a_point_along_a_line_of_the_given_length():
    point = np.zeros((101, 101), np.float32)
    point[50, 50] = 1.0
    out = create_distortion("motion_blur")(point, 4, seed=5)  # length 16 px
    ys, xs = np.nonzero(out.pixels > 1e-4)
    extent = np.hypot(ys.max() - ys.min(), xs.max() - xs.min())
    assert extent == pytest.approx(16, abs=2.5)
    angle = np.degrees(np.arctan2(-(ys - 50), xs - 50)[np.hypot(ys - 50, xs - 50) > 4]) % 180
    assert np.median(angle) == pytest.approx(out.params["angle"], abs=6)
    assert out.pixels.sum() == pytest.approx(1.0, rel=1e-3)


def test_downsample_factor_removes_detail_above_nyquist():
    rng = np.random.default_rng(0)
    img = rng.random((256, 256)).astype(np.float32)
    out = create_distortion("downsample")(img, 5).pixels  # factor 7
    spec = np.abs(np.fft.fftshift(np.fft.fft2(out - out.mean())))
    c, cut = 128, int(128 / 7)
    yy, xx = np.indices(spec.shape)
    r = np.hypot(yy - c, xx - c)
    assert spec[r > 2 * cut].mean() < 0.1 * spec[r < cut].mean()


def test_jpeg_quality_matches_pillow_roundtrip():
    import io

    from PIL import Image

    img = (np.random.default_rng(2).random((64, 64)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=20)
    expected = np.asarray(Image.open(buf), np.float32) / 255
    out = create_distortion("jpeg")(img.astype(np.float32) / 255, 3).pixels
    np.testing.assert_array_equal(out, expected)


def test_contrast_reduction_scales_deviation_from_mean():
    img = np.random.default_rng(3).random((64, 64)).astype(np.float32)
    out = create_distortion("contrast_reduction")(img, 5).pixels
    assert out.std() == pytest.approx(0.28 * img.std(), rel=1e-4)


def test_grid_lines_period():
    out = create_distortion("grid_lines")(flat(0.8, (256, 256)), 5, seed=0, force=True)
    profile = out.pixels.mean(axis=0) if out.params["vertical"] else out.pixels.mean(axis=1)
    spec = np.abs(np.fft.rfft(profile - profile.mean()))
    assert 256 / np.argmax(spec) == pytest.approx(out.params["period"], rel=0.15)


def test_speckle_is_multiplicative_with_unit_mean():
    d = create_distortion("speckle")
    out = d(flat(0.4, (256, 256)), 5, seed=0).pixels  # L = 1: exponential intensity, std ≈ mean
    assert out.mean() == pytest.approx(0.4, rel=0.05)
    assert out.std() / out.mean() == pytest.approx(1.0, rel=0.2)
    assert d(flat(0.0), 5).pixels.max() == 0.0  # no signal, no speckle


def test_us_shadow_darkens_below_the_reflector_only():
    out = create_distortion("us_gain_shadow")(flat(0.5, (256, 256)), 5, seed=4)
    p = out.params
    col = int(p["shadow_x"] * 255)
    top = int(p["shadow_top"] * 255)
    assert out.pixels[top + 30 :, col].mean() < 0.3 * out.pixels[: top - 5, col].mean()


def test_stain_shift_changes_colour_not_structure(refs_by_modality):
    from medqm.distort.calibration import ssim

    path = refs_by_modality["PATH"][0]
    out = create_distortion("stain_shift")(path, 3, seed=0).pixels
    grey = lambda x: x.mean(axis=2)  # noqa: E731
    assert np.abs(out - path.pixels).mean() > 0.02
    assert np.corrcoef(grey(out).ravel(), grey(path.pixels).ravel())[0, 1] > 0.9
    assert ssim(grey(out), grey(path.pixels)) > 0.8
