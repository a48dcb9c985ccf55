"""`medqm demo`: the whole MedQM pipeline on the bundled collection, offline, re-runnable.

Stages, run in pipeline order, each through the public function of its package::

    select    a few reference images per case of the collection          (`select_references`, medqm.io)
    distort   a shipped demo plan over them                              (medqm.distort.plan.run_plan)
    label     the diagnostic loss of the stand-in VLM (MedQM-D)          (medqm.label.runner.run_labels)
    train     MedQM-I, its ablations and the deep baseline, on one       (medqm.train.train, frozen backbone,
              case-level split                                            cached features)
    evaluate  all of them against NIQE, BRISQUE and PIQE on the held-out (medqm.evaluate.evaluate)
              cases, with the report

Caching. Every stage writes into ``OUT/<stage>-<key>/``, the key being a SHA-256 (16 hex digits) of everything
its output depends on: the key of the stage before it, its own settings, the medqm version and, for the first stages,
the content of the inputs (the selected reference images and masks, the plan, the VLM's files). A stage
that finishes writes ``stage.json`` there last; a later run that computes the same key finds it and skips
the stage. A stage folder without ``stage.json`` is an interrupted run: the stage is run again in the same
folder, and since distortion (ledger), labelling (shards), feature extraction (content-keyed cache), the
training loop (one stamp per model) and scoring (score caches) all resume, only the missing work is done.
Changing a setting or an input changes the key of that stage and of every stage after it, so a new folder
is made; nothing is ever overwritten with results of another configuration.

The caching engine (stage keys, stamps, ``.partial.json``, reuse, the ``latest`` links) is `medqm._stages`;
this module is the pipeline on top of it. It sits on top of every stage (it imports them all); no stage
imports it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medqm import __version__
from medqm._fs import atomic_path, file_sha256, write_json
from medqm._stages import LATEST, STAMP, Stage, StageRecord, folder_sha256, link_latest, read_stamp, stage_key

STAGES = ("select", "distort", "label", "train", "evaluate")
MAIN_MODEL = "medqm_i"
# Display names of the trained models in the report and the headline table.
MODEL_NAMES = {
    "medqm_i": "MedQM-I",
    "medqm_i_no_priors": "MedQM-I no priors",
    "medqm_i_no_queries": "MedQM-I no queries",
    "medqm_i_single_head": "MedQM-I single head",
    "medqm_i_baseline": "deep baseline",
}

Log = Callable[[str], None]
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class DemoConfig:
    """Every setting of a demo run; the two presets are in `PRESETS` (``demo_config('full' | 'quick')``).

    Args:
        out: output folder; stage folders, ``demo.json`` and a copy of ``report.html`` go there.
        preset: name of the preset the settings came from (recorded only).
        collection: image collection with ``manifest.csv`` (default: the bundled ``data/demo``).
        tumour_collection: a collection whose manifest's ``finding`` is 'tumour', asked the tumour question
            (default: Br35H in ``data/br35h``, built by ``make data``).
        tumour_cases: its cases (near-duplicate clusters) drawn, half with a tumour and half without, seeded by
            ``seed``; ``tumour_refs_per_case`` images of each. 0 leaves the tumour collection out.
        vlm: diagnostic model, a local Hugging Face folder or hub id (default: the shipped stand-in VLM).
        modalities: only cases of these modalities (empty: all).
        cases_per_modality: keep the largest this many cases of each modality (None: all); ties by case id.
        refs_per_case: reference images per case, evenly spread over the case's images, half of them taken
            from its lesion-positive images when it has any.
        plan: distortion plan, a shipped plan name or a plan file.
        lesion_questions: ask the lesion questions (presence, quadrant) as well as modality, body part, plane.
        label_loss, label_temperature, label_views: the MedQM-D label definition (`medqm label --loss --temperature
            --views`): KL over each question's choices at temperature 3 averaged over two views (the original
            and its mirror), the definition docs/medqm-d.md chose by measurement.
        label_batch_size: VLM samples per forward pass; shard_size: reference images per label shard.
        models: registered MedQM-I variants to train; must contain ``medqm_i`` (the evaluated model).
        img_size, epochs, patience, batch_size, lr, seed, fractions, target, ema_decay: training
            (`medqm.train.TrainConfig`), always in frozen-backbone mode; ``seed`` also seeds the split and the
            bootstrap. Eight epochs: with the weight average the validation SRCC levels off by the fourth to sixth.
        task_quality: train every model with a quality output per answer type (`medqm.train.TrainConfig` tasks:
            those with enough labelled images, e.g. ``tumour``), reported by `medqm score` / `medqm serve` and
            evaluated per task; False trains the overall quality only.
        baselines: classical baselines of the evaluation (`medqm.evaluate.list_baselines`).
        folds: case-level cross-validation in the evaluation (`medqm.evaluate.cross_validate`): every model is
            trained again in each of ``folds`` folds and every case is a test case once, figures pooled over the
            folds; 0 evaluates the train stage's checkpoints on its one split (`medqm.evaluate.evaluate`).
        n_boot: bootstrap replicates (cases resampled) for the confidence intervals.
        gallery: heatmap examples in the report; group_ci: bootstrap the per-modality/type/level SRCC too.
        runtime: MedQM-I scoring runtime in the evaluation ('torch', 'onnx' or 'auto').
        threads: CPU threads for torch and worker processes for distortion and baselines (None: all cores).
    """

    out: str = "runs/demo"
    preset: str = "full"
    collection: str | None = None
    tumour_collection: str | None = None
    tumour_cases: int = 60
    tumour_refs_per_case: int = 1
    vlm: str | None = None
    modalities: list[str] = field(default_factory=list)
    cases_per_modality: int | None = None
    refs_per_case: int = 3
    plan: str = "demo"
    lesion_questions: bool = True
    label_loss: str = "kl"
    label_temperature: float = 3.0
    label_views: int = 2
    label_batch_size: int = 8
    shard_size: int = 4
    models: list[str] = field(default_factory=lambda: list(MODEL_NAMES))
    img_size: int = 224
    epochs: int = 8
    patience: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    target: str = "loss"
    ema_decay: float = 0.99
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    task_quality: bool = True
    baselines: list[str] = field(default_factory=lambda: ["niqe", "brisque", "piqe"])
    folds: int = 5
    n_boot: int = 1000
    gallery: int = 8
    group_ci: bool = True
    runtime: str = "torch"
    threads: int | None = None

    def __post_init__(self):
        if not isinstance(self.tumour_cases, int) or self.tumour_cases < 0:
            raise ValueError(f"tumour_cases must be an integer >= 0, got {self.tumour_cases!r}")
        for name in ("refs_per_case", "tumour_refs_per_case", "label_batch_size", "shard_size", "img_size", "epochs",
                     "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.cases_per_modality is not None and self.cases_per_modality < 1:
            raise ValueError(f"cases_per_modality must be >= 1 or None, got {self.cases_per_modality}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None (all cores), got {self.threads}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds must be 0 (one split) or an integer >= 2, got {self.folds!r}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, got {self.n_boot}")
        if MAIN_MODEL not in self.models:
            raise ValueError(f"models must contain {MAIN_MODEL!r} (the evaluated model), got {self.models}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a model twice: {self.models}")
        self.fractions = tuple(float(f) for f in self.fractions)
        self.models, self.baselines, self.modalities = list(self.models), list(self.baselines), list(self.modalities)


# Sizes of the two presets. `full` is what `make demo` runs (1,611 distorted images, ≈ 13 min on 2 CPU
# cores, see docs/demo.md); `quick` exercises every stage on a handful of images (the end-to-end test).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {
        "modalities": ["CT", "MR"], "cases_per_modality": 4, "refs_per_case": 1, "plan": "demo-quick",
        "tumour_cases": 0, "folds": 0,
        "epochs": 3, "patience": 0, "batch_size": 16, "n_boot": 100, "gallery": 2,
    },
}


def demo_config(preset: str = "full", **overrides: Any) -> DemoConfig:
    """The settings of a preset ('full' or 'quick'), with ``overrides`` (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose from {', '.join(PRESETS)}")
    known = {f.name for f in fields(DemoConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown demo settings {unknown}; known: {sorted(known)}")
    settings = {**PRESETS[preset], "preset": preset, **{k: v for k, v in overrides.items() if v is not None}}
    return DemoConfig(**settings)


@dataclass
class DemoResult:
    out: Path
    config: DemoConfig
    stages: dict[str, StageRecord]
    metrics: dict[str, Any]
    report_html: Path
    seconds: float

    def timings(self) -> dict[str, float]:
        """Wall-clock seconds per stage in this run, and the total."""
        t = {n: round(r.seconds, 2) for n, r in self.stages.items()}
        t["total"] = round(self.seconds, 2)
        return t


class DemoError(ValueError):
    """A stage could not finish (failed images, a missing model); the message says what to do."""


# ------------------------------------------------------------------------------------------------ the stages
def select_references(manifest, *, modalities: Sequence[str] = (), cases_per_modality: int | None = None,
                      refs_per_case: int = 3):
    """The demo's reference images: rows of a collection manifest, deterministic.

    Cases of ``modalities`` (all when empty); per modality the ``cases_per_modality`` largest cases (most
    images first, then case id); per case ``refs_per_case`` images evenly spread over the case's images in id
    order, ``ceil(refs_per_case / 2)`` of them from its lesion-positive images when it has any, so volumes
    contribute slices with and without the lesion.
    """
    df = manifest
    if modalities:
        df = df[df["modality"].isin(list(modalities))]
    if df.empty:
        raise DemoError(f"the collection has no images of modalities {list(modalities)}")
    keep = []
    for _, g in df.groupby("modality", sort=True):
        sizes = g.groupby("case_id").size()
        cases = sorted(sizes.index, key=lambda c: (-int(sizes[c]), str(c)))
        for case in cases[:cases_per_modality] if cases_per_modality else cases:
            rows = g[g["case_id"] == case].sort_values("id")
            positive = rows["lesion"].astype(str).str.strip().isin(["1", "1.0"]) if "lesion" in rows else None
            if positive is not None and positive.any() and not positive.all():
                n_pos = min(int(positive.sum()), math.ceil(refs_per_case / 2))
                n_neg = min(int((~positive).sum()), refs_per_case - n_pos)
                n_pos = min(int(positive.sum()), refs_per_case - n_neg)  # too few negatives: more positives
                picks = _spread(rows[positive], n_pos) + _spread(rows[~positive], n_neg)
            else:
                picks = _spread(rows, refs_per_case)
            keep += picks
    return df.loc[sorted(set(keep))].sort_values("id").reset_index(drop=True)


def _spread(rows, k: int) -> list:
    """Index labels of ``k`` rows evenly spread over ``rows`` (the middle of k equal parts)."""
    n = len(rows)
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(rows.index)
    return [rows.index[int((i + 0.5) * n / k)] for i in range(k)]


def select_tumour_cases(manifest, n_cases: int, *, refs_per_case: int = 1, seed: int = 0):
    """Rows of a tumour collection (Br35H): ``n_cases`` cases, half of them with a tumour (``lesion`` 1) and half
    without (fewer if one kind runs short, the other then fills in), drawn at random with ``seed``;
    ``refs_per_case`` images of each, evenly spread over its images in id order. Deterministic."""
    import numpy as np

    flag = manifest["lesion"].astype(str).str.strip()
    df = manifest[flag.isin(["0", "1"])]
    by_case = df.groupby("case_id", sort=True)["lesion"].agg(lambda v: str(v.iloc[0]).strip())
    rng = np.random.default_rng(seed)
    pools = {k: list(rng.permutation(sorted(by_case.index[by_case == k]))) for k in ("1", "0")}
    want = {"1": (n_cases + 1) // 2, "0": n_cases // 2}
    short = {k: max(0, want[k] - len(pools[k])) for k in want}
    want = {"1": want["1"] - short["1"] + short["0"], "0": want["0"] - short["0"] + short["1"]}
    cases = set(pools["1"][: want["1"]]) | set(pools["0"][: want["0"]])
    keep = []
    for case in sorted(cases):
        keep += _spread(df[df["case_id"] == case].sort_values("id"), refs_per_case)
    return df.loc[sorted(keep)].sort_values("id").reset_index(drop=True)


def resolve_collection(spec: str | None, default: str) -> Path:
    """A collection folder: ``spec``, else ``default`` relative to the working directory or, failing that, to
    this source checkout (as `medqm.io.collection.default_collection` finds data/demo)."""
    from medqm.io.collection import MANIFEST

    if spec:
        return Path(spec)
    here = Path(default)
    return here if (here / MANIFEST).is_file() else Path(__file__).resolve().parents[2] / default


def _absolute(chosen, root: Path):
    """A selection with absolute image and mask paths: a collection of its own whose files stay where they are."""
    chosen = chosen.copy()
    chosen["path"] = [str(Path(p).resolve()) for p in chosen["abs_path"]]
    if "mask" in chosen:
        chosen["mask"] = [str((root / m).resolve()) if str(m).strip() else "" for m in chosen["mask"]]
    return chosen.drop(columns=["abs_path"])


def _run_select(cfg: DemoConfig, out: Path, log: Log) -> StageRecord:
    import pandas as pd

    from medqm.io.collection import MANIFEST, default_collection, load_manifest

    root = Path(cfg.collection) if cfg.collection else default_collection()
    t0 = time.perf_counter()
    manifest = load_manifest(root)
    chosen = _absolute(select_references(manifest, modalities=cfg.modalities,
                                         cases_per_modality=cfg.cases_per_modality, refs_per_case=cfg.refs_per_case),
                       root)
    roots = [root]
    if cfg.tumour_cases:
        troot = resolve_collection(cfg.tumour_collection, "data/br35h")
        if not (troot / MANIFEST).is_file():
            raise DemoError(f"the tumour collection {troot} is not built: run `make data` (or `medqm data build br35h "
                            f"--out {troot}`), or leave it out with --no-tumour (tumour_cases 0)")
        tm = load_manifest(troot)
        if "finding" not in tm or not (tm["finding"].astype(str).str.strip() == "tumour").any():
            raise DemoError(f"{troot}: no image has finding 'tumour' (an old build?); rebuild it with "
                            f"`medqm data build br35h --out {troot}`")
        clash = set(tm["case_id"].astype(str)) & set(chosen["case_id"].astype(str))
        if clash:
            raise DemoError(f"{troot} and {root} share case ids {sorted(clash)[:3]}")
        picked = select_tumour_cases(tm, cfg.tumour_cases, refs_per_case=cfg.tumour_refs_per_case, seed=cfg.seed)
        chosen = pd.concat([chosen, _absolute(picked, troot)], ignore_index=True)
        chosen = chosen.astype(object).where(chosen.notna(), "")  # columns one collection lacks: empty
        roots.append(troot)
    content = []
    for r in chosen.to_dict("records"):
        files = [r["path"]] + ([r["mask"]] if r.get("mask") else [])
        content.append({**{k: str(v) for k, v in r.items()}, "sha256": [file_sha256(f) for f in files]})
    # The absolute locations are part of the key: later stages record absolute paths to these files and to
    # the stage folders, so a moved collection or output folder starts afresh instead of pointing elsewhere.
    inputs = {"collection": str(root.resolve()), "out": str(out.resolve()), "images": content,
              "selection": {"modalities": cfg.modalities, "cases_per_modality": cfg.cases_per_modality,
                            "refs_per_case": cfg.refs_per_case}}
    if len(roots) > 1:  # keys of runs without a tumour collection stay what they were
        inputs["tumour"] = {"collection": str(roots[1].resolve()), "cases": cfg.tumour_cases,
                            "refs_per_case": cfg.tumour_refs_per_case, "seed": cfg.seed}
    stage = Stage(out, "select", inputs, log, order=STAGES, t0=t0)
    if stage.done:
        return stage.reused()
    stage.start()
    with atomic_path(stage.dir / MANIFEST) as tmp:
        chosen.to_csv(tmp, index=False)
    summary = {"collection": str(root), "collections": [str(r) for r in roots], "images": len(chosen),
               "cases": int(chosen["case_id"].nunique()),
               "by_modality": {str(m): int(n) for m, n in chosen.groupby("modality").size().items()}}
    if len(roots) > 1:
        tumour = chosen["path"].str.startswith(str(roots[1].resolve()))
        summary["tumour"] = {"images": int(tumour.sum()), "cases": int(chosen.loc[tumour, "case_id"].nunique()),
                             "with_tumour": int((chosen.loc[tumour, "lesion"].astype(str) == "1").sum())}
    return stage.finish(summary)


def _run_distort(cfg: DemoConfig, out: Path, select: StageRecord, log: Log, progress: Progress) -> StageRecord:
    from medqm.distort.plan import Plan, run_plan

    try:
        plan = Plan.load(cfg.plan)
    except ValueError as e:
        raise DemoError(str(e)) from e
    stage = Stage(out, "distort", {"select": select.key, "plan": asdict(plan)}, log, order=STAGES)
    if stage.done:
        return stage.reused()
    stage.start()

    def on_progress(done: int, total: int) -> None:
        progress("distort", done, total)
        stage.checkpoint()

    summary = run_plan(select.dir, plan, stage.dir, workers=cfg.threads, progress=on_progress)
    if summary.failed:
        stage.checkpoint()
        raise DemoError(f"{len(summary.failed)} distortions failed (listed in {stage.dir / 'failures.csv'}); "
                        "rerun to retry them")
    return stage.finish({"plan": plan.name, "images": summary.total, "types": plan.type_names, "levels": plan.levels})


def vlm_source(cfg: DemoConfig) -> tuple[str, dict[str, Any]]:
    """The VLM to label with and what identifies its content (a local folder's files are hashed)."""
    from medqm.label.standin import DEMO_VLM_DIR

    spec = cfg.vlm or str(DEMO_VLM_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DemoError(f"{path} is not a model folder (no config.json)")
        return str(path.resolve()), {"model": path.resolve().name, "sha256": folder_sha256(path)}
    if cfg.vlm is None:
        raise DemoError(f"the shipped stand-in VLM is missing ({DEMO_VLM_DIR}); pass --model DIR_OR_HUB_ID")
    if path.exists() or spec.startswith(("/", "./", "../", "~")):
        raise DemoError(f"--model {spec!r} is not a model folder")
    from medqm.label.hf import model_identity

    ident = model_identity(spec)
    return spec, {"model": ident.model_id, "revision": ident.revision}


def _questions(cfg: DemoConfig, select: StageRecord):
    """The collections' diagnostic questions (`demo_questions` of the whole collections, so the answer choices
    are those of `medqm label --tasks demo` on them; the tumour question for the tumour collection), for the
    selected images only."""
    import pandas as pd

    from medqm.io.collection import MANIFEST
    from medqm.label.tasks import demo_questions

    chosen = pd.read_csv(select.dir / MANIFEST, dtype=str, keep_default_na=False)
    roots = [Path(r) for r in select.summary.get("collections", [select.summary["collection"]])]
    wanted = {str(Path(p).resolve()) for p in chosen["path"]}
    return [it for it in demo_questions(roots, lesions=cfg.lesion_questions) if str(Path(it.image).resolve()) in wanted]


def _run_label(cfg: DemoConfig, out: Path, select: StageRecord, distort: StageRecord, vlm: tuple[str, dict],
               log: Log, progress: Progress) -> StageRecord:
    from medqm.label.quality import DEFAULT_MAP

    source, vlm_id = vlm
    inputs = {"distort": distort.key, "select": select.key, "vlm": vlm_id, "lesion_questions": cfg.lesion_questions,
              "quality_map": DEFAULT_MAP.to_dict(), "shard_size": cfg.shard_size,
              "definition": {"loss": cfg.label_loss, "temperature": cfg.label_temperature, "views": cfg.label_views}}
    stage = Stage(out, "label", inputs, log, order=STAGES)
    if stage.done:
        return stage.reused()
    stage.start()
    items = _questions(cfg, select)
    from transformers.utils import logging as hf_logging

    from medqm.label.hf import load_model
    from medqm.label.runner import run_labels

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the demo's own bar is the one progress display
    try:
        t = time.perf_counter()
        model = load_model(source, device="cpu", batch_size=cfg.label_batch_size)
        stage.log(f"loaded {model!r} in {time.perf_counter() - t:.1f} s; {len(items)} questions")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    t, first = time.perf_counter(), [None]

    def on_progress(done: int, total: int) -> None:
        first[0] = done if first[0] is None else first[0]
        progress("label", done, total)
        stage.checkpoint()

    summary = run_labels(items, model, stage.dir, distorted=distort.dir, quality_map=DEFAULT_MAP,
                         shard_size=cfg.shard_size, progress=on_progress, loss=cfg.label_loss,
                         temperature=cfg.label_temperature if cfg.label_loss == "kl" else 1.0, views=cfg.label_views)
    if summary.errors:
        raise DemoError(f"{len(summary.errors)} images could not be labelled (listed in {stage.dir / 'errors.csv'}); "
                        "rerun to retry them")
    labelled = summary.rows - (first[0] or 0)
    seconds = time.perf_counter() - t
    per_image = len(items) / max(1, len({it.image for it in items}))
    stage.log(f"{labelled} images labelled in {seconds:.1f} s")
    return stage.finish({"rows": summary.rows, "questions": len(items), "questions_per_image": round(per_image, 2),
                         "model_id": model.model_id, "model_revision": model.revision,
                         "images_per_s": round(labelled / seconds, 2) if labelled and seconds > 0 else None})


def _fit_settings(cfg: DemoConfig) -> dict[str, Any]:
    """What every training regresses and how it averages and calibrates, for the stage keys."""
    from medqm.train import TrainConfig

    return {"target": cfg.target, "ema_decay": cfg.ema_decay, "calibrate": TrainConfig.calibrate}


def _task_settings() -> dict[str, Any]:
    """What the task outputs are trained with (`medqm.train.TrainConfig`'s defaults), for the stage keys."""
    from medqm.train import TrainConfig

    return {"min_images": TrainConfig.task_min_images, "weight": TrainConfig.task_weight,
            "refit_epochs": TrainConfig.task_refit_epochs}


def _run_train(cfg: DemoConfig, out: Path, label: StageRecord, log: Log, progress: Progress) -> StageRecord:
    inputs = {"label": label.key, "mode": "frozen", "img_size": cfg.img_size, "epochs": cfg.epochs,
              "patience": cfg.patience, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
              "fractions": list(cfg.fractions), **_fit_settings(cfg)}
    # With cross-validation the evaluation trains every model in each fold; this stage then trains only the
    # checkpoint users get (runs/demo/latest/medqm-i), on one split.
    models = [MAIN_MODEL] if cfg.folds else cfg.models
    if cfg.folds:
        inputs["models"] = models
    if cfg.task_quality:  # keys of runs without task outputs stay what they were
        inputs["tasks"] = _task_settings()
    stage = Stage(out, "train", inputs, log, order=STAGES)
    todo = [m for m in models if not (stage.dir / f"{m}.done.json").is_file()]
    if stage.done and not todo:
        return stage.reused()
    stage.start()
    from medqm.label.runner import read_labels
    from medqm.train import TrainConfig, make_split, save_split, train
    from medqm.train.data import training_rows

    split_file = stage.dir / "split.csv"
    if not split_file.is_file():  # one case-level split for every model, made before any of them trains
        rows, _ = training_rows(read_labels(label.dir))
        save_split(make_split(rows, fractions=cfg.fractions, seed=cfg.seed), split_file)
    results = {}
    for name in models:
        done_file = stage.dir / f"{name}.done.json"
        if done_file.is_file():
            results[name] = json.loads(done_file.read_text(encoding="utf-8"))
            continue
        shown = MODEL_NAMES.get(name, name)
        tcfg = TrainConfig(labels=str(label.dir), out=str(stage.dir / name), model=name,
                           model_kwargs={"img_size": cfg.img_size}, mode="frozen", epochs=cfg.epochs,
                           tasks=None if cfg.task_quality else [],
                           patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                           target=cfg.target, ema_decay=cfg.ema_decay,
                           fractions=cfg.fractions, split_file=str(split_file),
                           cache_dir=str(out / "cache" / "features"), device="cpu")
        t = time.perf_counter()
        stage.log(f"-- {name}")

        def on_progress(what: str, done: int, total: int, shown=shown) -> None:
            progress("features" if what == "features" else f"train {shown}", done, total)

        r = train(tcfg, log=stage.log, progress=on_progress)
        progress(f"train {shown}", r.epochs_run, r.epochs_run)  # early stopping ends the bar where it stopped
        o = r.test.get("overall", {})
        results[name] = {"seconds": round(time.perf_counter() - t, 2), "best_epoch": r.best_epoch,
                         "epochs_run": r.epochs_run, "test_srcc": o.get("srcc"), "test_plcc_raw": o.get("plcc_raw")}
        write_json(results[name], done_file, indent=1, default=str)
        stage.checkpoint()
        # SRCC only: the one PLCC per model is the evaluation's (after the logistic), in the headline table
        log(f"  {shown}: held-out SRCC {_num(o.get('srcc'))} ({r.epochs_run} epochs, {results[name]['seconds']:.0f} s)")
    return stage.finish({"models": results, "split": str(split_file)})


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _run_evaluate(cfg: DemoConfig, out: Path, label: StageRecord, trained: StageRecord, log: Log,
                  progress: Progress) -> StageRecord:
    inputs = {"label": label.key, "train": trained.key, "models": cfg.models, "baselines": cfg.baselines,
              "n_boot": cfg.n_boot, "seed": cfg.seed, "gallery": cfg.gallery, "group_ci": cfg.group_ci,
              "runtime": cfg.runtime}
    if cfg.folds:  # keys of single-split runs stay what they were
        inputs["folds"] = {"k": cfg.folds, "img_size": cfg.img_size, "epochs": cfg.epochs, "patience": cfg.patience,
                           "batch_size": cfg.batch_size, "lr": cfg.lr, **_fit_settings(cfg)}
        if cfg.task_quality:
            inputs["folds"]["tasks"] = _task_settings()
    stage = Stage(out, "evaluate", inputs, log, order=STAGES)
    if stage.done and (stage.dir / "metrics.json").is_file() and (stage.dir / "report.html").is_file():
        return stage.reused()
    stage.start()
    if cfg.folds:
        from medqm.evaluate import CVConfig, cross_validate

        ccfg = CVConfig(labels=str(label.dir), out=str(stage.dir), folds=cfg.folds, models=cfg.models, main=MAIN_MODEL,
                        names=MODEL_NAMES, baselines=cfg.baselines, img_size=cfg.img_size, epochs=cfg.epochs,
                        patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr, target=cfg.target,
                        ema_decay=cfg.ema_decay, tasks=None if cfg.task_quality else [],
                        cache_dir=str(out / "cache" / "features"), device="cpu", num_threads=cfg.threads,
                        n_boot=cfg.n_boot, seed=cfg.seed, workers=cfg.threads or os.cpu_count() or 1,
                        group_ci=cfg.group_ci)
        result = cross_validate(ccfg, log=stage.log, progress=lambda what, d, t: progress(what, d, t))
    else:
        from medqm.evaluate import EvalConfig, evaluate

        compare = [f"{MODEL_NAMES.get(m, m)}={trained.dir / m}" for m in cfg.models if m != MAIN_MODEL]
        ecfg = EvalConfig(labels=str(label.dir), model=str(trained.dir / MAIN_MODEL), out=str(stage.dir),
                          compare=compare, name=MODEL_NAMES[MAIN_MODEL], baselines=cfg.baselines, n_boot=cfg.n_boot,
                          seed=cfg.seed, workers=cfg.threads or os.cpu_count() or 1, device="cpu",
                          runtime=cfg.runtime, num_threads=cfg.threads, gallery=cfg.gallery, group_ci=cfg.group_ci)
        result = evaluate(ecfg, log=stage.log, progress=lambda what, d, t: progress(f"score {what}", d, t))
    info = result.metrics["test_set"]
    return stage.finish({"test_images": info.get("n_images"), "test_cases": info.get("n_cases"),
                         "folds": cfg.folds or None,
                         "timing": {k: round(v, 2) for k, v in result.metrics.get("timing", {}).items()
                                    if isinstance(v, (int, float))}})


# ------------------------------------------------------------------------------------------------ the driver
def run_demo(cfg: DemoConfig, *, log: Log | None = print, progress: Progress | None = None) -> DemoResult:
    """Run (or reuse) every stage into ``cfg.out``; returns the stage records, the metrics and the report.

    ``log`` receives one line per stage (started, reused, finished with its time); the stages' detailed logs
    go to ``log.txt`` in their folders. ``progress(task, done, total)`` reports the work inside the stages
    ('distort', 'label', 'features', 'train <model>', 'score <method>').

    Raises:
        DemoError: a stage could not finish (the message says why and what to do).
    """
    say = log or (lambda _m: None)
    report = progress or (lambda _t, _d, _n: None)
    t0 = time.perf_counter()
    vlm = vlm_source(cfg)  # before any work: a missing model stops the demo at once
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = None
    if cfg.threads is not None:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
    stages: dict[str, StageRecord] = {}

    def done(rec: StageRecord, what: str) -> StageRecord:
        stages[rec.name] = rec
        how = (f"reused {rec.dir.name} (computed in {rec.computed_seconds:.1f} s)" if rec.cached
               else f"{rec.seconds:.1f} s")
        say(f"[{STAGES.index(rec.name) + 1}/{len(STAGES)}] {rec.name}: {what}; {how}")
        return rec

    try:
        sel = _run_select(cfg, out, say)
        s = sel.summary
        by_modality = ", ".join(f"{m} {n}" for m, n in s["by_modality"].items())
        tum = s.get("tumour")
        tumour = (f"; {tum['images']} of them from the tumour collection ({tum['cases']} cases, "
                  f"{tum['with_tumour']} with a tumour)" if tum else "")
        done(sel, f"{s['images']} reference images of {s['cases']} cases ({by_modality}){tumour}")
        dist = _run_distort(cfg, out, sel, say, report)
        done(dist, f"{dist.summary['images']} distorted images of {s['images']} references ({s['cases']} cases) "
                   f"with plan {dist.summary['plan']!r}")
        lab = _run_label(cfg, out, sel, dist, vlm, say, report)
        rate = lab.summary.get("images_per_s")
        done(lab, f"{lab.summary['rows']} labelled images, {lab.summary['questions']} diagnostic questions"
                  + (f", {rate:.1f} images/s" if rate else ""))
        trained = _run_train(cfg, out, lab, say, report)
        n = len(trained.summary["models"])
        done(trained, f"{n} model{'s' if n > 1 else ''} trained (frozen backbone)")
        ev = _run_evaluate(cfg, out, lab, trained, say, report)
        how = (f"pooled over {cfg.folds} case-level folds (every model trained in each)" if cfg.folds
               else "on the train stage's split")
        done(ev, f"{ev.summary['test_images']} held-out images of {ev.summary['test_cases']} cases scored by "
                 f"{len(cfg.models)} models and {len(cfg.baselines)} classical baselines, {how}")
    finally:
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)
    metrics = json.loads((ev.dir / "metrics.json").read_text(encoding="utf-8"))
    report_html = out / "report.html"  # a stable place for the latest report (it embeds its figures)
    with atomic_path(report_html) as tmp:
        shutil.copyfile(ev.dir / "report.html", tmp)
    link_latest(out, {"references": sel.dir, "distorted": dist.dir, "labels": lab.dir, "models": trained.dir,
                      "medqm-i": trained.dir / MAIN_MODEL, "evaluation": ev.dir})
    seconds = time.perf_counter() - t0
    result = DemoResult(out, cfg, stages, metrics, report_html, seconds)
    write_json({"config": asdict(cfg), "medqm_version": __version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "seconds": result.timings(),
                 "stages": {n: {"dir": str(r.dir), "key": r.key, "cached": r.cached, "seconds": round(r.seconds, 3),
                                "computed_seconds": round(r.computed_seconds, 3), "summary": r.summary}
                            for n, r in stages.items()},
                 "report": str(report_html), "report_dir": str(ev.dir)}, out / "demo.json", indent=1, default=str)
    return result


def headline(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The headline table of an evaluation's metrics: (header, rows), main model first."""
    from medqm.evaluate.report import HEADLINE_HEADER, headline_rows

    return list(HEADLINE_HEADER), headline_rows(metrics)


__all__ = [
    "LATEST",
    "MODEL_NAMES",
    "PRESETS",
    "STAGES",
    "STAMP",
    "DemoConfig",
    "DemoError",
    "DemoResult",
    "StageRecord",
    "demo_config",
    "folder_sha256",
    "headline",
    "link_latest",
    "read_stamp",
    "resolve_collection",
    "run_demo",
    "select_references",
    "select_tumour_cases",
    "stage_key",
    "vlm_source",
]
