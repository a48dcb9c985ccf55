"""Task outputs of MedQM-I: every variant, the unchanged overall head, old checkpoints, scoring tables, ONNX."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medqm.model import MedQMI, Scorer, create_model, list_models

IMG = 64
TASKS = ["tumour", "modality"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.py: one thread for small tensors


def _images(n: int = 3) -> list[np.ndarray]:
    return [np.random.default_rng(i).random((70, 50), dtype=np.float32) for i in range(n)]


@pytest.mark.parametrize("name", list_models("medqm_i*"))
def test_every_variant_has_task_outputs_that_train(name):
    torch.manual_seed(0)
    model = create_model(name, pretrained_backbone=False, img_size=IMG, tasks=TASKS).train()
    out = model(torch.rand(3, 3, IMG, IMG))
    assert out["task_scores"].shape == (3, 2) and ((out["task_scores"] > 0) & (out["task_scores"] < 1)).all()
    (out["score"].sum() + out["task_scores"].sum()).backward()
    assert model.task_head.weight.grad is not None and model.task_head.weight.grad.abs().sum() > 0


def test_the_overall_head_is_unchanged_by_tasks():
    """Same weights everywhere else: the overall quality is the same number with or without task heads."""
    torch.manual_seed(0)
    plain = create_model("medqm_i", pretrained_backbone=False, img_size=IMG).eval()
    with_tasks = create_model("medqm_i", pretrained_backbone=False, img_size=IMG, tasks=TASKS).eval()
    missing, unexpected = with_tasks.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["task_head.bias", "task_head.weight"] and not unexpected
    x = torch.rand(4, 3, IMG, IMG)
    with torch.inference_mode():
        a, b = plain(x, return_heatmap=True), with_tasks(x, return_heatmap=True)
    assert torch.equal(a["score"], b["score"]) and torch.equal(a["heatmap"], b["heatmap"])
    assert "task_scores" not in a


@pytest.mark.parametrize("tasks", [["bad name"], ["tumour", "tumour"], "tumour"])
def test_bad_task_lists_are_refused(tasks):
    with pytest.raises(ValueError, match="task"):
        create_model("medqm_i_baseline", pretrained_backbone=False, img_size=IMG, tasks=tasks)


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    """A checkpoint as written before tasks existed: its config.json has no 'tasks' key (nor does one without tasks
    written now, so its ONNX export digest is unchanged)."""
    torch.manual_seed(1)
    model = create_model("medqm_i", pretrained_backbone=False, img_size=IMG).eval()
    d = model.save_pretrained(tmp_path_factory.mktemp("old") / "ckpt")
    assert "tasks" not in json.loads((d / "config.json").read_text())["config"]
    return model, d


def test_old_checkpoints_load_and_score_as_before(old_checkpoint, tmp_path):
    model, d = old_checkpoint
    loaded = MedQMI.from_pretrained(d)
    assert loaded.cfg.tasks == () and loaded.task_head is None
    imgs = _images()
    scorer = Scorer(d, runtime="torch", workers=0)
    got = scorer.score_pixels(imgs)
    want = Scorer(model, runtime="torch").score_pixels(imgs)
    assert [g.quality for g in got] == [w.quality for w in want] and all(g.tasks == {} for g in got)
    files = []
    for i, im in enumerate(imgs):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.round(im * 255).astype(np.uint8)).save(files[-1])
    table = scorer.score_files(files)
    assert list(table.columns) == ["path", "index", "id", "modality", "case_id", "height", "width", "quality",
                                   "expert", "gates", "heatmap", "error"]


@pytest.fixture(scope="module")
def task_checkpoint(tmp_path_factory):
    torch.manual_seed(2)
    model = create_model("medqm_i", pretrained_backbone=False, img_size=IMG, tasks=TASKS).eval()
    with torch.no_grad():  # spread the task outputs apart, so a mix-up of tasks would show
        model.task_head.weight.normal_(0, 0.5)
        model.task_head.bias.copy_(torch.tensor([1.0, -1.0]))
    return model, model.save_pretrained(tmp_path_factory.mktemp("tasks") / "ckpt")


def test_scores_carry_the_task_qualities(task_checkpoint):
    model, d = task_checkpoint
    imgs = _images()
    res = Scorer(d, runtime="torch").score_pixels(imgs)
    from medqm.model import preprocess

    x = torch.from_numpy(np.stack([preprocess(im, IMG)[0] for im in imgs]))
    with torch.inference_mode():
        ref = model(x)["task_scores"].numpy()
    for r, row in zip(res, ref, strict=True):
        assert list(r.tasks) == TASKS
        np.testing.assert_allclose([r.tasks[t] for t in TASKS], row, rtol=1e-5)
    import medqm

    one = medqm.score(imgs[0], model=d, runtime="torch")
    assert one.tasks == pytest.approx(res[0].tasks, rel=1e-5)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_cli_score_writes_the_task_columns(task_checkpoint, tmp_path, suffix):
    model, d = task_checkpoint
    folder = tmp_path / "imgs"
    folder.mkdir()
    imgs = _images(2)
    for i, im in enumerate(imgs):
        Image.fromarray(np.round(im * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / f"scores{suffix}"
    r = subprocess.run([str(Path(sys.executable).with_name("medqm")), "score", str(folder), "--out", str(out),
                        "--model", str(d), "--runtime", "torch", "--workers", "0"],
                       capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mean quality per task: tumour" in r.stdout
    df = pd.read_csv(out) if suffix == ".csv" else pd.DataFrame(json.loads(out.read_text()))
    cols = list(df.columns)
    assert cols[cols.index("quality") + 1 : cols.index("quality") + 3] == ["quality_tumour", "quality_modality"]
    ok = df[df["error"].fillna("") == ""].sort_values("path")
    bad = df[df["error"].fillna("") != ""]
    assert len(ok) == 2 and len(bad) == 1 and bad[["quality_tumour", "quality_modality"]].isna().all(axis=None)
    want = Scorer(d, runtime="torch", workers=0).score_files(sorted(folder.glob("[0-9].png")))
    np.testing.assert_allclose(ok["quality_tumour"].to_numpy(float), want["quality_tumour"].to_numpy(float),
                               rtol=1e-5)


def test_onnx_and_torch_agree_on_the_task_outputs(task_checkpoint):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from medqm.model.onnx import OnnxScorer, output_names, save_onnx

    model, d = task_checkpoint
    assert "task_scores" in output_names(model)
    save_onnx(model, d)
    x = np.random.default_rng(0).random((5, 3, IMG, IMG), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x))["task_scores"].numpy()
    got = OnnxScorer(d / "model.onnx").run(x)
    np.testing.assert_allclose(got["task_scores"], ref, atol=1e-5, rtol=1e-4)
    fast = Scorer(d, runtime="onnx").score_pixels(_images())
    slow = Scorer(d, runtime="torch").score_pixels(_images())
    for f, s in zip(fast, slow, strict=True):
        assert list(f.tasks) == TASKS
        assert [f.tasks[t] for t in TASKS] == pytest.approx([s.tasks[t] for t in TASKS], abs=1e-5)
