"""Crash-safe file writing shared by the stages: a file exists complete or not at all."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir(name: str) -> Path:
    """``$MEDQM_CACHE/<name>``, else ``~/.cache/medqm/<name>``: the one root of MedQM's machine-wide caches."""
    root = os.environ.get("MEDQM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "medqm") / name


def write_parquet(table, path: str | Path) -> Path:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) atomically: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(obj, path: str | Path, *, indent: int | None = 2, sort_keys: bool = False, default=None,
               allow_nan: bool = True, ensure_ascii: bool = True) -> Path:
    """Write ``obj`` as JSON (UTF-8, one trailing newline) atomically; the keywords are `json.dumps`'s."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, allow_nan=allow_nan,
                      ensure_ascii=ensure_ascii)
    return write_text(text + "\n", path)


def write_records_csv(path: str | Path, rows: Sequence[dict], fieldnames: Sequence[str]) -> None:
    """Write ``rows`` as CSV, or remove the file when there are none (a rerun that fixed everything)."""
    path = Path(path)
    if not rows:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
