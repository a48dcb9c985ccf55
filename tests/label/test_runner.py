"""The label runner: join tasks with distortions, aggregate correctly, never lose or duplicate rows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medqm.distort.plan import Plan, run_plan
from medqm.io import read_image
from medqm.io.collection import default_collection, load_manifest
from medqm.label.quality import DEFAULT_MAP
from medqm.label.runner import read_labels, run_labels
from medqm.label.tasks import VQAItem

sys.path.insert(0, str(Path(__file__).parent))
from fakes import FakeDiagnosticModel, Stop, stop_past_half

PLAN = Plan(name="t", types=["gaussian_blur", "gaussian_noise", "jpeg"], levels=[1, 3, 5], seeds=1)


def _items(refs):
    items = []
    for _, r in refs.iterrows():
        items.append(VQAItem(r.abs_path, "What imaging modality is this?", r.modality, r.case_id, "modality", r.id,
                             r.modality))
        items.append(VQAItem(r.abs_path, "Is there a lesion?", "no", r.case_id, "lesion_present", r.id, r.modality))
    return items


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    df = load_manifest(default_collection())
    refs = df.groupby("modality").head(2).sort_values("id").head(10)
    sub = refs.drop(columns=["abs_path"])
    coll = root / "coll"
    for p in sub.path:
        (coll / p).parent.mkdir(parents=True, exist_ok=True)
        (coll / p).write_bytes((default_collection() / p).read_bytes())
    sub.to_csv(coll / "manifest.csv", index=False)
    run_plan(coll, PLAN, root / "dist", workers=1)
    refs = load_manifest(coll)
    return root, _items(refs), refs


def test_rows_and_arithmetic(setup, tmp_path):
    root, items, refs = setup
    model = FakeDiagnosticModel()
    summary = run_labels(items, model, tmp_path / "labels", distorted=root / "dist", shard_size=3, loss="nll")
    lab = read_labels(tmp_path / "labels")
    assert summary.rows == len(lab) == len(refs) * (1 + 3 * 3)
    assert lab.dist_id.is_unique and (lab.n_qa == 2).all()
    ref_rows = lab[lab.type == "reference"]
    assert len(ref_rows) == len(refs) and np.allclose(ref_rows.diag_loss, 0) and np.allclose(ref_rows.quality, 0.9)
    row = lab[(lab.type == "gaussian_blur") & (lab.level == 5)].iloc[0]
    ref_px, dist_px = read_image(row.ref_path).pixels, read_image(row.path).pixels
    qs = [it for it in items if it.image == row.ref_path]
    nr = FakeDiagnosticModel().answer_nll([ref_px] * 2, [q.question for q in qs], [q.answer for q in qs])
    nd = FakeDiagnosticModel().answer_nll([dist_px] * 2, [q.question for q in qs], [q.answer for q in qs])
    assert row.diag_loss == pytest.approx(float(np.mean(np.sort(nd) - np.sort(nr))), rel=1e-6)
    assert row.quality == pytest.approx(DEFAULT_MAP(row.diag_loss))
    assert row.diag_loss > 0 and row.quality < 0.9  # blur removes the detail the fake model relies on
    assert lab.attrs["medqm"]["quality_map"]["center"] == pytest.approx(np.log(2))
    # severity ordering survives aggregation: mean loss per level increases for blur
    blur = lab[lab.type == "gaussian_blur"].groupby("level").diag_loss.mean()
    assert blur.is_monotonic_increasing
    # reliability.json: Spearman(level, loss) per (reference, type) series, recomputed here with scipy
    from scipy.stats import spearmanr

    rel = json.loads((tmp_path / "labels" / "reliability.json").read_text())["severity_monotonicity"]
    rhos = [spearmanr(g.level, -g.quality)[0] for _, g in lab[lab.level > 0].groupby(["ref_id", "type"])
            if g.quality.nunique() > 1]
    assert rel["n_series"] == len(rhos) > 0 and rel["mean_rho"] == pytest.approx(np.mean(rhos))
    assert summary.monotonicity == rel
    assert set(rel["by_answer_type"]) <= {"modality", "lesion_present"}


def test_every_image_scored_once(setup, tmp_path):
    root, items, refs = setup
    model = FakeDiagnosticModel()
    run_labels(items, model, tmp_path / "l", distorted=root / "dist", shard_size=3, chunk=10_000, loss="nll")
    n_images = len(refs) * (1 + 3 * 3)
    assert model.samples == 2 * n_images  # two questions per image; references scored once, not per distortion
    # a rerun with a finished shard's reference cache but no shard file scores only distorted images
    (tmp_path / "l" / "shards" / "shard-00000.parquet").unlink()
    (tmp_path / "l" / "labels.parquet").unlink()
    again = FakeDiagnosticModel()
    run_labels(items, again, tmp_path / "l", distorted=root / "dist", shard_size=3, loss="nll")
    assert again.samples == 2 * 3 * 9


def test_resume_after_interrupt_gives_identical_rows(setup, tmp_path):
    root, items, _ = setup
    full = tmp_path / "full"
    run_labels(items, FakeDiagnosticModel(), full, distorted=root / "dist", shard_size=2, loss="nll")

    part = tmp_path / "part"
    with pytest.raises(Stop):
        run_labels(items, FakeDiagnosticModel(), part, distorted=root / "dist", shard_size=2, progress=stop_past_half,
                   loss="nll")
    summary = run_labels(items, FakeDiagnosticModel(), part, distorted=root / "dist", shard_size=2, loss="nll")
    assert summary.shards_done_before > 0
    pd.testing.assert_frame_equal(read_labels(full), read_labels(part))


def test_kill_9_and_resume(setup, tmp_path):
    root, items, _ = setup
    tasks = tmp_path / "items.json"
    tasks.write_text(json.dumps([it.to_dict() for it in items]))
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from fakes import FakeDiagnosticModel
from medqm.label.runner import run_labels
from medqm.label.tasks import VQAItem
items = [VQAItem(**d) for d in json.load(open({str(tasks)!r}))]
run_labels(items, FakeDiagnosticModel(stall_after=int(sys.argv[2]) or None, stall_marker=sys.argv[3]), sys.argv[1],
           distorted={str(root / 'dist')!r}, shard_size=1, chunk=4, loss="nll")
"""
    out = tmp_path / "killed"
    marker = tmp_path / "stalled"
    # the first run blocks at the start of its 4th model call, after 3 calls' work, and is killed there
    proc = subprocess.Popen([sys.executable, "-c", script, str(out), "3", str(marker)])
    while not marker.exists():
        assert proc.poll() is None, "the run ended before reaching the stall point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "labels.parquet").exists()
    subprocess.run([sys.executable, "-c", script, str(out), "0", str(marker)], check=True, timeout=300)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", script, str(ref), "0", str(marker)], check=True, timeout=300)
    a, b = read_labels(ref), read_labels(out)
    assert len(a) == len(b) and b.dist_id.is_unique
    pd.testing.assert_frame_equal(a.drop(columns=[]), b)


def test_config_change_is_refused(setup, tmp_path):
    root, items, _ = setup
    run_labels(items, FakeDiagnosticModel(), tmp_path / "l", distorted=root / "dist", loss="nll")
    with pytest.raises(ValueError, match="different configuration"):
        run_labels(items[:4], FakeDiagnosticModel(), tmp_path / "l", distorted=root / "dist", loss="nll")


def test_unreadable_distorted_image_is_recorded(setup, tmp_path):
    root, items, _ = setup
    import shutil

    dist = tmp_path / "dist"
    shutil.copytree(root / "dist", dist)
    victim = sorted((dist / "images" / "jpeg").glob("*.png"))[0]
    victim.write_bytes(b"")
    summary = run_labels(items, FakeDiagnosticModel(), tmp_path / "l", distorted=dist, loss="nll")
    assert [e["dist_id"] for e in summary.errors] == [victim.stem]
    assert victim.stem not in set(read_labels(tmp_path / "l").dist_id)
    assert (tmp_path / "l" / "errors.csv").is_file()


@pytest.fixture(scope="module")
def two_ref_distortions(tmp_path_factory):
    """A `medqm distort` folder made from two references of the demo collection (4 distortions each).

    The sub-collection's manifest points at the demo images themselves (absolute paths), so the distort
    manifest's ref_path is the very file that `demo_questions(default_collection())` asks about.
    """
    root = tmp_path_factory.mktemp("two_refs")
    df = load_manifest(default_collection())
    sub = df[df.modality.isin(["CT", "US"])].sort_values("id").groupby("modality").head(1)
    sub = sub.assign(path=[str(Path(a).resolve()) for a in sub.abs_path]).drop(columns=["abs_path"])
    (root / "coll").mkdir()
    sub.to_csv(root / "coll" / "manifest.csv", index=False)
    plan = Plan(name="two", types=["gaussian_blur", "jpeg"], levels=[1, 4], seeds=1)
    run_plan(root / "coll", plan, root / "dist", workers=1)
    return root / "dist", sorted(sub.id)


def _assert_only_those_references(lab, dist_dir, ref_ids):
    from medqm.distort.plan import read_manifest

    dist = read_manifest(dist_dir)
    assert len(dist) == 2 * 4 and sorted(dist.ref_id.unique()) == ref_ids
    expected = set(dist.dist_id) | {f"{r}__reference" for r in ref_ids}
    assert len(lab) == len(expected) == 10  # not the 402 collection references
    assert set(lab.dist_id) == expected and sorted(lab.ref_id.unique()) == ref_ids


def test_distorted_folder_restricts_the_references(two_ref_distortions, tmp_path):
    """Regression: `--tasks demo --distorted DIR` with DIR made from 2 references labelled all 402 references.

    Only references with a distorted version in DIR (and those distortions) are labelled and scored.
    """
    from medqm.label.tasks import demo_questions

    dist_dir, ref_ids = two_ref_distortions
    items = demo_questions(default_collection())
    assert len({it.image_id for it in items}) > 100  # the whole collection has questions
    model = FakeDiagnosticModel()
    summary = run_labels(items, model, tmp_path / "l", distorted=dist_dir, chunk=10_000, loss="nll")
    lab = read_labels(tmp_path / "l")
    _assert_only_those_references(lab, dist_dir, ref_ids)
    assert summary.rows == 10 and summary.shards == 1 and lab.attrs["medqm"]["n_references"] == 2
    n_questions = sum(it.image_id in ref_ids for it in items)
    assert model.samples == n_questions * (1 + 4)  # each reference's questions on it and its 4 distortions
    # without a distort folder every image with items is still a reference
    from medqm.label.runner import gather_references

    assert len(gather_references(items, None)) == len({it.image_id for it in items})


@pytest.mark.slow  # ~14 s (a subprocess importing transformers); the test above covers the fix in 1 s
def test_cli_label_demo_tasks_with_a_small_distorted_folder(two_ref_distortions, tmp_path):
    """The reported command, `medqm label --tasks demo --distorted DIR`, with a tiny LLaVA built locally."""
    from medqm.testing import build_tiny_vlm

    dist_dir, ref_ids = two_ref_distortions
    model = build_tiny_vlm("llava", tmp_path / "tiny-llava", seed=0)
    out = tmp_path / "labels"
    r = subprocess.run([str(Path(sys.executable).with_name("medqm")), "label", "--tasks", "demo", "--distorted",
                        str(dist_dir), "--model", str(model), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_only_those_references(read_labels(out), dist_dir, ref_ids)


class CallRecorder(FakeDiagnosticModel):
    """The fake model, remembering which array objects each `answer_nll` call received."""

    def __init__(self):
        super().__init__()
        self.batches: list[list[int]] = []

    def answer_nll(self, images, questions, answers):
        self.batches.append([id(im) for im in images])
        return super().answer_nll(images, questions, answers)


def test_local_scorer_sends_each_image_view_in_one_call(tmp_path):
    """Under --loss kl every image brings many samples; a chunk boundary must not split them (the hf backend
    scores one image's samples against one prefill only when they arrive together)."""
    from PIL import Image

    from medqm.label.runner import LabelDefinition, LocalScorer

    rng = np.random.default_rng(0)
    choices = ["CT", "MRI", "X-ray", "ultrasound"]
    definition = LabelDefinition(loss="kl", views=2)
    triples = []
    for k in range(5):
        path = tmp_path / f"im{k}.png"
        Image.fromarray((rng.random((32, 40)) * 255).astype(np.uint8)).save(path)
        items = [VQAItem(str(path), q, "CT", f"c{k}", "modality", f"im{k}", "CT", choices[: 2 + j])
                 for j, q in enumerate(["What imaging modality is this?", "Which modality?", "Modality?"])]
        triples += definition.triples(f"im{k}", str(path), items)  # 2 + 3 + 4 = 9 samples per view
    model = CallRecorder()
    kept, nll = LocalScorer(model, chunk=20)(triples, errors := [])
    assert kept == triples and not errors
    assert [len(b) for b in model.batches] == [18, 18, 18, 18, 18]  # two whole views per call, never three
    seen = [i for b in model.batches for i in dict.fromkeys(b)]
    assert len(seen) == len(set(seen)) == 10  # every (image, view) array in exactly one call
    np.testing.assert_array_equal(nll, LocalScorer(FakeDiagnosticModel(), chunk=1000)(triples, [])[1])
    model = CallRecorder()
    LocalScorer(model, chunk=4)(triples, [])  # a run longer than the chunk is a call of its own
    assert [len(b) for b in model.batches] == [9] * 10
