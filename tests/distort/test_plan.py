"""`medqm distort`: plans, the Parquet manifest, failures, and resuming after an interruption."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medqm.distort import create_distortion
from medqm.distort.plan import Plan, read_manifest, run_plan
from medqm.io import read_image
from medqm.io.collection import default_collection, load_manifest

MEDQM = str(Path(sys.executable).with_name("medqm"))


@pytest.fixture()
def small_collection(tmp_path):
    """Six demo images (two cases each of CT, US, PATH) copied with their manifest rows."""
    src = default_collection()
    df = load_manifest(src)
    rows = []
    for mod in ("CT", "US", "PATH"):
        g = df[df.modality == mod]
        for case in sorted(g.case_id.unique())[:2]:
            rows.append(g[g.case_id == case].iloc[0])
    sub = pd.DataFrame(rows).drop(columns=["abs_path"])
    root = tmp_path / "coll"
    for p in sub["path"]:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / p, root / p)
    sub.to_csv(root / "manifest.csv", index=False)
    return root


PLAN = {"name": "t", "types": ["gaussian_noise", "jpeg", "speckle", "stain_shift", "gaussian_blur"], "levels": [1, 3],
        "seeds": 2, "modalities": []}


def test_manifest_contents_and_replay(small_collection, tmp_path):
    out = tmp_path / "out"
    summary = run_plan(small_collection, Plan(**PLAN), out, workers=1)
    m = read_manifest(out)
    # generic types on all 6 images, speckle on 2 US, stain_shift on 2 PATH; × 2 levels × 2 seeds
    assert len(m) == summary.total == (3 * 6 + 2 + 2) * 2 * 2
    assert list(m.columns) == ["dist_id", "ref_id", "case_id", "modality", "type", "level", "seed", "params", "path",
                               "ref_path"]
    assert m.dist_id.is_unique and (m.dist_id == sorted(m.dist_id)).all()
    assert set(m[m.type == "speckle"].modality) == {"US"}
    row = m[(m.type == "gaussian_noise") & (m.level == 3)].iloc[0]
    ref = read_image(row.ref_path)
    stored = read_image(out / row.path).pixels
    replayed = create_distortion("gaussian_noise").replay(ref.pixels, json.loads(row.params))
    np.testing.assert_array_equal(stored, np.round(replayed * 255) / 255)  # PNG keeps 8 bits
    meta = json.loads(
        __import__("pyarrow.parquet", fromlist=["x"]).read_schema(out / "manifest.parquet").metadata[b"medqm"])
    assert meta["plan"]["types"] == PLAN["types"]


def test_resume_after_interrupt_equals_uninterrupted(small_collection, tmp_path):
    full = tmp_path / "full"
    run_plan(small_collection, Plan(**PLAN), full, workers=1)

    part = tmp_path / "part"

    class Interrupt(Exception):
        pass

    def stop_after_some(done, total):
        if done >= 30:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_plan(small_collection, Plan(**PLAN), part, workers=1, progress=stop_after_some)
    with open(part / "ledger.jsonl", "a") as f:
        f.write('{"status": "ok", "dist_id": "torn')  # a write cut off by the interruption
    (part / "images" / "jpeg" / ".x.png.123.tmp").parent.mkdir(parents=True, exist_ok=True)
    summary = run_plan(small_collection, Plan(**PLAN), part, workers=2)
    assert summary.done_before >= 30 and summary.written == summary.total - summary.done_before
    a, b = read_manifest(full), read_manifest(part)
    pd.testing.assert_frame_equal(a.drop(columns=["path"]), b.drop(columns=["path"]))
    for p in a.path:
        assert (full / p).read_bytes() == (part / p).read_bytes()
    # a third run has nothing left to do
    again = run_plan(small_collection, Plan(**PLAN), part, workers=1)
    assert again.written == 0 and again.done_before == again.total


def _outputs(out: Path) -> dict:
    """Everything a finished run leaves that matters: sorted ledger lines, manifest, and every image's bytes."""
    images = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}
    return {"ledger": sorted((out / "ledger.jsonl").read_text().splitlines()), "manifest": read_manifest(out),
            "images": images, "plan": json.loads((out / "plan.json").read_text())}


def test_killed_process_resumes(small_collection, tmp_path):
    """kill -9 at a known point (the run stalls on a test hook after its first ledger lines), then resume.

    Deterministic: the run is killed only once the hook's marker file exists, never by racing a clock.
    """
    from medqm.distort.plan import TEST_HOOK_STALL_ENV

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(json.dumps(PLAN))  # JSON is valid YAML
    out = tmp_path / "out"
    cmd = [MEDQM, "distort", "--collection", str(small_collection), "--plan", str(plan_file), "--workers", "2"]
    plain_env = {k: v for k, v in os.environ.items() if k != TEST_HOOK_STALL_ENV}
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(plain_env, **{TEST_HOOK_STALL_ENV: str(marker)}))
    try:
        failsafe = time.monotonic() + 600  # only so a broken hook cannot hang the suite; not a timing check
        while not marker.exists():
            assert proc.poll() is None, f"the run exited (rc {proc.returncode}) without stalling on the test hook"
            assert time.monotonic() < failsafe, "the run never reached the test hook"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert ledger and len({r["ref_id"] for r in ledger}) == 1  # exactly one finished job was recorded
    assert not (out / "manifest.parquet").exists(), "the run was killed before finishing"

    r = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300, env=plain_env)
    assert r.returncode == 0, r.stdout + r.stderr
    fresh = tmp_path / "fresh"
    r = subprocess.run(cmd + ["--out", str(fresh)], capture_output=True, text=True, timeout=300, env=plain_env)
    assert r.returncode == 0, r.stdout + r.stderr

    resumed, uninterrupted = _outputs(out), _outputs(fresh)
    m = resumed["manifest"]
    assert len(m) == (3 * 6 + 2 + 2) * 2 * 2 and m.dist_id.is_unique
    assert len(resumed["ledger"]) == len(m)  # the first job's records are not redone, nothing is missing
    pd.testing.assert_frame_equal(m, uninterrupted["manifest"])
    assert resumed["ledger"] == uninterrupted["ledger"]
    assert resumed["plan"] == uninterrupted["plan"]
    assert resumed["images"].keys() == uninterrupted["images"].keys() == {f"{p}" for p in m.path}
    assert resumed["images"] == uninterrupted["images"]
    for p in m.path:
        assert read_image(out / p).shape == (256, 256)


def test_bad_reference_is_recorded_and_the_rest_goes_on(small_collection, tmp_path):
    df = pd.read_csv(small_collection / "manifest.csv")
    broken = df.iloc[0]["path"]
    (small_collection / broken).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    r = subprocess.run([MEDQM, "distort", "--collection", str(small_collection), "--plan", "quick", "--out", str(out),
                        "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "failed" in r.stdout
    failures = pd.read_csv(out / "failures.csv")
    assert set(failures.ref_id) == {df.iloc[0]["id"]} and failures.reason.str.contains("unreadable").all()
    assert read_manifest(out).ref_id.nunique() == len(df) - 1


def test_plan_validation(tmp_path):
    with pytest.raises(ValueError, match="did you mean"):
        Plan(types=["jpg2000"])
    with pytest.raises(ValueError, match="levels"):
        Plan(levels=[0, 6])
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nlevel: [1]\n")
    with pytest.raises(ValueError, match="unknown plan keys"):
        Plan.load(bad)
    assert Plan.load("default").type_names and Plan.load("quick").levels == [1, 4]
