"""The Ray engine gives the same labels as the local engine (local Ray, 2 CPU workers, tiny LLaVA)."""

import json

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from medqm.distort.plan import Plan, run_plan  # noqa: E402 - after importorskip('ray') on purpose
from medqm.io.collection import default_collection, load_manifest  # noqa: E402 - after importorskip('ray') on purpose
from medqm.label.hf import load_model, model_identity  # noqa: E402 - after importorskip('ray') on purpose
from medqm.label.ray_engine import ModelSpec, RayScorer  # noqa: E402 - after importorskip('ray') on purpose
from medqm.label.runner import read_labels, run_labels  # noqa: E402 - after importorskip('ray') on purpose
from medqm.label.tasks import VQAItem  # noqa: E402 - after importorskip('ray') on purpose
from medqm.testing import build_tiny_vlm  # noqa: E402 - after importorskip('ray') on purpose


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
    manifest = load_manifest(coll)
    modalities = sorted(set(manifest.modality))  # choices: only --loss kl scores them
    for _, r in manifest.iterrows():
        items.append(VQAItem(r.abs_path, "What imaging modality is this?", r.modality, r.case_id, "modality", r.id,
                             choices=modalities))
        items.append(VQAItem(r.abs_path, "Is there a lesion?", "no", r.case_id, "lesion_present", r.id,
                             choices=["yes", "no"]))
    return root, model_dir, items


def test_ray_matches_local(job):
    root, model_dir, items = job
    local = run_labels(items, load_model(model_dir, batch_size=4), root / "local", distorted=root / "dist",
                       shard_size=2)
    spec = ModelSpec(str(model_dir), batch_size=4)
    try:
        scorer = RayScorer(spec, workers=2)
        remote = run_labels(items, model_identity(model_dir), root / "ray", distorted=root / "dist", shard_size=2,
                            scorer=scorer, shards_per_call=2)
        # the KL definition with a mirrored view: every choice, on flipped images, through the same actors
        kl = {"loss": "kl", "temperature": 3.0, "views": 2}
        run_labels(items, model_identity(model_dir), root / "ray-kl", distorted=root / "dist", shard_size=2,
                   scorer=scorer, shards_per_call=2, **kl)
    finally:
        ray.shutdown()
    run_labels(items, load_model(model_dir, batch_size=4), root / "local-kl", distorted=root / "dist", shard_size=2,
               **kl)
    a, b = read_labels(root / "local-kl"), read_labels(root / "ray-kl")
    assert (a.loss == "kl").all() and a.view_losses.map(lambda v: len(json.loads(v)) == 2).all()
    for col in ("diag_loss", "quality"):
        np.testing.assert_allclose(a[col], b[col], atol=1e-5, rtol=0)
    assert local.rows == remote.rows == 4 * (1 + 2 * 2)
    a, b = read_labels(root / "local"), read_labels(root / "ray")
    scores = ["diag_loss", "quality", "nll_ref", "nll_dist", "nll_ref_items", "nll_dist_items", "loss_items",
              "view_losses"]  # equal to float32 rounding only
    pd.testing.assert_frame_equal(a.drop(columns=scores), b.drop(columns=scores))
    for col in ("nll_ref", "nll_dist", "diag_loss", "quality"):
        np.testing.assert_allclose(a[col], b[col], atol=1e-5, rtol=0)
