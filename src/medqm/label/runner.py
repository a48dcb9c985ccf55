"""`medqm label`: diagnostic-loss labels for every distorted image, crash-safe and resumable.

Work is cut into shards of a few reference images each (fixed by the sorted reference list, so a resumed
run cuts the same shards). For a shard: the reference NLLs of every question are computed once and cached
(``cache/refs-NNNNN.parquet``), then each distorted version of those references is scored, and the shard's
rows are written to ``shards/shard-NNNNN.parquet`` through a temporary file and an atomic rename. A shard
file therefore exists complete or not at all: a ``kill -9`` at any moment loses at most the shard in
progress, and a rerun produces exactly the rows of an uninterrupted run. ``labels.parquet`` is assembled
from the shards at the end, sorted by dist_id, with the label configuration in its metadata.

The label definition (`LabelDefinition`: ``loss`` 'nll' or 'kl', its ``temperature``, and the number of
harmless ``views``) decides which (image, question, answer, view) triples are scored and how their NLLs
become D; it is part of the label configuration, so a folder holds labels of one definition only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medqm import __version__
from medqm._fs import write_json, write_parquet, write_records_csv
from medqm.io import MedQMReadError, read_image

from ._protocol import DiagnosticModel
from .quality import DEFAULT_MAP, QualityMap
from .tasks import VQAItem

LABEL_COLUMNS = (
    "dist_id", "ref_id", "case_id", "modality", "type", "level", "seed", "n_qa", "nll_ref", "nll_dist",
    "diag_loss", "quality", "model_id", "model_revision", "map_center", "map_scale", "path", "ref_path", "params",
    "answer_types", "nll_ref_items", "nll_dist_items",
    "loss", "temperature", "views", "loss_kind", "loss_items", "view_losses",
)
REFERENCE_TYPE = "reference"
LOSSES = ("nll", "kl")
VIEWS = ("original", "flip", "shift", "flip+shift")  # view v of `apply_view`; --views K uses the first K
VIEW_SHIFT = 6  # pixels, down and right, for the 'shift' views


def apply_view(pixels: np.ndarray, view: int) -> np.ndarray:
    """One harmless view of an image: 0 unchanged (the same array), 1 mirrored left-right, 2 shifted by
    `VIEW_SHIFT` pixels down and right (the vacated border repeats the edge pixels), 3 both."""
    if view == 0:
        return pixels
    name = VIEWS[view]
    x = pixels
    if "flip" in name:
        x = x[:, ::-1]
    if "shift" in name:
        s = VIEW_SHIFT
        x = np.pad(x, [(s, 0), (s, 0)] + [(0, 0)] * (x.ndim - 2), mode="edge")[: x.shape[0], : x.shape[1]]
    return np.ascontiguousarray(x)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_text(text: str) -> str:
    """'left' ↔ 'right' (whole words, case kept): an answer about image sides, for a mirrored image."""
    def swap(m: re.Match) -> str:
        w = m.group(0)
        o = "right" if w.lower() == "left" else "left"
        return o.upper() if w.isupper() else o.capitalize() if w[0].isupper() else o

    return _LEFT_RIGHT.sub(swap, text)


def view_flips(view: int) -> bool:
    return "flip" in VIEWS[view]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max()
    return z - (m + math.log(float(np.exp(z - m).sum())))


DEFAULT_KL_TEMPERATURE = 3.0


def choice_kl(nll_ref, nll_dist, temperature: float = 1.0) -> float:
    """KL(p_ref ‖ p_dist) in nats, p = softmax(−NLL(choice) / T) over one question's choices."""
    lr = _log_softmax(-np.asarray(nll_ref, np.float64) / temperature)
    ld = _log_softmax(-np.asarray(nll_dist, np.float64) / temperature)
    return max(0.0, float(np.sum(np.exp(lr) * (lr - ld))))


@dataclass(frozen=True)
class LabelDefinition:
    """How per-answer NLLs become the diagnostic loss D of an image (docs/medqm-d.md).

    - ``loss='nll'``: D = mean_j [NLL_j(distorted) − NLL_j(reference)] over the correct answers.
    - ``loss='kl'``: per question j with at least two distinct ``choices``, KL(p_ref ‖ p_dist) with
      p = softmax(−NLL(choice) / temperature) over its choices (every choice scored); questions without
      choices fall back to the nll difference (``loss_kind`` 'nll' in the label row). D = mean over questions.
    - ``views`` K in (1, 2, 4): D is the mean over the first K of `VIEWS`, each applied to the reference and
      the distorted image alike; on mirrored views the answers and choices have left and right swapped
      (`mirror_text`; the question text is kept).

    The default is ``kl`` at temperature 3 (``temperature=None`` means 3 for ``kl``, 1 for ``nll``): of the
    definitions compared in docs/medqm-d.md it gave the most learnable and most reproducible labels.
    """

    loss: str = "kl"
    temperature: float | None = None
    views: int = 1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.temperature is None:
            object.__setattr__(self, "temperature", DEFAULT_KL_TEMPERATURE if self.loss == "kl" else 1.0)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.loss == "nll" and self.temperature != 1.0:
            raise ValueError("--temperature applies to --loss kl only")
        if self.views not in (1, 2, 4):
            raise ValueError(f"views must be 1, 2 or 4, got {self.views}")

    def uses_choices(self, it: VQAItem) -> bool:
        return self.loss == "kl" and it.choices is not None and len(set(it.choices)) >= 2

    def answers(self, it: VQAItem) -> tuple[list[str], int, int]:
        """(the answers scored for one item, how many of them are choices, the index of the correct one)."""
        if not self.uses_choices(it):
            return [it.answer], 0, 0
        ch = list(dict.fromkeys(it.choices))
        if it.answer in ch:
            return ch, len(ch), ch.index(it.answer)
        return ch + [it.answer], len(ch), len(ch)

    def triples(self, owner: str, path: str, items: Sequence[VQAItem]) -> list[Triple]:
        out = []
        for v in range(self.views):
            flip = view_flips(v)
            for it in items:
                for a in self.answers(it)[0]:
                    out.append((owner, path, it.question, mirror_text(a) if flip else a, v))
        return out

    def losses(self, items: Sequence[VQAItem], ref: np.ndarray, dist: np.ndarray):
        """Per view and question: (loss, correct answer's NLL on the reference, on the distorted image),
        each an array of shape (views, questions), from two owners' flat NLL vectors (`triples` order)."""
        shape = (self.views, len(items))
        loss, nr, nd = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        if len(ref) != len(dist):
            raise ValueError("reference and distorted image were scored on different answers")
        o = 0
        for v in range(self.views):
            for j, it in enumerate(items):
                answers, n_choices, k = self.answers(it)
                r, d = ref[o : o + len(answers)], dist[o : o + len(answers)]
                o += len(answers)
                nr[v, j], nd[v, j] = r[k], d[k]
                loss[v, j] = (choice_kl(r[:n_choices], d[:n_choices], self.temperature) if n_choices
                              else d[k] - r[k])
        if o != len(ref):
            raise ValueError("the scored NLLs do not match the label definition's layout")
        return loss, nr, nd

    def to_dict(self) -> dict:
        return {"loss": self.loss, "temperature": float(self.temperature), "views": int(self.views)}


DEFAULT_DEFINITION = LabelDefinition()
# what a label folder made before the definition was stored used (its label_config.json lacks these keys)
LEGACY_DEFINITION = LabelDefinition("nll", 1.0, 1)


@dataclass
class Reference:
    """One reference image, its questions, and its distorted versions (rows of a distort manifest)."""

    key: str  # resolved image path
    ref_id: str
    case_id: str
    modality: str
    items: list[VQAItem]
    distortions: list[dict[str, Any]] = field(default_factory=list)


def _resolve(path: str) -> str:
    return str(Path(path).resolve())


def gather_references(items: Sequence[VQAItem], distorted: str | Path | None, *,
                      include_references: bool = True) -> list[Reference]:
    """Join task items (by image) with a `medqm distort` manifest (by its ref_path); sorted by ref_id.

    With a ``distorted`` folder, only references that are the ``ref_path`` of at least one of its distorted
    images are kept (task items of other images are ignored: a distort folder made from a few references
    labels those few, not the whole collection). Without one, every image with items is a reference
    (reference-only labels, when ``include_references``).
    """
    by_image: dict[str, list[VQAItem]] = defaultdict(list)
    for it in items:
        by_image[_resolve(it.image)].append(it)
    dist_rows: dict[str, list[dict]] = defaultdict(list)
    if distorted is not None:
        from medqm.distort.plan import read_manifest

        root = Path(distorted)
        for row in read_manifest(root).to_dict("records"):
            row["abs_path"] = str((root / row["path"]).resolve())
            dist_rows[_resolve(row["ref_path"])].append(row)
    refs = []
    for key, its in by_image.items():
        rows = sorted(dist_rows.get(key, []), key=lambda r: r["dist_id"])
        if not rows and (distorted is not None or not include_references):
            continue  # no distorted version of this image in the distort folder: nothing to label for it
        first = rows[0] if rows else {}
        ref_id = first.get("ref_id") or its[0].image_id or Path(key).stem
        refs.append(Reference(key, str(ref_id), str(first.get("case_id") or its[0].case_id),
                              str(first.get("modality") or its[0].modality or ""), sorted(its, key=_item_key), rows))
    ids = [r.ref_id for r in refs]
    if len(set(ids)) != len(ids):
        raise ValueError("two different reference images share a ref_id; give task items distinct image_id values")
    return sorted(refs, key=lambda r: r.ref_id)


def _item_key(it: VQAItem):
    return (it.answer_type or "", it.question, it.answer)


def image_chunks(images: Sequence[np.ndarray], chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of at most ``chunk`` samples that never split a run of one image.

    A run is consecutive samples holding the same array object (`LocalScorer` passes one object per image and
    view). The Hugging Face backend scores an image's samples against one pass of its prompt prefix when they
    arrive in one call, so a run is kept whole; a run longer than ``chunk`` is a chunk of its own.
    """
    bounds, begin = [0], 0
    for i in range(1, len(images) + 1):
        if i < len(images) and images[i] is images[i - 1]:
            continue
        if i - bounds[-1] > chunk and begin > bounds[-1]:  # run [begin, i) does not fit: close the chunk before it
            bounds.append(begin)
        begin = i
    if len(images) > bounds[-1]:
        bounds.append(len(images))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _score(model: DiagnosticModel, images: list[np.ndarray], questions: list[str], answers: list[str],
           chunk: int) -> np.ndarray:
    out = [np.asarray(model.answer_nll(images[a:b], questions[a:b], answers[a:b]), np.float64)
           for a, b in image_chunks(images, chunk)]
    return np.concatenate(out) if out else np.zeros(0)


def _atomic_parquet(rows: list[dict], columns: Sequence[str], path: Path) -> None:
    import pyarrow as pa

    table = (pa.Table.from_pylist(rows).select(list(columns)) if rows
             else pa.table({c: pa.array([], pa.string()) for c in columns}))
    write_parquet(table, path)


Triple = tuple  # (owner id, image path, question, answer[, view]); view 0 (the image as read) when absent


def triple_view(t: Triple) -> int:
    return int(t[4]) if len(t) > 4 else 0


def reference_triples(refs: Sequence[Reference], definition: LabelDefinition = DEFAULT_DEFINITION) -> list[Triple]:
    return [t for ref in refs for t in definition.triples(ref.ref_id, ref.key, ref.items)]


def distorted_triples(refs: Sequence[Reference], definition: LabelDefinition = DEFAULT_DEFINITION) -> list[Triple]:
    return [t for ref in refs for d in ref.distortions for t in definition.triples(d["dist_id"], d["abs_path"],
                                                                                     ref.items)]


def group_nlls(triples: Sequence[Triple], nll: Sequence[float]) -> dict[str, np.ndarray]:
    """Per-owner arrays of NLLs, in the order the owner's questions were listed."""
    out: dict[str, list[float]] = defaultdict(list)
    for (owner, *_), v in zip(triples, nll, strict=True):
        out[owner].append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


class LocalScorer:
    """Scores triples with one in-process model; an unreadable image becomes an error record, not a crash."""

    def __init__(self, model: DiagnosticModel, chunk: int = 32):
        self.model, self.chunk = model, chunk

    def __call__(self, triples: Sequence[Triple], errors: list[dict]) -> tuple[list[Triple], np.ndarray]:
        cache: dict[str, np.ndarray | None] = {}
        views: dict[tuple[str, int], np.ndarray] = {}
        kept = []
        for t in triples:
            path = t[1]
            if path not in cache:
                try:
                    cache[path] = read_image(path).pixels
                except MedQMReadError as e:
                    cache[path] = None
                    errors.append({"dist_id": t[0], "path": e.path, "reason": e.reason})
            if cache[path] is not None:
                kept.append(t)
                key = (path, triple_view(t))
                if key not in views:
                    views[key] = apply_view(cache[path], key[1])
        images = [views[(t[1], triple_view(t))] for t in kept]
        nll = _score(self.model, images, [t[2] for t in kept], [t[3] for t in kept], self.chunk)
        return kept, nll


def _json_floats(values) -> str:
    return json.dumps([round(float(v), 6) for v in values])


def label_rows(refs: Sequence[Reference], ref_nll: dict[str, np.ndarray], dist_nll: dict[str, np.ndarray],
               *, model: DiagnosticModel, quality_map: QualityMap, include_references: bool,
               definition: LabelDefinition = DEFAULT_DEFINITION) -> list[dict]:
    """Aggregate per-question NLLs into one label row per distorted (and reference) image."""
    rows = []
    for ref in refs:
        flat_ref = ref_nll[ref.ref_id]
        types = json.dumps([it.answer_type for it in ref.items])
        kinds = json.dumps(["kl" if definition.uses_choices(it) else "nll" for it in ref.items])
        entries = [({"dist_id": f"{ref.ref_id}__{REFERENCE_TYPE}", "type": REFERENCE_TYPE, "level": 0, "seed": 0,
                     "params": "{}", "abs_path": ref.key}, flat_ref)] if include_references else []
        entries += [(d, dist_nll[d["dist_id"]]) for d in ref.distortions if d["dist_id"] in dist_nll]
        for d, flat_dist in entries:
            per_view, nr_v, nd_v = definition.losses(ref.items, flat_ref, flat_dist)
            view_d = [float(np.mean(x)) for x in per_view]
            loss = float(np.mean(view_d))  # one view: exactly mean_j(NLL_dist − NLL_ref) under nll, as before
            nr, nd, items = nr_v.mean(axis=0), nd_v.mean(axis=0), per_view.mean(axis=0)
            rows.append({
                "dist_id": d["dist_id"], "ref_id": ref.ref_id, "case_id": ref.case_id, "modality": ref.modality,
                "type": d["type"], "level": int(d["level"]), "seed": int(d["seed"]), "n_qa": len(ref.items),
                "nll_ref": float(nr.mean()), "nll_dist": float(nd.mean()), "diag_loss": loss,
                "quality": float(quality_map(loss)), "model_id": model.model_id, "model_revision": model.revision,
                "map_center": quality_map.center, "map_scale": quality_map.scale, "path": d["abs_path"],
                "ref_path": ref.key, "params": d["params"], "answer_types": types,
                "nll_ref_items": _json_floats(nr), "nll_dist_items": _json_floats(nd),
                "loss": definition.loss, "temperature": float(definition.temperature), "views": definition.views,
                "loss_kind": kinds, "loss_items": _json_floats(items), "view_losses": _json_floats(view_d),
            })
    return rows


@dataclass
class LabelSummary:
    out: Path
    shards: int
    shards_done_before: int
    rows: int
    errors: list[dict]
    monotonicity: dict | None = None  # medqm.label.reliability.severity_monotonicity of the labels
    reliability: dict | None = None  # medqm.label.reliability.label_reliability: what reliability.json holds


_CONFIG_DEFAULTS = LEGACY_DEFINITION.to_dict()


def _config(items, refs, model, quality_map, shard_size, include_references,
            definition: LabelDefinition = DEFAULT_DEFINITION) -> dict:
    h = hashlib.sha256()
    for r in refs:
        h.update(r.ref_id.encode())
        for it in r.items:
            h.update(json.dumps(it.to_dict(), sort_keys=True).encode())
        for d in r.distortions:
            h.update(d["dist_id"].encode())
    return {"model_id": model.model_id, "model_revision": model.revision, "quality_map": quality_map.to_dict(),
            "shard_size": shard_size, "include_references": include_references, "work_sha256": h.hexdigest(),
            "n_items": len(items), "n_references": len(refs), "medqm_version": __version__,
            **definition.to_dict()}


def run_labels(
    items: Sequence[VQAItem],
    model: DiagnosticModel,
    out: str | Path,
    *,
    distorted: str | Path | None = None,
    quality_map: QualityMap = DEFAULT_MAP,
    shard_size: int = 4,
    include_references: bool = True,
    chunk: int = 32,
    progress: Callable[[int, int], None] | None = None,
    scorer: Callable | None = None,
    shards_per_call: int = 1,
    loss: str = DEFAULT_DEFINITION.loss,
    temperature: float | None = None,
    views: int = 1,
) -> LabelSummary:
    """Label every distorted image of ``distorted`` (a `medqm distort` output folder) whose reference has items.

    ``model`` supplies the scores and the identity (model_id, revision) stored with the labels; a ``scorer``
    (e.g. the Ray engine's) may score instead, ``shards_per_call`` shards at a time.
    ``progress(done_images, total_images)`` is called as shards complete. ``loss``, ``temperature`` and
    ``views`` choose the label definition (`LabelDefinition`; default kl at temperature 3, one view).
    """
    definition = LabelDefinition(loss, None if temperature is None else float(temperature), int(views))
    identity = model
    scorer = scorer or LocalScorer(model, chunk)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refs = gather_references(items, distorted, include_references=include_references)
    if not refs:
        raise ValueError("no reference image has both task items and distorted versions")
    config = _config(items, refs, identity, quality_map, shard_size, include_references, definition)
    cfg_path = out / "label_config.json"
    if cfg_path.is_file():
        old = {**_CONFIG_DEFAULTS, **json.loads(cfg_path.read_text())}
        if old != config:
            changed = sorted(k for k in config.keys() | old.keys() if old.get(k) != config.get(k))
            raise ValueError(f"{out} holds labels made with a different configuration ({', '.join(changed)}); "
                             "use another --out")
    else:
        write_json(config, cfg_path)

    shards = [refs[i : i + shard_size] for i in range(0, len(refs), shard_size)]
    per_shard = [sum(len(r.distortions) + int(include_references) for r in s) for s in shards]
    total = sum(per_shard)
    done_before = [i for i in range(len(shards)) if _shard_path(out, i).is_file()]
    done = sum(per_shard[i] for i in done_before)
    errors: list[dict] = []
    if progress:
        progress(done, total)
    pending = [i for i in range(len(shards)) if not _shard_path(out, i).is_file()]
    for start in range(0, len(pending), shards_per_call):
        block = pending[start : start + shards_per_call]
        cached = {i: _read_ref_cache(out, i) for i in block}
        triples = [t for i in block if cached[i] is None for t in reference_triples(shards[i], definition)]
        triples += [t for i in block for t in distorted_triples(shards[i], definition)]
        block_errors: list[dict] = []
        kept, nll = scorer(triples, block_errors)
        scored = group_nlls(kept, nll)
        for i in block:
            shard = shards[i]
            ref_nll = cached[i] or {r.ref_id: scored[r.ref_id] for r in shard}
            if cached[i] is None:
                _write_ref_cache(out, i, ref_nll)
            dist_ids = {d["dist_id"] for r in shard for d in r.distortions}
            rows = label_rows(shard, ref_nll, {k: v for k, v in scored.items() if k in dist_ids}, model=identity,
                              quality_map=quality_map, include_references=include_references,
                              definition=definition)
            shard_errors = [e for e in block_errors if e["dist_id"] in dist_ids]
            if shard_errors:
                write_json(shard_errors, out / "shards" / f"errors-{i:05d}.json", indent=None)
            _atomic_parquet(rows, LABEL_COLUMNS, _shard_path(out, i))
            done += per_shard[i]
            if progress:
                progress(done, total)
    table = assemble_labels(out, config)
    for p in sorted((out / "shards").glob("errors-*.json")):
        errors.extend(json.loads(p.read_text()))
    _write_errors(out, errors)
    mono = rel = None
    if table.num_rows:
        from .reliability import label_reliability

        rel = label_reliability(table.to_pandas())
        mono = rel["severity_monotonicity"]
        write_json(rel, out / "reliability.json", indent=None)
    return LabelSummary(out, len(shards), len(done_before), table.num_rows, errors, mono, rel)


def _shard_path(out: Path, i: int) -> Path:
    return out / "shards" / f"shard-{i:05d}.parquet"


def _ref_cache_path(out: Path, i: int) -> Path:
    return out / "cache" / f"refs-{i:05d}.parquet"


def _read_ref_cache(out: Path, i: int) -> dict[str, np.ndarray] | None:
    import pyarrow.parquet as pq

    path = _ref_cache_path(out, i)
    if not path.is_file():
        return None
    return {r["ref_id"]: np.asarray(json.loads(r["nll"])) for r in pq.read_table(path).to_pylist()}


def _write_ref_cache(out: Path, i: int, nll: dict[str, np.ndarray]) -> None:
    rows = [{"ref_id": k, "nll": json.dumps(v.tolist())} for k, v in sorted(nll.items())]
    _atomic_parquet(rows, ("ref_id", "nll"), _ref_cache_path(out, i))


def assemble_labels(out: Path, config: dict):
    """Concatenate the shards into ``labels.parquet`` (sorted by dist_id, configuration in the metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted((out / "shards").glob("shard-*.parquet"))]
    table = pa.concat_tables(tables) if tables else pa.table({})
    if table.num_rows:
        table = table.sort_by("dist_id")
    table = table.replace_schema_metadata({"medqm": json.dumps(config, sort_keys=True)})
    write_parquet(table, out / "labels.parquet")
    return table


def _write_errors(out: Path, errors: list[dict]) -> None:
    write_records_csv(out / "errors.csv", errors, ["dist_id", "path", "reason"])


def read_labels(out: str | Path):
    """A label set as a DataFrame; the configuration (model, quality map) is in ``df.attrs['medqm']``."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(out) / "labels.parquet")
    df = table.to_pandas()
    meta = (table.schema.metadata or {}).get(b"medqm")
    df.attrs["medqm"] = json.loads(meta) if meta else {}
    return df
