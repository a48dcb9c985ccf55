"""`medqm evaluate`: MedQM-I against classical and deep BIQA on the same held-out images, and the report.

One call scores every method on the labelled images of the main checkpoint's test cases, measures agreement
with the labels (`medqm.metrics`), tests MedQM-I against the best baseline, runs the alignment study
(how far NIQE, BRISQUE and PIQE agree with MLLM-oriented labels) and writes ``report.md``, a self-contained
``report.html`` (see `medqm.evaluate.report`) and, last and once, ``metrics.json``.

Nothing is tuned on the test split: the baselines have no parameters to tune, the deep models are loaded as
trained, and lower-is-better scores are only sign-flipped. The one fitted thing is the VQEG logistic before
PLCC and RMSE, a monotone re-mapping fitted on the evaluated images as that practice prescribes; it leaves
SRCC and KRCC unchanged.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medqm.metrics import CaseBootstrap, agreement, bootstrap_agreement, compare_srcc, srcc

from ._scoring import (
    TestSet,
    checkpoint_split,
    checkpoint_summary,
    heatmap_gallery,
    load_test_set,
    quiet_worker,
    score_baselines,
    score_checkpoint,
)
from .baselines import baseline_info, list_baselines
from .report import write_report
from .tasks import attach_task_labels, task_metrics

CLASSICAL_REFERENCE = ("niqe", "brisque", "piqe")  # the human-perception BIQA of the alignment study
GROUPS = {"by_modality": "modality", "by_type": "type", "by_level": "level"}
MIN_SEVERITY_IMAGES = 20  # a distortion type needs this many test images to count in the severity summary


@dataclass
class EvalConfig:
    """Settings of one evaluation (the `medqm evaluate` options).

    Args:
        labels: a `medqm label` output folder (labels.parquet).
        model: the MedQM-I checkpoint folder under evaluation; its ``split.csv`` names the test cases.
        out: report folder (created); score caches go to ``out/cache``.
        compare: other checkpoints, as ``'NAME=DIR'`` or ``'DIR'``; a DIR without config.json is searched for
            checkpoint sub-folders (each named after its folder). The main model's folder is skipped.
        name: display name of the main model.
        baselines: classical baselines to run (registry names; default all registered).
        split_file: use this split instead of the checkpoint's ``split.csv``.
        max_images: evaluate a case-stratified random subset of this many test images (seeded by ``seed``).
        n_boot: bootstrap replicates (cases resampled with replacement); level: confidence level.
        seed: seed of the bootstrap and of ``max_images`` sampling.
        workers: processes for the classical baselines.
        batch_size, device, runtime, num_threads: MedQM-I scoring (see `medqm.model.Scorer`).
        gallery: number of heatmap examples in the report.
        group_ci: also bootstrap the SRCC of each modality / distortion type / level.
        gate_risk: the risk of the quality-gate comparison (`medqm.evaluate.gate`): lost-answer-rate or
            mean-loss; gate_splits: its validity check's random case splits (0: no gate comparison).
    """

    labels: str
    model: str
    out: str
    compare: Sequence[str] = ()
    name: str = "MedQM-I"
    baselines: Sequence[str] | None = None
    split_file: str | None = None
    max_images: int | None = None
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    workers: int = 1
    batch_size: int = 32
    device: str = "cpu"
    runtime: str = "auto"
    num_threads: int | None = None
    gallery: int = 8
    group_ci: bool = True
    gate_risk: str = "lost-answer-rate"
    gate_splits: int = 200

    def __post_init__(self):
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, got {self.n_boot}")
        if not 0.5 <= self.level < 1:
            raise ValueError(f"level must lie in [0.5, 1), got {self.level}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gallery < 0:
            raise ValueError(f"gallery must be >= 0, got {self.gallery}")
        from .gate import RISKS

        if self.gate_risk not in RISKS:
            raise ValueError(f"gate_risk must be one of {RISKS}, got {self.gate_risk!r}")
        if self.gate_splits < 0:
            raise ValueError(f"gate_splits must be >= 0, got {self.gate_splits}")
        names = list(self.baselines) if self.baselines is not None else list_baselines()
        unknown = sorted(set(names) - set(list_baselines()))
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; registered: {', '.join(list_baselines())}")
        self.baselines = names
        if not (Path(self.model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {self.model}: not a MedQM-I checkpoint folder (no config.json)")


@dataclass
class Method:
    """One scored method: raw scores on the test rows, and how to read them."""

    name: str
    kind: str  # 'main' (the model under evaluation), 'ablation', 'deep' (other checkpoints) or 'classical'
    raw: np.ndarray
    lower_better: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, np.ndarray] = field(default_factory=dict)  # per-task quality (MedQM-I with tasks), by answer type

    @property
    def aligned(self) -> np.ndarray:
        """Scores signed so that higher means better quality."""
        return -self.raw if self.lower_better else self.raw


@dataclass
class EvalResult:
    """What `evaluate` produced: the metrics (as written to metrics.json) and the files."""

    metrics: dict[str, Any]
    out: Path
    files: dict[str, Path]
    methods: list[Method]
    test: TestSet


# ------------------------------------------------------------------------------------------------ checkpoints
def resolve_compare(entries: Sequence[str], main: str | os.PathLike, main_name: str) -> dict[str, Path]:
    """``NAME=DIR`` / ``DIR`` entries → {name: checkpoint folder}; folders of checkpoints are expanded."""
    main_path = Path(main).resolve()
    out: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        if path.resolve() == main_path:
            return
        if name in out or name == main_name or name in list_baselines():
            raise ValueError(f"--compare name {name!r} is used twice (or clashes with the main model or a baseline); "
                             "name it explicitly with NAME=DIR")
        out[name] = path

    for entry in entries:
        name, sep, d = entry.partition("=")
        if not sep:
            name, d = "", entry
        path = Path(d)
        if (path / "config.json").is_file():
            add(name or path.name, path)
        elif path.is_dir():
            found = sorted(p.parent for p in path.glob("*/config.json"))
            if not found:
                raise FileNotFoundError(f"--compare {entry}: no checkpoint (config.json) in {path} or its sub-folders")
            for p in found:
                add(f"{name}/{p.name}" if name else p.name, p)
        else:
            raise FileNotFoundError(f"--compare {entry}: {path} is not a folder")
    return out


def _check_unseen(name: str, model_dir: Path, test_cases: set[str]) -> bool:
    """Refuse a checkpoint that trained or validated on a test case; False when it saved no split to check."""
    from medqm.train import SplitLeakageError, load_split

    sp = checkpoint_split(model_dir)
    if sp is None:
        warnings.warn(f"{name} ({model_dir}) has no split.csv: cannot verify it never saw the test cases", stacklevel=3)
        return False
    split = load_split(sp)
    seen = set(split.loc[split["split"].isin(["train", "val"]), "case_id"].astype(str))
    leak = sorted(seen & test_cases)
    if leak:
        raise SplitLeakageError(
            f"{name} ({model_dir}) was trained or validated on {len(leak)} of the test cases (e.g. {leak[0]!r}); "
            "compare checkpoints trained on the same split (medqm train --split <main checkpoint>/split.csv)")
    return True


# ---------------------------------------------------------------------------------------------------- metrics
def method_metrics(m: Method, rows, cases: np.ndarray, boot: CaseBootstrap, cfg: EvalConfig) -> dict[str, Any]:
    """A method's agreement with the labels of ``rows``: overall (with case-bootstrap intervals) and per modality,
    distortion type and level. ``cfg`` is an `EvalConfig` or a `medqm.evaluate.crossval.CVConfig` (the helpers
    of this module read only the settings both have: level, n_boot, seed, group_ci, workers, name, gate_*)."""
    y = rows["quality"].to_numpy(dtype=np.float64)
    x = m.aligned
    ok = np.isfinite(x)
    overall = agreement(x[ok], y[ok]) if ok.sum() >= 1 else {"n": 0}
    overall["n_images"] = int(ok.sum())
    overall["n_cases"] = int(len(set(cases[ok])))
    overall["n_undefined"] = int((~ok).sum())
    ci = bootstrap_agreement(x, y, boot, level=cfg.level)
    for k in ("srcc", "krcc", "plcc", "plcc_raw", "rmse"):
        overall[f"{k}_ci"] = ci[k]
    out: dict[str, Any] = {"overall": overall}
    for key, col in GROUPS.items():
        groups: dict[str, Any] = {}
        values = rows[col].to_numpy()
        present = {v for v in values.tolist() if not (isinstance(v, float) and np.isnan(v)) and v is not None}
        for g in sorted(present, key=lambda v: (str(type(v)), v)):
            sel = (values == g) & ok
            gname = str(int(g)) if isinstance(g, float) and float(g).is_integer() else str(g)
            n_cases = len(set(cases[sel]))
            res = agreement(x[sel], y[sel]) if sel.sum() else {"n": 0}
            res.pop("fit", None)
            res.update(n_images=int(sel.sum()), n_cases=n_cases, srcc_ci=None)
            if cfg.group_ci and n_cases >= 2:
                idx = np.flatnonzero(values == g)
                gboot = CaseBootstrap(cases[idx], cfg.n_boot, cfg.seed)
                res["srcc_ci"] = bootstrap_agreement(x[idx], y[idx], gboot, level=cfg.level, metrics=("srcc",))["srcc"]
            groups[gname] = res
        out[key] = groups
    return out


def all_method_metrics(methods: list[Method], rows, cases: np.ndarray, boot: CaseBootstrap,
                        cfg: EvalConfig) -> dict[str, dict]:
    """`method_metrics` of every method; in ``cfg.workers`` processes when more than one (the bootstrap's
    logistic refits dominate the run time once the scores are cached)."""
    if cfg.workers == 1 or len(methods) == 1:
        return {m.name: method_metrics(m, rows, cases, boot, cfg) for m in methods}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(methods)), mp_context=mp.get_context("spawn"),
                             initializer=quiet_worker) as pool:
        futures = {m.name: pool.submit(method_metrics, m, rows, cases, boot, cfg) for m in methods}
        return {n: f.result() for n, f in futures.items()}


def _strength(r: float) -> str:
    a = abs(r)
    if a < 0.1:
        return "essentially no"
    if a < 0.3:
        return "weak"
    if a < 0.5:
        return "moderate"
    if a < 0.7:
        return "substantial"
    if a < 0.9:
        return "strong"
    return "very strong"


def _num(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _fmt_ci(ci) -> str:
    return f"{ci[0]:.2f} to {ci[1]:.2f}" if ci else "n/a"


def describe_agreement(label: str, r: float, ci, n_cases: int) -> str:
    """One honest sentence on a correlation with the labels, generated from the numbers."""
    if not np.isfinite(r):
        return f"{label}: agreement undefined (constant scores or too few images)."
    s = _strength(r)
    if r >= 0.1:
        text = f"{label} shows {s} agreement with the MLLM-oriented labels"
    elif r <= -0.1:
        text = (f"{label} shows {s} *disagreement* with the MLLM-oriented labels: images it rates better tend to "
                "be labelled worse")
    else:
        text = f"{label} shows essentially no agreement with the MLLM-oriented labels"
    text += f" (SRCC {r:+.2f}, 95 % CI {_fmt_ci(ci)}, {n_cases} test cases)"
    if ci and ci[0] <= 0 <= ci[1]:
        text += "; the interval includes zero, so no association can be claimed at this sample size"
    return text + "."


def alignment_study(methods: dict[str, Method], per: dict[str, dict], rows, main: str, sig: dict,
                    cfg: EvalConfig) -> dict:
    """The alignment study: how the classical BIQA metrics relate to the MLLM-oriented labels."""
    classical = [n for n in CLASSICAL_REFERENCE if n in methods]
    out: dict[str, Any] = {"metrics": classical, "overall": {}, "by_modality": {}, "by_type": {}, "severity": {},
                           "text": []}
    if not classical:
        out["text"].append("No classical reference metric (NIQE, BRISQUE, PIQE) was run.")
        return out
    for n in classical + [main]:
        o = per[n]["overall"]
        out["overall"][n] = {"srcc": o.get("srcc"), "srcc_ci": o.get("srcc_ci"), "plcc": o.get("plcc"),
                             "n_images": o.get("n_images"), "n_cases": o.get("n_cases")}
        out["by_modality"][n] = {g: v.get("srcc") for g, v in per[n]["by_modality"].items()}
        out["by_type"][n] = {g: v.get("srcc") for g, v in per[n]["by_type"].items()}
    # severity tracking: Spearman of each score with the distortion level, within each type (levels >= 1)
    y = rows["quality"].to_numpy(dtype=np.float64)
    lv = rows["level"].to_numpy(dtype=np.float64)
    for t in sorted(set(rows["type"]) - {"reference", "unknown"}):
        sel = (rows["type"].to_numpy() == t) & np.isfinite(lv)
        if sel.sum() < 3 or np.ptp(lv[sel]) == 0:
            continue
        entry = {"n_images": int(sel.sum()), "label": srcc(y[sel], lv[sel])}
        for n in classical + [main]:
            x = methods[n].aligned
            s = sel & np.isfinite(x)
            entry[n] = srcc(x[s], lv[s]) if s.sum() >= 3 else float("nan")
        out["severity"][t] = entry
    # the sentences
    text = out["text"]
    for n in classical:
        o = per[n]["overall"]
        text.append(describe_agreement(n.upper(), o.get("srcc", float("nan")), o.get("srcc_ci"), o.get("n_cases", 0)))
    best_c = max(classical, key=lambda n: np.nan_to_num(per[n]["overall"].get("srcc", np.nan), nan=-2))
    bc = per[best_c]["overall"]
    mo = per[main]["overall"]
    if np.isfinite(mo.get("srcc", np.nan)) and np.isfinite(bc.get("srcc", np.nan)):
        comparison = "higher than" if mo["srcc"] > bc["srcc"] else "not higher than"
        line = (f"On the same images {main} reaches SRCC {mo['srcc']:+.2f} (95 % CI {_fmt_ci(mo.get('srcc_ci'))}), "
                f"{comparison} the best classical metric, {best_c.upper()} ({bc['srcc']:+.2f})")
        test = sig.get("tests", {}).get(best_c)
        if test and test.get("bootstrap"):
            bt = test["bootstrap"]
            verdict = "significant" if bt["p"] < 1 - cfg.level else "not significant"
            line += (f"; the difference {bt['diff']:+.2f} (CI {_fmt_ci(bt['ci'])}) is {verdict} at the "
                     f"{round((1 - cfg.level) * 100)} % level (paired case bootstrap, p = {bt['p']:.3g})")
        text.append(line + ".")
    # where the classical metrics agree best and worst (per modality), for the best classical metric
    bym = {g: v for g, v in out["by_modality"][best_c].items() if v is not None and np.isfinite(v)}
    if len(bym) >= 2:
        hi = max(bym, key=bym.get)
        lo = min(bym, key=bym.get)
        n_of = {g: per[best_c]["by_modality"][g]["n_images"] for g in (hi, lo)}
        text.append(f"By modality, {best_c.upper()} agrees best on {hi} (SRCC {bym[hi]:+.2f}, {n_of[hi]} images) "
                    f"and worst on {lo} ({bym[lo]:+.2f}, {n_of[lo]} images).")
    if out["severity"]:
        usable = {t: e for t, e in out["severity"].items() if e["n_images"] >= MIN_SEVERITY_IMAGES}
        label_tracks = [t for t, e in usable.items() if np.isfinite(e["label"]) and e["label"] <= -0.3]
        if not usable:
            text.append(f"No distortion type has {MIN_SEVERITY_IMAGES} or more test images: severity not summarised.")
        elif label_tracks:
            n_t = len(label_tracks)
            agree = {n: sum(1 for t in label_tracks if np.isfinite(out["severity"][t][n])
                            and out["severity"][t][n] <= -0.3) for n in classical}
            parts = ", ".join(f"{n.upper()} {k} of {n_t}" for n, k in agree.items())
            text.append(f"The labels fall with severity (SRCC with level <= -0.3) for {n_t} of {len(usable)} "
                        "distortion "
                        f"types with {MIN_SEVERITY_IMAGES}+ test images; the classical metrics fall with them for: "
                        f"{parts}.")
        else:
            text.append(f"The labels do not fall consistently with distortion severity for any of the {len(usable)} "
                        f"types with {MIN_SEVERITY_IMAGES}+ test images (no within-type SRCC with level <= -0.3): the "
                        "label set carries little severity signal.")
    n_cases = int(rows["case_id"].nunique())
    if n_cases < 10:
        text.append(f"Caution: only {n_cases} test cases. Intervals resample cases, so they are wide and coarse "
                    "(few distinct resamples); treat the numbers as indicative.")
    return out


def severity_curves(methods: dict[str, Method], rows, names: Sequence[str]) -> dict[str, Any]:
    """Mean percentile-normalised score per level, per distortion type (level 0: the references of that type)."""
    from scipy.stats import rankdata

    def pct(x: np.ndarray) -> np.ndarray:
        out = np.full(x.shape, np.nan)
        ok = np.isfinite(x)
        if ok.sum():
            out[ok] = (rankdata(x[ok]) - 0.5) / ok.sum()
        return out

    series = {"label": pct(rows["quality"].to_numpy(dtype=np.float64))}
    for n in names:
        if n in methods:
            series[n] = pct(methods[n].aligned)
    types = rows["type"].to_numpy()
    refs = rows["ref_id"].astype(str).to_numpy()
    lv = rows["level"].to_numpy(dtype=np.float64)
    is_ref = types == "reference"
    curves: dict[str, Any] = {}
    for t in sorted(set(types.tolist()) - {"reference", "unknown"}):
        sel = types == t
        ref_sel = is_ref & np.isin(refs, np.unique(refs[sel]))
        levels = sorted({int(v) for v in lv[sel] if np.isfinite(v)})
        entry: dict[str, Any] = {"levels": ([0] if ref_sel.any() else []) + levels, "n": []}
        for lvl in entry["levels"]:
            entry["n"].append(int(ref_sel.sum() if lvl == 0 else (sel & (lv == lvl)).sum()))
        for name, s in series.items():
            vals = []
            for lvl in entry["levels"]:
                m = ref_sel if lvl == 0 else sel & (lv == lvl)
                v = s[m]
                v = v[np.isfinite(v)]
                vals.append(float(v.mean()) if v.size else None)
            entry[name] = vals
        curves[t] = entry
    return curves


# ------------------------------------------------------------------------------------------------------ driver
Say = Callable[[str], None]
Progress = Callable[[str, int, int], None]


def evaluate(cfg: EvalConfig, *, log: Say | None = print, progress: Progress | None = None) -> EvalResult:
    """Score every method on the test images, measure, test, and write the report into ``cfg.out``.

    ``metrics.json`` is written once, after the report, with the final timings.
    """
    say = log or (lambda _m: None)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    split_file, table, test, compare, verified = _load(cfg, say)
    timing["load"] = time.perf_counter() - t0
    methods = _score_methods(cfg, test.rows["path"].tolist(), compare, verified, out / "cache", timing, say, progress)

    t = time.perf_counter()
    per, sig, alignment, reliability, curves = _measure(cfg, methods, table, test.rows, split_file)
    timing["metrics"] = time.perf_counter() - t
    say(f"metrics and {cfg.n_boot} case-bootstrap replicates in {timing['metrics']:.1f} s")

    t = time.perf_counter()
    gate = gate_comparison(cfg, methods, test.rows)
    timing["gate"] = time.perf_counter() - t
    if gate:
        say(f"quality-gate comparison ({cfg.gate_splits} case splits) in {timing['gate']:.1f} s")

    t = time.perf_counter()
    main = next(m for m in methods if m.kind == "main")
    test.rows = attach_task_labels(test.rows, table, list(main.tasks))
    tasks = task_metrics(methods, test.rows, cfg)
    timing["tasks"] = time.perf_counter() - t
    if tasks:
        say("per-task SRCC of " + cfg.name + ": " + ", ".join(
            f"{n} {_num(e.get('srcc'))} (n={e['n_images']})" for n, e in tasks["by_task"].items()))

    t = time.perf_counter()
    metrics = _assemble(cfg, table, test, compare, methods, per, sig, alignment, reliability, curves, timing)
    metrics["gate"] = gate
    metrics["tasks"] = tasks
    gallery = heatmap_gallery(cfg.model, test.rows, n=cfg.gallery, device=cfg.device, runtime=cfg.runtime,
                              num_threads=cfg.num_threads) if cfg.gallery else []
    all_labels = table["quality"].dropna().to_numpy(dtype=np.float64)
    timing["report"] = 0.0
    timing["total"] = time.perf_counter() - t0
    files = write_report(metrics, test.rows, methods, out, gallery=gallery, all_labels=all_labels)
    timing["report"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    files["metrics.json"] = out / "metrics.json"
    write_metrics_json(metrics, files["metrics.json"])  # the one write, with the final timings
    say(f"report written to {out} in {timing['total']:.1f} s")
    return EvalResult(metrics, out, files, methods, test)


def _load(cfg: EvalConfig, say: Say):
    """The label table, the test set of the main checkpoint's split, the other checkpoints and whether each
    provably never saw a test case: (split_file, table, test, compare, verified)."""
    from medqm.label import read_labels

    split_file = cfg.split_file or checkpoint_split(cfg.model)
    if split_file is None:
        raise FileNotFoundError(f"{cfg.model} has no split.csv; pass the split it was trained with (--split FILE)")
    table = read_labels(cfg.labels)
    test = load_test_set(table, split_file, max_images=cfg.max_images, seed=cfg.seed)
    test_cases = set(test.rows["case_id"])
    compare = resolve_compare(cfg.compare, cfg.model, cfg.name)
    verified = {cfg.name: _check_unseen(cfg.name, Path(cfg.model), test_cases)}
    for n, d in compare.items():
        verified[n] = _check_unseen(n, d, test_cases)
    say(f"test set: {test.info['n_images']} images of {test.info['n_cases']} cases"
        + (f" (case-stratified sample of {test.info['n_usable']})" if test.info["sampled"] else "")
        + f"; methods: {cfg.name}, {len(compare)} other checkpoint(s), {len(cfg.baselines)} classical")
    return split_file, table, test, compare, verified


def _score_methods(cfg: EvalConfig, paths: list[str], compare: dict[str, Path], verified: dict[str, bool],
                   cache: Path, timing: dict[str, float], say: Say, progress: Progress | None) -> list[Method]:
    """Scores of the main checkpoint, the other checkpoints and the classical baselines, in that order."""
    from medqm.model import variant_kind

    t = time.perf_counter()
    base = score_baselines(paths, cfg.baselines, cache, workers=cfg.workers, progress=progress)
    timing["baselines"] = time.perf_counter() - t
    say(f"classical baselines: {len(paths)} images in {timing['baselines']:.1f} s ({cfg.workers} worker(s))")
    t = time.perf_counter()
    methods: list[Method] = []
    deep: list[tuple[str, bool, Path]] = [(cfg.name, True, Path(cfg.model)),
                                          *[(n, False, d) for n, d in compare.items()]]
    for n, is_main, d in deep:
        scores = score_checkpoint(d, paths, cache, name=n, batch_size=cfg.batch_size, device=cfg.device,
                                  runtime=cfg.runtime, num_threads=cfg.num_threads, progress=progress)
        info = checkpoint_summary(d)
        # the model under evaluation is 'main'; another MedQM-I with one part removed is an 'ablation'
        kind = "main" if is_main else ("ablation" if variant_kind(info["variant"]) == "ablation" else "deep")
        info["split_verified"] = verified[n]
        info["n_failed"] = int(scores["quality"].isna().sum())
        task_cols = {c[len("quality_"):]: c for c in scores.columns if c.startswith("quality_")}
        methods.append(Method(n, kind, scores["quality"].to_numpy(dtype=np.float64), False, info,
                              {t: scores[c].to_numpy(dtype=np.float64) for t, c in task_cols.items()} if is_main
                              else {}))
    timing["deep"] = time.perf_counter() - t
    say(f"MedQM-I checkpoints: {len(deep)} × {len(paths)} images in {timing['deep']:.1f} s")
    for b in cfg.baselines:
        bi = baseline_info(b)
        methods.append(Method(b, "classical", base[b].to_numpy(dtype=np.float64), bi.lower_better,
                              {"description": bi.description, "n_failed": int(base[b].isna().sum())}))
    return methods


def _measure(cfg: EvalConfig, methods: list[Method], table, rows, split_file):
    """Every number of the report: (per-method metrics, significance, alignment, label reliability, severity curves)."""
    from medqm.train import load_split

    from .reliability import describe_reliability, label_reliability

    by_name = {m.name: m for m in methods}
    cases = rows["case_id"].to_numpy()
    boot = CaseBootstrap(cases, cfg.n_boot, cfg.seed)
    per = all_method_metrics(methods, rows, cases, boot, cfg)
    sig = significance(cfg, methods, per, rows["quality"].to_numpy(dtype=np.float64), boot)
    alignment = alignment_study(by_name, per, rows, cfg.name, sig, cfg)
    reliability = label_reliability(table, load_split(split_file), rows, n_boot=cfg.n_boot, seed=cfg.seed,
                                    level=cfg.level)
    reliability.pop("pred")
    reliability["text"] = describe_reliability(reliability, cfg.name, per[cfg.name]["overall"].get("srcc"))
    curves = severity_curves(by_name, rows, ("niqe", "brisque", cfg.name))
    return per, sig, alignment, reliability, curves


def gate_comparison(cfg: EvalConfig, methods: list[Method], rows) -> dict[str, Any] | None:
    """Every method's quality gate on the test images (`medqm.evaluate.gate.compare_gates`); None without
    diagnostic losses in the labels or with fewer than 4 test cases."""
    from .gate import compare_gates

    d = rows["diag_loss"].to_numpy(dtype=np.float64) if "diag_loss" in rows else None
    if d is None or not np.isfinite(d).any() or rows["case_id"].nunique() < 4 or not cfg.gate_splits:
        return None
    return compare_gates({m.name: m.aligned for m in methods}, d, rows["case_id"].to_numpy(), reference=cfg.name,
                         risk=cfg.gate_risk, n_splits=cfg.gate_splits, n_boot=cfg.n_boot, seed=cfg.seed)


def significance(cfg: EvalConfig, methods: list[Method], per: dict[str, dict], y: np.ndarray,
                  boot: CaseBootstrap) -> dict[str, Any]:
    """The best baselines by SRCC, and the main model tested against every other method."""
    main = next(m for m in methods if m.name == cfg.name)
    others = [m for m in methods if m.kind != "main"]

    def best(pool):
        pool = [m for m in pool if np.isfinite(per[m.name]["overall"].get("srcc", np.nan))]
        return max(pool, key=lambda m: per[m.name]["overall"]["srcc"]).name if pool else None

    return {"reference": cfg.name, "best_baseline": best(others),
            "best_classical": best([m for m in others if m.kind == "classical"]),
            "best_deep_baseline": best([m for m in others if m.kind == "deep"]),
            "primary_test": "paired case bootstrap of the SRCC difference (two-sided)",
            "secondary_test": "Williams' t on Spearman correlations (images treated as independent)",
            "tests": {m.name: compare_srcc(main.aligned, m.aligned, y, boot, level=cfg.level) for m in others}}


def _assemble(cfg: EvalConfig, table, test: TestSet, compare: dict[str, Path], methods: list[Method],
              per: dict[str, dict], sig: dict, alignment: dict, reliability: dict, curves: dict,
              timing: dict[str, float]) -> dict[str, Any]:
    """The metrics.json document (``timing`` is the live dict, filled in until it is written)."""
    from medqm import __version__

    label_meta = table.attrs.get("medqm", {})
    settings = asdict(cfg)
    settings["compare"] = {n: str(d) for n, d in compare.items()}
    return {
        "medqm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "labels": {"path": str(Path(cfg.labels).resolve()), "model_id": label_meta.get("model_id"),
                   "model_revision": label_meta.get("model_revision"), "quality_map": label_meta.get("quality_map")},
        "test_set": test.info,
        "settings": settings,
        "methods": {m.name: {"kind": m.kind, "lower_better": m.lower_better,
                             "sign": -1 if m.lower_better else 1, "source": m.source, **per[m.name]} for m in methods},
        "significance": sig,
        "alignment": alignment,
        "label_reliability": reliability,
        "severity_curves": curves,
        "timing": timing,
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metrics_json(metrics: dict, path: Path) -> None:
    from medqm._fs import write_json

    write_json(_jsonable(metrics), path, indent=1, allow_nan=False)


__all__ = ["EvalConfig", "EvalResult", "Method", "evaluate", "resolve_compare", "describe_agreement", "method_metrics",
           "all_method_metrics", "significance", "alignment_study", "severity_curves", "gate_comparison",
           "write_metrics_json"]
