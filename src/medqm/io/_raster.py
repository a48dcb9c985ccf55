"""PNG / JPEG / JPEG 2000 / BMP (Pillow), TIFF (tifffile) and .npy → MedImage.

Integer images are scaled by their type's full range (8-bit /255, 16-bit /65535) so a 16-bit file keeps
all its levels and its meaning; floats already in [0, 1] are kept, other floats are windowed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ._image import MedImage, MedQMReadError, canonical_modality
from ._window import Window, apply_window, resolve_window


def _check_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise MedQMReadError(path, f"image declares an empty size ({width}×{height})")
    if height * width > max_pixels:
        raise MedQMReadError(path, f"image of {width}×{height} pixels exceeds the limit of {max_pixels} pixels")


def _pillow_array(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, on big images; our own limit (checked on the header) decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            with im:
                width, height = im.size
                _check_pixels(path, height, width, max_pixels)
                im.load()
                mode = im.mode
                if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                    return np.asarray(im, dtype=np.uint16)
                if mode == "I":  # 16-bit PNGs may open as 32-bit integers holding 16-bit values
                    arr = np.asarray(im)
                    return arr.astype(np.uint16) if 0 <= arr.min() and arr.max() <= 65535 else arr
                if mode == "F":
                    return np.asarray(im, dtype=np.float32)
                if mode in ("1", "L", "LA"):
                    return np.asarray(im.convert("L"), dtype=np.uint8)
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except MedQMReadError:
        raise
    except Exception as e:
        raise MedQMReadError(path, f"unreadable image ({type(e).__name__}: {e})") from e


def _tiff_array(path: Path, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape = page.shape
            axes = page.axes
            height = shape[axes.index("Y")] if "Y" in axes else shape[0]
            width = shape[axes.index("X")] if "X" in axes else shape[1]
            _check_pixels(path, int(height), int(width), max_pixels)
            arr = page.asarray()
    except MedQMReadError:
        raise
    except Exception as e:
        # tifffile needs imagecodecs for JPEG-compressed tiles (e.g. Aperio SVS); Pillow decodes many of those
        try:
            return _pillow_array(path, max_pixels)
        except MedQMReadError:
            raise MedQMReadError(path, f"unreadable TIFF ({type(e).__name__}: {e})") from e
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # planar (C, H, W)
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _npy_array(path: Path, max_pixels: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise MedQMReadError(path, f"unreadable .npy ({type(e).__name__}: {e})") from e
    if arr.ndim < 2:
        raise MedQMReadError(path, f".npy array of shape {arr.shape} is not an image")
    _check_pixels(path, int(arr.shape[0]), int(arr.shape[1]), max_pixels)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise MedQMReadError(path, f".npy of dtype {arr.dtype} is not a real-valued image")
    return np.array(arr)


def _to_unit(arr: np.ndarray, path: Path, window: Window, modality: str | None, body_part: str | None):
    """Array of any supported layout/dtype → (pixels float32 in [0,1], bits, value range, window used)."""
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # drop alpha
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise MedQMReadError(path, f"array of shape {arr.shape} is neither H×W nor H×W×3")
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0]  # grey stored as RGB (common for exported X-rays)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.size == 0:
        raise MedQMReadError(path, "image has no pixels")
    value_range = (float(arr.min()), float(arr.max()))
    if not all(np.isfinite(value_range)):
        raise MedQMReadError(path, "pixel data contains NaN or infinite values")

    chosen = resolve_window(window, modality=modality, body_part=body_part)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        bits = info.bits
        if chosen is None:
            if info.min < 0:
                chosen = "minmax"
            else:
                return (arr.astype(np.float32) / np.float32(info.max)), bits, value_range, None
    else:
        bits = 8 * arr.dtype.itemsize
        if chosen is None:
            if value_range[0] >= 0.0 and value_range[1] <= 1.0:
                return arr.astype(np.float32), bits, value_range, None
            chosen = "percentile"
    if arr.ndim == 3:
        raise MedQMReadError(path, "windowing applies to grayscale images only; this one is colour")
    pixels, used = apply_window(arr, chosen)
    return pixels, bits, value_range, used


def read_raster(
    path: Path,
    kind: str,
    *,
    window: Window,
    modality: str | None,
    body_part: str | None,
    case_id: str | None,
    max_pixels: int,
) -> list[MedImage]:
    if kind == "tiff":
        arr = _tiff_array(path, max_pixels)
    elif kind == "npy":
        arr = _npy_array(path, max_pixels)
    else:
        arr = _pillow_array(path, max_pixels)
    pixels, bits, value_range, used = _to_unit(arr, path, window, canonical_modality(modality), body_part)
    return [
        MedImage(
            pixels=np.ascontiguousarray(pixels, dtype=np.float32),
            path=str(path),
            modality=canonical_modality(modality),
            body_part=body_part,
            photometric="RGB" if pixels.ndim == 3 else "MONOCHROME2",
            bits_stored=bits,
            value_range=value_range,
            window=used,
            spacing=None,
            index=None,
            case_id=case_id or path.stem,
            meta={"format": kind, "dtype": str(arr.dtype)},
        )
    ]
