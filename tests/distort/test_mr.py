"""MR distortions: contract (determinism, replay, gating, calibration) and one physics check each."""

import json

import numpy as np
import pytest

from medqm.distort import DistortionNotApplicable, create_distortion, distort, list_distortions
from medqm.distort.calibration import reference_sample, ssim
from medqm.io.collection import default_collection

MR_TYPES = ["rician_noise", "mr_motion", "ghosting", "spike", "bias_field", "gibbs_ringing", "undersampling"]
N = 256


@pytest.fixture(scope="module")
def mr_images():
    """Four real MR slices from different cases of the demo collection."""
    refs = [r for r in reference_sample(default_collection(), n_per_modality=4, seed=0) if r.modality == "MR"]
    assert len(refs) >= 3
    return refs


def _disc(radius=40, value=0.6, centre=(N // 2, N // 2)):
    yy, xx = np.mgrid[:N, :N]
    return np.where((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2, value, 0.0).astype(np.float32)


def _square(r0, r1, c0, c1, value=0.8, background=0.0):
    px = np.full((N, N), background, np.float32)
    px[r0:r1, c0:c1] = value
    return px


# --- contract ------------------------------------------------------------------------------------------


def test_registered_for_mr_only():
    assert set(MR_TYPES) <= set(list_distortions("MR"))
    assert not set(MR_TYPES) & set(list_distortions("CT"))
    for name in MR_TYPES:
        d = create_distortion(name)
        assert d.family == "mr" and d.modalities == ("MR",) and d.color is False
        assert d.description


@pytest.mark.parametrize("name", MR_TYPES)
def test_deterministic_and_replayable(name, mr_images):
    img = mr_images[0]
    a = distort(img, name, 3, seed=7)
    b = distort(img, name, 3, seed=7)
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.pixels.shape == img.pixels.shape and a.pixels.dtype == np.float32
    assert np.isfinite(a.pixels).all() and not np.array_equal(a.pixels, img.pixels)
    params = json.loads(json.dumps(a.params))  # params survive a JSON manifest
    assert create_distortion(name).replay(img.pixels, params).tobytes() == a.pixels.tobytes()
    if name != "gibbs_ringing":  # the only type without random parameters
        assert distort(img, name, 3, seed=8).pixels.tobytes() != a.pixels.tobytes()


@pytest.mark.parametrize("name", MR_TYPES)
def test_non_square_shape_kept(name):
    px = np.random.default_rng(0).uniform(0, 1, (120, 200)).astype(np.float32)
    for level in (1, 5):
        assert distort(px, name, level, seed=1).pixels.shape == (120, 200)


def test_modality_and_colour_gating(refs_by_modality):
    ct = refs_by_modality["CT"][0]
    rgb = np.zeros((32, 32, 3), np.float32)
    for name in MR_TYPES:
        with pytest.raises(DistortionNotApplicable):
            distort(ct, name, 1)
        with pytest.raises(DistortionNotApplicable):
            distort(rgb, name, 1)
        assert distort(ct, name, 1, force=True).pixels.shape == ct.pixels.shape


def test_torch_global_rng_untouched(mr_images):
    # TorchIO's Transform.__call__ draws torch.rand(1) for its probability; we fork the RNG around it
    import torch

    state = torch.random.get_rng_state().clone()
    for name in ("mr_motion", "ghosting", "spike", "bias_field"):
        distort(mr_images[0], name, 2, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("name", MR_TYPES)
def test_ssim_decreases_with_level(name, mr_images):
    d = create_distortion(name)
    med = [np.median([ssim(r.pixels, d(r, level, 0).pixels) for r in mr_images]) for level in range(1, 6)]
    assert med[0] >= 0.9, med
    assert all(b < a for a, b in zip(med, med[1:], strict=False)), med


# --- physics -------------------------------------------------------------------------------------------


def test_rician_noise_floor_and_high_snr():
    d = create_distortion("rician_noise")
    px = np.zeros((N, N), np.float32)
    px[:, N // 2 :] = 0.8
    sigma = 0.05
    out = d.replay(px, {"sigma": sigma, "noise_seed": 3})
    air, tissue = out[:, : N // 2], out[:, N // 2 :]
    # air: Rayleigh, mean sigma·sqrt(pi/2) (a Gaussian model would give 0 before clipping, ~0.4 sigma after)
    assert air.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.03)
    assert air.min() >= 0.0
    # high SNR: ≈ Gaussian around sqrt(A² + sigma²) with std sigma
    assert tissue.mean() == pytest.approx(np.sqrt(0.8**2 + sigma**2), abs=0.003)
    assert tissue.std() == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("phase_axis", [0, 1])
def test_motion_ghosts_spread_along_phase_encoding_only(phase_axis):
    """k-space is mixed line by line along the phase-encoding axis, so the error of a centred disc that moved
    spreads along that axis (into air beside the disc) but never into rows/columns the disc never touched.
    A slice laid out so that TorchIO segments the singleton axis gives no ghost at all (a rigid copy)."""
    d = create_distortion("mr_motion")
    px = _disc(radius=40)
    params = {"times": [0.52], "angles": [0.0], "shifts": [[3.0, 3.0]], "phase_axis": phase_axis,
              "image_interpolation": "linear"}
    err = np.abs(d.replay(px, params) - px)
    if phase_axis == 0:
        err = err.T  # make the phase-encoding axis the column axis
    beside = err[N // 2 - 20 : N // 2 + 20, :60]  # rows through the disc, columns of air far left of it
    far = np.concatenate([err[:70], err[-70:]])  # rows the disc (± the 3 px shift) never reaches
    assert beside.mean() > 5e-3
    assert far.max() < 1e-4


def test_motion_sampling_respects_still_window():
    d = create_distortion("mr_motion")
    for level in range(1, 6):
        table = d.level_params(level)
        for seed in range(5):
            p = d(np.zeros((16, 16), np.float32), level, seed).params
            times = np.asarray(p["times"])
            assert len(times) == len(p["angles"]) == len(p["shifts"]) == table["num_transforms"]
            # all moves on one side of the centre, the nearest exactly `still` away from it
            assert np.all(times > 0.5) or np.all(times < 0.5) or table["still"] == 0
            assert np.min(np.abs(times - 0.5)) == pytest.approx(table["still"], abs=1e-4)
            assert np.all(np.abs(p["angles"]) <= table["degrees"])
            assert np.all(np.hypot(*np.asarray(p["shifts"]).T) <= table["translation"] + 1e-9)


@pytest.mark.parametrize("axis", [0, 1])
def test_ghosting_half_fov_replica_along_axis(axis):
    d = create_distortion("ghosting")
    px = _square(40, 70, 40, 70, value=0.8)
    if axis == 1:
        px = px.T.copy()
    out = d.replay(px, {"num_ghosts": 2, "phase_axis": axis, "intensity": 1.0, "restore": 0.02})
    if axis == 1:
        out, px = out.T, px.T
    ghost = out[40 + N // 2 + 5 : 70 + N // 2 - 5, 45:65]  # shifted by FOV/2 along the ghosting axis
    across = out[45:65, 40 + N // 2 + 5 : 70 + N // 2 - 5]  # same shift along the other axis: nothing
    # every other line zeroed: x/2 ± its half-FOV copy/2; the few restored central lines move signal between
    # object and ghost (a smooth band along the axis) but the two still add up to the object's intensity
    assert ghost.mean() > 0.15
    assert ghost.mean() + out[45:65, 45:65].mean() == pytest.approx(0.8, abs=0.02)
    assert across.max() < 0.02


def test_spike_gives_stripes_at_the_spike_frequency():
    d = create_distortion("spike")
    px = np.full((N, N), 0.5, np.float32)
    # spike 12 lines off centre along rows, 5 along columns; amplitude intensity × mean = 0.1
    pos = [[0.5 + 12 / N, 0.5 + 5 / N, 0.0]]
    out = d.replay(px, {"spikes_positions": pos, "intensity": 0.2})
    spec = np.abs(np.fft.fft2(out - out.mean()))
    peak = np.unravel_index(np.argmax(spec), spec.shape)
    assert peak in {(12, 5), (N - 12, N - 5)}
    assert (out.max() - out.min()) / 2 == pytest.approx(0.1, rel=0.05)  # |0.5 + 0.1 e^{iφ}| ∈ [0.4, 0.6]


def test_bias_field_multiplicative_in_plane_cubic_of_its_range():
    d = create_distortion("bias_field")
    flat = np.full((N, N), 0.02, np.float32)
    texture = np.random.default_rng(0).uniform(0.05, 0.3, (N, N)).astype(np.float32)
    yy, xx = (np.mgrid[:N, :N] - (N - 1) / 2) / ((N - 1) / 2)
    disc = xx**2 + yy**2 <= 0.8**2
    basis = np.stack([xx.ravel() ** i * yy.ravel() ** j for i in range(4) for j in range(4 - i)], axis=1)
    for seed in range(3):
        params = d.sample(3, np.random.default_rng(seed))
        gain = d.replay(flat, params) / 0.02
        assert (flat * gain).max() < 0.99  # nothing clipped
        # multiplicative: the same gain map whatever the image (where nothing clipped at 1)
        ok = texture * gain < 0.999
        np.testing.assert_allclose((d.replay(texture, params) / texture)[ok], gain[ok], rtol=1e-4)
        log_gain = np.log(gain)
        # an in-plane polynomial of order 3: a least-squares cubic in (row, column) fits it exactly
        coef, *_ = np.linalg.lstsq(basis, log_gain.ravel(), rcond=None)
        assert np.abs(basis @ coef - log_gain.ravel()).max() < 1e-3
        # the level's strength: zero mean and a span of log_range over the central disc
        assert np.ptp(log_gain[disc]) == pytest.approx(params["log_range"], rel=0.03)
        assert abs(log_gain[disc].mean()) < 0.02


def test_gibbs_overshoot_is_about_nine_percent():
    d = create_distortion("gibbs_ringing")
    px = _square(64, 192, 64, 192, value=0.6, background=0.2)
    out = d.replay(px, {"keep": 0.3})
    row = out[N // 2]
    overshoot = (row[64:192].max() - 0.6) / 0.4
    assert 0.06 < overshoot < 0.12  # Gibbs: ≈ 8.9 % of the jump
    assert np.abs(out[100:156, 100:156] - 0.6).max() < 0.03  # flat far from the edges
    # ringing, not just blur: the profile oscillates around the plateau
    inner = row[70:186] - 0.6
    assert np.sum(np.diff(np.sign(inner)) != 0) >= 4


@pytest.mark.parametrize("phase_axis", [0, 1])
def test_undersampling_aliases_at_fov_over_r(phase_axis):
    d = create_distortion("undersampling")
    px = _square(20, 40, 100, 130, value=0.8)
    if phase_axis == 1:
        px = px.T.copy()
    for r in (2, 3, 4):
        # the centre line on the comb, so the kept lines are exactly every R-th: R copies of amplitude 1/R
        params = {"acceleration": r, "center": 0.001, "phase_axis": phase_axis, "offset": (N // 2) % r}
        out = d.replay(px, params)
        if phase_axis == 1:
            out = out.T
        for k in range(r):
            shift = (k * N) // r
            copy = out[20 + shift + 3 : 40 + shift - 3, 103:127]
            assert copy.mean() == pytest.approx(0.8 / r, abs=0.02), (r, k)
        assert out[:, :90].max() < 0.03  # no copy along the fully sampled readout axis
    # a fully sampled centre puts the low frequencies back: the alias keeps only edges, much fainter
    out = d.replay(px, {"acceleration": 2, "center": 0.08, "phase_axis": phase_axis, "offset": 1})
    if phase_axis == 1:
        out = out.T
    obj, alias = out[23:37, 103:127].mean(), out[20 + N // 2 + 3 : 40 + N // 2 - 3, 103:127].mean()
    assert obj > 0.7 and 0.01 < alias < 0.2
