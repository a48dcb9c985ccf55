"""The description of a buildable dataset (kept apart so that builders import it without a cycle)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._fetch import Archive
from ._writer import CollectionWriter

Log = Callable[[str], None]


@dataclass(frozen=True)
class Dataset:
    """A buildable collection: its archives, its builder and the builder's version.

    ``build(writer, sources, log)`` writes every image through ``writer`` (rows via ``writer.add``, extra
    files via ``writer.write_text`` / ``write_json``, including ``LICENSES.md``), given the local path of each
    archive by package name, and returns a dict of figures that goes into the stamp. Bump ``version`` when
    the output of the builder changes.
    """

    name: str
    description: str
    archives: tuple[Archive, ...]
    build: Callable[[CollectionWriter, dict[str, Path], Log], dict]
    version: str = "1"


