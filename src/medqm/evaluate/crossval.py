"""`medqm evaluate --folds K`: case-level k-fold cross-validation of MedQM-I, its ablations, the deep baseline and
the classical BIQA metrics, with every figure pooled over the folds.

With a few dozen cases a single split tests on a handful of them, and case-bootstrap intervals are too wide to
tell methods apart. Here every case is a test case once: the cases are dealt into K folds (`medqm.train.make_folds`,
stratified by modality, seeded); for each fold every model variant is trained on the other cases (a validation
part of them for early stopping) and predicts the fold's test images; the classical baselines score every image
once. All methods are thus scored on the same images, each by a model that never saw its case. The folds' test
predictions are then pooled: one SRCC / KRCC / PLCC (after one logistic fit) / RMSE per method over all cases,
with the case bootstrap over all cases and the paired case-bootstrap test of MedQM-I against every other method.
Per-fold figures are reported beside the pooled ones.

Output folder (``out``)::

    cv.json                 settings that define the folds and the training (a resumed run must match)
    folds.csv               case_id, fold (the fold in which the case is tested), group, n_images
    fold-<i>/split.csv      that fold's train / val / test split
    fold-<i>/<model>/       a checkpoint (`medqm.train.train`), with test_predictions.csv
    fold-<i>/<model>.done.json   written last: the model of that fold is finished
    cache/                  classical baseline scores (`score_baselines`)
    predictions.csv         the pooled test rows: labels, fold and every method's score
    metrics.json, report.md, report.html, figures/

Resuming: a model of a fold with its ``.done.json`` is never retrained; an interrupted one is trained again from
the start. The frozen-backbone features are content-keyed (`medqm.train.data.FeatureCache`): the first training
computes them for every image, every later one (other models, other folds) reads them back.

MedQM-I's scores of a fold's test images are the ones its trainer wrote with the best weights
(``test_predictions.csv``, from the cached features in frozen mode); they equal `medqm score` on the checkpoint
up to the float16 rounding of the cached features.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medqm.metrics import CaseBootstrap, agreement

from ._scoring import load_test_set, score_baselines
from .baselines import baseline_info, list_baselines
from .runner import (
    Method,
    alignment_study,
    all_method_metrics,
    gate_comparison,
    severity_curves,
    significance,
    write_metrics_json,
)
from .tasks import attach_task_labels, task_metrics

DEFAULT_MODELS = ("medqm_i", "medqm_i_no_priors", "medqm_i_no_queries", "medqm_i_single_head", "medqm_i_baseline")
# Display names in the report (the same as `medqm demo`'s); a variant not listed is shown by its registered name.
DISPLAY_NAMES = {
    "medqm_i": "MedQM-I",
    "medqm_i_no_priors": "MedQM-I no priors",
    "medqm_i_no_queries": "MedQM-I no queries",
    "medqm_i_single_head": "MedQM-I single head",
    "medqm_i_baseline": "deep baseline",
}
DESIGN = "cross-validation"
# What the training of every fold depends on; a resumed run must have the same (see `_guard`).
GUARDED = ("labels_sha256", "folds", "seed", "val_fraction", "stratify", "mode", "img_size", "epochs", "patience",
           "batch_size", "lr", "target", "ema_decay", "calibrate", "tasks", "task_min_images", "task_weight")

Say = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass
class CVConfig:
    """Settings of one cross-validated evaluation (``medqm evaluate --folds K``).

    Args:
        labels: a `medqm label` output folder (labels.parquet).
        out: output folder (created); an interrupted run resumes in it.
        folds: K, the number of case-level folds (2 … number of cases).
        models: registered MedQM-I variants to train in every fold (`medqm.model.list_models`).
        main: the variant under evaluation (tested against every other method); must be in ``models``.
        names: display names by variant (default `DISPLAY_NAMES`).
        baselines: classical baselines (registry names; default all registered).
        val_fraction: share of each fold's non-test images, by case, kept for early stopping.
        stratify: label column the folds are stratified by (None: no stratification).
        mode, img_size, epochs, patience, batch_size, lr, target, ema_decay, calibrate: training of every model
            (`medqm.train.TrainConfig`).
        tasks, task_min_images, task_weight: the task-conditioned quality outputs every model is trained with
            (`medqm.train.TrainConfig`; None: every answer type with enough images, ``[]``: none).
        cache_dir: frozen-feature cache (default: `medqm.train.data.default_cache_dir`).
        device: training device; num_threads: torch CPU threads during the run (None: leave as is).
        n_boot: bootstrap replicates (cases resampled); level: confidence level.
        seed: seed of the folds, the training and the bootstrap.
        workers: processes for the classical baselines and the per-method statistics.
        group_ci: also bootstrap the SRCC of each modality / distortion type / level.
        gate_risk, gate_splits: the quality-gate comparison on the pooled predictions (0 splits: none).
    """

    labels: str
    out: str
    folds: int = 5
    models: Sequence[str] = DEFAULT_MODELS
    main: str = "medqm_i"
    names: Mapping[str, str] | None = None
    baselines: Sequence[str] | None = None
    val_fraction: float = 0.15
    stratify: str | None = "modality"
    mode: str = "frozen"
    img_size: int = 224
    epochs: int = 20
    patience: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    target: str = "loss"
    ema_decay: float = 0.99
    calibrate: bool = True
    tasks: Sequence[str] | None = None
    task_min_images: int = 50
    task_weight: float = 0.5
    cache_dir: str | None = None
    device: str = "cpu"
    num_threads: int | None = None
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    workers: int = 1
    group_ci: bool = True
    gate_risk: str = "lost-answer-rate"
    gate_splits: int = 200
    display: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self):
        from medqm.model import is_model

        from .gate import RISKS

        if isinstance(self.folds, bool) or not isinstance(self.folds, (int, np.integer)) or self.folds < 2:
            raise ValueError(f"folds must be an integer >= 2 (--folds), got {self.folds!r}")
        self.folds = int(self.folds)
        self.models = list(self.models)
        unknown = [m for m in self.models if not is_model(m)]
        if unknown:
            from medqm.model import list_models

            raise ValueError(f"unknown models {unknown}; registered: {', '.join(list_models())}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a model twice: {self.models}")
        if self.main not in self.models:
            raise ValueError(f"models must contain the evaluated model {self.main!r}, got {self.models}")
        names = list(self.baselines) if self.baselines is not None else list_baselines()
        unknown = sorted(set(names) - set(list_baselines()))
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; registered: {', '.join(list_baselines())}")
        self.baselines = names
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, got {self.n_boot}")
        if not 0.5 <= self.level < 1:
            raise ValueError(f"level must lie in [0.5, 1), got {self.level}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gate_risk not in RISKS:
            raise ValueError(f"gate_risk must be one of {RISKS}, got {self.gate_risk!r}")
        if self.gate_splits < 0:
            raise ValueError(f"gate_splits must be >= 0, got {self.gate_splits}")
        self.display = {m: (self.names or DISPLAY_NAMES).get(m, m) for m in self.models}
        shown = list(self.display.values())
        clash = sorted({n for n in shown if shown.count(n) > 1 or n in list_baselines()})
        if clash:
            raise ValueError(f"display names must be unique and differ from the baselines' names: {clash}")
        if not (Path(self.labels) / "labels.parquet").is_file():
            raise FileNotFoundError(f"--labels {self.labels}: no labels.parquet (expected a `medqm label` output)")

    @property
    def name(self) -> str:
        """Display name of the evaluated model (what the shared measuring helpers call ``cfg.name``)."""
        return self.display[self.main]


@dataclass
class CVResult:
    """What `cross_validate` produced: the metrics (as in metrics.json), the files, the pooled methods and rows."""

    metrics: dict[str, Any]
    out: Path
    files: dict[str, Path]
    methods: list[Method]
    rows: Any  # the pooled test rows (DataFrame), with a ``fold`` column
    splits: list[Any]


def cross_validate(cfg: CVConfig, *, log: Say | None = print, progress: Progress | None = None) -> CVResult:
    """Make (or resume) the folds, train every model per fold, score, pool and write the report into ``cfg.out``.

    ``log`` receives one line per step; ``progress(stage, done, total)`` reports 'features', 'fold i/K <model>'
    (epochs) and 'baselines'. ``metrics.json`` is written once, last.
    """
    say = log or (lambda _m: None)
    timing: dict[str, Any] = {}
    t0 = time.perf_counter()
    out = Path(cfg.out)
    threads_before = None
    if cfg.num_threads is not None:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(cfg.num_threads)
    try:
        table, splits = _folds(cfg, out, say)
        timing["load"] = time.perf_counter() - t0
        trained = _train_folds(cfg, out, splits, say, progress, timing)
        rows, dropped = _pooled_rows(table, out, len(splits))
        t = time.perf_counter()
        methods = _score(cfg, out, rows, progress)
        timing["baselines"] = time.perf_counter() - t
        say(f"classical baselines: {len(rows)} images in {timing['baselines']:.1f} s")
        t = time.perf_counter()
        metrics = _measure(cfg, table, splits, rows, methods)
        timing["metrics"] = time.perf_counter() - t
        say(f"pooled metrics and {cfg.n_boot} case-bootstrap replicates in {timing['metrics']:.1f} s")
        t = time.perf_counter()
        metrics["gate"] = gate_comparison(cfg, methods, rows)
        timing["gate"] = time.perf_counter() - t
    finally:
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)
    metrics = _assemble(cfg, out, table, splits, rows, dropped, methods, trained, metrics, timing)
    t = time.perf_counter()
    files = {"predictions.csv": _write_predictions(rows, methods, out / "predictions.csv")}
    from .report import write_cv_report

    timing["report"] = 0.0
    timing["total"] = time.perf_counter() - t0
    files.update(write_cv_report(metrics, rows, methods, out,
                                 all_labels=table["quality"].dropna().to_numpy(dtype=np.float64)))
    timing["report"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    files["metrics.json"] = out / "metrics.json"
    write_metrics_json(metrics, files["metrics.json"])
    say(f"cross-validation report written to {out} in {timing['total']:.1f} s")
    return CVResult(metrics, out, files, methods, rows, splits)


# ------------------------------------------------------------------------------------------------------- folds
def _settings(cfg: CVConfig) -> dict[str, Any]:
    from medqm._fs import file_sha256

    s = {k: getattr(cfg, k) for k in GUARDED if k != "labels_sha256"}
    s["tasks"] = None if cfg.tasks is None else list(cfg.tasks)
    s["labels_sha256"] = file_sha256(Path(cfg.labels) / "labels.parquet")
    return s


def _guard(cfg: CVConfig, out: Path) -> None:
    """Refuse to resume in a folder made with other labels, folds or training settings; else record them."""
    from medqm._fs import write_json

    now = _settings(cfg)
    path = out / "cv.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        differ = sorted(k for k in GUARDED if before.get(k) != now[k])
        if differ:
            raise ValueError(f"{out} holds a cross-validation with other {', '.join(differ)} "
                             f"({', '.join(f'{k}: {before.get(k)!r} then, {now[k]!r} now' for k in differ)}); "
                             "choose another --out, or delete the folder to start afresh")
        return
    write_json(now, path, indent=1)


def _folds(cfg: CVConfig, out: Path, say: Say):
    """The label table and the K splits (made once, saved as fold-<i>/split.csv and folds.csv)."""
    from medqm._fs import atomic_path
    from medqm.label import read_labels
    from medqm.train import check_folds, load_split, make_folds, save_split
    from medqm.train.data import training_rows

    table = read_labels(cfg.labels)
    rows, _ = training_rows(table)
    n_cases = int(rows["case_id"].nunique())
    if cfg.folds > n_cases:
        raise ValueError(f"--folds {cfg.folds}: the labels have only {n_cases} usable cases and every fold needs at "
                         f"least one test case (folds must lie in 2 … {n_cases})")
    out.mkdir(parents=True, exist_ok=True)
    _guard(cfg, out)
    files = [out / f"fold-{i}" / "split.csv" for i in range(cfg.folds)]
    if all(f.is_file() for f in files):
        splits = [load_split(f) for f in files]
        check_folds(splits, rows)
    else:
        splits = make_folds(rows, k=cfg.folds, val_fraction=cfg.val_fraction, seed=cfg.seed, stratify=cfg.stratify)
        for split, f in zip(splits, files, strict=True):
            save_split(split, f)
    if not (out / "folds.csv").is_file():
        table_of_folds = splits[0][["case_id", "fold", "group", "n_images"]].sort_values(["fold", "case_id"])
        with atomic_path(out / "folds.csv") as tmp:
            table_of_folds.to_csv(tmp, index=False)
    sizes = [int((s["split"] == "test").sum()) for s in splits]
    say(f"{cfg.folds} case-level folds over {n_cases} cases ({len(rows)} images): "
        + ", ".join(str(n) for n in sizes) + " test cases per fold"
        + (f", stratified by {cfg.stratify}" if cfg.stratify else ""))
    return table, splits


# ---------------------------------------------------------------------------------------------------- training
def _train_folds(cfg: CVConfig, out: Path, splits: list, say: Say, progress: Progress | None,
                 timing: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """Train every model of every fold that has no done-stamp; returns each (fold, model)'s stamp."""
    from medqm._fs import write_json
    from medqm.train import TrainConfig, train

    k = len(splits)
    stamps: dict[tuple[int, str], dict[str, Any]] = {}
    timing["train"] = {}
    for i in range(k):
        fold_dir = out / f"fold-{i}"
        for model in cfg.models:
            done_file = fold_dir / f"{model}.done.json"
            if done_file.is_file():
                stamps[(i, model)] = json.loads(done_file.read_text(encoding="utf-8"))
                continue
            ckpt = fold_dir / model
            if ckpt.exists():  # an interrupted training: start that model again
                shutil.rmtree(ckpt)
            shown = cfg.display[model]
            what = f"fold {i + 1}/{k} {shown}"
            say(f"-- {what}")
            tcfg = TrainConfig(labels=str(cfg.labels), out=str(ckpt), model=model,
                               model_kwargs={"img_size": cfg.img_size}, mode=cfg.mode, epochs=cfg.epochs,
                               patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                               target=cfg.target, ema_decay=cfg.ema_decay, calibrate=cfg.calibrate,
                               split_file=str(fold_dir / "split.csv"), cache_dir=cfg.cache_dir, device=cfg.device,
                               tasks=None if cfg.tasks is None else list(cfg.tasks),
                               task_min_images=cfg.task_min_images, task_weight=cfg.task_weight)

            def on_progress(stage: str, done: int, total: int, what=what) -> None:
                if progress:
                    progress("features" if stage == "features" else what, done, total)

            t = time.perf_counter()
            r = train(tcfg, log=None, progress=on_progress)
            if progress:
                progress(what, r.epochs_run, r.epochs_run)
            o = r.test.get("overall", {})
            stamp = {"fold": i, "model": model, "checkpoint": str(ckpt.resolve()),
                     "seconds": round(time.perf_counter() - t, 2), "best_epoch": r.best_epoch,
                     "epochs_run": r.epochs_run, "val_srcc": r.best_val.get("srcc"), "test_srcc": o.get("srcc"),
                     "n_test": o.get("n")}
            write_json(stamp, done_file, indent=1, default=str)
            stamps[(i, model)] = stamp
            timing["train"][f"fold-{i}/{model}"] = stamp["seconds"]
            say(f"   {what}: {r.epochs_run} epochs (best {r.best_epoch}), fold test SRCC "
                f"{_num(o.get('srcc'))}, {stamp['seconds']:.0f} s")
    return stamps


def _num(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


# -------------------------------------------------------------------------------------------- pooled scoring
def _pooled_rows(table, out: Path, k: int):
    """Every fold's test rows (`load_test_set`), concatenated with their ``fold``; and the rows dropped per cause."""
    import pandas as pd

    parts, dropped = [], {}
    for i in range(k):
        ts = load_test_set(table, out / f"fold-{i}" / "split.csv")
        parts.append(ts.rows.assign(fold=i))
        for cause, n in ts.info["dropped"].items():
            dropped[cause] = dropped.get(cause, 0) + int(n)
    rows = pd.concat(parts, ignore_index=True)
    if not rows["path"].is_unique:  # a path in two folds' test parts would be scored twice
        raise AssertionError("an image is a test image of two folds")
    return rows, dropped


def _score(cfg: CVConfig, out: Path, rows, progress: Progress | None) -> list[Method]:
    """The pooled scores: each model's fold checkpoints on their own test rows, the baselines on every row."""
    import pandas as pd

    from medqm.model import variant_kind

    methods: list[Method] = []
    fold = rows["fold"].to_numpy()
    for model in cfg.models:
        raw = np.full(len(rows), np.nan)
        tasks: dict[str, np.ndarray] = {}
        for i in sorted(set(fold.tolist())):
            ckpt = out / f"fold-{i}" / model
            pred = pd.read_csv(ckpt / "test_predictions.csv")
            sel = np.flatnonzero(fold == i)
            at = pd.Index(pred["path"].astype(str)).get_indexer(rows["path"].astype(str).to_numpy()[sel])
            raw[sel] = _take(pred["pred"], at)
            if model == cfg.main:  # the per-task outputs (pred_<task>) of the evaluated model
                for c in (c for c in pred.columns if c.startswith("pred_")):
                    tasks.setdefault(c[len("pred_"):], np.full(len(rows), np.nan))[sel] = _take(pred[c], at)
        kind = "main" if model == cfg.main else ("ablation" if variant_kind(model) == "ablation" else "deep")
        source = {"variant": model, "split_verified": True, "n_failed": int(np.isnan(raw).sum()),
                  "checkpoints": [str((out / f"fold-{i}" / model).resolve()) for i in sorted(set(fold.tolist()))],
                  "trained_per_fold": True}
        methods.append(Method(cfg.display[model], kind, raw, False, source, tasks))
    base = score_baselines(rows["path"].tolist(), cfg.baselines, out / "cache", workers=cfg.workers,
                           progress=progress)
    for b in cfg.baselines:
        bi = baseline_info(b)
        methods.append(Method(b, "classical", base[b].to_numpy(dtype=np.float64), bi.lower_better,
                              {"description": bi.description, "n_failed": int(base[b].isna().sum())}))
    return methods


def _take(column, at: np.ndarray) -> np.ndarray:
    """``column`` (a Series) at the positions ``at``, NaN where ``at`` is -1 (a row the file does not hold)."""
    v = column.to_numpy(dtype=np.float64)
    return np.where(at >= 0, v[np.maximum(at, 0)] if v.size else np.nan, np.nan)


# ------------------------------------------------------------------------------------------------- measuring
def _measure(cfg: CVConfig, table, splits: list, rows, methods: list[Method]) -> dict[str, Any]:
    """Pooled metrics, significance, ablation drops, alignment, label ceiling, severity curves, per-fold figures."""
    from .reliability import describe_reliability, distortion_oracle, label_reliability

    by_name = {m.name: m for m in methods}
    cases = rows["case_id"].to_numpy()
    y = rows["quality"].to_numpy(dtype=np.float64)
    boot = CaseBootstrap(cases, cfg.n_boot, cfg.seed)
    per = all_method_metrics(methods, rows, cases, boot, cfg)
    sig = significance(cfg, methods, per, y, boot)
    sig["ablations"] = {m.name: _drop(sig["tests"][m.name]) for m in methods if m.kind == "ablation"}
    sig["pooled"] = f"over the test predictions of all {len(splits)} folds; cases resampled across folds"
    alignment = alignment_study(by_name, per, rows, cfg.name, sig, cfg)
    fold = rows["fold"].to_numpy()
    oracle = np.full(len(rows), np.nan)
    for i, split in enumerate(splits):
        sel = fold == i
        oracle[sel] = distortion_oracle(table, split, rows[sel])
    reliability = label_reliability(table, None, rows, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level,
                                    pred=oracle)
    reliability.pop("pred")
    reliability["text"] = describe_reliability(reliability, cfg.name, per[cfg.name]["overall"].get("srcc"))
    reliability["distortion_oracle"]["per_fold"] = True
    curves = severity_curves(by_name, rows, ("niqe", "brisque", cfg.name))
    main = by_name[cfg.name]
    tasks = task_metrics(methods, attach_task_labels(rows, table, list(main.tasks)), cfg)
    return {"per": per, "significance": sig, "alignment": alignment, "label_reliability": reliability,
            "severity_curves": curves, "per_fold": _per_fold(methods, rows, oracle), "tasks": tasks}


def _drop(test: dict[str, Any]) -> dict[str, Any]:
    """An ablation's SRCC drop: the main model's SRCC minus the ablation's, with the paired test's CI and p."""
    b = test["bootstrap"]
    return {"drop": b["diff"], "ci": b["ci"], "p": b["p"], "n_images": b["n_images"], "n_valid": b["n_valid"]}


def _per_fold(methods: list[Method], rows, oracle: np.ndarray) -> dict[str, Any]:
    """Agreement of every method (and the oracle) within each fold, and the mean and SD of each over the folds."""
    fold = rows["fold"].to_numpy()
    y = rows["quality"].to_numpy(dtype=np.float64)
    cases = rows["case_id"].to_numpy()
    folds: list[dict[str, Any]] = []
    series = {m.name: m.aligned for m in methods}
    series["distortion oracle"] = oracle
    for i in sorted(set(fold.tolist())):
        sel = fold == i
        entry: dict[str, Any] = {"fold": i, "n_images": int(sel.sum()), "n_cases": int(len(set(cases[sel]))),
                                 "cases": sorted(set(cases[sel].tolist())), "methods": {}}
        for name, x in series.items():
            s = sel & np.isfinite(x)
            a = agreement(x[s], y[s]) if s.sum() >= 2 else {"srcc": float("nan")}
            a.pop("fit", None)
            entry["methods"][name] = {k: a.get(k, float("nan")) for k in ("srcc", "plcc", "krcc", "rmse")}
            entry["methods"][name]["n_images"] = int(s.sum())
        folds.append(entry)
    summary = {}
    for name in series:
        summary[name] = {}
        for key in ("srcc", "plcc", "krcc", "rmse"):
            v = np.array([f["methods"][name][key] for f in folds], dtype=np.float64)
            v = v[np.isfinite(v)]
            summary[name][f"{key}_mean"] = float(v.mean()) if v.size else float("nan")
            summary[name][f"{key}_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return {"folds": folds, "summary": summary}


def _assemble(cfg: CVConfig, out: Path, table, splits: list, rows, dropped: dict, methods: list[Method],
              trained: dict, measured: dict, timing: dict) -> dict[str, Any]:
    """The metrics.json document: the single-split schema (``methods``, ``significance``, ``test_set`` …, read by
    `medqm.evaluate.report.headline_rows`) with every figure pooled over the folds, plus ``design`` and
    ``per_fold``."""
    from medqm import __version__

    label_meta = table.attrs.get("medqm", {})
    q = rows["quality"].to_numpy(dtype=np.float64)
    per = measured["per"]
    settings = asdict(cfg)
    settings.pop("display", None)
    settings["names"] = dict(cfg.display)
    test_set = {"design": DESIGN, "folds_file": str((out / "folds.csv").resolve()),
                "split_files": [str((out / f"fold-{i}" / "split.csv").resolve()) for i in range(len(splits))],
                "n_images": int(len(rows)), "n_cases": int(rows["case_id"].nunique()),
                "cases": sorted(rows["case_id"].unique().tolist()), "dropped": dropped, "sampled": False,
                "max_images": None, "quality_range": [float(q.min()), float(q.max())],
                "by_fold": [{"fold": i, "n_images": int((rows["fold"] == i).sum()),
                             "n_cases": int(rows.loc[rows["fold"] == i, "case_id"].nunique())}
                            for i in range(len(splits))]}
    training = {f"fold-{i}/{m}": {k: v for k, v in s.items() if k not in ("fold", "model")}
                for (i, m), s in sorted(trained.items())}
    return {
        "medqm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "design": {"kind": DESIGN, "folds": len(splits), "pooled": True,
                   "what": f"every figure under 'methods', 'significance', 'alignment' and 'label_reliability' is "
                           f"pooled over the test predictions of all {len(splits)} folds (each case tested once, by "
                           "models that never saw it); 'per_fold' holds the figures of each fold",
                   "stratify": cfg.stratify, "val_fraction": cfg.val_fraction, "seed": cfg.seed},
        "labels": {"path": str(Path(cfg.labels).resolve()), "model_id": label_meta.get("model_id"),
                   "model_revision": label_meta.get("model_revision"), "quality_map": label_meta.get("quality_map")},
        "test_set": test_set,
        "settings": settings,
        "methods": {m.name: {"kind": m.kind, "lower_better": m.lower_better, "sign": -1 if m.lower_better else 1,
                             "source": m.source, **per[m.name]} for m in methods},
        "significance": measured["significance"],
        "per_fold": measured["per_fold"],
        "alignment": measured["alignment"],
        "label_reliability": measured["label_reliability"],
        "severity_curves": measured["severity_curves"],
        "gate": measured.get("gate"),
        "tasks": measured.get("tasks"),
        "training": training,
        "timing": timing,
    }


def _write_predictions(rows, methods: list[Method], path: Path) -> Path:
    """The pooled test rows with every method's score (sign-aligned: higher = better)."""
    from medqm._fs import atomic_path

    df = rows[["path", "case_id", "fold", "modality", "type", "level", "quality"]].copy()
    for m in methods:
        df[m.name] = m.aligned
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def fold_of_cases(out: str | os.PathLike) -> dict[str, int]:
    """{case_id: fold} of a cross-validation folder (its folds.csv)."""
    import pandas as pd

    df = pd.read_csv(Path(out) / "folds.csv", dtype={"case_id": str})
    return dict(zip(df["case_id"], df["fold"].astype(int), strict=True))


__all__ = ["CVConfig", "CVResult", "cross_validate", "fold_of_cases", "DEFAULT_MODELS", "DISPLAY_NAMES", "DESIGN"]
