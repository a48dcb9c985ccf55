"""Distortion plans: which types × levels × seeds to apply to a collection, run in parallel and resumably.

A plan is a small YAML or TOML file::

    name: default
    types: all            # or a list of distortion names
    levels: [1, 2, 3, 4, 5]
    seeds: 1              # seeds per (image, type, level); seed s uses the integer s
    modalities: all       # or a list: only reference images of these modalities

Each type is applied only to images whose modality it models. Outputs: ``OUT/images/<type>/<dist_id>.png``
and ``OUT/manifest.parquet`` (dist_id, ref_id, case_id, modality, type, level, seed, params JSON, path,
ref_path). Finished work is appended to ``OUT/ledger.jsonl`` as it completes, so an interrupted run picks up
where it stopped; images are written atomically (temp file + rename), so none is ever half-written.
Per-image failures go to ``OUT/failures.csv`` and are retried on the next run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medqm import __version__
from medqm._fs import atomic_path, write_json, write_parquet, write_records_csv
from medqm.io import MedQMReadError
from medqm.io.collection import load_manifest, read_collection_image

from ._base import N_LEVELS, create_distortion, list_distortions

PLANS_DIR = Path(__file__).parent / "plans"
MANIFEST_COLUMNS = ("dist_id", "ref_id", "case_id", "modality", "type", "level", "seed", "params", "path", "ref_path")


@dataclass
class Plan:
    name: str = "default"
    types: list[str] = field(default_factory=list)  # empty = all registered
    levels: list[int] = field(default_factory=lambda: list(range(1, N_LEVELS + 1)))
    seeds: int = 1
    modalities: list[str] = field(default_factory=list)  # empty = all

    def __post_init__(self):
        known = set(list_distortions())
        unknown = [t for t in self.types if t not in known]
        if unknown:
            create_distortion(unknown[0])  # raises with close-match suggestions
        bad = [lv for lv in self.levels if not (isinstance(lv, int) and 1 <= lv <= N_LEVELS)]
        if bad or not self.levels:
            raise ValueError(f"plan {self.name!r}: levels must be integers 1..{N_LEVELS}, got {self.levels}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"plan {self.name!r}: seeds must be a positive integer, got {self.seeds!r}")

    @property
    def type_names(self) -> list[str]:
        return list(self.types) or list_distortions()

    @classmethod
    def load(cls, spec: str | Path) -> Plan:
        """A plan file path, or the name of a plan that ships with MedQM ('default', 'quick')."""
        path = Path(spec)
        if not path.is_file():
            shipped = PLANS_DIR / f"{spec}.yaml"
            if not shipped.is_file():
                names = sorted(p.stem for p in PLANS_DIR.glob("*.yaml"))
                raise ValueError(f"plan {str(spec)!r} is neither a file nor a shipped plan ({', '.join(names)})")
            path = shipped
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a plan must be a mapping")
        allowed = {"name", "types", "levels", "seeds", "modalities"}
        extra = set(raw) - allowed
        if extra:
            raise ValueError(f"{path}: unknown plan keys {sorted(extra)}; allowed: {sorted(allowed)}")
        for key in ("types", "modalities"):
            if raw.get(key) in (None, "all"):
                raw[key] = []
        raw.setdefault("name", path.stem)
        return cls(**raw)


@dataclass(frozen=True)
class Job:
    """All distortions of one reference image (read once, distorted many times)."""

    ref_id: str
    ref_path: str
    case_id: str
    modality: str
    body_part: str
    tasks: tuple[tuple[str, int, int], ...]  # (type, level, seed)


def dist_id(ref_id: str, type_: str, level: int, seed: int) -> str:
    return f"{ref_id}__{type_}__L{level}__s{seed}"


def plan_jobs(collection: str | Path, plan: Plan, done: set[str] = frozenset()) -> list[Job]:
    """Expand a plan over a collection's manifest into per-image jobs, skipping finished dist_ids."""
    df = load_manifest(collection)
    if plan.modalities:
        df = df[df["modality"].isin(plan.modalities)]
    distortions = {n: create_distortion(n) for n in plan.type_names}
    jobs = []
    for _, row in df.sort_values("id").iterrows():
        color = _is_color(row)
        tasks = tuple(
            (name, level, seed)
            for name, d in distortions.items()
            if d.applies_to(row["modality"], color=color)
            for level in plan.levels
            for seed in range(plan.seeds)
            if dist_id(row["id"], name, level, seed) not in done
        )
        if tasks:
            jobs.append(Job(row["id"], row["abs_path"], str(row["case_id"]), row["modality"], row.get("body_part", ""),
                            tasks))
    return jobs


def _is_color(row) -> bool:
    """From the PNG header only; an unreadable file counts as grey and fails later, per image, in its job."""
    from PIL import Image

    try:
        with Image.open(row["abs_path"]) as im:
            return im.mode not in ("L", "I", "I;16", "F", "1", "LA")
    except OSError:
        return False


def _save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:  # a reader never sees half an image
        Image.fromarray(np.round(pixels * 255.0).astype(np.uint8)).save(tmp, format="PNG")


def run_job(job: Job, out: str) -> list[dict[str, Any]]:
    """Worker: distort one reference image for every task; returns one record per task (ok or error)."""
    out_dir = Path(out)
    records = []
    try:
        image = read_collection_image({"abs_path": job.ref_path, "modality": job.modality, "case_id": job.case_id,
                                       "body_part": job.body_part, "id": job.ref_id})
    except MedQMReadError as e:
        return [_error(job, t, f"reference unreadable: {e.reason}") for t in job.tasks]
    for name, level, seed in job.tasks:
        did = dist_id(job.ref_id, name, level, seed)
        rel = Path("images") / name / f"{did}.png"
        try:
            result = create_distortion(name)(image, level, seed)
            _save_png(result.pixels, out_dir / rel)
        except Exception as e:  # one failing distortion never stops the batch
            records.append(_error(job, (name, level, seed), f"{type(e).__name__}: {e}"))
            continue
        records.append({
            "status": "ok", "dist_id": did, "ref_id": job.ref_id, "case_id": job.case_id, "modality": job.modality,
            "type": name, "level": level, "seed": seed, "params": json.dumps(result.params, sort_keys=True),
            "path": rel.as_posix(), "ref_path": job.ref_path,
        })
    return records


def _error(job: Job, task, reason: str) -> dict[str, Any]:
    name, level, seed = task
    return {"status": "error", "dist_id": dist_id(job.ref_id, name, level, seed), "ref_id": job.ref_id,
            "type": name, "level": level, "seed": seed, "reason": reason}


def read_ledger(out: Path) -> dict[str, dict]:
    """Finished records by dist_id; a torn last line from an interrupted write is ignored."""
    ledger = out / "ledger.jsonl"
    records: dict[str, dict] = {}
    if not ledger.is_file():
        return records
    with open(ledger, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("status") == "ok":
                records[rec["dist_id"]] = rec
    return records


def _drop_torn_tail(ledger: Path) -> None:
    """Cut a last line left half-written by an interruption, so new records start on a line of their own."""
    if not ledger.is_file():
        return
    with open(ledger, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


TEST_HOOK_STALL_ENV = "MEDQM_TEST_HOOK_STALL_AFTER_FIRST_LEDGER"


def _test_hook_stall_after_first_ledger(marker: str) -> None:
    """TEST HOOK, inert unless ``$MEDQM_TEST_HOOK_STALL_AFTER_FIRST_LEDGER`` is set (never set it in real use).

    When the variable names a file, `run_plan` calls this right after the first batch of ledger lines (one
    finished job) has been written and fsynced: it creates that marker file and then blocks forever, so a
    test can wait for the marker and ``kill -9`` the run at a known point (records in the ledger, no
    manifest yet) instead of racing the machine's speed. Workers of a pool may still finish their current
    jobs while the main process is blocked; those images are not in the ledger and are redone on resume.
    """
    import time

    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(str(os.getpid()))
    while True:  # until killed
        time.sleep(3600)


@dataclass
class RunSummary:
    out: Path
    total: int
    done_before: int
    written: int
    failed: list[dict]


def run_plan(
    collection: str | Path,
    plan: Plan,
    out: str | Path,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunSummary:
    """Apply ``plan`` to ``collection``, writing into ``out``; resumes from ``out/ledger.jsonl``.

    ``progress(done, total)`` is called as distortions complete. Returns counts and the failures.
    (Tests only: ``$MEDQM_TEST_HOOK_STALL_AFTER_FIRST_LEDGER``, see `_test_hook_stall_after_first_ledger`.)
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    collection = Path(collection)
    meta = {"plan": asdict(plan), "collection": str(collection.resolve()), "medqm_version": __version__}
    meta_path = out / "plan.json"
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        if previous.get("plan") != meta["plan"] or previous.get("collection") != meta["collection"]:
            raise ValueError(f"{out} holds the output of a different plan or collection; use another --out")
    else:
        write_json(meta, meta_path)  # atomic: a crash never leaves a torn guard file

    _drop_torn_tail(out / "ledger.jsonl")
    done = read_ledger(out)
    jobs = plan_jobs(collection, plan, done=set(done))
    total = len(done) + sum(len(j.tasks) for j in jobs)
    failures: list[dict] = []
    written = 0
    workers = max(1, workers or os.cpu_count() or 1)
    stall_marker = os.environ.get(TEST_HOOK_STALL_ENV)  # test hook; None in real use
    if progress:
        progress(len(done), total)

    with open(out / "ledger.jsonl", "a", encoding="utf-8") as ledger:
        def record(records):
            nonlocal written
            for rec in records:
                if rec["status"] == "ok":
                    done[rec["dist_id"]] = rec
                    written += 1
                else:
                    failures.append(rec)
                ledger.write(json.dumps(rec, sort_keys=True) + "\n")
            ledger.flush()
            os.fsync(ledger.fileno())
            if progress:
                progress(len(done), total)
            if stall_marker and records:
                _test_hook_stall_after_first_ledger(stall_marker)

        if workers == 1:
            for job in jobs:
                record(run_job(job, str(out)))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                pending = set()
                queue = iter(jobs)
                for job in queue:  # keep a bounded number in flight so an interrupt loses little
                    pending.add(pool.submit(run_job, job, str(out)))
                    if len(pending) >= 4 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            record(fut.result())
                for fut in pending:
                    record(fut.result())

    write_manifest(out, done, meta)
    _write_failures(out, failures)
    return RunSummary(out, total, total - sum(len(j.tasks) for j in jobs), written, failures)


def write_manifest(out: Path, records: dict[str, dict], meta: dict) -> Path:
    """Parquet manifest sorted by dist_id (so it does not depend on completion order), plan in its metadata."""
    import pyarrow as pa

    rows = [records[k] for k in sorted(records)]
    table = pa.table({
        c: pa.array([r[c] for r in rows], type=pa.int32() if c in ("level", "seed") else pa.string())
        for c in MANIFEST_COLUMNS
    })
    table = table.replace_schema_metadata({"medqm": json.dumps(meta, sort_keys=True)})
    return write_parquet(table, out / "manifest.parquet")


def _write_failures(out: Path, failures: list[dict]) -> None:
    write_records_csv(out / "failures.csv", failures, ["dist_id", "ref_id", "type", "level", "seed", "reason"])


def read_manifest(out: str | Path):
    """The distortion manifest as a DataFrame (params still JSON text; `json.loads` them to replay)."""
    import pandas as pd

    return pd.read_parquet(Path(out) / "manifest.parquet")
