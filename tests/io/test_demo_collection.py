"""The bundled demo collection (data/demo) is complete, consistent and readable."""

from pathlib import Path

import numpy as np
import pytest

from medqm.io import read_image
from medqm.io.collection import load_manifest

ROOT = Path(__file__).resolve().parents[2] / "data" / "demo"


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(ROOT)


def test_size_and_modalities(manifest):
    assert len(manifest) >= 400
    assert manifest["modality"].nunique() >= 6
    assert manifest["case_id"].nunique() >= 20


def test_pyradiomics_tumour_slices(manifest):
    rad = manifest[manifest["source_package"] == "pyradiomics"]
    assert len(rad) == 178
    assert (rad["lesion"].astype(str) == "1").sum() == 27
    for _, row in rad[rad["lesion"].astype(str) == "1"].iterrows():
        mask = read_image(ROOT / row["mask"]).pixels
        assert mask.max() == 1.0, f"{row['id']} is lesion-positive but its mask is empty"


def test_one_source_volume_one_case(manifest):
    # every slice/frame of one source file belongs to one case: a case is never split across case ids
    per_source = manifest.groupby(["source_package", "source_file"])["case_id"].nunique()
    assert (per_source == 1).all(), per_source[per_source > 1]


def test_all_files_are_256_and_readable(manifest):
    for path in manifest["abs_path"]:
        im = read_image(path)
        assert im.shape == (256, 256)
        assert np.isfinite(im.pixels).all()


def test_demo_radiographs_stay_xr_with_xray_distortions(manifest):
    """The demo manifest's XR images keep modality XR (not split into CR/DX) and get the X-ray types."""
    from medqm.distort import list_distortions
    from medqm.io.collection import read_collection_image

    xr = manifest[manifest.modality == "XR"]
    assert len(xr) == 21
    img = read_collection_image(xr.iloc[0].to_dict())
    assert img.modality == "XR"
    assert {"xray_scatter", "grid_lines"} <= set(list_distortions("XR"))
