"""The evaluation report: report.md, a self-contained report.html, and the figures as PNG files.

``metrics.json``, the numbers the report is drawn from, is written once by `medqm.evaluate.runner.evaluate`
(or `medqm.evaluate.crossval.cross_validate`, whose report `write_cv_report` adds the per-fold figures),
after the report (so it carries the final timings). `HEADLINE_HEADER` and `headline_rows` give the headline
table to other front ends (`medqm evaluate`, `medqm demo`).

The HTML embeds every picture as a base64 PNG and its style inline, so the one file opens offline and can be
mailed around. Figures are drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

KIND_COLOUR = {"main": "#d62728", "ablation": "#ff7f0e", "deep": "#8c564b", "classical": "#1f77b4"}
KIND_LABEL = {"main": "MedQM-I (evaluated)", "ablation": "MedQM-I ablation", "deep": "deep (other checkpoints)",
              "classical": "classical BIQA"}
DISPLAY = {"niqe": "NIQE", "brisque": "BRISQUE", "piqe": "PIQE", "entropy": "entropy",
           "total_variation": "total variation",
           "noise_sigma": "noise σ", "laplacian_variance": "Laplacian variance"}


def display(name: str) -> str:
    return DISPLAY.get(name, name)


# ------------------------------------------------------------------------------------------------ formatting
def _f(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _ci(v, ci, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{digits}f} [{ci[0]:.{digits - 1}f}, {ci[1]:.{digits - 1}f}]" if ci else f"{v:.{digits}f}"


def _p(p) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else "<0.001"


def ordered_methods(metrics: dict) -> list[str]:
    """The main model first, then the others by SRCC (highest first; undefined last)."""
    ms = metrics["methods"]

    def key(n):
        s = ms[n]["overall"].get("srcc")
        return (ms[n]["kind"] != "main", -(s if s is not None and np.isfinite(s) else -9))

    return sorted(ms, key=key)


def headline_rows(metrics: dict) -> list[list[str]]:
    """The headline table: method, kind, SRCC [CI], PLCC [CI], KRCC, RMSE, images, cases."""
    rows = []
    for n in ordered_methods(metrics):
        m = metrics["methods"][n]
        o = m["overall"]
        rows.append([display(n), m["kind"], _ci(o.get("srcc"), o.get("srcc_ci")), _ci(o.get("plcc"), o.get("plcc_ci")),
                     _f(o.get("krcc")), _f(o.get("rmse"), 4), str(o.get("n_images", 0)), str(o.get("n_cases", 0))])
    o = metrics.get("label_reliability", {}).get("distortion_oracle")
    if o and o.get("n_images"):
        rows.append(["distortion oracle (label ceiling)", "oracle", _ci(o.get("srcc"), o.get("srcc_ci")),
                     _f(o.get("plcc")), _f(o.get("krcc")), _f(o.get("rmse"), 4), str(o["n_images"]),
                     str(o.get("n_cases", 0))])
    return rows


def design_of(metrics: dict) -> dict[str, Any]:
    """How the figures of a metrics.json were obtained: ``{'kind': 'cross-validation', 'folds': K, …}`` when
    pooled over K folds (`medqm.evaluate.crossval`), else ``{'kind': 'single-split'}`` (`evaluate` on one split)."""
    return metrics.get("design") or {"kind": "single-split"}


def headline_title(metrics: dict) -> str:
    """A title for the headline table that says where its figures come from."""
    d = design_of(metrics)
    if d["kind"] == "cross-validation":
        return (f"agreement with the labels, pooled over {d['folds']} case-level folds "
                f"({metrics['test_set']['n_cases']} cases, each tested once)")
    return "agreement with the labels on the held-out cases"


def reliability_text(metrics: dict) -> list[str]:
    return list(metrics.get("label_reliability", {}).get("text", []))


HEADLINE_HEADER = ["method", "kind", "SRCC [95% CI]", "PLCC [95% CI]", "KRCC", "RMSE", "images", "cases"]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def group_table(metrics: dict, key: str, names: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows = groups (modality / type / level), columns = methods' SRCC; with image and case counts."""
    names = list(names or ordered_methods(metrics))
    ms = metrics["methods"]
    groups: list[str] = []
    for n in names:
        for g in ms[n].get(key, {}):
            if g not in groups:
                groups.append(g)
    if key == "by_level":
        groups.sort(key=lambda g: float(g) if g.replace(".", "", 1).isdigit() else 1e9)
    ref = ms[names[0]].get(key, {})
    header = [key.removeprefix("by_"), "images", "cases"] + [display(n) for n in names]
    rows = []
    for g in groups:
        r0 = ref.get(g, {})
        rows.append([g, str(r0.get("n_images", "")), str(r0.get("n_cases", ""))]
                    + [_f(ms[n].get(key, {}).get(g, {}).get("srcc"), 2) for n in names])
    return header, rows


# --------------------------------------------------------------------------------------------------- figures
def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _modality_colours(mods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(mods)))}


def fig_scatter(metrics: dict, rows, methods, *, max_points: int = 2500, seed: int = 0) -> bytes:
    """Predicted (sign-aligned) vs label, one panel per method, coloured by modality, with the fitted logistic."""
    from medqm.metrics import LogisticFit

    names = ordered_methods(metrics)
    by = {m.name: m for m in methods}
    ncol = min(4, len(names))
    nrow = int(np.ceil(len(names) / ncol))
    fig = _figure(3.3 * ncol, 2.9 * nrow)
    y = rows["quality"].to_numpy(dtype=np.float64)
    mods = rows["modality"].to_numpy()
    colours = _modality_colours(mods.tolist())
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(len(y), size=min(max_points, len(y)), replace=False))
    for i, n in enumerate(names):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        x = by[n].aligned
        s = sub[np.isfinite(x[sub])]
        ax.scatter(x[s], y[s], s=4, alpha=0.5, c=[colours[m] for m in mods[s]], linewidths=0)
        o = metrics["methods"][n]["overall"]
        fit = o.get("fit")
        if fit and np.isfinite(x).sum() > 1:
            grid = np.linspace(np.nanmin(x), np.nanmax(x), 200)
            f = LogisticFit(fit["kind"], tuple(fit["params"]), fit["increasing"])
            ax.plot(grid, f(grid), color="k", lw=1.2)
        sign = "−" if by[n].lower_better else ""
        ax.set_title(f"{display(n)}  SRCC {_f(o.get('srcc'), 2)}", fontsize=9)
        ax.set_xlabel(f"{sign}{display(n)} score" + (" (sign-aligned)" if sign else ""), fontsize=8)
        ax.set_ylabel("label quality", fontsize=8)
        ax.tick_params(labelsize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in colours.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(8, len(handles)), fontsize=8, frameon=False)
    return _png(fig)


def fig_srcc_bars(metrics: dict) -> bytes:
    """SRCC of every method with its case-bootstrap confidence interval."""
    names = ordered_methods(metrics)[::-1]
    ms = metrics["methods"]
    fig = _figure(6.5, 0.35 * len(names) + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    vals = [ms[n]["overall"].get("srcc") for n in names]
    vals = [v if v is not None and np.isfinite(v) else 0.0 for v in vals]
    lo = [v - (ms[n]["overall"].get("srcc_ci") or [v, v])[0] for n, v in zip(names, vals, strict=True)]
    hi = [(ms[n]["overall"].get("srcc_ci") or [v, v])[1] - v for n, v in zip(names, vals, strict=True)]
    ax.barh(range(len(names)), vals, xerr=[lo, hi], color=[KIND_COLOUR[ms[n]["kind"]] for n in names],
            capsize=3, error_kw={"lw": 1})
    ax.set_yticks(range(len(names)), [display(n) for n in names], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    level = metrics["settings"].get("level", 0.95)
    ax.set_xlabel(f"SRCC with the labels ({round(level * 100)} % CI, cases resampled)", fontsize=8)
    ax.set_xlim(min(-0.1, min(v - low for v, low in zip(vals, lo, strict=True)) - 0.05), 1.0)
    from matplotlib.patches import Patch

    kinds = sorted({ms[n]["kind"] for n in names}, key=list(KIND_COLOUR).index)
    ax.legend(handles=[Patch(color=KIND_COLOUR[k], label=KIND_LABEL[k]) for k in kinds], fontsize=7, loc="lower right")
    return _png(fig)


def fig_severity(metrics: dict) -> bytes | None:
    """Quality vs severity per distortion type: label and NIQE / BRISQUE / MedQM-I, each as percentile ranks."""
    curves = metrics.get("severity_curves") or {}
    if not curves:
        return None
    main = metrics["significance"]["reference"]
    styles = {"label": ("k", "-", 2.0, "MLLM label"), "niqe": ("#1f77b4", "--", 1.2, "−NIQE"),
              "brisque": ("#2ca02c", "--", 1.2, "−BRISQUE"), main: ("#d62728", "-", 1.4, main)}
    types = list(curves)
    ncol = min(6, len(types))
    nrow = int(np.ceil(len(types) / ncol))
    fig = _figure(2.4 * ncol, 2.0 * nrow + 0.5)
    for i, t in enumerate(types):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        c = curves[t]
        for key, (col, ls, lw, lab) in styles.items():
            if key in c:
                v = np.array([np.nan if x is None else x for x in c[key]], dtype=float)
                ax.plot(c["levels"], v, color=col, ls=ls, lw=lw, marker="o", ms=2.5, label=lab)
        ax.set_title(t, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xticks(c["levels"])
        ax.tick_params(labelsize=6)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("mean percentile rank over the test images (1 = best) vs distortion level (0 = reference)", fontsize=9)
    return _png(fig)


def fig_labels(rows, all_labels: np.ndarray | None) -> bytes:
    """The label distribution: all labels vs the test images, and the test labels per level."""
    fig = _figure(9, 3.0)
    ax = fig.add_subplot(1, 2, 1)
    y = rows["quality"].to_numpy(dtype=np.float64)
    lo, hi = float(np.min(y)), float(np.max(y))
    if all_labels is not None and all_labels.size:
        lo, hi = min(lo, float(all_labels.min())), max(hi, float(all_labels.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
    if all_labels is not None and all_labels.size:
        ax.hist(all_labels, bins=bins, density=True, alpha=0.4, color="grey", label=f"all labels (n={all_labels.size})")
    ax.hist(y, bins=bins, density=True, histtype="step", color="#d62728", lw=1.5, label=f"test images (n={y.size})")
    ax.set_xlabel("quality label", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    lv = rows["level"].to_numpy(dtype=np.float64)
    levels = sorted({int(v) for v in lv if np.isfinite(v)})
    if levels:
        ax2.boxplot([y[lv == v] for v in levels], positions=list(range(len(levels))), showfliers=False)
        ax2.set_xticks(range(len(levels)), [str(v) for v in levels])
        ax2.set_xlabel("distortion level (0 = reference)", fontsize=8)
    ax2.set_ylabel("test label quality", fontsize=8)
    ax2.tick_params(labelsize=7)
    return _png(fig)


def _overlay_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- writers
def significance_rows(metrics: dict) -> list[list[str]]:
    sig = metrics["significance"]
    rows = []
    for n, t in sorted(sig["tests"].items(),
                       key=lambda kv: -(kv[1]["bootstrap"]["diff"] if np.isfinite(kv[1]["bootstrap"]["diff"]) else -9)):
        b, w = t["bootstrap"], t.get("williams") or {}
        tag = []
        if n == sig.get("best_baseline"):
            tag.append("best baseline")
        if n == sig.get("best_classical") and n != sig.get("best_baseline"):
            tag.append("best classical")
        rows.append([display(n) + (f" ({', '.join(tag)})" if tag else ""),
                     f"{b['diff']:+.3f}" if np.isfinite(b["diff"]) else "–",
                     f"[{b['ci'][0]:+.3f}, {b['ci'][1]:+.3f}]" if b.get("ci") else "–", _p(b.get("p")),
                     _f(w.get("t"), 2), _p(w.get("p")), str(b.get("n_images", ""))])
    return rows


SIG_HEADER = ["vs", "ΔSRCC", "95% CI (cases)", "p (case bootstrap)", "Williams t", "p (Williams)", "images"]


def _provenance(metrics: dict) -> list[str]:
    ts = metrics["test_set"]
    lab = metrics["labels"]
    main = metrics["significance"]["reference"]
    src = metrics["methods"][main]["source"]
    trained = (src.get("trained_on") or {})
    lines = [
        f"Labels: `{lab['path']}` (labelling model: {lab.get('model_id') or 'unknown'})",
        f"Model under evaluation: {main}, `{src.get('path')}` (variant {src.get('variant')}, "
        f"trained on {trained.get('n_images', '?')} images of `{trained.get('labels', '?')}`)",
        f"Test set: {ts['n_images']} images of {ts['n_cases']} held-out cases from `{ts['split_file']}`"
        + (f" — a case-stratified sample (--max-images {ts['max_images']}, seed {ts['sample_seed']}) of "
           f"{ts['n_usable']} usable" if ts.get("sampled") else "")
        + f"; dropped: {', '.join(f'{k} {v}' for k, v in ts['dropped'].items())}",
        f"Confidence intervals: {metrics['settings']['n_boot']} bootstrap replicates resampling cases "
        f"(seed {metrics['settings']['seed']}); PLCC and RMSE after the VQEG 4-parameter logistic fit; lower-is-better "
        "scores sign-flipped",
    ]
    unverified = [n for n, m in metrics["methods"].items() if m["kind"] != "classical"
                  and not m["source"].get("split_verified", True)]
    if unverified:
        lines.append(f"Warning: no saved split for {', '.join(unverified)}: "
                     "cannot verify they never saw the test cases")
    return lines


def _significance_text(metrics: dict) -> str:
    sig = metrics["significance"]
    main, best = sig["reference"], sig.get("best_baseline")
    if not best or best not in sig["tests"]:
        return "No baseline to test against."
    b = sig["tests"][best]["bootstrap"]
    level = metrics["settings"].get("level", 0.95)
    alpha = 1 - level
    if not np.isfinite(b["diff"]) or b.get("ci") is None:
        return f"The SRCC difference between {main} and {display(best)} is undefined."
    verdict = "significantly higher than" if (b["diff"] > 0 and b["p"] < alpha) else (
        "significantly lower than" if (b["diff"] < 0 and b["p"] < alpha) else "not significantly different from")
    return (f"{main}'s SRCC is {verdict} that of the best baseline, {display(best)}: difference {b['diff']:+.3f} "
            f"(95 % CI {b['ci'][0]:+.3f} to {b['ci'][1]:+.3f}; paired case bootstrap p = {_p(b['p'])}, "
            f"{b['n_valid']} replicates). Williams' t, which treats images as independent, is given for reference "
            "and is optimistic when images cluster in cases.")


GATE_HEADER = ["method", "kind", "pass at score ≥", "pass rate [95% CI]", "calibration risk",
               "held-out risk (mean)", "splits over α"]


def gate_sections(metrics: dict) -> list[tuple[str, str, list[list[str]]]]:
    """(title, sentence, table rows) for each calibration method of the gate comparison; empty without one."""
    g = metrics.get("gate")
    if not g:
        return []
    kinds = {n: m["kind"] for n, m in metrics["methods"].items()}
    what = ("share of passed images whose correct answer became less than half as likely" if g["risk"] ==
            "lost-answer-rate" else "mean diagnostic loss of passed images (nats, capped)")
    out = []
    for method, e in g["methods"].items():
        title = ("Learn then Test (with probability ≥ 1 − δ, among passed images)" if method == "ltt"
                 else "Conformal risk control (in expectation, per submitted image)")
        if e["alpha"] is None:
            out.append((title, f"{display(g['reference'])} attains none of α = "
                        f"{', '.join(f'{a:g}' for a in e['alphas_tried'])} in half of the case splits "
                        f"({g['n_cases']} cases): too few cases for this guarantee.", []))
            continue
        rows = []
        for n in ordered_methods(metrics):
            r = e["by_method"].get(n)
            if r is None:
                continue
            v = r["validity"]
            over = f"{v['violation_rate']:.1%} of {v['attained']}" if v["attained"] else "never attained"
            rows.append([display(n), kinds.get(n, ""), _f(r["pass_min"]) if r["pass_min"] is not None else "none",
                         _ci(r["pass_rate"], r["pass_rate_ci"]) if r["pass_rate_ci"] else "0",
                         _f(r["calibration_risk"]), _f(v["mean_heldout_risk"]), over])
        delta = f", δ = {g['delta']:g}" if method == "ltt" else ""
        n_splits = next(iter(e["by_method"].values()))["validity"]["n_splits"]
        out.append((title, f"Risk: {what}; α = {e['alpha']:g}{delta} (the smallest α that "
                    f"{display(g['reference'])} attains in at least half of {n_splits} "
                    f"random case splits). Thresholds calibrated on all {g['n_images']} test images of "
                    f"{g['n_cases']} cases; the last two columns calibrate on half of the cases and measure the "
                    "other half. A better quality model passes more images under the same guarantee.", rows))
    return out


def fig_risk_coverage(metrics: dict) -> bytes | None:
    g = metrics.get("gate")
    if not g:
        return None
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    kinds = {n: m["kind"] for n, m in metrics["methods"].items()}
    for n in ordered_methods(metrics):
        c = g["curves"].get(n)
        if c is None:
            continue
        ax.plot(c["coverage"], c["risk"], label=display(n), color=KIND_COLOUR.get(kinds.get(n), "#777"),
                lw=2.2 if kinds.get(n) == "main" else 1.0, alpha=1.0 if kinds.get(n) == "main" else 0.7)
    ax.set_xlabel("fraction of images passed (highest scores first)")
    ax.set_ylabel("risk among passed images")
    ax.set_title(f"risk–coverage ({g['risk']}, {g['n_images']} test images)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


TASK_HEADER = ["task (answer type)", "images", "cases", "task output SRCC [CI]", "overall quality SRCC [CI]",
               "task − overall (p)", "best classical SRCC"]


def task_rows(metrics: dict) -> list[list[str]]:
    """The task-conditioned quality table: per answer type, the main model's task output and its overall quality
    against the task's labels (on the images that have the task), the paired test of the two, the best classical."""
    sec = metrics.get("tasks") or {}
    classical = {n for n, m in metrics.get("methods", {}).items() if m.get("kind") == "classical"}
    rows = []
    for t, e in (sec.get("by_task") or {}).items():
        if e.get("srcc") is None and "note" in e:
            rows.append([t, str(e.get("n_images", 0)), str(e.get("n_cases", 0)), e["note"], "–", "–", "–"])
            continue
        ov = e.get("overall_output") or {}
        d = e.get("task_vs_overall") or {}
        cl = {n: v for n, v in (e.get("other_methods_srcc") or {}).items()
              if n in classical and v is not None and np.isfinite(v)}
        best = max(cl, key=cl.get) if cl else None
        rows.append([t, str(e.get("n_images", 0)), str(e.get("n_cases", 0)), _ci(e.get("srcc"), e.get("srcc_ci")),
                     _ci(ov.get("srcc"), ov.get("srcc_ci")),
                     f"{_f(d.get('diff'))} ({_p(d.get('p'))})" if d else "–",
                     f"{_f(cl[best])} ({display(best)})" if best else "–"])
    return rows


def task_note(metrics: dict) -> str:
    sec = metrics.get("tasks") or {}
    return (f"{sec.get('method', 'The model')}'s quality per answer type against that type's own label (the quality "
            "map of the mean diagnostic loss of the image's questions of that type), on the test images that have "
            "such a question; 95 % case-bootstrap intervals. “Overall quality” ranks the same labels with the "
            "model's single overall score; “task − overall” is the paired case-bootstrap test of the SRCC "
            "difference.")


def _md_tasks(metrics: dict, pooled: bool) -> list[str]:
    """report.md's task-conditioned quality section (none without task outputs)."""
    if not task_rows(metrics):
        return []
    return [f"## Task-conditioned quality{' (pooled)' if pooled else ''}", "", task_note(metrics), "",
            _md_table(TASK_HEADER, task_rows(metrics)), ""]


def _md_tail(metrics: dict, figures: dict[str, str], pooled: bool) -> list[str]:
    """report.md's sections shared by the single-split and the cross-validated reports: the alignment study, the
    per-modality table, the quality gates and the figures."""
    lines = ["## Alignment study: classical BIQA vs MLLM-oriented labels", ""]
    lines += [f"- {t}" for t in metrics["alignment"]["text"]]
    h, r = group_table(metrics, "by_modality")
    lines += ["", f"## Per modality (SRCC{', pooled' if pooled else ''})", "", _md_table(h, r), ""]
    for title, text, rows in gate_sections(metrics):
        lines += [f"## Quality gate: {title}", "", text, ""] + ([_md_table(GATE_HEADER, rows), ""] if rows else [])
    if figures:
        lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()] + [""]
    return lines


def write_markdown(metrics: dict, path: Path, figures: dict[str, str]) -> None:
    main = metrics["significance"]["reference"]
    lines = [f"# MedQM evaluation: {main} vs classical and deep BIQA", ""]
    lines += [f"- {p}" for p in _provenance(metrics)]
    lines += ["", "## Headline", "", _md_table(HEADLINE_HEADER, headline_rows(metrics)), ""]
    if reliability_text(metrics):
        lines += ["## How learnable are these labels?", ""] + [f"- {t}" for t in reliability_text(metrics)] + [""]
    lines += ["## Significance", "", _significance_text(metrics), "",
              _md_table(SIG_HEADER, significance_rows(metrics)), ""]
    lines += _md_tasks(metrics, pooled=False) + _md_tail(metrics, figures, pooled=False)
    lines += ["The full report, with per-type and per-level tables and the heatmap gallery, is `report.html`; every "
              "number is in `metrics.json`.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;\
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}\
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img.fig{max-width:100%;border:1px solid #eee}.gallery{display:flex;flex-wrap:wrap;gap:10px}
.gallery figure{margin:0;width:230px;font-size:.75em}.gallery img{width:230px}
.note{color:#555;font-size:.9em}ul.text li{margin:.3em 0}.scroll{overflow-x:auto}
"""


def _img(pngs: dict[str, bytes], key: str, alt: str) -> str:
    """An embedded figure, or nothing when it was not drawn."""
    if key not in pngs:
        return ""
    return (f'<img class="fig" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(pngs[key]).decode()}">')


def _html_tasks(metrics: dict, pooled: bool) -> list[str]:
    if not task_rows(metrics):
        return []
    return [f"<h2>Task-conditioned quality{' (pooled)' if pooled else ''}</h2>",
            f"<p class='note'>{html.escape(task_note(metrics))}</p>", _html_table(TASK_HEADER, task_rows(metrics))]


def _html_gates(metrics: dict, pngs: dict[str, bytes], note: str = "") -> list[str]:
    """The quality-gate section (none without gates); ``note`` (HTML) follows its figure."""
    gates = gate_sections(metrics)
    if not gates:
        return []
    s = ["<h2>Quality gate with a guarantee</h2>", _img(pngs, "risk_coverage", "risk against coverage")]
    s += [note] if note else []
    for title, text, rows in gates:
        s += [f"<h3>{html.escape(title)}</h3>", f"<p class='note'>{html.escape(text)}</p>"]
        s += [_html_table(GATE_HEADER, rows)] if rows else []
    return s


def _html_groups(metrics: dict, pngs: dict[str, bytes], pooled: bool) -> list[str]:
    """Severity and scatter figures, then every method's SRCC per modality, distortion type and level."""
    p, cp = (" (pooled)", ", pooled") if pooled else ("", "")
    return ["<h2>Quality vs severity</h2>", _img(pngs, "severity", "quality vs severity per distortion type"),
            f"<h2>Predicted vs label{p}</h2>", _img(pngs, "scatter", "predicted vs label"),
            f"<h2>Per modality (all methods, SRCC{cp})</h2>",
            "<div class='scroll'>" + _html_table(*group_table(metrics, "by_modality")) + "</div>",
            f"<h2>Per distortion type (all methods, SRCC{cp})</h2>",
            "<div class='scroll'>" + _html_table(*group_table(metrics, "by_type")) + "</div>",
            f"<h2>Per level (all methods, SRCC{cp})</h2>",
            "<div class='scroll'>" + _html_table(*group_table(metrics, "by_level")) + "</div>"]


def write_html(metrics: dict, path: Path, pngs: dict[str, bytes], gallery: list[dict]) -> None:
    main = metrics["significance"]["reference"]

    def img(key: str, alt: str) -> str:
        return _img(pngs, key, alt)

    def para(t: str) -> str:
        # *word* from the generated text becomes emphasis
        parts = html.escape(t).split("*")
        return "".join(f"<em>{p}</em>" if i % 2 else p for i, p in enumerate(parts))

    al = metrics["alignment"]
    s = [f"<!doctype html><html><head><meta charset='utf-8'><title>MedQM evaluation: {html.escape(main)}</title>",
         f"<style>{CSS}</style></head><body>",
         f"<h1>MedQM evaluation: {html.escape(main)} vs classical and deep BIQA</h1>",
         "<ul class='note'>" + "".join(f"<li>{para(p.replace('`', ''))}</li>" for p in _provenance(metrics)) + "</ul>",
         "<h2>Headline</h2>", _html_table(HEADLINE_HEADER, headline_rows(metrics)),
         img("srcc", "SRCC with confidence intervals")]
    if reliability_text(metrics):
        s += ["<h2>How learnable are these labels?</h2>",
              "<ul class='text'>" + "".join(f"<li>{para(t)}</li>" for t in reliability_text(metrics)) + "</ul>"]
    s += ["<h2>Significance</h2>", f"<p>{para(_significance_text(metrics))}</p>",
         _html_table(SIG_HEADER, significance_rows(metrics))]
    s += _html_tasks(metrics, pooled=False)
    s += [
         "<h2>Alignment study: classical BIQA vs MLLM-oriented labels</h2>",
         "<p class='note'>Human-perception BIQA metrics (NIQE, BRISQUE, PIQE; sign-flipped so that higher = better) "
         "against the labels on the same test images. The sentences below are generated from the numbers.</p>",
         "<ul class='text'>" + "".join(f"<li>{para(t)}</li>" for t in al["text"]) + "</ul>"]
    if al.get("metrics"):
        names = al["metrics"] + [main]
        h, r = group_table(metrics, "by_modality", names)
        s += ["<h3>Per modality (SRCC with the labels)</h3>", _html_table(h, r)]
        sev = al.get("severity", {})
        header = ["type", "images", "label vs level"] + [f"{display(n)} vs label" for n in names] + \
                 [f"{display(n)} vs level" for n in names]
        rows = []
        for t, e in sorted(sev.items()):
            bt = {n: metrics["methods"][n]["by_type"].get(t, {}) for n in names}
            rows.append([t, str(e.get("n_images", "")), _f(e.get("label"), 2)]
                        + [_f(bt[n].get("srcc"), 2) for n in names] + [_f(e.get(n), 2) for n in names])
        if rows:
            s += ["<h3>Per distortion type</h3>",
                  "<p class='note'>“vs label”: SRCC with the labels within the type. “vs level”: SRCC with the "
                  "distortion level (−1 = the score falls steadily with severity).</p>",
                  "<div class='scroll'>" + _html_table(header, rows) + "</div>"]
    s += _html_gates(metrics, pngs) + _html_groups(metrics, pngs, pooled=False) + ["<h2>Where MedQM-I looks</h2>"]
    if gallery:
        s.append("<p class='note'>Attention heatmaps of the model under evaluation on test images (lowest and highest "
                 "label per modality).</p><div class='gallery'>")
        for g in gallery:
            src = base64.b64encode(_overlay_png(g["overlay"])).decode()
            lvl = "" if g.get("level") is None else f" L{g['level']}"
            s.append(f"<figure><img alt='heatmap' src='data:image/png;base64,{src}'>"
                     f"<figcaption>{html.escape(g['modality'])} · "
                     f"{html.escape(str(g['type']))}{lvl}<br>label {g['label']:.3f} · predicted {g['pred']:.3f}<br>"
                     f"<span class='note'>{html.escape(Path(g['path']).name)}</span></figcaption></figure>")
        s.append("</div>")
    else:
        s.append("<p class='note'>No heatmaps: the model has neither textual priors nor implicit queries, or the "
                 "gallery was switched off.</p>")
    s += ["<h2>Label distribution</h2>", img("labels", "label distribution"),
          f"<p class='note'>medqm {html.escape(str(metrics['medqm_version']))} · {html.escape(metrics['created'])} · "
          f"total {metrics['timing'].get('total', 0):.0f} s · every number is in metrics.json</p>", "</body></html>"]
    path.write_text("\n".join(s), encoding="utf-8")


def write_report(metrics: dict, rows, methods, out: Path, *, gallery: list[dict] | None = None,
                 all_labels: np.ndarray | None = None) -> dict[str, Path]:
    """Write report.md, report.html and figures/*.png into ``out``; returns their paths (metrics.json: the caller)."""
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    pngs = {"srcc": fig_srcc_bars(metrics), "scatter": fig_scatter(metrics, rows, methods),
            "labels": fig_labels(rows, all_labels)}
    for key, fig in (("severity", fig_severity(metrics)), ("risk_coverage", fig_risk_coverage(metrics))):
        if fig is not None:
            pngs[key] = fig
    files: dict[str, Path] = {}
    for k, b in pngs.items():
        files[f"figures/{k}.png"] = figdir / f"{k}.png"
        (figdir / f"{k}.png").write_bytes(b)
    files["report.md"] = out / "report.md"
    write_markdown(metrics, files["report.md"], {k: f"figures/{k}.png" for k in ("srcc", "severity", "scatter")
                                                 if k in pngs})
    files["report.html"] = out / "report.html"
    write_html(metrics, files["report.html"], pngs, gallery or [])
    return files


# ------------------------------------------------------------------------------------------- cross-validation
def per_fold_rows(metrics: dict, key: str = "srcc") -> tuple[list[str], list[list[str]]]:
    """Rows = methods (then the distortion oracle), columns = each fold's ``key``, their mean ± SD, the pooled one."""
    pf = metrics["per_fold"]
    folds = pf["folds"]
    header = ["method"] + [f"fold {f['fold'] + 1} ({f['n_cases']} cases)" for f in folds] + ["mean ± SD", "pooled"]
    rows = []
    oracle = metrics.get("label_reliability", {}).get("distortion_oracle", {})
    for n in [*ordered_methods(metrics), "distortion oracle"]:
        if n not in pf["summary"]:
            continue
        sm = pf["summary"][n]
        pooled = oracle.get(key) if n == "distortion oracle" else metrics["methods"][n]["overall"].get(key)
        rows.append([display(n)] + [_f(f["methods"][n].get(key)) for f in folds]
                    + [f"{_f(sm.get(f'{key}_mean'))} ± {_f(sm.get(f'{key}_sd'))}", _f(pooled)])
    return header, rows


def versus_text(metrics: dict) -> list[str]:
    """One sentence each on the evaluated model against the best classical baseline and the best deep baseline."""
    sig = metrics["significance"]
    main, out = sig["reference"], []
    for role, key in (("best classical baseline", "best_classical"), ("deep baseline", "best_deep_baseline")):
        n = sig.get(key)
        t = sig["tests"].get(n, {}).get("bootstrap") if n else None
        if not t or t.get("ci") is None or not np.isfinite(t["diff"]):
            continue
        who = display(n) + (f" ({role})" if display(n) != role else "")
        out.append(f"{main} vs {who}: SRCC difference {t['diff']:+.3f} (95 % CI {t['ci'][0]:+.3f} to "
                   f"{t['ci'][1]:+.3f}), paired case bootstrap p = {_p(t['p'])}.")
    return out


ABLATION_HEADER = ["ablation", "SRCC drop (MedQM-I − ablation)", "95% CI (cases)", "p (case bootstrap)"]


def ablation_rows(metrics: dict) -> list[list[str]]:
    """Each ablation's SRCC drop against the evaluated model, pooled, with the paired case bootstrap."""
    out = []
    for n, d in (metrics["significance"].get("ablations") or {}).items():
        ci = d.get("ci")
        out.append([display(n), f"{d['drop']:+.3f}" if d.get("drop") is not None and np.isfinite(d["drop"]) else "–",
                    f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "–", _p(d.get("p"))])
    return out


def fig_per_fold(metrics: dict) -> bytes:
    """SRCC of every method in each fold (dots) and pooled over the folds (bar), methods as rows."""
    pf = metrics["per_fold"]
    ms = metrics["methods"]
    names = ordered_methods(metrics)[::-1]
    fig = _figure(6.5, 0.35 * len(names) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    for j, n in enumerate(names):
        pooled = ms[n]["overall"].get("srcc")
        ax.barh(j, pooled if pooled is not None and np.isfinite(pooled) else 0.0, color=KIND_COLOUR[ms[n]["kind"]],
                alpha=0.35)
        vals = [f["methods"][n].get("srcc") for f in pf["folds"]]
        for f, v in zip(pf["folds"], vals, strict=True):
            if v is not None and np.isfinite(v):
                ax.plot(v, j, "o", ms=4, color=KIND_COLOUR[ms[n]["kind"]])
                ax.annotate(str(f["fold"] + 1), (v, j), xytext=(0, 4), textcoords="offset points", fontsize=6,
                            ha="center")
    ax.set_yticks(range(len(names)), [display(n) for n in names], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("SRCC with the labels: dots = each fold (numbered), bar = pooled over the folds", fontsize=8)
    return _png(fig)


def _cv_provenance(metrics: dict) -> list[str]:
    d, ts, lab, st = metrics["design"], metrics["test_set"], metrics["labels"], metrics["settings"]
    per_fold = ", ".join(f"{f['n_cases']} cases / {f['n_images']} images" for f in ts["by_fold"])
    return [
        f"Labels: `{lab['path']}` (labelling model: {lab.get('model_id') or 'unknown'})",
        f"Design: {d['folds']}-fold case-level cross-validation (seed {d['seed']}"
        + (f", stratified by {d['stratify']}" if d.get("stratify") else "") + f"), folds in `{ts['folds_file']}`. "
        f"In each fold every model ({', '.join(st['names'][m] for m in st['models'])}) is trained "
        f"({st['mode']} backbone, {st['epochs']} epochs at most, patience {st['patience']}, input {st['img_size']} px) "
        f"on the other cases, {st['val_fraction']:.0%} of them (by images) kept for early stopping, and predicts the "
        "fold's test images; the classical baselines score every image once",
        f"Test predictions pooled over the folds: {ts['n_images']} images of {ts['n_cases']} cases, each case tested "
        f"once ({per_fold}); dropped: {', '.join(f'{k} {v}' for k, v in ts['dropped'].items())}",
        f"Confidence intervals and the paired test: {st['n_boot']} bootstrap replicates resampling cases over all "
        f"folds (seed {st['seed']}); PLCC and RMSE after one VQEG 4-parameter logistic fit on the pooled predictions; "
        "lower-is-better scores sign-flipped",
    ]


def write_cv_markdown(metrics: dict, path: Path, figures: dict[str, str]) -> None:
    main = metrics["significance"]["reference"]
    k = metrics["design"]["folds"]
    lines = [f"# MedQM evaluation ({k}-fold cross-validation): {main} vs classical and deep BIQA", ""]
    lines += [f"- {p}" for p in _cv_provenance(metrics)]
    lines += ["", f"## Headline (pooled over {k} folds)", "", _md_table(HEADLINE_HEADER, headline_rows(metrics)), ""]
    h, r = per_fold_rows(metrics)
    lines += ["## Per fold (SRCC)", "", _md_table(h, r), ""]
    if reliability_text(metrics):
        lines += ["## How learnable are these labels?", ""] + [f"- {t}" for t in reliability_text(metrics)] + [""]
    lines += ["## Significance (pooled)", "", _significance_text(metrics), ""]
    lines += [f"- {t}" for t in versus_text(metrics)] + ["", _md_table(SIG_HEADER, significance_rows(metrics)), ""]
    lines += _md_tasks(metrics, pooled=True)
    if ablation_rows(metrics):
        lines += ["## Ablations (pooled)", "", _md_table(ABLATION_HEADER, ablation_rows(metrics)), ""]
    lines += _md_tail(metrics, figures, pooled=True)
    lines += ["The full report, with per-type and per-level tables, is `report.html`; every number is in "
              "`metrics.json`, every pooled prediction in `predictions.csv`.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_cv_html(metrics: dict, path: Path, pngs: dict[str, bytes]) -> None:
    main = metrics["significance"]["reference"]
    k = metrics["design"]["folds"]

    def img(key: str, alt: str) -> str:
        return _img(pngs, key, alt)

    def ul(items) -> str:
        return "<ul class='text'>" + "".join(f"<li>{html.escape(t)}</li>" for t in items) + "</ul>"

    title = f"MedQM evaluation ({k}-fold cross-validation): {main} vs classical and deep BIQA"
    s = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
         f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
         "<ul class='note'>" + "".join(f"<li>{html.escape(p.replace('`', ''))}</li>"
                                       for p in _cv_provenance(metrics)) + "</ul>",
         f"<h2>Headline (pooled over {k} folds)</h2>", _html_table(HEADLINE_HEADER, headline_rows(metrics)),
         img("srcc", "pooled SRCC with confidence intervals"),
         "<h2>Per fold</h2>", "<div class='scroll'>" + _html_table(*per_fold_rows(metrics)) + "</div>",
         "<p class='note'>PLCC (after each fold's own logistic fit) per fold:</p>",
         "<div class='scroll'>" + _html_table(*per_fold_rows(metrics, "plcc")) + "</div>",
         img("per_fold", "SRCC per fold and pooled")]
    if reliability_text(metrics):
        s += ["<h2>How learnable are these labels?</h2>", ul(reliability_text(metrics))]
    s += ["<h2>Significance (pooled)</h2>", f"<p>{html.escape(_significance_text(metrics))}</p>",
          ul(versus_text(metrics)), _html_table(SIG_HEADER, significance_rows(metrics))]
    s += _html_tasks(metrics, pooled=True)
    if ablation_rows(metrics):
        s += ["<h2>Ablations (pooled)</h2>", _html_table(ABLATION_HEADER, ablation_rows(metrics))]
    s += ["<h2>Alignment study: classical BIQA vs MLLM-oriented labels</h2>", ul(metrics["alignment"]["text"])]
    s += _html_gates(metrics, pngs, "<p class='note'>Pooled scores of models trained on different folds share one "
                                    "threshold here; a deployed gate is calibrated for one model.</p>")
    s += _html_groups(metrics, pngs, pooled=True)
    s += ["<h2>Label distribution</h2>", img("labels", "label distribution"),
          f"<p class='note'>medqm {html.escape(str(metrics['medqm_version']))} · {html.escape(metrics['created'])} · "
          f"total {metrics['timing'].get('total', 0):.0f} s · every number is in metrics.json</p>", "</body></html>"]
    path.write_text("\n".join(s), encoding="utf-8")


def write_cv_report(metrics: dict, rows, methods, out: Path, *, all_labels: np.ndarray | None = None
                    ) -> dict[str, Path]:
    """The cross-validation report (`medqm.evaluate.crossval`): report.md, report.html and figures/*.png, every
    figure pooled over the folds beside the per-fold ones; returns their paths (metrics.json: the caller)."""
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    pngs = {"srcc": fig_srcc_bars(metrics), "per_fold": fig_per_fold(metrics),
            "scatter": fig_scatter(metrics, rows, methods), "labels": fig_labels(rows, all_labels)}
    for key, fig in (("severity", fig_severity(metrics)), ("risk_coverage", fig_risk_coverage(metrics))):
        if fig is not None:
            pngs[key] = fig
    files: dict[str, Path] = {}
    for key, b in pngs.items():
        files[f"figures/{key}.png"] = figdir / f"{key}.png"
        (figdir / f"{key}.png").write_bytes(b)
    files["report.md"] = out / "report.md"
    write_cv_markdown(metrics, files["report.md"], {key: f"figures/{key}.png" for key in
                                                    ("srcc", "per_fold", "severity", "scatter") if key in pngs})
    files["report.html"] = out / "report.html"
    write_cv_html(metrics, files["report.html"], pngs)
    return files


__all__ = ["write_report", "write_cv_report", "headline_rows", "headline_title", "design_of", "HEADLINE_HEADER",
           "per_fold_rows", "ablation_rows", "versus_text", "group_table", "ordered_methods", "display", "task_rows",
           "TASK_HEADER"]
