"""DICOM → MedImage through pydicom and the pylibjpeg decoders.

Display pipeline (PS3.3 C.11, PS3.4 N.2): stored values → Modality LUT or Rescale Slope/Intercept →
VOI LUT or Window Center/Width (or a caller's window, or a per-modality default) → MONOCHROME1
inversion. Colour images (RGB, YBR_* converted by pydicom, PALETTE COLOR via its LUT) are scaled by
their bit depth. Enhanced multi-frame objects keep rescale, window and spacing in functional groups,
which pydicom's LUT helpers do not read, so `_frame_attr` looks there first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._image import MedImage, MedQMReadError, MedQMUnsupportedFormatError, canonical_modality
from ._window import Window, apply_window, default_window, resolve_window

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Functional-group sequences that hold per-frame copies of otherwise top-level attributes.
_GROUP_OF = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
    "VOILUTFunction": "FrameVOILUTSequence",
    "PixelSpacing": "PixelMeasuresSequence",
}


class _NonFinite(ValueError):
    pass


def _frame_attr(ds, name: str, frame: int, default: Any = None) -> Any:
    """Attribute for one frame: per-frame functional group, then shared group, then top level."""
    group = _GROUP_OF.get(name)
    if group:
        for seq_name, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
            seq = ds.get(seq_name)
            if seq and len(seq) > idx:
                inner = seq[idx].get(group)
                if inner and name in inner[0]:
                    return inner[0].get(name)
    value = ds.get(name, default)
    return default if value is None or value == "" else value


def _first(value) -> float | None:
    """First number of a possibly multi-valued DICOM element (several windows may be stored)."""
    if value is None or value == "":
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if uid is None:
        return "unknown SOP class"
    return getattr(uid, "name", str(uid))


NOT_DICOM = "not a DICOM file (no DICM preamble or valid dataset)"


def _has_preamble(path: Path) -> bool:
    """Whether the file has the Part 10 'DICM' marker at offset 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _plausible_dataset(ds) -> bool:
    """Whether a dataset read with ``force=True`` from a file without preamble looks like DICOM at all.

    pydicom parses any bytes into *something* when forced: random bytes or text become one or two elements
    with nonsense tags. A real dataset holds several tags of the DICOM dictionary (command group 0000 aside,
    which a run of zero bytes imitates).
    """
    from pydicom.datadict import dictionary_has_tag

    meta = getattr(ds, "file_meta", None)
    tags = list(ds.keys()) + (list(meta.keys()) if meta is not None else [])
    known = sum(1 for t in tags if t.group != 0x0000 and dictionary_has_tag(t))
    return known >= 2


def _case_id(ds, path: Path) -> str:
    for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(key, "") or "").strip()
        if value:
            return value
    return path.stem


def _ensure_transfer_syntax(ds) -> None:
    """Files written without a File Meta header still decode: infer the syntax they were read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _spacing(ds, frame: int) -> tuple[float, float] | None:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing; zero or malformed means unknown."""
    for value in (_frame_attr(ds, "PixelSpacing", frame), ds.get("ImagerPixelSpacing")):
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and col > 0:
            return (row, col)
    return None


def _check_dataset(ds, path: Path, max_pixels: int) -> int:
    """Refuse non-image objects and absurd sizes before any pixel data is decoded; returns the frame count."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise MedQMReadError(path, f"DICOM object has no pixel data ({_sop_name(ds)}); it is not an image")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise MedQMReadError(path, "DICOM image without valid Rows/Columns") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise MedQMReadError(path, f"DICOM declares an empty image ({rows}×{cols}, {frames} frames)")
    if rows * cols > max_pixels:
        raise MedQMReadError(path, f"image of {rows}×{cols} pixels exceeds the limit of {max_pixels} pixels")
    if samples not in (1, 3):
        raise MedQMReadError(path, f"unsupported Samples per Pixel = {samples}")
    return frames


def _grayscale(arr: np.ndarray, ds, frame: int, window: Window, modality: str | None, body_part: str | None):
    """Stored grayscale values → (display pixels in [0,1], value range in modality units, window used)."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    if ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(arr, ds).astype(np.float32)
    else:
        slope = _first(_frame_attr(ds, "RescaleSlope", frame)) or 1.0
        intercept = _first(_frame_attr(ds, "RescaleIntercept", frame)) or 0.0
        values = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(values).all():
        raise _NonFinite("pixel data contains NaN or infinite values")
    value_range = (float(values.min()), float(values.max()))

    chosen = resolve_window(window, modality=modality, body_part=body_part)
    used: tuple[float, float] | None
    if chosen is None and ds.get("VOILUTSequence") and not ds.get("ModalityLUTSequence"):
        lut_item = ds.VOILUTSequence[0]
        out = apply_voi(np.round(values).astype(np.int64), ds, index=0).astype(np.float32)
        depth = int(lut_item.LUTDescriptor[2]) or 16
        pixels = np.clip(out / float(2**depth - 1), 0.0, 1.0)
        used = None
    else:
        if chosen is None:
            center = _first(_frame_attr(ds, "WindowCenter", frame))
            width = _first(_frame_attr(ds, "WindowWidth", frame))
            chosen = ((center, width) if center is not None and width and width > 0
                      else default_window(modality, body_part))
        function = str(_frame_attr(ds, "VOILUTFunction", frame, "LINEAR")).upper()
        if function == "SIGMOID" and isinstance(chosen, tuple) and window is None:
            center, width = chosen
            pixels = (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
            used = chosen
        else:
            pixels, used = apply_window(values, chosen)
    return pixels, value_range, used


def _color(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Colour pixels (already RGB after pydicom's YBR conversion, or palette indices) → float RGB in [0,1]."""
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return (rgb.astype(np.float32) / float(2**depth - 1)).clip(0.0, 1.0)
    bits = int(ds.get("BitsStored", 8) or 8)
    return (arr.astype(np.float32) / float(2**bits - 1)).clip(0.0, 1.0)


def read_dicom(
    path: Path,
    *,
    index: int | None,
    all_frames: bool,
    window: Window,
    modality: str | None,
    body_part: str | None,
    case_id: str | None,
    max_pixels: int,
    force: bool = False,
) -> list[MedImage]:
    """Decode one DICOM file into one MedImage per frame (or only frame ``index``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import pixel_array

    preamble = _has_preamble(path)
    try:
        ds = pydicom.dcmread(path, force=force)
    except InvalidDicomError as e:
        raise MedQMUnsupportedFormatError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # pydicom raises many types on truncated/garbled files
        if not preamble:  # no DICM marker and no dataset either: judged by content, whatever the suffix
            raise MedQMUnsupportedFormatError(path, NOT_DICOM) from e
        raise MedQMReadError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from e
    if not preamble and not _plausible_dataset(ds):
        raise MedQMUnsupportedFormatError(path, NOT_DICOM)

    try:
        frames = _check_dataset(ds, path, max_pixels)
        _ensure_transfer_syntax(ds)
    except MedQMReadError:
        raise
    except Exception as e:  # malformed attributes (e.g. a non-numeric IS value)
        raise MedQMReadError(path, f"invalid DICOM image attributes ({type(e).__name__}: {e})") from e
    if index is not None:
        if not 0 <= index < frames:
            raise MedQMReadError(path, f"frame index {index} out of range (file has {frames} frames)")
        wanted = [index]
    else:
        wanted = list(range(frames)) if all_frames else [0]

    dicom_modality = str(ds.get("Modality", "") or "")
    try:
        mod = canonical_modality(modality) or canonical_modality(dicom_modality) or "OT"
    except ValueError:  # a DICOM code outside MedQM's set (RTDOSE, SEG, …)
        mod = "OT"
    part = body_part or (str(ds.get("BodyPartExamined", "") or "").strip().lower() or None)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    case = case_id or _case_id(ds, path)

    images = []
    for frame in wanted:
        try:
            arr = pixel_array(ds, index=frame if frames > 1 else None)
            if arr.ndim == 3 and samples == 1:  # a single-frame file whose decoder kept a frame axis
                arr = arr[0]
            if samples == 3 or photometric == "PALETTE COLOR":
                pixels, value_range, used = _color(arr, ds, photometric), (float(arr.min()), float(arr.max())), None
                out_photometric = "RGB"
            else:
                pixels, value_range, used = _grayscale(arr, ds, frame, window, mod, part)
                if photometric == "MONOCHROME1":
                    pixels = 1.0 - pixels
                out_photometric = "MONOCHROME2"
        except _NonFinite as e:
            raise MedQMReadError(path, str(e)) from e
        except Exception as e:
            raise MedQMReadError(path, f"cannot decode pixel data of frame {frame} ({type(e).__name__}: {e})") from e
        if not np.isfinite(pixels).all():
            raise MedQMReadError(path, "pixel data contains NaN or infinite values")
        spacing = _spacing(ds, frame)
        images.append(
            MedImage(
                pixels=np.ascontiguousarray(pixels, dtype=np.float32),
                path=str(path),
                modality=mod,
                body_part=part,
                photometric=out_photometric,
                bits_stored=bits,
                value_range=value_range,
                window=used,
                spacing=spacing,
                index=frame if frames > 1 else None,
                case_id=case,
                meta={
                    "format": "dicom",
                    "dicom_modality": dicom_modality,
                    "source_photometric": photometric,
                    "sop_class": _sop_name(ds),
                    "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")),
                    "frames": frames,
                },
            )
        )
    return images
