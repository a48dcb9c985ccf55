"""Volume slicing: slices must come out in radiological display orientation whatever the voxel order on disk."""

import nibabel as nib
import nrrd
import numpy as np
import pytest

from medqm.io import MedQMReadError, read_image, read_images, read_volume_slices

# A right-anterior-superior marker and a left-posterior-inferior one, placed by *world* (RAS mm) coordinates,
# so the expected display position follows from anatomy alone: in an axial slice anterior is at the top and
# the patient's right on the viewer's left; in coronal/sagittal superior is at the top.
AFFINES = {
    "ras_identity": np.array([[1, 0, 0, -10], [0, 1, 0, -15], [0, 0, 1, -12], [0, 0, 0, 1.0]]),
    "x_flipped": np.array([[-1, 0, 0, 10], [0, 1, 0, -15], [0, 0, 1, -12], [0, 0, 0, 1.0]]),
    "xy_swapped": np.array([[0, -1, 0, 15], [1, 0, 0, -10], [0, 0, 1, -12], [0, 0, 0, 1.0]]),
    "lps_like": np.array([[-1, 0, 0, 10], [0, -1, 0, 15], [0, 0, -1, 12], [0, 0, 0, 1.0]]),
}
RAS_MARK, LPI_MARK = (6.0, 8.0, 5.0), (-6.0, -8.0, -5.0)


def _volume(affine):
    vol = np.zeros((31, 31, 25), np.float32)
    inv = np.linalg.inv(affine)
    for world, value in ((RAS_MARK, 100.0), (LPI_MARK, 50.0)):
        ijk = np.round(inv @ np.array([*world, 1.0]))[:3].astype(int)
        vol[tuple(ijk)] = value
    return vol


@pytest.mark.parametrize("name", list(AFFINES))
def test_nifti_axial_coronal_sagittal_orientation(tmp_path, name):
    affine = AFFINES[name]
    p = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(_volume(affine), affine), p)
    for axis in (2, 1, 0):
        images = read_images(p, axis=axis, window=(50, 100))
        assert all(im.meta["axis"] == axis for im in images)
        stack = np.stack([im.pixels for im in images])
        k, r, c = np.unravel_index(np.argmax(stack), stack.shape)  # the right-anterior-superior marker
        k2, r2, c2 = np.unravel_index(np.argmax(np.isclose(stack, 0.5)), stack.shape)  # the left-posterior-inferior one
        # axial: anterior up, patient right on the left; coronal: superior up, right on the left;
        # sagittal: superior up, anterior on the left. In each the RAS marker is up-left of the LPI one.
        assert r < r2 and c < c2
        # slices are ordered along L, P, S: the right/anterior/superior marker sits at the low end for L and P,
        # the high end for S
        assert (k > k2) if axis == 2 else (k < k2)


def test_nrrd_lps_matches_nifti(tmp_path):
    affine = AFFINES["ras_identity"]
    vol = _volume(affine)
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "v.nii")
    # the same volume written as NRRD in LPS space: directions/origin are the RAS ones with x, y negated
    lps = np.diag([-1.0, -1.0, 1.0])
    header = {"space": "left-posterior-superior", "space directions": (lps @ affine[:3, :3]).T,
              "space origin": lps @ affine[:3, 3]}
    nrrd.write(str(tmp_path / "v.nrrd"), vol, header)
    a = read_images(tmp_path / "v.nii", window="minmax")
    b = read_images(tmp_path / "v.nrrd", window="minmax")
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.pixels, y.pixels)
    raw = read_volume_slices(tmp_path / "v.nrrd")
    assert raw[0].shape == a[0].pixels.shape and max(s.max() for s in raw) == 100.0


def test_spacing_window_and_middle_slice(tmp_path):
    affine = np.diag([0.5, 0.8, 3.0, 1.0])
    vol = np.random.default_rng(0).normal(100, 20, (40, 30, 9)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "ct.nii.gz")
    im = read_image(tmp_path / "ct.nii.gz", modality="CT", window=(100, 80))
    assert im.index == 4 and im.modality == "CT"
    assert im.spacing == pytest.approx((0.8, 0.5))  # axial display rows run along y, columns along x
    assert im.bits_stored == 16
    expected = np.clip((vol[::-1, ::-1, 4].T.astype(np.float32) - 60) / 80, 0, 1)
    np.testing.assert_allclose(im.pixels, expected, atol=1e-6)
    sag = read_image(tmp_path / "ct.nii.gz", axis="sagittal", index=3)
    assert sag.spacing == pytest.approx((3.0, 0.8)) and sag.pixels.shape == (9, 30)


def test_volume_bad_inputs(tmp_path):
    vol = np.zeros((8, 8, 4), np.float32)
    vol[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(MedQMReadError, match="NaN"):
        read_images(tmp_path / "nan.nii.gz")
    data = (tmp_path / "nan.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedQMReadError):
        read_images(tmp_path / "cut.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "ok.nii")
    with pytest.raises(MedQMReadError, match="out of range"):
        read_image(tmp_path / "ok.nii", index=4)
