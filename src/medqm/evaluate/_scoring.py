"""The evaluation's images and everyone's scores on them: the test set, classical baselines, MedQM-I checkpoints.

All methods score the same rows: the labelled images of the test cases of the main checkpoint's saved split.
Scores are cached in the report folder (``cache/``) as Parquet parts keyed by image path, size and
modification time (and, for checkpoints, the weights' digest), so an interrupted run resumes and a rerun
that adds a method only scores what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medqm._fs import atomic_path
from medqm.io import MedQMReadError, read_image

TEST_COLUMNS = ("path", "quality", "case_id", "modality", "type", "level", "ref_id", "dist_id", "diag_loss")
Progress = Callable[[str, int, int], None]


# -------------------------------------------------------------------------------------------------- the test set
@dataclass
class TestSet:
    """The evaluated rows (one per labelled test image) and how they were chosen.

    Attributes:
        rows: DataFrame with columns path, quality, case_id, modality, type, level, ref_id, dist_id.
        info: provenance for the report (split file, counts, dropped rows, sampling).
        split: the split table (case_id, split) the test cases come from.
    """

    rows: Any
    info: dict[str, Any]
    split: Any


def checkpoint_split(model_dir: str | os.PathLike) -> Path | None:
    """The split file saved with a checkpoint (``split.csv``), or None."""
    p = Path(model_dir) / "split.csv"
    return p if p.is_file() else None


def load_test_set(labels, split_file: str | os.PathLike, *, max_images: int | None = None, seed: int = 0) -> TestSet:
    """The labelled images of the split's test cases.

    Args:
        labels: a `medqm label` output folder, or a label table (DataFrame) in its schema.
        split_file: a split file (case_id, split), normally the main checkpoint's ``split.csv``.
        max_images: keep at most this many images, sampled per case in proportion to its size (every test
            case keeps at least one image; largest remainders settle the rounding), seeded by ``seed``.
    Rows without a quality label, whose image file is missing, or repeating a path are dropped (counted in
    ``info['dropped']``). The split is checked against the labels of its cases for leakage (a reference image
    or file shared between parts raises `medqm.train.SplitLeakageError`).
    """
    import pandas as pd

    from medqm.label import read_labels
    from medqm.train import check_split, load_split

    table = labels if isinstance(labels, pd.DataFrame) else read_labels(labels)
    missing = [c for c in ("path", "quality", "case_id") if c not in table]
    if missing:
        raise ValueError(f"the label table lacks columns {missing} (expected a `medqm label` output)")
    split = load_split(split_file)
    table = table.copy()
    table["case_id"] = table["case_id"].astype(str)
    in_split = table[table["case_id"].isin(set(split["case_id"].astype(str)))]
    check_split(split, in_split)
    test_cases = set(split.loc[split["split"] == "test", "case_id"].astype(str))
    if not test_cases:
        raise ValueError(f"{split_file}: the split has no test cases")
    rows = table[table["case_id"].isin(test_cases)].copy()
    n_labelled = len(rows)
    if rows.empty:
        raise ValueError(f"none of the {len(test_cases)} test cases of {split_file} has a label in this table "
                         "(are the labels and the checkpoint from the same collection?)")
    dropped = {"no_quality": int(rows["quality"].isna().sum())}
    rows = rows[rows["quality"].notna()]
    exists = rows["path"].map(lambda p: isinstance(p, str) and Path(p).is_file())
    dropped["missing_file"] = int((~exists).sum())
    rows = rows[exists]
    before = len(rows)
    rows = rows.drop_duplicates("path")
    dropped["duplicate_path"] = before - len(rows)
    for c in TEST_COLUMNS:
        if c not in rows:
            rows[c] = None
    rows = rows[list(TEST_COLUMNS)].copy()
    rows["modality"] = rows["modality"].fillna("unknown").astype(str)
    rows["type"] = rows["type"].fillna("unknown").astype(str)
    rows["level"] = pd.to_numeric(rows["level"], errors="coerce")
    rows = rows.sort_values(["case_id", "path"]).reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"no usable test rows: {dropped}")
    n_usable = len(rows)
    if max_images is not None and max_images < n_usable:
        rows = _sample_by_case(rows, max_images, seed)
    q = rows["quality"].to_numpy(dtype=np.float64)
    info = {
        "split_file": str(Path(split_file).resolve()),
        "n_test_cases_in_split": len(test_cases),
        "n_labelled": n_labelled,
        "n_usable": n_usable,
        "dropped": dropped,
        "max_images": max_images,
        "sampled": len(rows) < n_usable,
        "sample_seed": seed if len(rows) < n_usable else None,
        "n_images": len(rows),
        "n_cases": int(rows["case_id"].nunique()),
        "cases": sorted(rows["case_id"].unique().tolist()),
        "quality_range": [float(q.min()), float(q.max())],
    }
    return TestSet(rows, info, split)


def _sample_by_case(rows, max_images: int, seed: int):
    sizes = rows.groupby("case_id").size()
    if max_images < len(sizes):
        raise ValueError(f"max_images={max_images} is below the number of test cases ({len(sizes)}); every case "
                         "keeps at least one image")
    share = sizes / sizes.sum() * max_images
    quota = np.maximum(1, np.floor(share)).astype(int)
    # settle the rounding: add to the largest remainders, or take from the largest quotas above one
    remainder = (share - np.floor(share)).sort_values(ascending=False, kind="stable")
    extra = max_images - int(quota.sum())
    for case in remainder.index:
        if extra <= 0:
            break
        if quota[case] < sizes[case]:
            quota[case] += 1
            extra -= 1
    while extra < 0:
        case = quota.idxmax()
        quota[case] -= 1
        extra += 1
    rng = np.random.default_rng(seed)
    keep = []
    for case, idx in rows.groupby("case_id").indices.items():
        keep.extend(rng.choice(idx, size=int(quota[case]), replace=False).tolist())
    return rows.iloc[sorted(keep)].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ score caches
def _file_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


class _PartCache:
    """A folder of Parquet parts, each a batch of scored rows keyed by (path, size, mtime_ns)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, columns: Sequence[str]):
        import pandas as pd

        parts = sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []
        frames = []
        for p in parts:
            try:
                df = pd.read_parquet(p)
            except (OSError, ValueError) as e:  # a damaged part (pyarrow raises ArrowInvalid, a ValueError) is rescored
                warnings.warn(f"ignoring unreadable score cache {p} ({type(e).__name__}: {e})", stacklevel=2)
                continue
            if set(columns) <= set(df.columns):
                frames.append(df)
        if not frames:
            return None
        return pd.concat(frames, ignore_index=True).drop_duplicates(["path", "size", "mtime_ns"], keep="last")

    def append(self, df) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        n = len(list(self.folder.glob("part-*.parquet")))
        while (self.folder / f"part-{n:05d}.parquet").exists():
            n += 1
        with atomic_path(self.folder / f"part-{n:05d}.parquet") as tmp:
            df.to_parquet(tmp, index=False)


def _todo(paths: Sequence[str], cached, columns: Sequence[str]) -> tuple[list[int], dict[str, dict]]:
    """Indices of ``paths`` not (validly) in ``cached``, and the cached values of the others by path."""
    keys = [_file_key(p) for p in paths]
    have: dict[str, dict] = {}
    if cached is not None:
        for rec in cached.to_dict("records"):
            have[(rec["path"], int(rec["size"]), int(rec["mtime_ns"]))] = rec
    todo, found = [], {}
    for i, (p, (size, mtime)) in enumerate(zip(paths, keys, strict=True)):
        rec = have.get((p, size, mtime))
        if rec is None:
            todo.append(i)
        else:
            found[p] = {c: rec[c] for c in columns}
    return todo, found


# ----------------------------------------------------------------------------------------- classical baselines
def _score_chunk(paths: Sequence[str], names: Sequence[str]) -> list[dict]:
    """Read and score a list of images with every baseline in ``names`` (runs in worker processes)."""
    from .baselines import create_baseline

    scorers = [(n, create_baseline(n)) for n in names]
    out = []
    for p in paths:
        size, mtime = _file_key(p)
        rec: dict[str, Any] = {"path": p, "size": size, "mtime_ns": mtime, "error": ""}
        try:
            px = read_image(p).pixels
        except MedQMReadError as e:
            rec.update({n: float("nan") for n in names})
            rec["error"] = f"read: {e}"
            out.append(rec)
            continue
        errors = []
        for n, s in scorers:
            try:
                rec[n] = float(s(px))
            except (ValueError, TypeError, np.linalg.LinAlgError) as e:
                rec[n] = float("nan")
                errors.append(f"{n}: {e}")
        rec["error"] = "; ".join(errors)
        out.append(rec)
    return out


def score_baselines(paths: Sequence[str], names: Sequence[str], cache_dir: str | os.PathLike, *, workers: int = 1,
                    chunk: int = 64, progress: Progress | None = None):
    """Raw scores (not sign-aligned) of every image with every named baseline, cached and resumable.

    Args:
        paths: image files.
        names: registered baselines (`medqm.evaluate.list_baselines`).
        cache_dir: folder for the score cache (``baselines/`` under it).
        workers: processes (images are independent; each worker scores whole chunks).
        chunk: images per work item and per cache part.
        progress: ``progress('baselines', done, total)``.
    Returns a DataFrame indexed like ``paths`` with one column per baseline (NaN where undefined, e.g. NIQE
    on an image without texture) and ``error``.
    """
    import pandas as pd

    from .baselines import list_baselines

    names = list(names)
    unknown = sorted(set(names) - set(list_baselines()))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; registered: {', '.join(list_baselines())}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    paths = [str(p) for p in paths]
    cache = _PartCache(Path(cache_dir) / "baselines")
    todo, found = _todo(paths, cache.load(names + ["error"]), names + ["error"])
    total, done = len(paths), len(paths) - len(todo)
    if progress:
        progress("baselines", done, total)
    chunks = [[paths[i] for i in todo[k : k + chunk]] for k in range(0, len(todo), chunk)]

    def record(recs: list[dict]) -> None:
        nonlocal done
        cache.append(pd.DataFrame(recs))
        for r in recs:
            found[r["path"]] = {c: r[c] for c in names + ["error"]}
        done += len(recs)
        if progress:
            progress("baselines", done, total)

    if workers == 1 or len(chunks) <= 1:
        for c in chunks:
            record(_score_chunk(c, names))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=quiet_worker) as pool:
            futures = [pool.submit(_score_chunk, c, names) for c in chunks]
            for f in as_completed(futures):
                record(f.result())
    return pd.DataFrame([found[p] for p in paths], columns=names + ["error"])


def quiet_worker() -> None:
    """Process-pool initializer: one BLAS thread per worker process (the workers are the parallelism)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


# -------------------------------------------------------------------------------------------- MedQM-I checkpoints
def checkpoint_digest(model_dir: str | os.PathLike) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint's config.json and model.safetensors."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(d / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def checkpoint_summary(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What the report says about a checkpoint: variant, parameters, what it was trained on.

    Built on `medqm.model.checkpoint_info` (which reads the folder without loading the weights).
    """
    from medqm.model import checkpoint_info

    d = Path(model_dir)
    info = checkpoint_info(d)
    cfg = info.meta
    inner = cfg.get("config", {})
    meta = inner.get("meta", {}) or {}
    return {"path": str(d.resolve()), "variant": meta.get("variant") or cfg.get("architecture"),
            "num_params": cfg.get("num_params"), "trained_on": info.trained_on,
            "use_priors": inner.get("use_priors"), "use_implicit": inner.get("use_implicit"), "head": inner.get("head"),
            "digest": checkpoint_digest(d)}


def score_checkpoint(model_dir: str | os.PathLike, paths: Sequence[str], cache_dir: str | os.PathLike, *,
                     name: str = "model", batch_size: int = 32, device: str = "cpu", runtime: str = "auto",
                     num_threads: int | None = None, chunk: int = 512, progress: Progress | None = None):
    """MedQM-I quality of every image under a checkpoint, cached (by weights digest) and resumable.

    Returns a DataFrame indexed like ``paths``: ``quality`` (NaN with ``error`` set when an image fails),
    ``quality_<task>`` for each task of the checkpoint (none without), ``expert`` (largest gate) and ``gates``
    (JSON list).
    """
    import pandas as pd

    from medqm.model import Scorer, checkpoint_info, task_column

    paths = [str(p) for p in paths]
    task_cols = [task_column(t) for t in checkpoint_info(model_dir).meta.get("config", {}).get("tasks") or []]
    cols = ["quality", *task_cols, "expert", "gates", "error"]
    cache = _PartCache(Path(cache_dir) / f"model-{checkpoint_digest(model_dir)}")
    todo, found = _todo(paths, cache.load(cols), cols)
    total, done = len(paths), len(paths) - len(todo)
    if progress:
        progress(name, done, total)
    if todo:
        scorer = Scorer(model_dir, device=device, batch_size=batch_size, runtime=runtime, num_threads=num_threads)
        for k in range(0, len(todo), chunk):
            recs = []
            for sub in range(k, min(k + chunk, len(todo)), batch_size):
                batch = [paths[i] for i in todo[sub : min(sub + batch_size, k + chunk, len(todo))]]
                recs.extend(_score_model_batch(scorer, batch))
                if progress:
                    progress(name, done + len(recs), total)
            cache.append(pd.DataFrame(recs))
            for r in recs:
                found[r["path"]] = {c: r[c] for c in cols}
            done += len(recs)
    return pd.DataFrame([found[p] for p in paths], columns=cols)


def _score_model_batch(scorer, batch: Sequence[str]) -> list[dict]:
    from medqm.model import task_column

    imgs, recs = [], []
    for p in batch:
        size, mtime = _file_key(p)
        rec = {"path": p, "size": size, "mtime_ns": mtime, "quality": float("nan"), "expert": -1, "gates": "",
               "error": "", **{task_column(t): float("nan") for t in scorer.tasks}}
        try:
            imgs.append((rec, read_image(p)))
        except MedQMReadError as e:
            rec["error"] = f"read: {e}"
        recs.append(rec)
    if imgs:
        for rec, res in zip((r for r, _ in imgs), scorer.score_pixels([im for _, im in imgs]), strict=True):
            rec["quality"] = float(res.quality)
            rec.update({task_column(t): v for t, v in res.tasks.items()})
            rec["expert"] = int(res.expert)
            rec["gates"] = json.dumps([round(float(g), 6) for g in res.gates])
    return recs


def heatmap_gallery(model_dir: str | os.PathLike, rows, *, n: int = 8, device: str = "cpu", runtime: str = "auto",
                    num_threads: int | None = None) -> list[dict[str, Any]]:
    """Heatmap overlays (RGB uint8) of MedQM-I on a few test images, picked across modalities and quality.

    Per modality (in turn, until ``n`` are picked): the image with the lowest label, then the highest.
    Returns dicts with path, modality, type, level, label, pred and overlay; [] when the model has no
    attention (no priors and no implicit queries).
    """
    from medqm.model import Scorer
    from medqm.model.scoring import heatmap_overlay

    scorer = Scorer(model_dir, device=device, runtime=runtime, num_threads=num_threads)
    if not scorer.heatmaps_available or n <= 0:
        return []
    seqs = []
    for _, g in rows.groupby("modality", sort=True):
        idx = list(g.sort_values(["quality", "path"]).index)
        inter, lo, hi = [], 0, len(idx) - 1
        while lo <= hi:  # lowest, highest, second lowest, second highest, …
            inter.append(idx[lo])
            if hi != lo:
                inter.append(idx[hi])
            lo, hi = lo + 1, hi - 1
        seqs.append(inter)
    picks: list[int] = []
    for k in range(max(len(s) for s in seqs)):  # round robin over the modalities
        picks.extend(s[k] for s in seqs if k < len(s))
    picks = picks[:n]
    out = []
    images = []
    for i in picks:
        try:
            images.append((i, read_image(rows.at[i, "path"])))
        except MedQMReadError:
            continue
    results = scorer.score_pixels([im for _, im in images], heatmaps=True)
    for (i, im), res in zip(images, results, strict=True):
        r = rows.loc[i]
        out.append({"path": r["path"], "modality": r["modality"], "type": r["type"],
                    "level": None if r["level"] != r["level"] else int(r["level"]), "label": float(r["quality"]),
                    "pred": float(res.quality), "overlay": heatmap_overlay(im.pixels, res.heatmap, max_side=384)})
    return out


__all__ = ["TestSet", "load_test_set", "checkpoint_split", "score_baselines", "score_checkpoint", "checkpoint_summary",
           "checkpoint_digest", "heatmap_gallery", "quiet_worker"]
