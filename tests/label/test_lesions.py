"""Synthetic lesions in real demo backgrounds: determinism, masks, contrast, texture, detectability, lesion sets."""

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medqm.io.collection import default_collection, load_manifest, read_collection_image
from medqm.label.tasks import QUADRANTS, demo_questions, mask_quadrant
from medqm.synth import (
    DEFAULT_PER_MODALITY,
    LESION_COLUMNS,
    LESION_PARAMS,
    anatomy_mask,
    insert_lesion,
    make_lesion_set,
)

DEMO = default_collection()
LUMA = np.array([0.299, 0.587, 0.114])
# lesion-free backgrounds of each modality: lung CT in a lung window, brain / breast / head MR, chest and leg
# radiograph crops, fundus crops
BACKGROUNDS = {
    "CT": ["ct-lung1-s010", "ct-lung2-s030", "ct-pancreas"],
    "MR": ["mr-brain1-s005", "mr-breast1-s003", "mr-mni152-ax-s094"],
    "XR": ["xr-chest", "xr-chest-c06", "xr-tibia-c02"],
    "FUNDUS": ["fundus-normal", "fundus-normal-c04", "fundus-normal-c09"],
}
CASES = [(m, i) for m, ids in BACKGROUNDS.items() for i in ids]


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(DEMO).set_index("id", drop=False)


@pytest.fixture(scope="module")
def pixels(manifest):
    return {i: read_collection_image(manifest.loc[i]).pixels for _, i in CASES}


def grey(px):
    return px.astype(np.float64) @ LUMA if px.ndim == 3 else px.astype(np.float64)


def robust_std(x):
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def geometry(info, shape):
    """Distance from the lesion centre, and the ring of background around the lesion (outside its soft edge)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.hypot(yy - info["center"][0], xx - info["center"][1])
    a2, a4 = info["lobulation"]
    outer = info["radius"] * (1 + a2 + a4) + 2 * info["edge_width"]
    return d, (d >= outer) & (d <= 3 * info["radius"])


def test_backgrounds_are_lesion_free(manifest):
    for _, i in CASES:
        assert str(manifest.loc[i, "lesion"]) != "1"


@pytest.mark.parametrize("modality,image_id", CASES)
def test_same_seed_same_image(pixels, modality, image_id):
    px = pixels[image_id]
    out1, m1, info1 = insert_lesion(px, rng_or_seed=7, modality=modality)
    out2, m2, info2 = insert_lesion(px, rng_or_seed=np.random.default_rng(7), modality=modality)
    assert np.array_equal(out1, out2) and np.array_equal(m1, m2) and info1 == info2
    out3, _, info3 = insert_lesion(px, rng_or_seed=8, modality=modality)
    assert not np.array_equal(out1, out3) and info3["center"] != info1["center"]
    assert out1.dtype == np.float32 and out1.shape == px.shape and 0 <= out1.min() and out1.max() <= 1
    assert np.array_equal(pixels[image_id], px)  # input untouched


@pytest.mark.parametrize("modality,image_id", CASES)
def test_mask_centre_and_placement(pixels, modality, image_id):
    px = pixels[image_id]
    anat = anatomy_mask(px)
    for seed in range(4):
        out, mask, info = insert_lesion(px, rng_or_seed=seed, modality=modality)
        ys, xs = np.nonzero(mask)
        assert abs(ys.mean() - info["center"][0]) <= 1 and abs(xs.mean() - info["center"][1]) <= 1
        lo, hi = LESION_PARAMS[modality].radius
        assert lo <= info["radius"] <= hi
        assert abs(mask.sum() - np.pi * info["radius"] ** 2) < 0.35 * np.pi * info["radius"] ** 2
        assert anat[mask].all()  # inside the anatomy, never in padding or the air around the patient
        smooth = ndimage.gaussian_filter(grey(px), 2)
        assert smooth[mask].min() > 0.05
        assert info["quadrant"] == mask_quadrant(mask)
        d, _ = geometry(info, px.shape)
        far = d > info["radius"] * 1.18 + 4 * info["edge_width"] + 1  # beyond the soft edge nothing changes
        assert np.array_equal(out[far], px[far])


@pytest.mark.parametrize("modality", list(BACKGROUNDS))
def test_contrast_sign(pixels, modality):
    signs = set()
    for image_id in BACKGROUNDS[modality]:
        px = pixels[image_id]
        for seed in range(6):
            out, mask, info = insert_lesion(px, rng_or_seed=seed, modality=modality)
            _, ring = geometry(info, px.shape)
            against_ring = grey(out)[mask].mean() - grey(px)[ring & anatomy_mask(px)].mean()
            assert np.sign(against_ring) == np.sign(info["contrast"])
            signs.add(int(np.sign(info["contrast"])))
            if modality == "FUNDUS":
                diff = (out[mask] - px[mask]).mean(axis=0)
                if info["kind"] == "haemorrhage":  # dark red: every channel darker, red keeps most of its level
                    assert (diff < 0).all() and info["contrast"] < 0
                    assert (out[mask].mean(0) / px[mask].mean(0)).argmax() == 0
                else:  # exudate: yellow, so red and green rise most
                    assert info["kind"] == "exudate" and (diff > 0).all() and diff[2] < min(diff[0], diff[1])
            elif modality in ("CT", "XR"):  # a bright nodule brightens what it covers
                assert grey(out)[mask].mean() > grey(px)[mask].mean()
    if modality in ("CT", "XR"):
        assert signs == {1}
    else:
        assert signs == {-1, 1}  # both kinds occur (hyper/hypointense; haemorrhage/exudate)


@pytest.mark.parametrize("modality,image_id", CASES)
def test_texture_matches_the_surroundings(pixels, modality, image_id, monkeypatch):
    """The lesion's high-pass residual has the std of the background's around it: no flat sticker.

    Radiographs add the lesion to the anatomy, so there the residual inside must be the background's own
    (same pixels, before and after); elsewhere the lesion replaces the tissue and carries synthetic texture
    matched to the ring around it, without which its inside would be much smoother.
    """
    from medqm.synth import lesions

    px = pixels[image_id]

    def hp(img):
        g = grey(img)
        return g - ndimage.gaussian_filter(g, 1.0)

    for seed in range(3):
        out, mask, info = insert_lesion(px, rng_or_seed=seed, modality=modality, radius=8.0)
        d, ring = geometry(info, px.shape)
        core = d <= 0.5 * info["radius"]
        inside = robust_std(hp(out)[core])
        if LESION_PARAMS[modality].opacity == 0:
            reference = robust_std(hp(px)[core])
        else:
            reference = robust_std(hp(px)[ring & anatomy_mask(px)])
        if max(inside, reference) < 1 / 255:  # both below one grey level of the 8-bit image: nothing to see
            continue
        assert 0.5 <= inside / reference <= 2.0, (seed, inside, reference)
    if LESION_PARAMS[modality].opacity > 0:
        monkeypatch.setattr(lesions, "_texture", lambda rng, shape, blur: np.zeros(shape))
        out, _, info = insert_lesion(px, rng_or_seed=0, modality=modality, radius=8.0)
        d, ring = geometry(info, px.shape)
        sticker = robust_std(hp(out)[d <= 0.5 * info["radius"]])
        assert sticker < 0.5 * robust_std(hp(px)[ring & anatomy_mask(px)]) or sticker < 0.5 / 255


@pytest.mark.parametrize("modality,image_id", CASES)
def test_detectable_but_not_trivial(pixels, modality, image_id):
    """Contrast-to-noise: (mean inside the mask − mean of the ring around) / std of the ring, in [1, 8].

    Below ~1 a lesion of this size is hard to tell from anatomy; far above it is a glaring sticker. The
    sampler keeps |c| / σ_ring within the modality's ``cnr`` range (1.8–5, fundus 2–8); the measured ratio
    is lower by the soft edge (α averages ~0.8 inside the mask).
    """
    px = pixels[image_id]
    anat = anatomy_mask(px)
    for seed in range(5):
        out, mask, info = insert_lesion(px, rng_or_seed=seed, modality=modality)
        g = grey(out)
        _, ring = geometry(info, px.shape)
        ring &= anat
        cnr = abs(g[mask].mean() - g[ring].mean()) / g[ring].std()
        assert 1.0 <= cnr <= 8.0, (seed, cnr, info)
        lo, hi = LESION_PARAMS[modality].contrast
        assert lo <= abs(info["contrast"]) <= hi


def test_explicit_parameters_and_quadrants(pixels):
    px = pixels["mr-brain1-s005"]
    out, mask, info = insert_lesion(px, rng_or_seed=0, modality="MRI", radius=6, contrast=-0.2, center=(100, 90))
    assert info["center"] == (100, 90) and info["radius"] == 6 and info["contrast"] == -0.2
    assert info["kind"] == "hypointense lesion" and info["quadrant"] == "upper left" and mask[100, 90]
    for q in QUADRANTS:
        _, mask, info = insert_lesion(px, rng_or_seed=1, modality="MR", quadrant=q)
        assert info["quadrant"] == q == mask_quadrant(mask)


def test_errors(pixels):
    px = pixels["ct-lung1-s010"]
    with pytest.raises(ValueError, match="no lesion model for modality 'US'"):
        insert_lesion(px, rng_or_seed=0, modality="US")
    with pytest.raises(ValueError, match="not a CT lesion kind"):
        insert_lesion(px, rng_or_seed=0, modality="CT", kind="exudate")
    tiny = np.zeros(px.shape, bool)
    tiny[10:20, 10:20] = True
    with pytest.raises(ValueError, match="no room for a lesion"):
        insert_lesion(px, rng_or_seed=0, modality="CT", body_mask=tiny)
    with pytest.raises(ValueError, match="quadrant must be one of"):
        insert_lesion(px, rng_or_seed=0, modality="CT", quadrant="middle")
    with pytest.raises(TypeError, match="float display values"):
        insert_lesion((px * 255).astype(np.uint8), rng_or_seed=0, modality="CT")


# --- lesion sets

SMALL = {"CT": 3, "MR": 3, "XR": 2, "FUNDUS": 2}


@pytest.fixture(scope="module")
def lesion_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synles")
    rows = make_lesion_set(DEMO, out, per_modality=SMALL, variants=2, seed=3)
    return out, rows


def test_lesion_set_layout(lesion_set, manifest):
    out, rows = lesion_set
    df = load_manifest(out)
    demo_cols = list(load_manifest(DEMO).columns.drop("abs_path"))
    assert list(df.columns.drop("abs_path")) == demo_cols + list(LESION_COLUMNS)
    assert len(df) == len(rows) == 3 * sum(SMALL.values())  # per background: one negative, two hybrids
    counts = Counter(zip(df["modality"], df["lesion"].astype(str), strict=True))
    for mod, n in SMALL.items():
        assert counts[(mod, "0")] == n and counts[(mod, "1")] == 2 * n
    for r in df.itertuples():
        bg = manifest.loc[r.background_id]
        assert str(bg["lesion"]) != "1"  # never a real lesion-positive image
        assert r.case_id == bg["case_id"] and r.modality == bg["modality"]  # case-level splits stay right
        img = np.asarray(Image.open(r.abs_path))
        mask = np.asarray(Image.open(out / r.mask))
        assert img.dtype == np.uint8 and img.shape == np.asarray(Image.open(bg["abs_path"])).shape
        assert set(np.unique(mask)) <= {0, 255}
        if str(r.lesion) == "0":
            assert r.id == f"{r.background_id}-synneg" and not mask.any()
            assert np.array_equal(img, np.asarray(Image.open(bg["abs_path"])))  # the untouched background
        else:
            assert r.id in (f"{r.background_id}-synles1", f"{r.background_id}-synles2")
            assert r.source_file == f"synthetic lesion on {r.background_id}" and r.licence == bg["licence"]
            ys, xs = np.nonzero(mask)
            assert abs(ys.mean() - int(r.lesion_center_row)) <= 1 and abs(xs.mean() - int(r.lesion_center_col)) <= 1
            assert float(r.lesion_radius) > 0 and float(r.lesion_contrast) != 0
        assert str(r.background_lesion) == str(bg["lesion"]).strip()


def test_lesion_set_is_deterministic(lesion_set, tmp_path):
    out, rows = lesion_set
    again = make_lesion_set(DEMO, tmp_path, per_modality={"CT": 2, "FUNDUS": 1}, variants=2, seed=3)
    first = [r for r in rows if r["modality"] in ("CT", "FUNDUS")]
    # a smaller count gives a prefix of the same rows, pixel for pixel
    prefix = [r for r in first if r["modality"] == "CT"][: 3 * 2] + [r for r in first if r["modality"] == "FUNDUS"][:3]
    assert [r["id"] for r in again] == [r["id"] for r in prefix]
    for a, b in zip(again, prefix, strict=True):
        assert a == b
        assert (tmp_path / a["path"]).read_bytes() == (out / b["path"]).read_bytes()


def test_lesion_set_questions(lesion_set):
    out, rows = lesion_set
    items = demo_questions(out)
    counts = Counter(it.answer_type for it in items)
    assert counts["modality"] == counts["lesion_present"] == len(rows)
    assert counts["lesion_quadrant"] == sum(r["lesion"] == 1 for r in rows)
    present = Counter(it.answer for it in items if it.answer_type == "lesion_present")
    assert present == {"yes": 2 * sum(SMALL.values()), "no": sum(SMALL.values())}
    both = demo_questions([DEMO, out])
    assert len(both) == len(demo_questions(DEMO)) + len(items)
    import pandas as pd

    assert demo_questions(pd.concat([load_manifest(DEMO), load_manifest(out)], ignore_index=True)) == both
    # hybrids aim at the quadrants in turn
    quads = Counter(it.answer for it in items if it.answer_type == "lesion_quadrant")
    assert len(quads) >= 3


def test_default_counts_have_enough_backgrounds(manifest):
    """The default set needs, per modality, that many lesion-free (0 or unknown) demo images."""
    free = manifest[manifest["lesion"].astype(str) != "1"]
    for mod, n in DEFAULT_PER_MODALITY.items():
        assert (free["modality"] == mod).sum() >= n
    assert sum(DEFAULT_PER_MODALITY.values()) >= 150 and len(DEFAULT_PER_MODALITY) >= 4


@pytest.mark.slow
def test_default_lesion_set(tmp_path):
    rows = make_lesion_set(DEMO, tmp_path)
    counts = Counter((r["modality"], r["lesion"]) for r in rows)
    assert counts == Counter({(m, v): n for m, n in DEFAULT_PER_MODALITY.items() for v in (0, 1)})
    with open(tmp_path / "manifest.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
