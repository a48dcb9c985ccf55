"""The one in-memory image type every MedQM stage consumes, and the reader's error types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_PIXELS = 2**26  # ~67 M pixels per 2D image (8192²): refuses decompression bombs before decoding

# Canonical modality names. DICOM codes map onto them; non-DICOM files get one from the caller.
# The projection X-ray codes CR, DX, XA (angiography) and RF (fluoroscopy) stay distinct, like MG: users and
# per-modality thresholds tell them apart. Distortions choose by family (`modality_family`: all four → XR).
MODALITIES = ("CT", "MR", "XR", "US", "NM", "PT", "MG", "PATH", "FUNDUS", "OT", "CR", "DX", "XA", "RF")

# Modality → the family whose physics (and so whose distortion types) it shares.
_FAMILY = {"CR": "XR", "DX": "XR", "XA": "XR", "RF": "XR"}

_DICOM_TO_CANONICAL = {
    "CT": "CT",
    "MR": "MR",
    "CR": "CR",
    "DX": "DX",
    "DR": "XR",
    "RF": "RF",
    "XA": "XA",
    "PX": "XR",
    "IO": "XR",
    "US": "US",
    "IVUS": "US",
    "NM": "NM",
    "PT": "PT",
    "MG": "MG",
    "SM": "PATH",
    "GM": "PATH",
    "OP": "FUNDUS",
    "XC": "OT",
    "OT": "OT",
    "SC": "OT",
}

_ALIASES = {
    "XRAY": "XR",
    "X-RAY": "XR",
    "CXR": "XR",
    "HISTO": "PATH",
    "HISTOPATHOLOGY": "PATH",
    "PATHOLOGY": "PATH",
    "WSI": "PATH",
    "RETINA": "FUNDUS",
    "ULTRASOUND": "US",
    "MRI": "MR",
    "PET": "PT",
}


def canonical_modality(code: str | None) -> str | None:
    """Map a DICOM modality code or a common alias ('MRI', 'x-ray', 'SM') to MedQM's canonical name."""
    if code is None:
        return None
    key = str(code).strip().upper()
    if not key:
        return None
    if key in MODALITIES:
        return key
    if key in _DICOM_TO_CANONICAL:
        return _DICOM_TO_CANONICAL[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown modality {code!r}; expected one of {', '.join(MODALITIES)} or a DICOM modality code")


def modality_family(modality: str | None) -> str | None:
    """The modality whose artifacts apply to ``modality``: XR for CR, DX, XA and RF; the modality itself otherwise.

    For choosing distortion types, lesion models and fallback thresholds; `MedImage.modality` keeps the code.
    """
    if modality is None:
        return None
    return _FAMILY.get(modality, modality)


class MedQMReadError(Exception):
    """A file could not be turned into a MedImage. Carries the file and a human-readable reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep picklable across process pools
        return (type(self), (self.path, self.reason))


class MedQMUnsupportedFormatError(MedQMReadError):
    """The file is not an image format MedQM reads at all (judged from its content, whatever its suffix).

    A subclass of `MedQMReadError`, so callers that catch that still catch it; the quality gate answers
    415 ``unsupported_format`` for it, and 422 for files of a known format that cannot be decoded.
    """


@dataclass(frozen=True)
class ReadFailure:
    """Record yielded by `iter_images` for a file that failed, so batches go on."""

    path: str
    reason: str

    @classmethod
    def from_error(cls, err: MedQMReadError) -> ReadFailure:
        return cls(err.path, err.reason)


@dataclass
class MedImage:
    """A 2D medical image ready for display-space processing.

    ``pixels`` is float32 in [0, 1]: H×W for grayscale, H×W×3 for colour. It is the *display* image
    (after rescale, windowing/VOI and MONOCHROME1 inversion) because that is what an MLLM sees.
    ``value_range`` is the (min, max) of the stored values in their own units (HU after rescale for CT)
    and ``bits_stored`` the original bit depth, so nothing about the source is lost from the record.
    """

    pixels: np.ndarray
    path: str
    modality: str | None = None
    body_part: str | None = None
    photometric: str = "MONOCHROME2"
    bits_stored: int = 8
    value_range: tuple[float, float] = (0.0, 1.0)
    window: tuple[float, float] | None = None
    spacing: tuple[float, float] | None = None
    index: int | None = None
    case_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.dtype != np.float32:
            raise TypeError(f"{self.path}: MedImage.pixels must be a float32 ndarray, "
                            f"got {type(p).__name__} {getattr(p, 'dtype', '')}")
        if not (p.ndim == 2 or (p.ndim == 3 and p.shape[2] == 3)):
            raise ValueError(f"{self.path}: MedImage.pixels must be H×W or H×W×3, got shape {p.shape}")

    @property
    def is_color(self) -> bool:
        return self.pixels.ndim == 3

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape[:2]

    @property
    def id(self) -> str:
        """A readable identifier: file name plus frame/slice index when the file holds several."""
        name = Path(self.path).name
        return name if self.index is None else f"{name}#{self.index}"

    def to_uint8(self) -> np.ndarray:
        return np.round(self.pixels * 255.0).astype(np.uint8)

    def summary(self) -> dict[str, Any]:
        """Metadata as plain JSON-able values (no pixels, no patient identifiers)."""
        return {
            "path": self.path,
            "index": self.index,
            "case_id": self.case_id,
            "modality": self.modality,
            "body_part": self.body_part,
            "photometric": self.photometric,
            "bits_stored": self.bits_stored,
            "value_range": list(self.value_range),
            "window": list(self.window) if self.window else None,
            "spacing": list(self.spacing) if self.spacing else None,
            "height": int(self.shape[0]),
            "width": int(self.shape[1]),
            "channels": 3 if self.is_color else 1,
        }
