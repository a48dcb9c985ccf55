"""Classical no-reference baselines (`medqm.evaluate.baselines`): calibration, registry, inputs, cheap signals.

Calibration values are pyiqa's published scores for its own implementations, the rows "niqe(ours)",
"brisque(ours)", "piqe(ours)" and "entropy(ours)" of ``ResultsCalibra/calibration_summary.csv`` in the
IQA-PyTorch repository (commit 065c2b73eecc7fbfc5dde75cccb5328bf62f3cc6), with pyiqa's per-metric tolerances
(NIQE ±0.01, BRISQUE ±0.05, PIQE ±0.05). The images are pyiqa's calibration images from TID2013; see
``tests/evaluate/data/README.md``. Everything here runs offline; the comparison against pyiqa itself runs
only where pyiqa is installed (``pip install --no-deps pyiqa==0.1.16``, see the ``baselines`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medqm.evaluate import aligned_score, baseline_info, create_baseline, list_baselines, score_images
from medqm.evaluate import baselines as B
from medqm.io import MedImage

DATA = Path(__file__).parent / "data"
IMAGES = ("I03", "I04", "I06", "I08", "I19")

PUBLISHED = {
    "niqe": (15.6538, 3.6549, 3.2342, 3.1921, 9.0722),
    "brisque": (94.6452, -0.1082, 1.0759, 5.1423, 66.8381),
    "piqe": (100.0, 21.6242, 35.8646, 41.147, 76.9485),
    "entropy": (6.9511, 6.9661, 7.5309, 7.5565, 5.7629),
}
TOLERANCE = {"niqe": 0.01, "brisque": 0.05, "piqe": 0.05, "entropy": 0.001}
REFERENCE_METRICS = ("niqe", "brisque", "piqe")
CHEAP = ("entropy", "total_variation", "noise_sigma", "laplacian_variance")


def _load(name: str) -> np.ndarray:
    """An 8-bit file as the scorers take it (float32 in [0, 1]), as pyiqa's loader does: u8 / 255 in float32."""
    with Image.open(DATA / f"{name}.bmp") as im:
        return np.asarray(im.convert("RGB")).astype(np.float32) / np.float32(255)


@pytest.fixture(scope="module")
def calibration_images() -> dict[str, np.ndarray]:
    return {name: _load(name) for name in IMAGES}


@pytest.fixture(scope="module")
def grey256() -> np.ndarray:
    """A natural grey 256×256 image in [0, 1]: scikit-image's camera, 2×2-averaged, on the 8-bit grid."""
    from skimage import data

    cam = data.camera().astype(np.float64)
    small = cam.reshape(256, 2, 256, 2).mean(axis=(1, 3))
    return (np.round(small) / 255).astype(np.float32)


@pytest.fixture(scope="module")
def rgb256() -> np.ndarray:
    from skimage import data

    astro = data.astronaut().astype(np.float64)
    small = astro.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    return (np.round(small) / 255).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# calibration against the published reference values
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", list(PUBLISHED))
def test_calibration_matches_published_values(metric, calibration_images):
    scorer = create_baseline(metric)
    got = np.array([scorer(calibration_images[name]) for name in IMAGES])
    want = np.array(PUBLISHED[metric])
    err = np.abs(got - want)
    assert err.max() <= TOLERANCE[metric], (
        f"{metric}: got {np.round(got, 4).tolist()}, published {want.tolist()}, max error {err.max():.4f}"
    )


def test_calibration_images_are_the_published_ones(calibration_images):
    for name, img in calibration_images.items():
        assert img.shape == (384, 512, 3) and img.dtype == np.float32, name


# --------------------------------------------------------------------------------------------------------------
# optional: against pyiqa itself, fed medqm's shipped parameter files
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pyiqa_metrics(tmp_path_factory):
    pyiqa = pytest.importorskip("pyiqa")
    import scipy.io
    import torch

    tmp = tmp_path_factory.mktemp("pyiqa_params")
    niqe_p = B._params("niqe_pris_params.npz")
    # the file layouts pyiqa reads: NIQE's modelparameters.mat and a (sv_coef, sv) tensor pair for BRISQUE
    mat = {"mu_prisparam": niqe_p["mu_pris_param"][None], "cov_prisparam": niqe_p["cov_pris_param"]}
    scipy.io.savemat(tmp / "niqe.mat", mat)
    svm = B._params("brisque_svm_live.npz")
    torch.save((torch.from_numpy(svm["sv_coef"]), torch.from_numpy(svm["sv"])), tmp / "brisque.pth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small images: threads only add contention; restored below
    try:
        yield {
            "niqe": pyiqa.create_metric("niqe", device="cpu", pretrained_model_path=str(tmp / "niqe.mat")),
            "brisque": pyiqa.create_metric("brisque", device="cpu", pretrained_model_path=str(tmp / "brisque.pth")),
            "piqe": pyiqa.create_metric("piqe", device="cpu"),
        }
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("metric", REFERENCE_METRICS)
def test_agrees_with_installed_pyiqa(metric, pyiqa_metrics, calibration_images, grey256, rgb256):
    import torch

    # BRISQUE: pyiqa evaluates its SVR in float32 (sums of ±1024 coefficients), so it is only good to ~0.01
    tol = {"niqe": 1e-4, "brisque": 0.02, "piqe": 1e-3}[metric]
    images = [*calibration_images.values(), grey256, rgb256]
    for img in images:
        t = torch.from_numpy(img if img.ndim == 3 else img[..., None]).permute(2, 0, 1)[None]
        want = float(pyiqa_metrics[metric](t))
        assert create_baseline(metric)(img) == pytest.approx(want, abs=tol)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------
def test_registry_lists_reference_metrics_and_cheap_signals():
    assert set(REFERENCE_METRICS + CHEAP) <= set(list_baselines())
    assert list_baselines() == sorted(list_baselines())


@pytest.mark.parametrize("name", list_baselines())
def test_every_baseline_scores_grey_and_colour(name, grey256, rgb256):
    scorer = create_baseline(name)
    info = baseline_info(name)
    assert info.name == name and isinstance(info.lower_better, bool) and info.description
    lo, hi = info.score_range
    for img in (grey256, rgb256):
        value = scorer(img)
        assert isinstance(value, float) and math.isfinite(value)
        if not info.range_is_typical:
            assert lo <= value <= hi
        assert aligned_score(name, img) == (-value if info.lower_better else value)


def test_direction_metadata():
    assert all(baseline_info(n).lower_better for n in ("niqe", "brisque", "piqe", "noise_sigma"))
    assert not any(baseline_info(n).lower_better for n in ("entropy", "total_variation", "laplacian_variance"))
    assert baseline_info("piqe").score_range == (0.0, 100.0) and not baseline_info("piqe").range_is_typical


@pytest.mark.parametrize(("typo", "suggestion"), [("nique", "niqe"), ("brisqe", "brisque"), ("PIQE", "piqe")])
def test_unknown_name_suggests_close_matches(typo, suggestion):
    with pytest.raises(ValueError, match=rf"unknown baseline '{typo}'.*did you mean.*'{suggestion}'"):
        create_baseline(typo)
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_info(typo)


def test_unknown_name_without_match_lists_registered():
    with pytest.raises(ValueError, match="Registered: .*niqe"):
        create_baseline("zzzz")


def test_score_images_batches_and_aligns(grey256, rgb256):
    images = [grey256, rgb256, grey256[:128, :200]]
    raw = score_images("piqe", images)
    assert raw.shape == (3,) and raw.dtype == np.float64
    assert raw.tolist() == [B.piqe(img) for img in images]
    np.testing.assert_array_equal(score_images("piqe", images, aligned=True), -raw)
    np.testing.assert_array_equal(score_images("entropy", iter(images), aligned=True), score_images("entropy", images))
    assert score_images(create_baseline("niqe"), []).shape == (0,)


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_baselines())
def test_grey_equals_replicated_grey(name, grey256):
    scorer = create_baseline(name)
    rgb = np.repeat(grey256[..., None], 3, axis=2)
    assert scorer(rgb) == scorer(grey256)
    assert scorer(grey256[..., None]) == scorer(grey256)  # H×W×1
    assert scorer(grey256.astype(np.float64)) == scorer(grey256)


def test_medimage_is_accepted(grey256):
    image = MedImage(pixels=grey256, path="camera.png", modality="OT")
    assert B.niqe(image) == B.niqe(grey256)


@pytest.mark.parametrize("name", REFERENCE_METRICS + CHEAP)
def test_rejects_bad_input(name, grey256):
    scorer = create_baseline(name)
    with pytest.raises(TypeError, match=r"astype\(np.float32\) / 255"):
        scorer((grey256 * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="channels must come last"):
        scorer(np.repeat(grey256[None], 3, axis=0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer(grey256 * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer(grey256 - 0.5)
    bad = grey256.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        scorer(bad)
    with pytest.raises(ValueError, match="H×W or H×W×3"):
        scorer(np.zeros((8, 8, 4), np.float32) + 0.5)


def test_minimum_sizes(grey256):
    with pytest.raises(ValueError, match=r"niqe: needs at least 96×96 pixels, got 95×256"):
        B.niqe(grey256[:95])
    assert math.isfinite(B.niqe(grey256[:96, :96]))
    with pytest.raises(ValueError, match="at least 16×16"):
        B.piqe(grey256[:15, :15])


def test_flat_images():
    flat = np.full((128, 128), 0.5, np.float32)
    assert math.isnan(B.niqe(flat))  # no textured block: undefined, as in the reference
    assert B.piqe(flat) == 100.0 and B.piqe(np.zeros((32, 32), np.float32)) == 100.0
    assert B.entropy(flat) == 0.0 and B.total_variation(flat) == 0.0
    assert B.noise_sigma(flat) == 0.0 and B.laplacian_variance(flat) == 0.0


def test_piqe_pads_like_matlab(grey256):
    # MATLAB pads a size that is not a multiple of 16 symmetrically up to whole blocks (pyiqa pads by the
    # remainder and crops); scoring the padded image directly must give the same number
    part = grey256[:250, :233]
    padded = np.pad(part, ((0, 6), (0, 7)), mode="symmetric")
    assert B.piqe(part) == B.piqe(padded)


# --------------------------------------------------------------------------------------------------------------
# cheap signals against values worked out by hand
# --------------------------------------------------------------------------------------------------------------
def test_entropy_known_values():
    half = np.zeros((64, 64), np.float32)
    half[:, 32:] = 1.0
    assert B.entropy(half) == pytest.approx(1.0, abs=1e-12)  # two equally likely levels: 1 bit
    all_levels = (np.arange(256, dtype=np.float32) / 255).reshape(16, 16)
    assert B.entropy(all_levels) == pytest.approx(8.0, abs=1e-12)
    quarter = np.zeros((64, 64), np.float32)
    quarter[:16] = 1.0  # p = (3/4, 1/4)
    assert B.entropy(quarter) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), abs=1e-12)


def test_total_variation_of_ramps():
    d = 1 / 255
    ramp = np.tile(np.arange(200) * d, (50, 1)).astype(np.float64)  # rises by d per column, flat down columns
    assert B.total_variation(ramp) == pytest.approx(d, rel=1e-12)
    assert B.total_variation(ramp.T.copy()) == pytest.approx(d, rel=1e-12)
    diagonal = (np.arange(40)[:, None] + np.arange(40)[None, :]) * (0.5 / 80)
    assert B.total_variation(diagonal) == pytest.approx(2 * 0.5 / 80, rel=1e-12)


def test_noise_sigma_ignores_planes_and_finds_white_noise():
    y, x = np.mgrid[0:256, 0:256]
    plane = 0.2 + 0.001 * x + 0.0015 * y
    assert B.noise_sigma(plane) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    noisy = 0.5 + rng.normal(0.0, 0.05, size=(256, 256))
    assert B.noise_sigma(noisy) == pytest.approx(0.05, rel=0.03)


def test_laplacian_variance_known_values():
    checker = (np.indices((32, 32)).sum(axis=0) % 2).astype(np.float64)
    # each pixel's four neighbours have the other value: Laplacian = ±4 in equal shares, variance 16
    assert B.laplacian_variance(checker) == pytest.approx(16.0, rel=1e-12)
    x = np.arange(64) / 64
    parabola = np.tile(0.5 * x**2, (64, 1))  # constant second difference: variance 0
    assert B.laplacian_variance(parabola) == pytest.approx(0.0, abs=1e-20)


def test_blur_lowers_sharpness_signals(grey256):
    from scipy.ndimage import uniform_filter

    blurred = uniform_filter(grey256.astype(np.float64), size=5)
    assert B.laplacian_variance(blurred) < B.laplacian_variance(grey256)
    assert B.total_variation(blurred) < B.total_variation(grey256)


# --------------------------------------------------------------------------------------------------------------
# parameter files
# --------------------------------------------------------------------------------------------------------------
def test_shipped_parameter_files_hold_the_reference_models():
    niqe_p = B._params("niqe_pris_params.npz")
    assert niqe_p["mu_pris_param"].shape == (36,) and niqe_p["cov_pris_param"].shape == (36, 36)
    np.testing.assert_allclose(niqe_p["cov_pris_param"], niqe_p["cov_pris_param"].T)
    svm = B._params("brisque_svm_live.npz")
    assert svm["sv"].shape == (774, 36) and svm["sv_coef"].shape == (774,)
    assert float(svm["gamma"]) == 0.05 and float(svm["rho"]) == -153.591
    assert svm["feature_range"].shape == (36, 2) and svm["scale_target"].tolist() == [-1.0, 1.0]
    params_dir = Path(B.__file__).parent / "params"
    assert (params_dir / "README.md").is_file()
    for f in params_dir.glob("*.npz"):
        with np.load(f, allow_pickle=False) as archive:  # plain arrays only: loading must not need pickle
            assert all(archive[k].dtype == np.float64 for k in archive.files)
