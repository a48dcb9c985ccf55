"""Writing a collection folder: 256×256 PNGs, masks, ``manifest.csv``, ``LICENSES.md`` and a build stamp.

The layout is the one of ``data/demo`` (see its README), so every stage reads a built collection as it reads
the bundled one. Files are written atomically; the manifest and the stamp come last, so a folder without
a stamp is an interrupted build that a rerun completes (images already written are kept).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medqm._fs import atomic_path, write_json, write_records_csv, write_text

SIZE = 256
STAMP = "build.json"
MANIFEST_COLUMNS = (
    "id", "case_id", "modality", "body_part", "plane", "source_package", "source_version", "source_file",
    "index", "licence", "lesion", "finding", "mask", "path", "width_orig", "height_orig", "pixel_spacing_mm",
)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Display pixels in [0, 1] (float) → uint8; uint8 input is returned as it is."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(np.round(np.asarray(pixels, np.float32) * 255.0), 0, 255).astype(np.uint8)


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Lossless 8-bit PNG (mode L for H×W, RGB for H×W×3), written atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(pixels)).save(tmp, format="PNG", optimize=True)


def read_stamp(out: str | Path) -> dict | None:
    path = Path(out) / STAMP
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class CollectionWriter:
    """Collects manifest rows while images are written; `finish` writes the manifest, licences and stamp."""

    def __init__(self, out: str | Path, columns: tuple[str, ...] = MANIFEST_COLUMNS):
        self.out = Path(out)
        self.columns = tuple(columns)
        self.rows: list[dict[str, str]] = []
        self._seen: set[str] = set()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / STAMP).unlink(missing_ok=True)  # the folder is incomplete until finish()

    def add(self, row: dict, pixels: np.ndarray, mask: np.ndarray | None = None) -> dict:
        """Write the 256×256 image (and its mask) of one manifest row; fills in ``path`` and ``mask``."""
        if pixels.shape[:2] != (SIZE, SIZE):
            raise ValueError(f"{row['id']}: images must be {SIZE}×{SIZE}, got {pixels.shape[:2]}")
        row = {k: "" if v is None else str(v) for k, v in row.items()}
        if row["id"] in self._seen:
            raise ValueError(f"duplicate image id {row['id']!r}")
        rel = Path("images") / row["modality"] / f"{row['id']}.png"
        if not (self.out / rel).is_file():
            save_png(pixels, self.out / rel)
        row["path"] = rel.as_posix()
        if mask is not None:
            mrel = Path("masks") / f"{row['id']}.png"
            if not (self.out / mrel).is_file():
                save_png(np.where(mask, 255, 0).astype(np.uint8), self.out / mrel)
            row["mask"] = mrel.as_posix()
        self._seen.add(row["id"])
        self.rows.append(row)
        return row

    def write_text(self, name: str, text: str) -> Path:
        return write_text(text, self.out / name)

    def write_json(self, name: str, obj) -> Path:
        return write_json(obj, self.out / name, sort_keys=True, default=str)

    def finish(self, stamp: dict) -> Path:
        """Remove files of images no longer in the manifest, write ``manifest.csv`` and the stamp."""
        keep = {r["path"] for r in self.rows} | {r["mask"] for r in self.rows if r.get("mask")}
        for sub in ("images", "masks"):
            for f in sorted((self.out / sub).rglob("*.png")) if (self.out / sub).is_dir() else []:
                if f.relative_to(self.out).as_posix() not in keep:
                    f.unlink()
        write_records_csv(self.out / "manifest.csv", self.rows, self.columns)
        self.write_json(STAMP, stamp)
        return self.out


__all__ = ["CollectionWriter", "MANIFEST_COLUMNS", "SIZE", "STAMP", "read_stamp", "save_png", "to_uint8"]
