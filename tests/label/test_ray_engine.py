"""The Ray engine gives the same labels as the local engine (local Ray, 2 CPU workers, tiny LLaVA)."""

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from medqm.distort.plan import Plan, run_plan
from medqm.io.collection import default_collection, load_manifest
from medqm.label.hf import load_model, model_identity
from medqm.label.ray_engine import ModelSpec, RayScorer
from medqm.label.runner import read_labels, run_labels
from medqm.label.tasks import VQAItem
from medqm.testing import build_tiny_vlm


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model_dir = build_tiny_vlm("llava", root / "tiny-llava", seed=0)
    df = load_manifest(default_collection())
    refs = df.groupby("modality").head(1).sort_values("id").head(4).drop(columns=["abs_path"])
    coll = root / "coll"
    for p in refs.path:
        (coll / p).parent.mkdir(parents=True, exist_ok=True)
        (coll / p).write_bytes((default_collection() / p).read_bytes())
    refs.to_csv(coll / "manifest.csv", index=False)
    run_plan(coll, Plan(name="r", types=["gaussian_noise", "jpeg"], levels=[1, 5]), root / "dist", workers=1)
    items = []
    for _, r in load_manifest(coll).iterrows():
        items.append(VQAItem(r.abs_path, "What imaging modality is this?", r.modality, r.case_id, "modality", r.id))
        items.append(VQAItem(r.abs_path, "Is there a lesion?", "no", r.case_id, "lesion_present", r.id))
    return root, model_dir, items


def test_ray_matches_local(job):
    root, model_dir, items = job
    local = run_labels(items, load_model(model_dir, batch_size=4), root / "local", distorted=root / "dist", shard_size=2)
    spec = ModelSpec(str(model_dir), batch_size=4)
    try:
        scorer = RayScorer(spec, workers=2)
        remote = run_labels(items, model_identity(model_dir), root / "ray", distorted=root / "dist", shard_size=2,
                            scorer=scorer, shards_per_call=2)
    finally:
        ray.shutdown()
    assert local.rows == remote.rows == 4 * (1 + 2 * 2)
    a, b = read_labels(root / "local"), read_labels(root / "ray")
    pd.testing.assert_frame_equal(a.drop(columns=["diag_loss", "quality", "nll_ref", "nll_dist", "nll_ref_items",
                                                  "nll_dist_items"]),
                                  b.drop(columns=["diag_loss", "quality", "nll_ref", "nll_dist", "nll_ref_items",
                                                  "nll_dist_items"]))
    for col in ("nll_ref", "nll_dist", "diag_loss", "quality"):
        np.testing.assert_allclose(a[col], b[col], atol=1e-5, rtol=0)
