"""Diagnostic question/answer items (VQA) for reference images: task files, public-dataset readers, and
questions generated from a collection's manifest.

The one in-memory form is `VQAItem`; task files are JSONL or CSV with the same fields. Image paths in a
file are relative to the file's folder (or absolute).

Public datasets (the files themselves are not bundled; see each reader for the layout it expects):

- VQA-RAD (Lau et al., Sci. Data 2018, https://osf.io/89kps/): ``VQA_RAD Dataset Public.json`` and the
  ``VQA_RAD Image Folder``.
- SLAKE (Liu et al., ISBI 2021, https://www.med-vqa.com/slake/): ``train.json`` / ``validate.json`` /
  ``test.json`` and the ``imgs/`` folder (``imgs/xmlabNNN/source.jpg``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medqm._fs import atomic_path
from medqm.synth.quadrants import QUADRANTS, image_quadrant


@dataclass
class VQAItem:
    """One question about one image with its correct answer.

    ``choices`` is the closed answer set when there is one (used to measure accuracy: the answer the model
    finds most likely among them); ``answer_type`` is e.g. 'modality', 'body_part', 'plane',
    'lesion_present', 'lesion_quadrant', or VQA-RAD's / SLAKE's 'CLOSED'/'OPEN'. ``meta`` holds the source's
    extra annotations (VQA-RAD's question_type, SLAKE's content_type, ...) as JSON-able values.
    """

    image: str
    question: str
    answer: str
    case_id: str
    answer_type: str | None = None
    image_id: str | None = None
    modality: str | None = None
    choices: list[str] | None = field(default=None)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["meta"]:  # items without meta serialise (and fingerprint) as before the field existed
            del d["meta"]
        return d


FIELDS = tuple(f.name for f in fields(VQAItem))
REQUIRED_FIELDS = ("image", "question", "answer", "case_id")
CHOICE_SEP = "|"


class TaskFileError(ValueError):
    """A task or dataset file that cannot be read as VQA items; ``problems`` lists (line, message)."""

    def __init__(self, path: str | Path, problems: Sequence[tuple[int | None, str]]):
        self.path = str(path)
        self.problems = list(problems)
        shown = [f"  line {ln}: {msg}" if ln is not None else f"  {msg}" for ln, msg in self.problems[:20]]
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n" + "\n".join(shown) + more)


# ---------------------------------------------------------------------------------------------------------
# task files


def _blank(v) -> bool:
    return v is None or str(v).strip() == ""


def _parse_choices(value) -> list[str] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return [c.strip() for c in value.split(CHOICE_SEP) if c.strip()]
    if isinstance(value, (list, tuple)):
        return [str(c) for c in value]
    raise ValueError(f"choices must be a list or a '{CHOICE_SEP}'-separated string, got {type(value).__name__}")


def _item_from_record(rec: dict, folder: Path) -> tuple[VQAItem | None, list[str]]:
    """Validate one record; returns the item (or None) and the problems found."""
    problems = []
    unknown = sorted(set(rec) - set(FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    missing = [k for k in REQUIRED_FIELDS if rec.get(k) is None or (k != "answer" and _blank(rec.get(k)))]
    if missing:
        problems.append(f"missing field(s) {missing}")
    if "answer" not in missing and _blank(rec.get("answer")):
        problems.append("empty answer")
    try:
        choices = _parse_choices(rec.get("choices"))
    except ValueError as e:
        problems.append(str(e))
        choices = None
    meta = rec.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as e:
            problems.append(f"meta is not a JSON object ({e.msg})")
            meta = {}
    if not isinstance(meta, dict):
        problems.append(f"meta must be a JSON object, got {type(meta).__name__}")
        meta = {}
    if problems:
        return None, problems
    answer = str(rec["answer"]).strip()
    if choices is not None and answer not in choices:
        return None, [f"answer {answer!r} is not among choices {choices}"]

    def opt(k):
        return None if _blank(rec.get(k)) else str(rec[k]).strip()

    image = Path(str(rec["image"]).strip())
    image = (image if image.is_absolute() else folder / image).resolve()
    return VQAItem(str(image), str(rec["question"]).strip(), answer, str(rec["case_id"]).strip(), opt("answer_type"),
                   opt("image_id"), opt("modality"), choices, meta), []


def _records(path: Path) -> Iterable[tuple[int, dict | None, str | None]]:
    """(line number, record or None, parse error or None) for every non-blank record of a JSONL/CSV file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield ln, None, f"not valid JSON ({e.msg} at column {e.colno})"
                    continue
                if not isinstance(rec, dict):
                    yield ln, None, f"expected a JSON object, got {type(rec).__name__}"
                    continue
                yield ln, rec, None
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return
            ln = reader.line_num
            for row in reader:
                start, ln = ln + 1, reader.line_num  # a quoted field may span lines: report where the row starts
                if None in row:
                    yield start, None, f"more values than the {len(reader.fieldnames)} header columns"
                    continue
                if not any((v or "").strip() for v in row.values()):
                    continue
                yield start, {k: v for k, v in row.items() if k is not None}, None
    else:
        raise TaskFileError(path, [(None, f"unknown task file type {suffix!r}; use .jsonl or .csv")])


def read_tasks(path: str | Path, *, check_images: bool = True) -> list[VQAItem]:
    """Read a JSONL or CSV task file into `VQAItem`s.

    Fields are `VQAItem`'s; ``image``, ``question``, ``answer`` and ``case_id`` are required and non-empty.
    ``choices`` is a JSON list (JSONL) or a '|'-separated string (CSV); ``meta`` a JSON object (a JSON string
    in CSV). Relative image paths are resolved against the file's folder and returned absolute.

    Raises:
        TaskFileError: naming the file and each offending line (missing fields, empty answer, an answer not
            among its choices, unknown fields, bad JSON), or listing every image file that does not exist
            when ``check_images``.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(path, [(None, "no such file")])
    folder = path.resolve().parent
    items, problems, lines = [], [], []
    for ln, rec, err in _records(path):
        if err:
            problems.append((ln, err))
            continue
        item, probs = _item_from_record(rec, folder)
        problems += [(ln, p) for p in probs]
        if item is not None:
            items.append(item)
            lines.append(ln)
    if problems:
        raise TaskFileError(path, problems)
    if check_images:
        missing = [(ln, f"image file not found: {it.image}")
                   for ln, it in zip(lines, items, strict=True) if not Path(it.image).is_file()]
        if missing:
            raise TaskFileError(path, missing)
    return items


def _relative_image(image: str, folder: Path) -> str:
    p = Path(image).resolve()
    try:
        return p.relative_to(folder).as_posix()
    except ValueError:
        return str(p)


def write_tasks(items: Iterable[VQAItem], path: str | Path) -> Path:
    """Write items as JSONL (``.jsonl``) or CSV (``.csv``); image paths inside the file's folder are written
    relative to it, others absolute. Returns the path. `read_tasks` reads the file back to equal items."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise ValueError(f"task file must end in .jsonl or .csv, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    recs = []
    for it in items:
        d = asdict(it)
        d["image"] = _relative_image(it.image, folder)
        recs.append(d)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        if suffix == ".csv":
            wr = csv.DictWriter(f, fieldnames=list(FIELDS))
            wr.writeheader()
            for d in recs:
                if d["choices"] and any(CHOICE_SEP in c for c in d["choices"]):
                    raise ValueError(f"a choice contains {CHOICE_SEP!r}, which CSV task files use as separator: "
                                     f"{d['choices']}")
                d["choices"] = CHOICE_SEP.join(d["choices"]) if d["choices"] else ""
                d["meta"] = json.dumps(d["meta"], ensure_ascii=False, sort_keys=True) if d["meta"] else ""
                wr.writerow({k: ("" if v is None else v) for k, v in d.items()})
        else:
            for d in recs:
                if not d["meta"]:
                    del d["meta"]
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# public datasets

YES_NO = ["yes", "no"]
_YES_NO_ZH = ["是", "否"]


def _load_json_list(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskFileError(path, [(None, "no such file")])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskFileError(path, [(e.lineno, f"not valid JSON ({e.msg})")]) from e
    if not isinstance(data, list):
        raise TaskFileError(path, [(None, f"expected a JSON list of question entries, got {type(data).__name__}")])
    return data


def _closed_answer(answer: str, answer_type: str, yes_no: list[str]) -> tuple[str, list[str] | None]:
    """Closed yes/no answers are normalised to lower case and get ``yes_no`` as choices."""
    a = answer.strip()
    if answer_type == "CLOSED" and a.lower() in yes_no:
        return a.lower(), list(yes_no)
    return a, None


def _finish(path: Path, items: list[VQAItem], problems: list, check_images: bool) -> list[VQAItem]:
    if problems:
        raise TaskFileError(path, problems)
    if check_images:
        missing = sorted({it.image for it in items if not Path(it.image).is_file()})
        if missing:
            raise TaskFileError(path, [(None, f"image file not found: {m}") for m in missing])
    return items


def read_vqa_rad(json_path: str | Path, image_dir: str | Path, *, check_images: bool = True) -> list[VQAItem]:
    """Read VQA-RAD's ``VQA_RAD Dataset Public.json`` (a JSON list; each entry has ``qid``, ``image_name``,
    ``question``, ``answer``, ``answer_type`` 'CLOSED'/'OPEN', ``question_type``, ``image_organ``,
    ``phrase_type``, ...) with images in ``image_dir`` (the ``VQA_RAD Image Folder``).

    ``case_id`` is the image name: VQA-RAD publishes no patient id, and its 315 images are, with few
    exceptions, one per MedPix case (``image_case_url``), so the image is the best available grouping unit
    (keep all questions of an image, free-form and paraphrased, in one split). Closed yes/no answers are
    lower-cased and get choices ['yes', 'no']; other answers are kept as written (stripped). ``modality`` is
    left empty (VQA-RAD does not record it per image). ``meta`` keeps question_type, image_organ,
    phrase_type, qid_linked_id and image_case_url; ``answer_type`` is 'CLOSED' or 'OPEN'.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    items, problems = [], []
    for i, e in enumerate(_load_json_list(json_path), start=1):
        where = f"entry {i}" + (f" (qid {e.get('qid')})" if isinstance(e, dict) and "qid" in e else "")
        if not isinstance(e, dict):
            problems.append((None, f"{where}: expected an object"))
            continue
        missing = [k for k in ("image_name", "question", "answer", "answer_type") if _blank(e.get(k))]
        if missing:
            problems.append((None, f"{where}: missing field(s) {missing}"))
            continue
        atype = str(e["answer_type"]).strip().upper()
        answer, choices = _closed_answer(str(e["answer"]), atype, YES_NO)
        name = str(e["image_name"]).strip()
        meta = {k: e[k] for k in ("qid", "question_type", "image_organ", "phrase_type", "qid_linked_id",
                                  "image_case_url")
                if e.get(k) not in (None, "", "NULL")}
        items.append(VQAItem(str((image_dir / name).resolve()), str(e["question"]).strip(), answer, name, atype,
                             name, None, choices, meta))
    return _finish(json_path, items, problems, check_images)


_SLAKE_MODALITY = {"CT": "CT", "MRI": "MR", "X-RAY": "XR", "XRAY": "XR"}


def read_slake(json_path: str | Path, image_dir: str | Path, lang: str | None = "en", *,
               check_images: bool = True) -> list[VQAItem]:
    """Read a SLAKE split (``train.json``, ``validate.json`` or ``test.json``: a JSON list; each entry has
    ``img_id``, ``img_name`` like 'xmlab102/source.jpg', ``question``, ``answer``, ``q_lang`` 'en'/'zh',
    ``location``, ``modality`` 'CT'/'MRI'/'X-Ray', ``answer_type`` 'CLOSED'/'OPEN', ``base_type``,
    ``content_type``, ``triple``, ``qid``) with images under ``image_dir`` (SLAKE's ``imgs/``).

    Only questions in ``lang`` are kept (None keeps both languages). ``case_id`` is the image's folder
    (``xmlabNNN``: one folder per image with its masks, SLAKE's unit of grouping). Closed yes/no answers
    get choices ['yes', 'no'] (['是', '否'] for Chinese); ``modality`` is mapped to MedQM's codes (CT, MR,
    XR); ``meta`` keeps qid, img_id, q_lang, location, content_type and base_type.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    if lang not in (None, "en", "zh"):
        raise ValueError(f"lang must be 'en', 'zh' or None (both), got {lang!r}")
    items, problems = [], []
    for i, e in enumerate(_load_json_list(json_path), start=1):
        where = f"entry {i}" + (f" (qid {e.get('qid')})" if isinstance(e, dict) and "qid" in e else "")
        if not isinstance(e, dict):
            problems.append((None, f"{where}: expected an object"))
            continue
        q_lang = str(e.get("q_lang", "")).strip()
        if lang is not None and q_lang != lang:
            continue
        missing = [k for k in ("img_name", "question", "answer", "answer_type") if _blank(e.get(k))]
        if missing:
            problems.append((None, f"{where}: missing field(s) {missing}"))
            continue
        atype = str(e["answer_type"]).strip().upper()
        answer, choices = _closed_answer(str(e["answer"]), atype, _YES_NO_ZH if q_lang == "zh" else YES_NO)
        name = str(e["img_name"]).strip()
        case = Path(name).parts[0] if len(Path(name).parts) > 1 else Path(name).stem
        mod = _SLAKE_MODALITY.get(str(e.get("modality", "")).strip().upper())
        meta = {k: e[k] for k in ("qid", "img_id", "q_lang", "location", "content_type", "base_type")
                if not _blank(e.get(k))}
        items.append(VQAItem(str((image_dir / name).resolve()), str(e["question"]).strip(), answer, case, atype,
                             str(e.get("img_id", case)), mod, choices, meta))
    return _finish(json_path, items, problems, check_images)


# ---------------------------------------------------------------------------------------------------------
# questions from a collection's manifest

QUESTION_TEMPLATES = {
    "modality": "What imaging modality is this?",
    "body_part": "Which part of the body is shown in this image?",
    "plane": "In which plane is this image?",
    "view": "Is this an AP or PA view?",  # radiographs; answer_type 'plane'
    "lesion_present": "Is there a lesion in this image?",
    "lesion_quadrant": "In which quadrant of the image is the lesion?",
    # images whose manifest `finding` is 'tumour' (Br35H brain MR): answer_type 'tumour', choices YES_NO, asked
    # instead of the two lesion questions
    "tumour": "Is there a tumour in this brain MR image?",
}
MODALITY_WORDS = {
    "CT": "CT",
    "MR": "MRI",
    "XR": "X-ray",
    "US": "ultrasound",
    "NM": "nuclear medicine",
    "PATH": "histopathology",
    "FUNDUS": "fundus photograph",
    "PT": "PET",
    "MG": "mammography",
}
BODY_PART_SYNONYMS = {"brain": "head"}  # an MR of the brain and a CT of the head answer alike
PLANES = ["axial", "coronal", "sagittal"]
VIEWS = ["AP", "PA"]
ANSWER_TYPES = ("modality", "body_part", "plane", "lesion_present", "lesion_quadrant", "tumour")


def mask_quadrant(mask) -> str | None:
    """`image_quadrant` of a mask's centroid (pixels > 0); None for an empty mask."""
    import numpy as np

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    rr, cc = np.nonzero(m > 0)
    if rr.size == 0:
        return None
    return image_quadrant(float(rr.mean()), float(cc.mean()), m.shape)


def _lesion_flag(v) -> int | None:
    s = str(v).strip()
    if s in ("1", "1.0", "True", "true"):
        return 1
    if s in ("0", "0.0", "False", "false"):
        return 0
    return None  # empty / NaN / anything else: unknown


def _body_part(v) -> str | None:
    s = str(v).strip().lower()
    if s in ("", "nan", "none"):
        return None
    return BODY_PART_SYNONYMS.get(s, s)


def _as_manifest(collection):
    """One DataFrame with ``abs_path`` and ``abs_mask`` from a root, a list of roots, or a DataFrame."""
    import pandas as pd

    from medqm.io.collection import load_manifest

    if isinstance(collection, pd.DataFrame):
        df = collection.copy()
        if "abs_path" not in df:
            if "root" not in df:
                raise ValueError("a manifest DataFrame needs an 'abs_path' column (load_manifest adds it) "
                                 "or a 'root' column")
            df["abs_path"] = [str(Path(r) / p) for r, p in zip(df["root"], df["path"], strict=True)]
        if "root" not in df:
            roots = []  # abs_path = root / path, so the root is abs_path less path's parts
            for a, p in zip(df["abs_path"], df["path"], strict=True):
                a, p = Path(a), Path(str(p))
                tail = len(p.parts)
                roots.append(str(Path(*a.parts[:-tail])) if a.parts[-tail:] == p.parts else str(a.parent))
            df["root"] = roots
    else:
        roots = [collection] if isinstance(collection, (str, os.PathLike)) else list(collection)
        parts = []
        for r in roots:
            d = load_manifest(r)
            d["root"] = str(r)
            parts.append(d)
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    df["abs_path"] = [str(Path(p).resolve()) for p in df["abs_path"]]
    if "mask" in df:
        df["abs_mask"] = [str((Path(r) / str(m).strip()).resolve()) if str(m).strip() not in ("", "nan") else ""
                          for r, m in zip(df["root"], df["mask"], strict=True)]
    else:
        df["abs_mask"] = ""
    return df.reset_index(drop=True)


def demo_questions(collection, *, lesions: bool = True) -> list[VQAItem]:
    """Diagnostic questions for every image of one or more collections, from their manifests and masks.

    ``collection`` is a collection folder (with ``manifest.csv``), a list of them (e.g. ``data/demo`` and a
    lesion set from `medqm.synth.make_lesion_set`), or a manifest DataFrame (``load_manifest``'s,
    or several concatenated; needs ``abs_path``). Per image, in this order (answer_type: question):

    - ``modality``: "What imaging modality is this?" — always; answer in words (`MODALITY_WORDS`: 'CT',
      'MRI', 'X-ray', 'ultrasound', 'nuclear medicine', 'histopathology', 'fundus photograph'); choices:
      the words of every modality present in the collections.
    - ``body_part``: "Which part of the body is shown in this image?" — when the manifest names one;
      lower-case manifest words, 'brain' folded into 'head' (`BODY_PART_SYNONYMS`, so no two choices are
      both right); choices: every body part present in the collections. All body parts, not those of the
      image's modality, because several modalities have a single one (fundus: eye; NM: whole body; PATH:
      colon), which would make the question a one-choice giveaway.
    - ``plane``: "In which plane is this image?" — for axial/coronal/sagittal images; choices `PLANES`.
      Radiographs (XR) with a projection get "Is this an AP or PA view?" (choices `VIEWS`), also typed
      'plane'.
    - ``lesion_present``: "Is there a lesion in this image?" — only when ``lesion`` is 1 or 0 (empty means
      unknown: nothing is asked); choices ['yes', 'no'].
    - ``lesion_quadrant``: "In which quadrant of the image is the lesion?" — lesion 1 with a non-empty mask;
      the quadrant (`QUADRANTS`) of the mask's centroid in image coordinates (`image_quadrant`).
    - ``tumour``: "Is there a tumour in this brain MR image?" — instead of the two lesion questions, right after
      the modality question, when the manifest's optional ``finding`` column reads ``tumour`` (Br35H) and
      ``lesion`` is 1 or 0; choices ['yes', 'no'].

    ``lesions=False`` leaves out the two lesion questions. Output order follows the manifest rows, so the
    result is deterministic.
    """
    import numpy as np
    from PIL import Image

    df = _as_manifest(collection)
    if df.empty:
        return []
    mods_present = [m for m in MODALITY_WORDS if m in set(df["modality"].astype(str))]
    mods_present += sorted(set(df["modality"].astype(str)) - set(MODALITY_WORDS))
    mod_choices = [MODALITY_WORDS.get(m, m) for m in mods_present]
    parts = sorted({p for p in (_body_part(v) for v in df.get("body_part", [])) if p})
    items: list[VQAItem] = []
    for row in df.to_dict("records"):
        mod = str(row["modality"])
        base = dict(image=str(row["abs_path"]), case_id=str(row["case_id"]), image_id=str(row["id"]), modality=mod)
        items.append(VQAItem(question=QUESTION_TEMPLATES["modality"], answer=MODALITY_WORDS.get(mod, mod),
                             answer_type="modality", choices=list(mod_choices), **base))
        flag = _lesion_flag(row.get("lesion", ""))
        tumour = str(row.get("finding", "")).strip().lower() == "tumour"
        if tumour and lesions and flag is not None:
            items.append(VQAItem(question=QUESTION_TEMPLATES["tumour"], answer=YES_NO[1 - flag],
                                 answer_type="tumour", choices=list(YES_NO), **base))
        part = _body_part(row.get("body_part", ""))
        if part:
            items.append(VQAItem(question=QUESTION_TEMPLATES["body_part"], answer=part, answer_type="body_part",
                                 choices=list(parts), **base))
        plane = str(row.get("plane", "")).strip()
        if plane.lower() in PLANES:
            items.append(VQAItem(question=QUESTION_TEMPLATES["plane"], answer=plane.lower(), answer_type="plane",
                                 choices=list(PLANES), **base))
        elif mod in ("XR", "CR", "DX") and plane.upper() in VIEWS:  # radiographs, whichever code the manifest uses
            items.append(VQAItem(question=QUESTION_TEMPLATES["view"], answer=plane.upper(), answer_type="plane",
                                 choices=list(VIEWS), **base))
        if not lesions or tumour or flag is None:
            continue
        items.append(VQAItem(question=QUESTION_TEMPLATES["lesion_present"], answer=YES_NO[1 - flag],
                             answer_type="lesion_present", choices=list(YES_NO), **base))
        if flag == 1 and row["abs_mask"]:
            mpath = Path(row["abs_mask"])
            if not mpath.is_file():
                raise FileNotFoundError(f"mask of {row['id']} not found: {mpath}")
            quad = mask_quadrant(np.asarray(Image.open(mpath)))
            if quad is not None:
                items.append(VQAItem(question=QUESTION_TEMPLATES["lesion_quadrant"], answer=quad,
                                     answer_type="lesion_quadrant", choices=list(QUADRANTS), **base))
    return items


__all__ = [
    "ANSWER_TYPES",
    "BODY_PART_SYNONYMS",
    "MODALITY_WORDS",
    "PLANES",
    "QUADRANTS",
    "QUESTION_TEMPLATES",
    "VIEWS",
    "YES_NO",
    "TaskFileError",
    "VQAItem",
    "demo_questions",
    "image_quadrant",
    "mask_quadrant",
    "read_slake",
    "read_tasks",
    "read_vqa_rad",
    "write_tasks",
]
