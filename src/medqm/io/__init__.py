"""Readers: any medical image file → `MedImage` (float32 display pixels in [0, 1] plus metadata)."""

from ._image import (
    DEFAULT_MAX_PIXELS,
    MODALITIES,
    MedImage,
    MedQMReadError,
    MedQMUnsupportedFormatError,
    ReadFailure,
    canonical_modality,
    modality_family,
)
from ._reader import FORMATS, iter_images, read_image, read_images, sniff_format, walk_image_files
from ._resize import resize_pad
from ._volume import AXIS_NAMES, read_volume_slices
from ._window import WINDOW_PRESETS, apply_window

__all__ = [
    "MedImage",
    "MedQMReadError",
    "MedQMUnsupportedFormatError",
    "ReadFailure",
    "MODALITIES",
    "canonical_modality",
    "modality_family",
    "read_image",
    "read_images",
    "iter_images",
    "walk_image_files",
    "sniff_format",
    "read_volume_slices",
    "resize_pad",
    "apply_window",
    "WINDOW_PRESETS",
    "AXIS_NAMES",
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
]
