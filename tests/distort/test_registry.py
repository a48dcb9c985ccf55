"""Contract every registered distortion must meet, parametrized over the registry (as timm tests its models)."""

import json

import numpy as np
import pytest

from medqm.distort import (
    Distortion,
    DistortionNotApplicable,
    DistortionOutputError,
    create_distortion,
    distort,
    list_distortions,
    saturate,
)
from medqm.distort.calibration import MIN_LEVEL1_SSIM, ssim

ALL = list_distortions()


def test_registry_is_large_and_documented():
    assert len(ALL) >= 25
    families = {create_distortion(n).family for n in ALL}
    assert {"generic", "mr", "ct", "xray", "us", "color"} <= families
    for n in ALL:
        d = create_distortion(n)
        assert d.description and len(d.levels) == 5 and d.modalities


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="did you mean gaussian_noise"):
        create_distortion("gausian_noise")


@pytest.mark.parametrize("name", ALL)
def test_contract(name, demo_refs):
    d = create_distortion(name)
    ref = next(r for r in demo_refs if d.applies_to(r.modality, color=r.is_color))
    for level in (1, 5):
        a = d(ref, level, seed=3)
        b = d(ref, level, seed=3)
        assert a.pixels.tobytes() == b.pixels.tobytes(), "same image + type + level + seed must be bit-identical"
        assert a.pixels.shape == ref.pixels.shape and a.pixels.dtype == np.float32
        assert np.isfinite(a.pixels).all() and a.pixels.min() >= 0 and a.pixels.max() <= 1
        # parameters survive a JSON round trip (as in the manifest) and replay the exact output
        params = json.loads(json.dumps(a.params))
        assert d.replay(ref.pixels, params).tobytes() == a.pixels.tobytes()
        assert not np.array_equal(a.pixels, ref.pixels)
    assert ssim(ref.pixels, d(ref, 1).pixels) > ssim(ref.pixels, d(ref, 5).pixels)


@pytest.mark.parametrize("name", [n for n in ALL if create_distortion(n).stochastic])
def test_different_seeds_differ(name, demo_refs):
    d = create_distortion(name)
    ref = next(r for r in demo_refs if d.applies_to(r.modality, color=r.is_color))
    assert not np.array_equal(d(ref, 3, seed=0).pixels, d(ref, 3, seed=1).pixels)


def test_modality_gating(refs_by_modality):
    fundus = refs_by_modality["FUNDUS"][0]
    with pytest.raises(DistortionNotApplicable, match="'spike' models MR images; this image .* is FUNDUS"):
        distort(fundus, "spike", 3)
    with pytest.raises(DistortionNotApplicable):
        distort(refs_by_modality["CT"][0], "speckle", 1)
    distort(refs_by_modality["CT"][0], "speckle", 1, force=True)  # explicit override is allowed
    assert "spike" not in list_distortions("FUNDUS") and "spike" in list_distortions("MR")


def test_levels_validated(demo_refs):
    with pytest.raises(ValueError, match="level must be an integer 1..5"):
        distort(demo_refs[0], "gaussian_noise", 0)


def test_level1_mild_and_monotone_on_a_few_images(demo_refs):
    """The calibration claim on a small sample per type (the full table is in docs/distortions.md)."""
    from medqm.distort.calibration import calibration_problems, ssim_table

    names = [n for n in ALL if create_distortion(n).family in ("generic", "xray", "us", "color")]
    table = ssim_table(demo_refs, names=names)
    assert not calibration_problems(table)
    assert (table[table.level == 1].median_ssim >= MIN_LEVEL1_SSIM).all()


class _Broken(Distortion):
    """A deliberately broken distortion (not registered: no ``name`` when the class is made)."""

    levels = ({"gain": 1.0}, {"gain": 1.5}, {"gain": 2.0}, {"gain": 3.0}, {"gain": 4.0})
    mode = "range"

    def apply(self, pixels, params):
        if self.mode == "nan":
            out = pixels.copy()
            out[0, 0] = np.nan
            return out
        if self.mode == "shape":
            return pixels[1:]
        return pixels * params["gain"]


_Broken.name = "broken_for_test"


def _broken(mode):
    d = _Broken()
    d.mode = mode
    return d


def test_replay_raises_on_a_broken_output_and_never_repairs_it():
    px = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    assert "broken_for_test" not in list_distortions()
    with pytest.raises(DistortionOutputError, match=r"'broken_for_test' at level 3 with parameters \{'gain': 2\.0\} "
                                                    r"produced values in \[0, 2\], outside \[0, 1\]"):
        _broken("range")(px, 3, seed=0, force=True)
    with pytest.raises(DistortionOutputError, match=r"'broken_for_test' at level 1 .* 1 non-finite values"):
        _broken("nan")(px, 1, seed=0, force=True)
    with pytest.raises(DistortionOutputError, match=r"changed the shape \(8, 8\) → \(7, 8\)"):
        _broken("shape").replay(px, {"gain": 1.0})
    with pytest.raises(DistortionOutputError,
                       match=r"with parameters \{'gain': 1\.01\} produced values in \[0, 1\.01\]"):
        _broken("range").replay(px, {"gain": 1.01})  # no level given: the parameters still say which call
    # an output within the contract comes back as it was: nothing clipped, nothing replaced
    out = _broken("range")(px * 0.5, 2, seed=0, force=True).pixels
    assert out.tobytes() == (px * 0.5 * np.float32(1.5)).tobytes()


def test_saturate_clips_to_the_display_range():
    x = np.array([-0.5, 0.0, 0.25, 1.0, 1.5], np.float32)
    np.testing.assert_array_equal(saturate(x), [0.0, 0.0, 0.25, 1.0, 1.0])
