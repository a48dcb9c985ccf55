"""Path → MedImage(s): format detection by content, size limits, and fault-tolerant folder walking."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ._dicom import read_dicom
from ._image import (
    DEFAULT_MAX_PIXELS,
    MedImage,
    MedQMReadError,
    MedQMUnsupportedFormatError,
    ReadFailure,
    canonical_modality,
)
from ._raster import read_raster
from ._volume import parse_axis, read_volume
from ._window import Window, resolve_window

FORMATS = ("dicom", "nifti", "nrrd", "png", "jpeg", "jpeg2000", "tiff", "bmp", "npy")

_SUFFIXES = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".img": "nifti",
    ".hdr": "nifti",
    ".mgz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".jp2": "jpeg2000",
    ".j2k": "jpeg2000",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
    ".npy": "npy",
}

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"\x93NUMPY", "npy"),
    (b"NRRD0", "nrrd"),
    (b"BM", "bmp"),
)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def sniff_format(path: str | Path) -> str | None:
    """Format of a file from its first bytes (then its suffix); None when it is not a supported image file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:2] == b"\x1f\x8b" and _suffix(path) == ".nii.gz":
        return "nifti"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    return _SUFFIXES.get(_suffix(path))


def read_images(
    path: str | os.PathLike,
    *,
    index: int | None = None,
    axis: int | str | None = 2,
    window: Window = None,
    modality: str | None = None,
    body_part: str | None = None,
    case_id: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[MedImage]:
    """Read every 2D image a file holds: each frame of a DICOM, each slice of a volume along ``axis``.

    Args:
        path: DICOM (any transfer syntax pydicom + pylibjpeg decode), NIfTI, NRRD, PNG, JPEG, JPEG 2000,
            TIFF, BMP or ``.npy``. The format is detected from the content, not only the suffix.
        index: one frame / slice only.
        axis: slicing axis for volumes, in LPS patient space: 0/'sagittal', 1/'coronal', 2/'axial'.
            4D volumes use their first 3D volume.
        window: None (automatic: the DICOM's own VOI LUT or window, else a CT preset by body part, else the
            0.5–99.5 percentile range, taken over the whole volume for volumes), a preset name
            ('lung', 'soft_tissue', 'bone', 'brain', 'mediastinum', 'liver', 'subdural', 'stroke'),
            'percentile', 'minmax', or (center, width) in stored units (HU for CT).
        modality, body_part, case_id: override or supply metadata (non-DICOM files carry none).
        max_pixels: refuse images with more pixels than this, judged from the header before decoding.

    Raises:
        MedQMReadError: with the path and the reason, for anything that cannot become a valid MedImage;
            its subclass MedQMUnsupportedFormatError when the content is no supported format at all
            (e.g. text or random bytes named ``.dcm``: "not a DICOM file (no DICM preamble or valid dataset)").
    """
    return _read(Path(path), index=index, all_frames=True, axis=axis, window=window, modality=modality,
                 body_part=body_part, case_id=case_id, max_pixels=max_pixels)


def read_image(path: str | os.PathLike, *, index: int | None = None, axis: int | str | None = 2, window: Window = None,
               modality: str | None = None, body_part: str | None = None, case_id: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> MedImage:
    """Read one 2D image: frame/slice ``index`` if given, else the first DICOM frame or the middle volume slice.

    Arguments as in `read_images`; only the chosen frame or slice is decoded.
    """
    return _read(Path(path), index=index, all_frames=False, axis=axis, window=window, modality=modality,
                 body_part=body_part, case_id=case_id, max_pixels=max_pixels)[0]


def _read(path: Path, *, index, all_frames, axis, window, modality, body_part, case_id, max_pixels) -> list[MedImage]:
    # argument errors are the caller's (ValueError), checked before the file is touched
    resolve_window(window, modality=None, body_part=None)
    modality = canonical_modality(modality)
    parse_axis(axis)
    if index is not None and index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")

    try:
        size = path.stat().st_size
    except OSError as e:
        raise MedQMReadError(path, f"cannot open ({e.strerror or e})") from e
    if path.is_dir():
        raise MedQMReadError(path, "is a folder; use iter_images to walk folders")
    if size == 0:
        raise MedQMReadError(path, "empty file (0 bytes)")

    kind = sniff_format(path)
    common = dict(window=window, modality=modality, body_part=body_part, case_id=case_id, max_pixels=max_pixels)
    try:
        if kind in ("nifti", "nrrd"):
            return read_volume(path, index=index, all_frames=all_frames, axis=axis, **common)
        if kind in ("png", "jpeg", "jpeg2000", "tiff", "bmp", "npy"):
            if index not in (None, 0):
                raise MedQMReadError(path, f"index {index} requested but a {kind} file holds one image")
            return read_raster(path, kind, **common)
        if kind == "dicom":
            return read_dicom(path, index=index, all_frames=all_frames, force=True, **common)
        return _read_unknown(path, index=index, all_frames=all_frames, common=common)
    except MedQMReadError:
        raise
    except MemoryError as e:
        raise MedQMReadError(path, "not enough memory to decode this image") from e
    except Exception as e:  # the contract: a file's problems surface as MedQMReadError, never a bare traceback
        raise MedQMReadError(path, f"unexpected {type(e).__name__} while reading: {e}") from e


def _read_unknown(path: Path, *, index, all_frames, common) -> list[MedImage]:
    """Last resort for files without a recognised signature: a DICOM without preamble."""
    try:
        return read_dicom(path, index=index, all_frames=all_frames, force=True, **common)
    except MedQMReadError as e:
        if "no pixel data" in e.reason and "unknown SOP class" not in e.reason:
            raise
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    hint = " (gzip-compressed: decompress it first)" if gz else ""
    raise MedQMUnsupportedFormatError(
        path, f"unrecognised file format{hint}; supported: DICOM, NIfTI, NRRD, PNG, JPEG, JPEG 2000, TIFF, BMP, NPY"
    )


def walk_image_files(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                     on_skip: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """The files `iter_images` reads under ``paths``, in its order: folders walked recursively in sorted order
    (hidden entries and non-image files skipped, each skipped file passed to ``on_skip``), files named
    explicitly always kept (so a missing or bad file is reported). For parallel readers that split the list."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    f = Path(root) / name
                    # in folders, take only files that look like images; sidecars (csv, json, md) are skipped
                    if sniff_format(f) is not None:
                        yield f
                    elif on_skip is not None:
                        on_skip(f)
        else:
            yield p  # named explicitly: always tried, so a missing or bad file is reported


def iter_images(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                on_skip: Callable[[Path], None] | None = None, **kwargs) -> Iterator[MedImage | ReadFailure]:
    """Yield every image under ``paths`` (files and folders, walked recursively in sorted order).

    A file that fails yields a `ReadFailure(path, reason)` instead of raising, so one bad file never
    stops a batch. In folders, files that are no image format (csv, json, txt, icc…) are skipped: each
    is passed to ``on_skip`` when given (hidden files and folders are not looked at). Other keyword
    arguments go to `read_images`.
    """
    for f in walk_image_files(paths, on_skip=on_skip):
        try:
            yield from read_images(f, **kwargs)
        except MedQMReadError as e:
            yield ReadFailure.from_error(e)
        except Exception as e:  # a decoder bug must not end a batch; it is reported like any bad file
            yield ReadFailure(str(f), f"unexpected {type(e).__name__}: {e}")


__all__ = ["read_images", "read_image", "iter_images", "walk_image_files", "sniff_format", "DEFAULT_MAX_PIXELS",
           "FORMATS"]
