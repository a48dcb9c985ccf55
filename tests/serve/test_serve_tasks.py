"""The quality gate returns the per-task qualities of a checkpoint trained with tasks, and documents them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import DEMO_PNG, IMG, make_config

from medqm.io import read_image
from medqm.model import Scorer, create_model
from medqm.serve import create_app

TASKS = ["tumour", "modality"]


@pytest.fixture(scope="module")
def task_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = create_model("medqm_i_no_priors", pretrained_backbone=False, img_size=IMG, tasks=TASKS).eval()
    with torch.no_grad():  # tasks apart from the overall quality and from each other
        model.task_head.weight.normal_(0, 0.5)
        model.task_head.bias.copy_(torch.tensor([1.5, -1.5]))
    return model.save_pretrained(tmp_path_factory.mktemp("serve-tasks") / "medqm-i-tasks")


def test_score_returns_the_task_qualities(task_checkpoint):
    with TestClient(create_app(make_config(task_checkpoint))) as c:
        resp = c.post("/v1/score", files=[("files", (DEMO_PNG.name, DEMO_PNG.read_bytes(), "image/png"))])
        assert resp.status_code == 200, resp.text
        (r,) = resp.json()["results"]
        assert list(r["tasks"]) == TASKS
        want = Scorer(task_checkpoint, runtime="torch").score_pixels([read_image(DEMO_PNG)])[0]
        assert r["quality"] == pytest.approx(want.quality, abs=1e-6)
        assert [r["tasks"][t] for t in TASKS] == pytest.approx([want.tasks[t] for t in TASKS], abs=1e-6)
        assert r["tasks"]["tumour"] > r["tasks"]["modality"]  # the biases set above keep them apart
        assert c.get("/v1/model").json()["tasks"] == TASKS
        schema = c.get("/openapi.json").json()["components"]["schemas"]
        assert "answer type" in schema["ImageResult"]["properties"]["tasks"]["description"]
        assert "tasks" in schema["ModelCard"]["properties"]


def test_a_checkpoint_without_tasks_returns_an_empty_mapping(checkpoint):
    with TestClient(create_app(make_config(checkpoint))) as c:
        png = DEMO_PNG.read_bytes()
        (r,) = c.post("/v1/score", files=[("files", ("x.png", png, "image/png"))]).json()["results"]
        assert r["tasks"] == {} and np.isfinite(r["quality"])
        assert c.get("/v1/model").json()["tasks"] == []
