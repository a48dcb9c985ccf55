"""`medqm demo --quick` end to end: every stage on the bundled collection, the report, caching and resuming.

The diagnostic model is a small untrained stand-in with the shipped model's architecture family (built here in
seconds, `medqm.label.standin.build_demo_vlm` at 64 px, with the ImageNet vision tower: a randomly initialised
tower's features vanish, ~1e-22, so every image would get the same answer likelihoods and constant labels), so
the test neither waits for nor depends on the trained stand-in VLM; `--model` is the option a user would pass
for their own MLLM.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from medqm.cli import app
from medqm.demo import MODEL_NAMES, STAGES, DemoConfig, DemoError, demo_config, select_references, stage_key

TINY_ARCH = {"image_size": 64, "text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_mlp": 128}
HEADLINE_METHODS = [*MODEL_NAMES.values(), "NIQE", "BRISQUE", "PIQE"]
# the kind column, as the README's table prints it (known here, not read from the run)
HEADLINE_KINDS = {"MedQM-I": "main", "MedQM-I no priors": "ablation", "MedQM-I no queries": "ablation",
                  "MedQM-I single head": "ablation", "deep baseline": "deep", "NIQE": "classical",
                  "BRISQUE": "classical", "PIQE": "classical"}


@pytest.fixture(scope="module")
def tumour_collection(tmp_path_factory) -> Path:
    """A fake Br35H-like collection (4 of its cases go into the quick demo, 2 with a tumour)."""
    from medqm.testing import fake_tumour_collection

    return fake_tumour_collection(tmp_path_factory.mktemp("tumour") / "br35h")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, tumour_collection) -> Path:
    from medqm.io.collection import default_collection
    from medqm.label.standin import DEMO_VLM_ARCH, build_demo_vlm, save_demo_vlm, tokenizer_corpus
    from medqm.label.tasks import demo_questions

    corpus = tokenizer_corpus(demo_questions([default_collection(), tumour_collection]))
    model, processor = build_demo_vlm(corpus, arch={**DEMO_VLM_ARCH, **TINY_ARCH}, pretrained=True)
    return save_demo_vlm(model, processor, tmp_path_factory.mktemp("vlm") / "tiny-demo-vlm")


def _demo(out: Path, vlm: Path, tumour: Path):
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--model", str(vlm), "--threads", "1",
                                 "--tumour-collection", str(tumour), "--tumour-cases", "4"])
    assert r.exit_code == 0, r.output
    return r.output, time.perf_counter() - t0


def _status(output: str) -> dict[str, str]:
    """Stage → 'ran' / 'reused', from the stage table."""
    return {m.group(1): m.group(2) for m in re.finditer(r"│ (\w+)\s+│ (ran|reused)\s+│", output)}


@pytest.fixture(scope="module")
def first_run(tiny_vlm, tumour_collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    output, seconds = _demo(out, tiny_vlm, tumour_collection)
    return out, output, seconds


def test_latest_links_point_at_the_finished_run(first_run, tmp_path):
    """The README's examples use runs/demo/latest/…: the links exist and the commands accept them."""
    out, _, _ = first_run
    latest = out / "latest"
    for name in ("references", "distorted", "labels", "models", "medqm-i", "evaluation"):
        assert (latest / name).is_symlink() and (latest / name).is_dir(), name
    assert (latest / "references" / "manifest.csv").is_file()
    assert (latest / "medqm-i" / "config.json").is_file()
    assert (latest / "evaluation" / "metrics.json").is_file()
    demo = json.loads((out / "demo.json").read_text())
    assert (latest / "labels").resolve() == Path(demo["stages"]["label"]["dir"]).resolve()
    ref = pd.read_csv(latest / "references" / "manifest.csv", dtype=str, keep_default_na=False)
    image = Path(ref["abs_path"].iloc[0]) if "abs_path" in ref else Path(ref["path"].iloc[0])
    scores = tmp_path / "scores.csv"
    r = CliRunner().invoke(app, ["score", str(image), "--model", str(latest / "medqm-i"), "--out", str(scores)])
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(scores)) == 1


def test_quick_demo_runs_every_stage_and_writes_the_report(first_run):
    out, output, _ = first_run
    assert _status(output) == dict.fromkeys(STAGES, "ran")
    for method in HEADLINE_METHODS:  # the headline table: MedQM-I, ablations, deep baseline, NIQE, BRISQUE, PIQE
        kind = HEADLINE_KINDS[method]
        assert re.search(rf"│ {re.escape(method)}\s+│ {kind}\s+│ -?\d\.\d{{3}} \[", output), method
    report = out / "report.html"
    assert f"report: {report}" in output.replace("\n", "")
    html = report.read_text(encoding="utf-8")
    assert "MedQM-I no priors" in html and "BRISQUE" in html

    summary = json.loads((out / "demo.json").read_text())
    assert list(summary["stages"]) == list(STAGES) and summary["config"]["preset"] == "quick"
    assert set(summary["seconds"]) == {*STAGES, "total"}
    stages = {n: Path(s["dir"]) for n, s in summary["stages"].items()}
    for name, folder in stages.items():
        stamp = json.loads((folder / "stage.json").read_text())
        assert folder.name == f"{name}-{stamp['key']}" and stamp["seconds"] >= 0

    # what each stage made: 12 references (4 CT and 4 MR cases of data/demo, 4 tumour cases, 2 with a tumour),
    # 3 types x 2 levels, five models
    sel = summary["stages"]["select"]["summary"]
    assert sel["by_modality"] == {"CT": 4, "MR": 8}
    assert sel["tumour"] == {"images": 4, "cases": 4, "with_tumour": 2}
    labels = pd.read_parquet(stages["label"] / "labels.parquet")
    assert len(labels) == 12 * (3 * 2 + 1) and labels["quality"].between(0, 1).all()
    assert set(labels["loss"]) == {"kl"} and set(labels["views"]) == {2}  # the demo's label definition
    tumour_refs = labels[labels["case_id"].str.startswith("br35h-fake")]
    assert tumour_refs["ref_id"].nunique() == 4
    assert tumour_refs["answer_types"].astype(str).str.contains("tumour").all()
    assert set(labels["level"]) == {0, 1, 4}
    for model in MODEL_NAMES:
        assert (stages["train"] / model / "config.json").is_file()
    split = pd.read_csv(stages["train"] / "split.csv")
    assert {"train", "val", "test"} <= set(split["split"])
    metrics = json.loads((stages["evaluate"] / "metrics.json").read_text())
    assert set(metrics["methods"]) == {*MODEL_NAMES.values(), "niqe", "brisque", "piqe"}
    assert set(metrics["test_set"]["cases"]) == set(split.loc[split["split"] == "test", "case_id"])
    oracle = metrics["label_reliability"]["distortion_oracle"]
    assert oracle["n_images"] + oracle["n_uncovered"] == metrics["test_set"]["n_images"]
    assert "Label ceiling" in output


def test_a_second_run_reuses_every_stage(first_run, tiny_vlm, tumour_collection):
    out, first, _ = first_run
    output, _ = _demo(out, tiny_vlm, tumour_collection)
    assert _status(output) == dict.fromkeys(STAGES, "reused")  # nothing recomputed (no clock: reuse is the test)
    table = [ln for ln in first.splitlines() if ln.startswith("│ MedQM-I ")]
    assert table and table[0] in output  # the same headline numbers


def test_an_interrupted_run_resumes_where_it_stopped(first_run, tiny_vlm, tumour_collection):
    """Stage folders without their stamp, as a kill leaves them: only the missing work is redone."""
    out, _, _ = first_run
    stages = {n: Path(s["dir"]) for n, s in json.loads((out / "demo.json").read_text())["stages"].items()}
    label, trained = stages["label"], stages["train"]
    before = pd.read_parquet(label / "labels.parquet")
    shards = sorted((label / "shards").glob("shard-*.parquet"))
    assert len(shards) >= 2
    kept = {p: p.stat().st_mtime_ns for p in shards[1:]}
    shards[0].unlink()  # the shard in progress when the run was killed
    (label / "stage.json").unlink()
    (trained / "stage.json").unlink()
    (trained / "medqm_i_baseline.done.json").unlink()  # the model in training when the run was killed
    main_weights = (trained / "medqm_i" / "model.safetensors").stat().st_mtime_ns

    output, _ = _demo(out, tiny_vlm, tumour_collection)
    assert _status(output) == {"select": "reused", "distort": "reused", "label": "ran", "train": "ran",
                               "evaluate": "reused"}
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished shards were not redone
    # the same rows; NLLs only to float32 rounding (the redone shard's batches are composed differently)
    after = pd.read_parquet(label / "labels.parquet")
    assert after["dist_id"].tolist() == before["dist_id"].tolist()
    for col in ("nll_ref", "nll_dist", "diag_loss", "quality"):
        assert after[col].to_numpy() == pytest.approx(before[col].to_numpy(), abs=1e-5), col
    assert (trained / "medqm_i" / "model.safetensors").stat().st_mtime_ns == main_weights
    assert (trained / "medqm_i_baseline.done.json").is_file() and (trained / "stage.json").is_file()


def test_changing_a_setting_makes_new_folders_for_that_stage_and_the_ones_after():
    a = stage_key("train", {"label": "k", "epochs": 3})
    assert a == stage_key("train", {"epochs": 3, "label": "k"})  # order does not matter
    assert a != stage_key("train", {"label": "k", "epochs": 4}) and a != stage_key("label", {"label": "k", "epochs": 3})


def test_reference_selection_is_deterministic_and_prefers_lesion_slices():
    from medqm.io.collection import default_collection, load_manifest

    manifest = load_manifest(default_collection())
    a = select_references(manifest, refs_per_case=3)
    assert a["id"].tolist() == select_references(manifest, refs_per_case=3)["id"].tolist()
    per_case = a.groupby("case_id").size()
    sizes = manifest.groupby("case_id").size()
    assert (per_case == sizes.clip(upper=3)).all() and set(per_case.index) == set(sizes.index)
    lung = a[a["case_id"] == "pyradiomics-lung1"]
    assert lung["lesion"].astype(str).eq("1").sum() == 2  # ceil(3 / 2) slices through the tumour
    q = select_references(manifest, modalities=["CT", "MR"], cases_per_modality=4, refs_per_case=1)
    assert q.groupby("modality")["case_id"].nunique().to_dict() == {"CT": 4, "MR": 4}
    with pytest.raises(DemoError, match="no images of modalities"):
        select_references(manifest, modalities=["PET"])


def test_tumour_cases_are_drawn_half_with_a_tumour(tumour_collection):
    from medqm.demo import select_tumour_cases
    from medqm.io.collection import load_manifest

    m = load_manifest(tumour_collection)  # 12 cases, 6 with a tumour, 1-3 images each
    a = select_tumour_cases(m, 6, seed=0)
    assert a["id"].tolist() == select_tumour_cases(m, 6, seed=0)["id"].tolist()
    assert a["case_id"].nunique() == 6 and a.groupby("case_id").size().eq(1).all()
    assert a.groupby("case_id")["lesion"].first().astype(str).value_counts().to_dict() == {"0": 3, "1": 3}
    b = select_tumour_cases(m, 6, seed=1)
    assert set(b["case_id"]) != set(a["case_id"])  # the seed draws the cases
    c = select_tumour_cases(m, 10, refs_per_case=2)  # 5 + 5 of 6 + 6: two images where a case has them
    assert c["case_id"].nunique() == 10 and c.groupby("case_id").size().max() == 2
    assert select_tumour_cases(m, 40)["case_id"].nunique() == 12  # asking for more takes them all


def test_config_presets_and_validation():
    full, quick = demo_config(), demo_config("quick", threads=1)
    assert full.plan == "demo" and full.refs_per_case == 3 and quick.plan == "demo-quick" and quick.threads == 1
    assert demo_config(epochs=None).epochs == full.epochs  # None means "not given"
    with pytest.raises(ValueError, match="unknown demo preset"):
        demo_config("huge")
    with pytest.raises(ValueError, match="unknown demo settings"):
        demo_config(epoch=3)
    with pytest.raises(ValueError, match="must contain 'medqm_i'"):
        DemoConfig(models=["medqm_i_baseline"])
    with pytest.raises(ValueError, match="refs_per_case must be a positive integer"):
        DemoConfig(refs_per_case=0)


def test_default_model_is_the_shipped_stand_in_or_a_clear_error():
    from medqm.demo import vlm_source
    from medqm.label.standin import DEMO_VLM_DIR

    if (DEMO_VLM_DIR / "config.json").is_file():
        assert vlm_source(DemoConfig())[0] == str(DEMO_VLM_DIR.resolve())
    else:
        with pytest.raises(DemoError, match="pass --model"):
            vlm_source(DemoConfig())


def test_shipped_plans_load():
    from medqm.distort.plan import Plan

    assert Plan.load("demo").levels == [1, 3, 5] and Plan.load("demo-quick").levels == [1, 4]
