"""NIfTI and NRRD volumes → 2D slices in radiological display orientation.

Every volume is reoriented to LPS (DICOM patient space) with nibabel's orientation tools, so slice
arrays come out as a DICOM viewer shows them, whatever the voxel order on disk:

- axial (axis 2): rows run anterior → posterior, columns patient-right → patient-left;
- coronal (axis 1): rows superior → inferior, columns patient-right → patient-left;
- sagittal (axis 0): rows superior → inferior, columns anterior → posterior.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._image import DEFAULT_MAX_PIXELS, MedImage, MedQMReadError, canonical_modality
from ._window import PERCENTILE_WINDOW, Window, apply_window, default_window, resolve_window

AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
_LPS = ("L", "P", "S")


def parse_axis(axis: int | str | None) -> int:
    """The array axis (0 sagittal, 1 coronal, 2 axial) for an axis name or index; None means axial."""
    if axis is None:
        return 2
    if isinstance(axis, str):
        for k, name in AXIS_NAMES.items():
            if axis.lower() == name:
                return k
        raise ValueError(f"axis must be 0/1/2 or one of {list(AXIS_NAMES.values())}, got {axis!r}")
    if axis not in AXIS_NAMES:
        raise ValueError(f"axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")
    return int(axis)


def _nrrd_to_nifti(path: Path, max_pixels: int):
    """NRRD header + data → a nibabel image with a RAS affine (nibabel has no NRRD reader)."""
    import nibabel as nib
    import nrrd

    header = nrrd.read_header(str(path))
    sizes = [int(s) for s in header.get("sizes", [])]
    if len(sizes) != 3:
        raise MedQMReadError(path, f"NRRD with {len(sizes)} dimensions; only 3D scalar volumes are supported")
    _check_size(path, sizes, max_pixels)
    data, header = nrrd.read(str(path))
    directions = np.asarray(header.get("space directions", np.eye(3)), dtype=float)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    # space directions are per-axis vectors in the named patient space; convert that space to RAS
    flip = {
        "left-posterior-superior": (-1, -1, 1),
        "right-anterior-superior": (1, 1, 1),
        "left-anterior-superior": (-1, 1, 1),
    }.get(space)
    if flip is None:
        raise MedQMReadError(path, f"unsupported NRRD space {space!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.diag(flip) @ directions.T
    affine[:3, 3] = np.diag(flip) @ origin
    return nib.Nifti1Image(np.asarray(data), affine)


def _check_size(path: Path, shape, max_pixels: int) -> None:
    shape = [int(s) for s in shape]
    if any(s <= 0 for s in shape[:3]):
        raise MedQMReadError(path, f"volume has an empty dimension {tuple(shape)}")
    biggest_slice = max(shape[0] * shape[1], shape[0] * shape[2], shape[1] * shape[2])
    if biggest_slice > max_pixels or int(np.prod(shape, dtype=np.float64)) > 64 * max_pixels:
        raise MedQMReadError(path,
                             f"volume of shape {tuple(shape)} exceeds the size limit ({max_pixels} pixels per slice)")


def load_volume(path: Path, *, max_pixels: int):
    """Load a 3D volume reoriented to LPS: (data[x, y, z] float32, voxel sizes in mm, stored bits per voxel)."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nhdr")):
            img = _nrrd_to_nifti(path, max_pixels)
        else:
            img = nib.load(str(path))
            _check_size(path, img.shape, max_pixels)
    except MedQMReadError:
        raise
    except Exception as e:
        raise MedQMReadError(path, f"unreadable volume ({type(e).__name__}: {e})") from e

    shape = img.shape
    if len(shape) == 4:
        img = img.slicer[..., 0]  # first volume of a 4D series (e.g. the b0 of a DWI)
    elif len(shape) == 2:
        raise MedQMReadError(path, "2D NIfTI; expected a 3D volume")
    elif len(shape) != 3:
        raise MedQMReadError(path, f"volume with shape {shape} is not 3D")

    transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(_LPS))
    try:
        data = np.asanyarray(img.dataobj).astype(np.float32)
    except Exception as e:
        raise MedQMReadError(path, f"cannot read voxel data ({type(e).__name__}: {e})") from e
    data = nib.orientations.apply_orientation(data, transform)
    # voxel sizes follow the axis permutation: output axis transform[j, 0] comes from input axis j
    perm = np.empty(3, dtype=int)
    perm[transform[:, 0].astype(int)] = np.arange(3)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)[perm]
    bits = 8 * np.dtype(img.get_data_dtype()).itemsize
    return data, tuple(float(z) for z in zooms), bits


def volume_slice(data: np.ndarray, axis: int, k: int) -> np.ndarray:
    """One slice of an LPS volume in radiological display orientation (see module docstring)."""
    if axis == 2:
        return data[:, :, k].T
    if axis == 1:
        return data[:, k, :].T[::-1]
    return data[k, :, :].T[::-1]


def read_volume_slices(path: str | Path, *, axis: int | str | None = 2,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """Raw (unwindowed) slices of a volume in display orientation; for label masks that must not be windowed."""
    path = Path(path)
    data, _, _ = load_volume(path, max_pixels=max_pixels)
    ax = parse_axis(axis)
    return [np.ascontiguousarray(volume_slice(data, ax, k)) for k in range(data.shape[ax])]


def read_volume(
    path: Path,
    *,
    index: int | None,
    all_frames: bool,
    axis: int | str | None,
    window: Window,
    modality: str | None,
    body_part: str | None,
    case_id: str | None,
    max_pixels: int,
) -> list[MedImage]:
    ax = parse_axis(axis)
    data, zooms, bits = load_volume(path, max_pixels=max_pixels)
    if not np.isfinite(data).all():
        raise MedQMReadError(path, "voxel data contains NaN or infinite values")
    n = data.shape[ax]
    if index is not None:
        if not 0 <= index < n:
            raise MedQMReadError(path, f"slice index {index} out of range ({n} slices along axis {ax})")
        wanted = [index]
    else:
        wanted = list(range(n)) if all_frames else [n // 2]

    mod = canonical_modality(modality)
    chosen = resolve_window(window, modality=mod, body_part=body_part)
    if chosen is None:
        chosen = default_window(mod, body_part)
    if chosen in ("percentile", "minmax"):
        # one window for the whole volume, so slices of one case are displayed consistently
        lo, hi = np.percentile(data, PERCENTILE_WINDOW) if chosen == "percentile" else (data.min(), data.max())
        lo, hi = float(lo), float(hi)
        if hi <= lo:
            lo, hi = float(data.min()), float(data.max())
        chosen = ((lo + hi) / 2.0, max(hi - lo, 1e-6))
    value_range = (float(data.min()), float(data.max()))
    # display (row, column) spacing: axial (y, x), coronal (z, x), sagittal (z, y)
    spacing = {2: (zooms[1], zooms[0]), 1: (zooms[2], zooms[0]), 0: (zooms[2], zooms[1])}[ax]
    case = case_id or _volume_case_id(path)

    images = []
    for k in wanted:
        pixels, used = apply_window(volume_slice(data, ax, k), chosen)
        images.append(
            MedImage(
                pixels=np.ascontiguousarray(pixels),
                path=str(path),
                modality=mod,
                body_part=body_part,
                photometric="MONOCHROME2",
                bits_stored=bits,
                value_range=value_range,
                window=used,
                spacing=spacing,
                index=k,
                case_id=case,
                meta={"format": "volume", "axis": ax, "plane": AXIS_NAMES[ax], "slices": n, "shape": list(data.shape)},
            )
        )
    return images


def _volume_case_id(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mgz", ".img", ".hdr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem
