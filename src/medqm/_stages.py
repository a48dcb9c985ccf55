"""A content-addressed, resumable stage cache: the engine under `medqm demo` (`medqm.demo` is its pipeline).

A stage writes into ``OUT/<name>-<key>/``, the key being a SHA-256 (16 hex digits, `stage_key`) of everything
its output depends on. A stage that finishes writes ``stage.json`` (`STAMP`) there last; a later run that
computes the same key finds it (`read_stamp`) and reuses the folder. A folder without the stamp is an
interrupted run: the stage runs again in the same folder, ``.partial.json`` carrying the time already spent
so that the stage's total stays right. ``OUT/latest/<name>`` links (`link_latest`) give the folders of the run
that finished last stable names.

Nothing here knows the demo's stages; this module imports no stage of medqm.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medqm import __version__
from medqm._fs import file_sha256, write_json

STAMP = "stage.json"
PARTIAL = ".partial.json"
LATEST = "latest"

Log = Callable[[str], None]


@dataclass
class StageRecord:
    """One stage of a run: its folder, key, whether it was reused, and its times.

    ``seconds`` is the wall-clock time of the stage in this run (the time to check the stamp when it was
    reused); ``computed_seconds`` the time the stage took when it was computed (summed over resumed runs).
    """

    name: str
    dir: Path
    key: str
    cached: bool
    seconds: float
    computed_seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of a stage's name, the medqm version and its inputs (as sorted JSON)."""
    blob = json.dumps({"stage": stage, "medqm_version": __version__, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def folder_sha256(path: str | os.PathLike) -> str:
    """SHA-256 over every file below ``path`` (relative names and bytes), hidden files left out."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def read_stamp(folder: Path) -> dict[str, Any] | None:
    """A finished stage's record, or None (missing, unreadable, or written by a run of another key)."""
    path = folder / STAMP
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return stamp if stamp.get("key") == folder.name.rpartition("-")[2] else None


def _write(obj: Any, path: Path) -> None:
    write_json(obj, path, indent=1, default=str)


class Stage:
    """Runs one stage in its content-addressed folder, or reuses it; keeps the stage's log file.

    Args:
        out: the run's output folder; the stage's folder is ``out/<name>-<key>``.
        name: the stage's name; inputs: what its output depends on (hashed into the key, kept in the stamp).
        log: one line per stage for the user (started, resuming); the detailed log goes to ``log.txt``.
        order: the names of all stages of the pipeline, to number this one in ``log`` (``[2/5]``).
        t0: when the stage's work began (default: now), for stages that compute their inputs first.

    Use: ``if stage.done: return stage.reused()``, else ``stage.start()``, the work (calling
    ``stage.checkpoint()`` now and then), and ``return stage.finish(summary)``.
    """

    def __init__(self, out: Path, name: str, inputs: dict[str, Any], log: Log, *, order: Sequence[str] = (),
                 t0: float | None = None):
        self.name, self.inputs, self.say, self.order = name, inputs, log, tuple(order)
        self.key = stage_key(name, inputs)
        self.dir = Path(out) / f"{name}-{self.key}"
        self.stamp = read_stamp(self.dir)
        self.t0 = time.perf_counter() if t0 is None else t0
        self._previous = 0.0

    @property
    def done(self) -> bool:
        return self.stamp is not None

    def start(self) -> None:
        resuming = self.dir.is_dir() and any(self.dir.iterdir())
        self.dir.mkdir(parents=True, exist_ok=True)
        partial = self.dir / PARTIAL  # time spent by interrupted earlier runs of this stage
        if partial.is_file():
            try:
                self._previous = float(json.loads(partial.read_text())["seconds"])
            except (ValueError, KeyError, json.JSONDecodeError):
                self._previous = 0.0
        self.log(f"== {self.name} ({self.key}) medqm {__version__}")
        number = f"[{self.order.index(self.name) + 1}/{len(self.order)}] " if self.name in self.order else ""
        self.say(f"{number}{self.name} → {self.dir}" + (" (resuming an interrupted run)" if resuming else ""))

    def log(self, msg: str) -> None:
        with open(self.dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def checkpoint(self) -> None:
        """Record the time spent so far, for the stage's total should this run be interrupted."""
        _write({"seconds": self._previous + time.perf_counter() - self.t0}, self.dir / PARTIAL)

    def finish(self, summary: dict[str, Any]) -> StageRecord:
        seconds = time.perf_counter() - self.t0
        self.stamp = {"stage": self.name, "key": self.key, "medqm_version": __version__,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(self._previous + seconds, 3),
                      "inputs": self.inputs, "summary": summary}
        _write(self.stamp, self.dir / STAMP)
        (self.dir / PARTIAL).unlink(missing_ok=True)
        return StageRecord(self.name, self.dir, self.key, False, seconds, self._previous + seconds, summary)

    def reused(self) -> StageRecord:
        return StageRecord(self.name, self.dir, self.key, True, time.perf_counter() - self.t0,
                           float(self.stamp.get("seconds", 0.0)), dict(self.stamp.get("summary", {})))


def link_latest(out: Path, targets: dict[str, Path]) -> Path:
    """Point ``out/latest/<name>`` at the stage folders of the run that just finished (relative symlinks).

    Stage folders are named by their cache keys; these stable names are what the README's examples use
    (``runs/demo/latest/labels``, ``runs/demo/latest/medqm-i``, …). Each link is replaced atomically.
    """
    latest = Path(out) / LATEST
    latest.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        link = latest / name
        tmp = latest / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, latest), tmp, target_is_directory=True)
        os.replace(tmp, link)
    return latest


__all__ = ["LATEST", "PARTIAL", "STAMP", "Stage", "StageRecord", "folder_sha256", "link_latest", "read_stamp",
           "stage_key"]
