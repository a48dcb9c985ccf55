"""Synthetic lesions inserted into real backgrounds (hybrid images) for lesion-detection questions.

Task-based image-quality studies put simulated lesions into real patient backgrounds, so the truth (present
or not, where) is known exactly while the anatomy and noise stay real (e.g. Samei, Flynn & Eyler,
"Simulation of subtle lung nodules in projection chest radiography", Radiology 1997; Solomon & Samei, "A
generic framework to simulate realistic lung, liver and renal pathologies in CT imaging", Phys. Med. Biol.
2014). `insert_lesion` does this in the 2D display image; a lesion set (`make_lesion_set`) pairs every
hybrid with its untouched background, so a VLM's answers to "Is there a lesion?" and "In which quadrant?"
can be scored, and degraded by the distortions.

The lesion model, per image (all lengths in pixels of the given image, intensities in display units, i.e.
the [0, 1] pixels of `medqm.io.MedImage`):

- Shape: a slightly lobulated disc, boundary radius ``R(θ) = R·(1 + a2·cos 2(θ-φ2) + a4·cos 4(θ-φ4))``
  with a2 ~ U(0, 0.12), a4 ~ U(0, 0.06), φ ~ U(0, 2π). Only even harmonics, so the shape is point-symmetric
  about its centre and the mask centroid *is* the centre.
- Edge: Gaussian-blurred (an erf ramp), opacity ``α = ½·erfc((r − R(θ)) / (√2·w))`` with w ~ U(edge)·R
  (at least 0.6 px), set to 0 below 10⁻³; the mask is ``r ≤ R(θ)`` (the α = ½ contour). ``r_out =
  R·(1 + a2 + a4) + 2w`` bounds the lesion's visible extent.
- Background statistics come from the ring ``r_out ≤ r ≤ 3R`` around the site (inside the anatomy): its
  mean μ (per channel), the std σ of its luminance, and the robust std (1.4826·MAD) of its high-pass
  residual (image minus its Gaussian blur, σ = 1.5 px) per channel, plus the residual's lag-1
  autocorrelation within 3R.
- Intensity: ``T = μ + c·v``, c the signed contrast and v its direction per channel (1 for grey images; a
  dark-red or a yellow direction of unit luminance for fundus photographs).
- Texture: t, a noise field whose high-pass residual has the ring's residual std and (by choosing the
  noise's blur among `_NOISE_BLURS`) about its lag-1 autocorrelation. A solid lesion replaces the tissue
  it occupies (CT, MR, fundus): ``out = (1 − α)·b + α·(T + t)``. Radiographs are projections, so there
  the lesion's attenuation adds to what lies in front of and behind it: ``out = b + α·c·v``, the real
  anatomy and noise show through (opacity 0 in `LESION_PARAMS`), and sites where the mean under the
  lesion differs from μ by more than σ/4 are refused (the background's step would be the contrast).
- Site: a pixel of the anatomy (``body_mask``, or `anatomy_mask`: Otsu on the smoothed image, holes
  filled, never black, so padding, the air around the patient and bowel gas are never used), at least
  r_out from the anatomy's edge and the image's border, and at least ``max(2, R/2)`` px from the image's
  midlines so the quadrant answer is unambiguous (optionally within one given quadrant). Up to 150 sites
  are drawn uniformly from the more homogeneous half of the candidates (by the local std over 6R), then up
  to 50 from the rest; the first admissible one is used.
- Contrast: |c| ~ U(lo, hi) where ``lo = max(contrast[0], cnr[0]·σ)``, ``hi = min(contrast[1], cnr[1]·σ,
  headroom)``, headroom what keeps ``T ± 2·texture std`` inside [0.02, 0.98] (no clipping that would
  flatten the texture; for radiographs, the 5th–95th percentile under the lesion plus c). A site with
  lo > hi is refused. The sign comes from the lesion kind, drawn with the modality's ``kind_p``; where no
  site admits it, the modality's other kinds are tried.

So a lesion is never a flat sticker (texture and edge match the surroundings) and never invisible or
glaring: its contrast-to-noise ratio against the local anatomy is kept within ``cnr`` of its modality.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from medqm._fs import atomic_path

from .quadrants import QUADRANTS, image_quadrant

BLACK_LEVEL = 0.05  # smoothed display value below which an image is black (padding, air, gas): no lesion there
HP_SIGMA = 1.5  # px; the high-pass residual is image − gaussian(image, HP_SIGMA)
LOCAL_RADIUS = 3.0  # × R: the neighbourhood whose statistics the lesion matches
MAX_SITE_TRIES = 200
TEXTURE_FLOOR = 0.3 / 255  # texture std used where the background's residual is flat (8-bit flat areas)
_LUMA = np.array([0.299, 0.587, 0.114], np.float64)  # ITU-R BT.601, as Pillow's convert("L")
_NOISE_BLURS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)  # candidate texture correlation (px)


@dataclass(frozen=True)
class LesionKind:
    name: str
    sign: int  # +1 brighter than the background, −1 darker
    colour: tuple[float, float, float] | None = None  # RGB direction (scaled to unit luminance); None: grey


@dataclass(frozen=True)
class LesionParams:
    """Sampling ranges of one modality; each range (lo, hi) is drawn as U(lo, hi)."""

    radius: tuple[float, float]  # px of a 256-px image; scaled by min(H, W)/256 for other sizes
    contrast: tuple[float, float]  # |c| in display units (luminance for colour)
    cnr: tuple[float, float]  # |c| / local background std
    edge: tuple[float, float]  # edge width w as a fraction of R
    kinds: tuple[LesionKind, ...]
    kind_p: tuple[float, ...]
    opacity: float  # 1: the lesion replaces the tissue (tomographic, photographic); 0: adds to it (projection)


LESION_PARAMS: dict[str, LesionParams] = {
    # solid pulmonary / soft-tissue nodule, denser than its surroundings
    "CT": LesionParams((4.0, 9.0), (0.15, 0.45), (1.8, 5.0), (0.15, 0.3), (LesionKind("nodule", +1),), (1.0,), 1.0),
    # MR lesions are hyper- or hypointense depending on tissue and sequence
    "MR": LesionParams((4.0, 10.0), (0.10, 0.35), (1.8, 5.0), (0.15, 0.3),
                       (LesionKind("hyperintense lesion", +1), LesionKind("hypointense lesion", -1)), (0.5, 0.5), 1.0),
    # nodule on a radiograph: extra attenuation, brighter where bone is white
    "XR": LesionParams((5.0, 11.0), (0.06, 0.25), (1.8, 5.0), (0.25, 0.45), (LesionKind("nodule", +1),), (1.0,), 0.0),
    # retinal blot haemorrhage (dark red) or hard exudate (yellow)
    "FUNDUS": LesionParams((3.0, 7.0), (0.06, 0.25), (2.0, 8.0), (0.2, 0.4),
                           (LesionKind("haemorrhage", -1, (0.8, 1.1, 0.6)),
                            LesionKind("exudate", +1, (0.6, 1.0, 0.25))),
                           (0.6, 0.4), 1.0),
}


def _rgb_luma(px: np.ndarray) -> np.ndarray:
    return px @ _LUMA if px.ndim == 3 else px


def _lum(v: np.ndarray) -> float:
    """Luminance of one pixel value given per channel (1 or 3 values)."""
    return float(v @ _LUMA) if v.size == 3 else float(v[0])


def _check_pixels(pixels) -> np.ndarray:
    px = np.asarray(pixels)
    if not np.issubdtype(px.dtype, np.floating):
        raise TypeError(f"pixels must be float display values in [0, 1] (MedImage.pixels), got dtype {px.dtype}")
    if not (px.ndim == 2 or (px.ndim == 3 and px.shape[2] == 3)):
        raise ValueError(f"pixels must be H×W or H×W×3, got shape {px.shape}")
    if px.size == 0 or not np.isfinite(px).all() or px.min() < -1e-6 or px.max() > 1 + 1e-6:
        raise ValueError("pixels must be finite display values in [0, 1]")
    return px.astype(np.float64)


def anatomy_mask(pixels, *, sigma: float = 2.0) -> np.ndarray:
    """Where the patient is: the smoothed image (σ = 2 px) above half its Otsu threshold, holes filled,
    never where it is black (≤ `BLACK_LEVEL`).

    Half of Otsu keeps dark tissue (lung in a lung window, fat) while dropping black padding and the air
    around the patient; filling holes brings back enclosed dark organs (lungs, ventricles), but not black
    ones (bowel gas in a soft-tissue window), where a lesion would sit on nothing. Returns bool H×W.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    grey = _rgb_luma(_check_pixels(pixels))
    smooth = ndimage.gaussian_filter(grey, sigma)
    thr = max(BLACK_LEVEL, 0.5 * float(threshold_otsu(smooth))) if np.ptp(smooth) > 0 else BLACK_LEVEL
    return ndimage.binary_fill_holes(smooth > thr) & (smooth > BLACK_LEVEL)


def _highpass(px: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    sig = (HP_SIGMA, HP_SIGMA, 0) if px.ndim == 3 else HP_SIGMA
    return px - ndimage.gaussian_filter(px, sig)


def _robust_std(x: np.ndarray, axis=0) -> np.ndarray:
    med = np.median(x, axis=axis)
    return 1.4826 * np.median(np.abs(x - med), axis=axis)


def _lag1(h: np.ndarray, region: np.ndarray) -> float:
    """Lag-1 autocorrelation of ``h`` (2D) over pixel pairs both inside ``region`` (mean of both axes)."""
    vals = []
    for a, b, m in ((h[:, :-1], h[:, 1:], region[:, :-1] & region[:, 1:]), (h[:-1], h[1:], region[:-1] & region[1:])):
        x, y = a[m], b[m]
        if x.size > 8 and x.std() > 0 and y.std() > 0:
            vals.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(vals)) if vals else 0.0


@cache
def _noise_lag1_table() -> tuple[float, ...]:
    """Lag-1 autocorrelation of the high-pass residual of white noise blurred by each of `_NOISE_BLURS`."""
    from scipy import ndimage

    n = np.random.default_rng(12345).standard_normal((160, 160))
    out = []
    for s in _NOISE_BLURS:
        f = ndimage.gaussian_filter(n, s) if s > 0 else n
        out.append(_lag1(_highpass(f)[8:-8, 8:-8], np.ones((144, 144), bool)))
    return tuple(out)


def _texture(rng: np.random.Generator, shape: tuple[int, int], blur: float) -> np.ndarray:
    """Noise whose high-pass residual has unit std (so scaling by σ gives a residual std of σ)."""
    from scipy import ndimage

    n = rng.standard_normal(shape)
    if blur > 0:
        n = ndimage.gaussian_filter(n, blur)
    hp = _highpass(n)
    return n / max(float(hp.std()), 1e-12)


def _params_for(modality: str) -> tuple[str, LesionParams]:
    from medqm.io import canonical_modality, modality_family

    try:
        mod = modality_family(canonical_modality(modality))  # CR, DX, XA, RF: the XR model
    except ValueError:
        mod = None
    if mod not in LESION_PARAMS:
        raise ValueError(f"no lesion model for modality {modality!r}; expected one of {', '.join(LESION_PARAMS)}")
    return mod, LESION_PARAMS[mod]




@dataclass(frozen=True)
class _Shape:
    """A drawn lesion footprint: nominal radius R, edge width w, lobulation (a2, φ2, a4, φ4), visible extent."""

    R: float
    w: float
    a2: float
    a4: float
    ph2: float
    ph4: float

    @property
    def r_out(self) -> float:
        return self.R * (1 + self.a2 + self.a4) + 2 * self.w  # where α has fallen below ~2 %


@dataclass(frozen=True)
class _Site:
    """The chosen site: centre, the ring's statistics, the signed contrast and the lesion kind."""

    r0: int
    c0: int
    mu: np.ndarray  # per-channel mean of the ring
    sig_tex: np.ndarray  # per-channel robust std of the ring's high-pass residual
    sig_bg: float  # std of the ring's luminance
    contrast: float
    kind: LesionKind


def _choose_kinds(prm: LesionParams, mod: str, rng: np.random.Generator, kind: str | None,
                  contrast: float | None) -> list[LesionKind]:
    """The kinds to try, in order: the requested one, the one of the contrast's sign, or the drawn one first."""
    names = [k.name for k in prm.kinds]
    if kind is not None:
        if kind not in names:
            raise ValueError(f"kind {kind!r} is not a {mod} lesion kind; expected one of {names}")
        return [prm.kinds[names.index(kind)]]
    if contrast is not None:
        signed = [k for k in prm.kinds if k.sign == (1 if contrast >= 0 else -1)]
        return [signed[0] if signed else prm.kinds[0]]
    # the drawn kind first; the others only where it fits nowhere (a bright lesion in bright white matter)
    first = int(rng.choice(len(prm.kinds), p=np.asarray(prm.kind_p)))
    return [prm.kinds[first]] + [k for i, k in enumerate(prm.kinds) if i != first]


def _draw_shape(rng: np.random.Generator, prm: LesionParams, shape: tuple[int, int], radius: float | None) -> _Shape:
    H, W = shape
    scale = min(H, W) / 256.0
    R = float(radius) if radius is not None else float(rng.uniform(*prm.radius)) * scale
    if not R > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    w = max(0.6, float(rng.uniform(*prm.edge)) * R)
    a2, a4 = float(rng.uniform(0, 0.12)), float(rng.uniform(0, 0.06))
    ph2, ph4 = rng.uniform(0, 2 * np.pi, 2)
    return _Shape(R, w, a2, a4, float(ph2), float(ph4))


def _direction(lk: LesionKind, colour: bool) -> np.ndarray:
    """Contrast per channel with unit luminance: a grey lesion changes all channels alike, a grey image of a
    colour kind (a red-free fundus photograph) gets the luminance change only."""
    if not colour:
        return np.ones(1)
    v = np.asarray(lk.colour if lk.colour is not None else (1.0, 1.0, 1.0), np.float64)
    return v / float(v @ _LUMA)


def _candidate_sites(grey: np.ndarray, anat: np.ndarray, shp: _Shape, rng: np.random.Generator,
                     center: tuple[int, int] | None, quadrant: str | None) -> np.ndarray:
    """Flat indices of the sites to try, in order (module docstring: Site)."""
    from scipy import ndimage

    H, W = grey.shape
    if center is not None:
        r0, c0 = int(round(center[0])), int(round(center[1]))
        if not (0 <= r0 < H and 0 <= c0 < W):
            raise ValueError(f"center {center} is outside the {H}×{W} image")
        return np.array([r0 * W + c0])
    R, r_out = shp.R, shp.r_out
    rows, cols = np.mgrid[0:H, 0:W]
    dist = ndimage.distance_transform_edt(np.pad(anat, 1))[1:-1, 1:-1]
    band = max(2.0, R / 2)
    ok = (dist >= r_out) & (rows >= r_out) & (rows <= H - 1 - r_out) & (cols >= r_out) & (cols <= W - 1 - r_out)
    ok &= (np.abs(rows - (H - 1) / 2) >= band) & (np.abs(cols - (W - 1) / 2) >= band)
    if quadrant is not None:
        if quadrant not in QUADRANTS:
            raise ValueError(f"quadrant must be one of {QUADRANTS}, got {quadrant!r}")
        upper, left = quadrant.startswith("upper"), quadrant.endswith("left")
        ok &= ((rows < (H - 1) / 2) == upper) & ((cols < (W - 1) / 2) == left)
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        where = f" in the {quadrant} quadrant" if quadrant else ""
        raise ValueError(f"no room for a lesion of radius {R:.1f} px inside the anatomy{where} "
                         f"({int(anat.sum())} anatomy pixels; pass body_mask or a smaller radius)")
    # try the more homogeneous half of the sites first (parenchyma rather than organ borders), where a
    # lesion's contrast is defined by its surroundings rather than by an edge next to it
    size = int(2 * LOCAL_RADIUS * R) | 1
    var = ndimage.uniform_filter(grey * grey, size) - ndimage.uniform_filter(grey, size) ** 2
    local_sd = np.sqrt(np.maximum(var, 0)).ravel()[cand]
    calm = local_sd <= np.median(local_sd)
    n_calm = (3 * MAX_SITE_TRIES) // 4
    return np.concatenate([rng.permutation(cand[calm])[:n_calm],
                           rng.permutation(cand[~calm])[:MAX_SITE_TRIES - n_calm]])


def _site_stats(px, grey, hp, anat, r0: int, c0: int, shp: _Shape, prm: LesionParams, explicit: bool):
    """The ring's statistics at one site and the room above / below its level, or None when the site is refused
    (too little anatomy around it; for an additive lesion, a background under it unlike its surroundings)."""
    H, W = grey.shape
    R = shp.R
    reach = int(np.ceil(LOCAL_RADIUS * R)) + 1
    win = (slice(max(0, r0 - reach), min(H, r0 + reach + 1)), slice(max(0, c0 - reach), min(W, c0 + reach + 1)))
    rows, cols = np.mgrid[win]
    d = np.hypot(rows - r0, cols - c0)
    ring = (d <= LOCAL_RADIUS * R) & anat[win] & (d >= shp.r_out)
    if ring.sum() < 12:
        if not explicit:
            return None
        ring = d <= LOCAL_RADIUS * R  # an explicit centre off the anatomy: use what is there
    pxw = px[win].reshape(ring.size, -1)
    mu = pxw[ring.ravel()].mean(axis=0)
    sig_tex = np.maximum(_robust_std(hp[win].reshape(ring.size, -1)[ring.ravel()]), TEXTURE_FLOOR)
    sig_bg = max(float(grey[win][ring].std()), 1.0 / 255)
    if prm.opacity > 0:
        top = 0.98 - mu - 2 * sig_tex  # per channel room above, below
        bottom = mu - 0.02 - 2 * sig_tex
    else:
        under = pxw[(d <= R).ravel()]
        top = 0.98 - np.percentile(under, 95, axis=0)
        bottom = np.percentile(under, 5, axis=0) - 0.02
        # an added lesion keeps what lies under it: that must look like its surroundings, or the
        # lesion's apparent contrast is the background's step rather than c
        if not explicit and abs(_lum(under.mean(axis=0)) - _lum(mu)) > 0.25 * sig_bg:
            return None
    return mu, sig_tex, sig_bg, top, bottom


def _choose_site(px, grey, hp, anat, sites, kinds, shp: _Shape, prm: LesionParams, rng: np.random.Generator, *,
                 mod: str, contrast: float | None, explicit: bool) -> _Site:
    """The first admissible (kind, site) pair and its contrast (module docstring: Contrast)."""
    W = grey.shape[1]
    lo_c, hi_c = prm.contrast
    chosen = None
    for lk in kinds:
        v = _direction(lk, px.ndim == 3)
        for s in sites:
            r0, c0 = divmod(int(s), W)
            stats = _site_stats(px, grey, hp, anat, r0, c0, shp, prm, explicit)
            if stats is None:
                continue
            mu, sig_tex, sig_bg, top, bottom = stats
            headroom = float(((top if lk.sign > 0 else bottom) / v).min())
            if contrast is not None:
                if headroom >= abs(contrast) or explicit or chosen is None:
                    chosen = _Site(r0, c0, mu, sig_tex, sig_bg, float(contrast), lk)
                if headroom >= abs(contrast) or explicit:
                    break
                continue
            lo = max(lo_c, prm.cnr[0] * sig_bg)
            hi = min(hi_c, prm.cnr[1] * sig_bg, headroom)
            if lo <= hi:
                chosen = _Site(r0, c0, mu, sig_tex, sig_bg, lk.sign * float(rng.uniform(lo, hi)), lk)
                break
            if explicit:  # no admissible contrast at the requested centre: take the nearest bound
                chosen = _Site(r0, c0, mu, sig_tex, sig_bg, lk.sign * float(max(min(lo, headroom), 0.0)), lk)
        if chosen is not None:
            return chosen
    raise ValueError(f"no site in the anatomy admits a {mod} lesion ({', '.join(k.name for k in kinds)}) of radius "
                     f"{shp.R:.1f} px with contrast in {prm.contrast} and CNR in {prm.cnr} (tried {len(sites)} sites)")


def _render(px, hp_grey, anat, site: _Site, shp: _Shape, prm: LesionParams, rng: np.random.Generator):
    """Blend the lesion into ``px`` in a bounding box; returns (pixels, mask, texture blur)."""
    from scipy.special import erfc

    H, W = px.shape[:2]
    colour = px.ndim == 3
    R, r0, c0 = shp.R, site.r0, site.c0
    half = int(np.ceil(max(shp.r_out, LOCAL_RADIUS * R))) + 1
    y0, y1, x0, x1 = max(0, r0 - half), min(H, r0 + half + 1), max(0, c0 - half), min(W, c0 + half + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - r0, xx - c0
    rr, th = np.hypot(dy, dx), np.arctan2(dy, dx)
    boundary = R * (1 + shp.a2 * np.cos(2 * (th - shp.ph2)) + shp.a4 * np.cos(4 * (th - shp.ph4)))
    alpha = 0.5 * erfc((rr - boundary) / (np.sqrt(2) * shp.w))
    alpha[alpha < 1e-3] = 0.0  # the lesion ends ~3 w beyond its boundary: pixels further out stay untouched
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = rr <= boundary

    rows, cols = np.mgrid[0:H, 0:W]
    rho = _lag1(hp_grey, (np.hypot(rows - r0, cols - c0) <= LOCAL_RADIUS * R) & anat)
    table = _noise_lag1_table()
    blur = _NOISE_BLURS[int(np.argmin([abs(t - rho) for t in table]))]
    tex = _texture(rng, (y1 - y0, x1 - x0), blur)

    box = px[y0:y1, x0:x1]
    cv = site.contrast * _direction(site.kind, colour)  # per-channel (or scalar) contrast
    mu, sig_tex = site.mu, site.sig_tex
    if colour:
        a = alpha[..., None]
        target = mu + cv + tex[..., None] * sig_tex
    else:
        a = alpha
        target = float(mu[0]) + float(cv[0]) + tex * float(sig_tex[0])
    if prm.opacity > 0:
        new = box + a * prm.opacity * (target - box) + a * (1 - prm.opacity) * cv
    else:
        new = box + a * (cv if colour else float(cv[0]))
    out = px.copy()
    out[y0:y1, x0:x1] = np.clip(new, 0.0, 1.0)
    return out, mask, blur


def insert_lesion(pixels, *, rng_or_seed, modality: str, body_mask=None, radius: float | None = None,
                  contrast: float | None = None, center: tuple[int, int] | None = None,
                  kind: str | None = None,
                  quadrant: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Insert one synthetic lesion into a real image (see the module docstring for the model).

    Args:
        pixels: float display pixels in [0, 1], H×W or H×W×3 (`MedImage.pixels`).
        rng_or_seed: an int seed or a ``numpy.random.Generator``; the same seed gives the same image.
        modality: 'CT', 'MR', 'XR' or 'FUNDUS' (aliases such as 'MRI' accepted); selects `LESION_PARAMS`.
        body_mask: bool H×W where the lesion may go; default `anatomy_mask(pixels)`.
        radius: nominal radius R in px; default U(radius range) scaled to the image size.
        contrast: signed contrast c in display units (luminance for colour) relative to the local
            background level; default drawn per site as described in the module docstring. Given
            explicitly, it is used as is (sites with the headroom for it are preferred).
        center: (row, col) of the lesion centre; default a random valid site.
        kind: one of the modality's lesion kinds (e.g. 'haemorrhage', 'exudate'); default drawn.
        quadrant: restrict the site to one image quadrant ('upper left', ..., see `QUADRANTS`); lets a
            lesion set balance its quadrant answers.

    Returns:
        ``(pixels_out, mask, info)``: float32 pixels of the input's shape in [0, 1], the bool mask
        ``r ≤ R(θ)``, and a dict with center (row, col), radius, contrast, quadrant, kind and the
        measured local statistics (local_mean, local_std, texture_std, cnr).

    Raises:
        ValueError: unknown modality or kind, bad shapes, or no site of the anatomy has room for the lesion.
    """
    rng = np.random.default_rng(rng_or_seed)
    px = _check_pixels(pixels)
    mod, prm = _params_for(modality)
    H, W = px.shape[:2]
    if body_mask is None:
        anat = anatomy_mask(px)
    else:
        anat = np.asarray(body_mask).astype(bool)
        if anat.shape != (H, W):
            raise ValueError(f"body_mask must have the image's shape {(H, W)}, got {anat.shape}")
    # lesion kind, size and shape are drawn first, so that the site search knows the footprint
    kinds = _choose_kinds(prm, mod, rng, kind, contrast)
    shp = _draw_shape(rng, prm, (H, W), radius)
    grey = _rgb_luma(px)
    sites = _candidate_sites(grey, anat, shp, rng, center, quadrant)
    hp = _highpass(px)
    site = _choose_site(px, grey, hp, anat, sites, kinds, shp, prm, rng, mod=mod, contrast=contrast,
                        explicit=center is not None)
    out, mask, blur = _render(px, _rgb_luma(hp), anat, site, shp, prm, rng)
    c = site.contrast
    info = {
        "center": (site.r0, site.c0),
        "radius": shp.R,
        "contrast": c,
        "quadrant": image_quadrant(site.r0, site.c0, (H, W)),
        "kind": site.kind.name,
        "modality": mod,
        "edge_width": shp.w,
        "lobulation": (shp.a2, shp.a4),
        "opacity": prm.opacity,
        "local_mean": _lum(site.mu),
        "local_std": site.sig_bg,
        "texture_std": _lum(site.sig_tex),
        "texture_blur": blur,
        "cnr": abs(c) / site.sig_bg,
    }
    return out.astype(np.float32), mask, info


# ---------------------------------------------------------------------------------------------------------
# lesion sets

DEFAULT_PER_MODALITY = {"CT": 60, "MR": 60, "XR": 20, "FUNDUS": 13}
# background_lesion: the background's own lesion field in its collection ('0', or '' = unknown), so a
# strict analysis can keep only negatives known to be lesion-free
LESION_COLUMNS = ("lesion_center_row", "lesion_center_col", "lesion_radius", "lesion_contrast", "lesion_kind",
                  "background_id", "background_lesion")


def spread_order(n: int) -> list[int]:
    """Indices 0..n-1 ordered so that every prefix is spread over the range (middle first, then quarters…)."""
    order, seen, k = [], set(), 1
    while len(order) < n and k < 64 * n + 64:
        x, f, j = 0.0, 0.5, k  # van der Corput, base 2
        while j:
            x += f * (j & 1)
            j >>= 1
            f /= 2
        i = min(n - 1, int(x * n))
        if i not in seen:
            seen.add(i)
            order.append(i)
        k += 1
    return order + [i for i in range(n) if i not in seen]


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", optimize=False)


def _background_queues(g) -> list[list]:
    """One queue of manifest rows per case (sorted by case id), each spread over the case (`spread_order`)."""
    queues = []
    for _, c in sorted(g.groupby("case_id", sort=True), key=lambda kv: kv[0]):
        c = c.sort_values("id")
        queues.append([c.iloc[i] for i in spread_order(len(c))])
    return queues


def _hybrids(px: np.ndarray, mod: str, bg_id: str, *, done: int, variants: int, seed: int) -> list | None:
    """``variants`` `insert_lesion` results for one background, aimed at the quadrants in turn from ``done``
    (another quadrant where that one has no room); None when the background has no room for them all."""
    made = []
    for k in range(1, variants + 1):
        first = (done + k - 1) % len(QUADRANTS)
        for attempt in range(len(QUADRANTS)):
            quad = QUADRANTS[(first + attempt) % len(QUADRANTS)]
            rng = np.random.default_rng([seed, k, attempt, zlib.crc32(bg_id.encode())])
            try:
                made.append(insert_lesion(px, rng_or_seed=rng, modality=mod, quadrant=quad))
                break
            except ValueError:
                continue
        if len(made) < k:
            return None
    return made


def _write_background(out_dir: Path, mod: str, bg, img, made: list, base: dict) -> list[dict[str, Any]]:
    """Save one background's negative copy and its hybrids (images and masks); returns their manifest rows."""
    bg_id = str(bg["id"])
    bg_lesion = str(bg.get("lesion", "")).strip()
    neg_id = f"{bg_id}-synneg"
    _save_png(img.to_uint8(), out_dir / "images" / mod / f"{neg_id}.png")
    _save_png(np.zeros(img.pixels.shape[:2], np.uint8), out_dir / "masks" / f"{neg_id}.png")
    rows = [{**base, "id": neg_id, "lesion": 0, "mask": f"masks/{neg_id}.png", "path": f"images/{mod}/{neg_id}.png",
             **{c: "" for c in LESION_COLUMNS}, "background_id": bg_id, "background_lesion": bg_lesion}]
    for k, (out, mask, info) in enumerate(made, start=1):
        pid = f"{bg_id}-synles{k}"
        _save_png(np.round(out * 255).astype(np.uint8), out_dir / "images" / mod / f"{pid}.png")
        _save_png(mask.astype(np.uint8) * 255, out_dir / "masks" / f"{pid}.png")
        rows.append({**base, "id": pid, "lesion": 1, "mask": f"masks/{pid}.png", "path": f"images/{mod}/{pid}.png",
                     "source_file": f"synthetic lesion on {bg_id}",
                     "lesion_center_row": info["center"][0], "lesion_center_col": info["center"][1],
                     "lesion_radius": round(info["radius"], 3), "lesion_contrast": round(info["contrast"], 4),
                     "lesion_kind": info["kind"], "background_id": bg_id, "background_lesion": bg_lesion})
    return rows


def make_lesion_set(collection, out_dir, *, per_modality: dict[str, int] | None = None, variants: int = 1,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Build a hybrid lesion set from a collection's lesion-free backgrounds.

    For each modality in ``per_modality`` (default `DEFAULT_PER_MODALITY`: CT 60, MR 60, XR 20, FUNDUS 13)
    backgrounds are drawn from images whose ``lesion`` is 0 or unknown (never the lesion-positive ones),
    round-robin over cases and spread within each case; a background without room for a lesion (e.g. a
    neck slice in a lung window, all soft tissue with no headroom for a brighter nodule) is skipped and the
    next one taken. Every background gives ``variants`` lesion-positive hybrids (``<bg_id>-synles<k>``) and
    one lesion-negative copy (``<bg_id>-synneg``), all with the background's case_id so case-level splits
    stay leak-free. The k-th background's lesions aim at the four quadrants in turn (another quadrant where
    that one has no room), so quadrant answers are balanced. Seeds derive from ``seed``, the variant and the
    background id: the set is deterministic, and raising a count keeps the rows already made.

    A negative copy has lesion 0 meaning "no inserted lesion"; where its background's own lesion field was
    unknown (every demo radiograph, a few CT and MR images) real pathology cannot be ruled out, which the
    ``background_lesion`` column records ('0' or '').

    ``out_dir`` receives ``images/<MOD>/<id>.png`` (8-bit, L or RGB as the background), ``masks/<id>.png``
    (0/255; all zero for negatives) and ``manifest.csv`` in the demo schema plus the columns in
    `LESION_COLUMNS` (the lesion_* ones empty on negative rows); the manifest is rewritten, other files
    already there are left alone. Every file is written atomically. Returns the manifest rows as dicts.
    """
    from medqm.io.collection import MANIFEST, load_manifest, read_collection_image

    if variants < 1:
        raise ValueError(f"variants must be ≥ 1, got {variants}")
    per_modality = dict(DEFAULT_PER_MODALITY if per_modality is None else per_modality)
    for m in per_modality:
        _params_for(m)
    out_dir = Path(out_dir)
    df = load_manifest(collection)
    base_cols = [c for c in df.columns if c != "abs_path"]
    rows: list[dict[str, Any]] = []
    for mod, want in per_modality.items():
        g = df[df["modality"] == mod]
        if "lesion" in g:
            g = g[g["lesion"].astype(str).str.strip() != "1"]
        queues = _background_queues(g)
        done = 0
        while done < want and any(queues):
            for q in queues:
                if done >= want or not q:
                    continue
                bg = q.pop(0)
                img = read_collection_image(bg)
                made = _hybrids(img.pixels, mod, str(bg["id"]), done=done, variants=variants, seed=seed)
                if made is None:
                    continue
                done += 1
                rows += _write_background(out_dir, mod, bg, img, made, {c: bg[c] for c in base_cols})
    cols = base_cols + [c for c in LESION_COLUMNS if c not in base_cols]
    with atomic_path(out_dir / MANIFEST) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    return rows


__all__ = [
    "DEFAULT_PER_MODALITY",
    "LESION_COLUMNS",
    "LESION_PARAMS",
    "LesionKind",
    "LesionParams",
    "anatomy_mask",
    "insert_lesion",
    "make_lesion_set",
    "spread_order",
]
