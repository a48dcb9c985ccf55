"""CT sinogram distortions: contract (determinism, replay, gating, calibration) and one physics check each."""

import json

import numpy as np
import pytest

from medqm.distort import DistortionNotApplicable, create_distortion, ct, distort, list_distortions
from medqm.distort.calibration import reference_sample, ssim
from medqm.io.collection import default_collection

CT_TYPES = ["ct_low_dose", "ct_sparse_view", "ct_metal_streaks", "ct_ring"]


@pytest.fixture(scope="module")
def ct_images():
    """Three real CT slices from different cases of the demo collection."""
    refs = [r for r in reference_sample(default_collection(), n_per_modality=4, seed=0) if r.modality == "CT"]
    assert len(refs) >= 3
    return refs[:3]


@pytest.fixture(scope="module")
def ct_px(ct_images):
    return ct_images[0].pixels


def test_registered_for_ct_only():
    assert set(CT_TYPES) <= set(list_distortions("CT"))
    assert not set(CT_TYPES) & set(list_distortions("MR"))
    for name in CT_TYPES:
        d = create_distortion(name)
        assert d.family == "ct" and d.modalities == ("CT",) and d.color is False


@pytest.mark.parametrize("name", CT_TYPES)
def test_deterministic_and_replayable(name, ct_images):
    img = ct_images[0]
    a = distort(img, name, 3, seed=7)
    b = distort(img, name, 3, seed=7)
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.pixels.shape == img.pixels.shape and a.pixels.dtype == np.float32
    assert np.isfinite(a.pixels).all()
    params = json.loads(json.dumps(a.params))  # params survive a JSON manifest
    replayed = create_distortion(name).replay(img.pixels, params)
    assert replayed.tobytes() == a.pixels.tobytes()


@pytest.mark.parametrize("name", ["ct_low_dose", "ct_metal_streaks", "ct_ring"])
def test_seed_changes_random_types(name, ct_px):
    assert not np.array_equal(distort(ct_px, name, 3, seed=1).pixels, distort(ct_px, name, 3, seed=2).pixels)


@pytest.mark.parametrize("name", CT_TYPES)
def test_modality_gating(name, demo_refs):
    d = create_distortion(name)
    non_ct = next(r for r in demo_refs if r.modality not in (None, "CT") and not r.is_color)
    with pytest.raises(DistortionNotApplicable):
        d(non_ct, 1)
    colour = next(r for r in demo_refs if r.is_color)
    with pytest.raises(DistortionNotApplicable):
        d(colour, 1)
    with pytest.raises(DistortionNotApplicable):  # colour has no sinogram even when the modality check is skipped
        d(colour, 1, force=True)


def test_ssim_decreases_with_level(ct_images):
    for name in CT_TYPES:
        d = create_distortion(name)
        med = [np.median([ssim(r.pixels, d(r, level, 0).pixels) for r in ct_images]) for level in range(1, 6)]
        assert np.all(np.diff(med) < 0), (name, np.round(med, 3))
        assert med[0] >= 0.9, (name, med[0])


def test_non_square_image_keeps_shape(ct_px):
    crop = ct_px[20:220, :]
    for name in CT_TYPES:
        out = distort(crop, name, 2, seed=0).pixels
        assert out.shape == crop.shape


# --- the projector -------------------------------------------------------------------------------------


def test_projector_matches_skimage_radon(ct_px):
    from skimage.transform import radon

    theta = np.array([0.0, 17.0, 45.0, 90.0, 133.5])
    ours = ct.radon(ct_px, theta)
    ref = radon(ct_px.astype(np.float64), theta, circle=False)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_disc_projection_matches_projector_geometry():
    """The analytic metal sinogram lands on the same bins as the projected painted disc."""
    theta = ct._theta(36)
    yy, xx = np.mgrid[:256, :256]
    row, col, radius = 70, 180, 6.0
    disc = ((yy - row) ** 2 + (xx - col) ** 2 <= radius**2).astype(np.float32)
    numeric = ct.radon(disc, theta)
    analytic = ct._disc_projection(numeric.shape[0], theta, row, col, radius, 128)
    bins = np.arange(numeric.shape[0])[:, None]
    centroid = lambda s: (s * bins).sum(0) / s.sum(0)  # noqa: E731
    assert np.abs(centroid(numeric) - centroid(analytic)).max() < 0.1
    assert analytic.sum(0) == pytest.approx(np.pi * radius**2, rel=0.03)  # chord lengths sampled at bin centres


# --- physics ---------------------------------------------------------------------------------------------


def _unclipped(px):
    """Pixels inside the display window (clipped ones are pushed out by CLIP_MARGIN before the artifact)."""
    return (px > 0) & (px < 1)


def test_clipped_pixels_stay_clipped_under_mild_artifacts(ct_images):
    img = next(r.pixels for r in ct_images if (r.pixels == 0).mean() > 0.2)  # air below the window
    for name in CT_TYPES:
        out = distort(img, name, 3, seed=0).pixels
        assert np.mean(out[img == 0] == 0) > 0.98, name


def test_low_dose_noise_scales_as_inverse_sqrt_dose(ct_px):
    d = create_distortion("ct_low_dose")
    ok = _unclipped(ct_px)
    rms = {i0: np.std((d.apply(ct_px, {"I0": i0, "noise_seed": 3}) - ct_px)[ok]) for i0 in (1e6, 1e4)}
    # Gaussian regime: variance of −log(counts/I0) is exp(p)/I0, so 100× less dose → 10× the noise
    assert rms[1e4] / rms[1e6] == pytest.approx(10.0, rel=0.15)
    # and at an enormous dose the added noise vanishes: the radon → FBP round trip itself adds nothing
    assert np.abs(d.apply(ct_px, {"I0": 1e12, "noise_seed": 3}) - ct_px)[ok].max() < 2e-3


def test_sparse_view_streaks_grow_as_views_drop(ct_px):
    d = create_distortion("ct_sparse_view")
    ok = _unclipped(ct_px)
    assert np.abs(d.apply(ct_px, {"views": ct.N_VIEWS}) - ct_px)[ok].max() < 1e-4  # the reference geometry
    err = [np.sqrt(np.mean((d.apply(ct_px, {"views": v}) - ct_px)[ok] ** 2)) for v in (150, 90, 45, 24, 12)]
    assert np.all(np.diff(err) > 0), np.round(err, 4)


def test_metal_bright_with_dark_streak_between_objects(ct_px):
    d = create_distortion("ct_metal_streaks")
    params = d.level_params(4) | {"radius": 5.0, "sites": [0.25, 0.75], "noise_seed": 0}
    out = d.apply(ct_px, params)
    (r0, c0), (r1, c1) = d._centres(ct._attenuation(ct_px), params["sites"], 5.0)
    assert ct._attenuation(ct_px)[[r0, r1], [c0, c1]].min() > 0.2  # inside the body
    assert out[r0, c0] > 1.5 and out[r1, c1] > 1.5  # the metal itself is far above the window
    assert np.hypot(r1 - r0, c1 - c0) > 30
    err = out - ct_px
    yy, xx = np.mgrid[: ct_px.shape[0], : ct_px.shape[1]]
    near = ((yy - r0) ** 2 + (xx - c0) ** 2 <= 81) | ((yy - r1) ** 2 + (xx - c1) ** 2 <= 81)
    t = np.linspace(0, 1, 400)
    rr, cc = np.round(r0 + t * (r1 - r0)).astype(int), np.round(c0 + t * (c1 - c0)).astype(int)
    keep = ~near[rr, cc] & _unclipped(ct_px)[rr, cc]
    # beam hardening under-counts the rays through both objects → the classic dark band joining them
    assert err[rr[keep], cc[keep]].mean() < -0.05
    assert abs(err[~near & _unclipped(ct_px)].mean()) < 0.01


def test_ring_error_is_concentric_about_the_centre(ct_px):
    d = create_distortion("ct_ring")
    params = d.sample(4, np.random.default_rng(0))
    px = ct_px * 0.9 + 0.05  # nothing clipped, so the error is the ring image alone
    err = (d.apply(px, params) - px).astype(np.float64)
    n = px.shape[0]
    # symmetric under the square's rotations about the rotation centre (pixel n // 2)
    e = err[1:, 1:]
    assert np.linalg.norm(e - np.rot90(e)) < 1e-3 * np.linalg.norm(e)
    assert np.linalg.norm(e - e.T) < 1e-3 * np.linalg.norm(e)
    # radial profile varies, each circle is flat: variance of the ring means ≫ variance along the rings
    yy, xx = np.mgrid[:n, :n]
    rad = np.hypot(yy - n // 2, xx - n // 2)
    r4 = np.round(rad * 4).astype(int)  # quarter-pixel radius bins
    inside = rad < n // 2 - 2
    counts = np.bincount(r4[inside])
    means = np.bincount(r4[inside], err[inside]) / np.maximum(counts, 1)
    radial_var = np.var(means[counts > 0])
    angular_var = np.mean((err[inside] - means[r4[inside]]) ** 2)
    assert radial_var > 5 * angular_var
    # the rings sit at the radii of the bad detector elements
    profile = np.abs(means[: 4 * (n // 2 - 2)])
    peak_r = np.argmax(profile) / 4
    radii = np.array(params["radii"]) * n / 2
    assert np.abs(radii - peak_r).min() <= 1.5
