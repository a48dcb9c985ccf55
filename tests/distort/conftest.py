import pytest

from medqm.distort.calibration import reference_sample
from medqm.io.collection import default_collection


@pytest.fixture(scope="session")
def demo_refs():
    """Two real demo images per modality (MedImages with the manifest's modality)."""
    return reference_sample(default_collection(), n_per_modality=2, seed=1)


@pytest.fixture(scope="session")
def refs_by_modality(demo_refs):
    out = {}
    for r in demo_refs:
        out.setdefault(r.modality, []).append(r)
    return out
