"""CT artifacts simulated in the sinogram: low dose, sparse views, metal, detector rings.

The display image is read as an attenuation map: μ = (pixel − air) · `_mu_per_pixel` (air = the image's
1st percentile, so lung-window images whose air is grey start from zero attenuation). A path across the
whole image at display value 1 attenuates by ``PATH_ATTENUATION``; a 256-pixel path through water
(display ≈ 0.5 above air) totals ≈ 5, as in a real body. Projection is parallel-beam (``N_VIEWS`` views
over 180°), reconstruction is scikit-image's filtered back-projection (`iradon`, ramp filter).

A radon → FBP round trip is not lossless (interpolation blur, view aliasing), so no type returns the
reconstruction itself: each adds the *artifact* — FBP(corrupted sinogram) − FBP(ideal sinogram), which
by linearity of FBP is FBP(corrupted − ideal) — to the original image. The original is the noise-free,
fully sampled scan; the output is what the same scan looks like with the defect.

Pixels at the display floor or ceiling (exactly 0 or 1) are clipped by the display window — air under a
soft-tissue window, bone under a brain window, black padding — so their true value lies well outside it.
They are taken to sit ``CLIP_MARGIN`` (one window width) beyond the edge before the artifact is added, so
only an artifact stronger than that (metal streaks) shows in them, as on a real windowed scan.
"""

from __future__ import annotations

import numpy as np

from ._base import Distortion, DistortionNotApplicable, saturate

N_VIEWS = 180  # reference geometry: parallel beam, 1° steps over 180°
PATH_ATTENUATION = 10.0  # line integral across the full image width at display value 1 above air
WATER_DISPLAY = 0.5  # display value (above air) taken as water, for metal densities in water units
CLIP_MARGIN = 1.0  # how far beyond the window (display units) a clipped pixel is taken to lie


def _theta(n_views: int) -> np.ndarray:
    return np.linspace(0.0, 180.0, int(n_views), endpoint=False)


def _mu_per_pixel(size: int) -> float:
    """Attenuation per pixel of display value 1 (above air), so the scale does not depend on matrix size."""
    return PATH_ATTENUATION / size


def _to_square(pixels: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Zero-pad to a square so the rotation centre is the image centre; return the crop back."""
    h, w = pixels.shape
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    sq = np.zeros((s, s), np.float32)
    sq[top : top + h, left : left + w] = pixels
    return sq, (slice(top, top + h), slice(left, left + w))


def _attenuation(pixels: np.ndarray) -> np.ndarray:
    """Display values above the image's air level (1st percentile), ≥ 0, in display units."""
    air = float(np.percentile(pixels, 1))
    return np.clip(pixels - air, 0.0, None).astype(np.float32)


def radon(image: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """`skimage.transform.radon(image, theta, circle=False)`, same geometry and bin layout, ~6× faster.

    skimage rotates the padded image with `skimage.transform.warp` (≈1.2 ms per view at 363²; 220 ms for
    180 views, over the 200 ms budget of a whole call). This is the same algorithm — bilinear rotation
    about the same centre with the same matrix, then column sums — with `cv2.warpAffine` doing the
    rotation (≈0.2 ms per view). tests/distort/test_ct.py checks it against skimage.
    """
    import cv2

    diagonal = np.sqrt(2) * max(image.shape)
    pad = [int(np.ceil(diagonal - s)) for s in image.shape]
    pad_before = [(s + p) // 2 - s // 2 for s, p in zip(image.shape, pad, strict=True)]
    padded = np.pad(
        np.asarray(image, np.float32), [(pb, p - pb) for pb, p in zip(pad_before, pad, strict=True)], mode="constant"
    )
    n = padded.shape[0]
    c = n // 2
    out = np.empty((n, len(theta)), np.float32)
    for i, a in enumerate(np.deg2rad(theta)):
        ca, sa = np.cos(a), np.sin(a)
        m = np.array([[ca, sa, -c * (ca + sa - 1)], [-sa, ca, -c * (ca - sa - 1)]])
        rot = cv2.warpAffine(
            padded, m, (n, n), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        out[:, i] = rot.sum(0)
    return out


def fbp(sinogram: np.ndarray, theta: np.ndarray, size: int) -> np.ndarray:
    """Filtered back-projection (ramp filter) onto a size × size grid: `skimage.transform.iradon`."""
    from skimage.transform import iradon

    return iradon(sinogram, theta, output_size=size, filter_name="ramp", interpolation="linear", circle=False)


def _log_counts(counts: np.ndarray, i0: float) -> np.ndarray:
    """Measured line integrals −log(counts / I0); a detector that counted no photons reads one (log(0) guard)."""
    return -np.log(np.maximum(counts, 1.0) / i0)


def _add_artifact(pixels: np.ndarray, artifact: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """pixels + artifact, with clipped pixels (0 or 1; except where ``keep``) first pushed CLIP_MARGIN outward."""
    base = pixels.astype(np.float32).copy()
    low, high = pixels <= 0.0, pixels >= 1.0
    if keep is not None:
        low &= ~keep
        high &= ~keep
    base[low] -= CLIP_MARGIN
    base[high] += CLIP_MARGIN
    return base + artifact.astype(np.float32)


def _grey(pixels: np.ndarray, name: str) -> None:
    if pixels.ndim != 2:
        raise DistortionNotApplicable(f"distortion {name!r} simulates a CT sinogram; it needs a grayscale image")


class CTDistortion(Distortion):
    family = "ct"
    modalities = ("CT",)
    color = False

    def display(self, out: np.ndarray) -> np.ndarray:
        # `apply` returns the reconstruction in window units, past black and white where the artifact is
        # strong (metal far above the window); the display window saturates those, as a CT viewer does
        return saturate(out)


class CTLowDose(CTDistortion):
    """Quantum noise of a low-dose scan.

    Transmitted counts ~ Poisson(I0 · exp(−p)) per detector bin and view, p' = −log(counts / I0). The
    output is the original plus FBP(p' − p) in display units — FBP(noisy) − FBP(clean), so only the dose
    effect is added and not the blur of the radon → FBP round trip (level 1 stays nearly noiseless).
    """

    name = "ct_low_dose"
    stochastic = True
    description = (
        "Low-dose CT quantum noise: Poisson transmitted counts at I0 incident photons per detector bin and view "
        "(180 parallel views), log, ramp-filtered back-projection of the noise added to the image."
    )
    levels = ({"I0": 1e6}, {"I0": 3e5}, {"I0": 1e5}, {"I0": 4e4}, {"I0": 1.5e4})

    def apply(self, pixels, params):
        _grey(pixels, self.name)
        att, crop = _to_square(_attenuation(pixels))
        size = att.shape[0]
        mu = _mu_per_pixel(size)
        theta = _theta(N_VIEWS)
        p = radon(att, theta).astype(np.float64) * mu
        i0 = float(params["I0"])
        counts = np.random.default_rng(int(params["noise_seed"])).poisson(i0 * np.exp(-p))
        noise = fbp(_log_counts(counts, i0) - p, theta, size) / mu
        return _add_artifact(pixels, noise[crop])


class CTSparseView(CTDistortion):
    """Too few projection angles: view aliasing shows as streaks radiating from edges and bright structures.

    The output is the original plus FBP(``views`` views) − FBP(180 views) of the same object, so only the
    streaks of undersampling are added and not the blur of the radon → FBP round trip.
    """

    name = "ct_sparse_view"
    description = (
        "Sparse-view CT: parallel-beam projections at a few evenly spaced angles over 180° reconstructed by ramp "
        "FBP; the streaks relative to a 180-view scan are added to the image."
    )
    levels = ({"views": 150}, {"views": 100}, {"views": 64}, {"views": 40}, {"views": 24})

    def apply(self, pixels, params):
        _grey(pixels, self.name)
        att, crop = _to_square(_attenuation(pixels))
        size = att.shape[0]
        full, sparse = _theta(N_VIEWS), _theta(params["views"])
        streaks = fbp(radon(att, sparse), sparse, size) - fbp(radon(att, full), full, size)
        return _add_artifact(pixels, streaks[crop])


def _disc_projection(n_bins: int, theta: np.ndarray, row: float, col: float, radius: float, centre: int) -> np.ndarray:
    """Exact parallel-beam line integrals of a unit-attenuation disc, in skimage's radon/iradon bin layout.

    A pixel (row, col) projects onto bin t + n_bins // 2 with t = (col − c) cos θ − (row − c) sin θ.
    """
    a = np.deg2rad(theta)
    t0 = (col - centre) * np.cos(a) - (row - centre) * np.sin(a)
    t = np.arange(n_bins)[:, None] - n_bins // 2
    return 2.0 * np.sqrt(np.clip(radius**2 - (t - t0[None, :]) ** 2, 0.0, None))


class CTMetal(CTDistortion):
    """Metal implants: dark/bright streaks from beam hardening and photon starvation.

    Discs of ``metal_mu`` × water attenuation are placed inside the body; `sample` draws one uniform number
    per object, which `apply` maps to a pixel of the body (eroded so the disc lies inside), so the params
    replay the exact output. In the sinogram the metal's line integral q is hardened to q / (1 + β q)
    (a polychromatic beam, water-precorrected, sees metal less attenuating than its true μ), counts are
    Poisson(I0 · exp(−(p + q_hardened))) so rays through metal starve, and the output is the image with
    the metal painted in plus FBP(measured − ideal) — the artifact alone.
    """

    name = "ct_metal_streaks"
    stochastic = True
    description = (
        "Metal artifact: small discs of metal (μ in water units) inside the body; beam hardening q/(1+βq) of the "
        "metal line integrals and photon starvation (Poisson counts at I0) in the sinogram, streaks by ramp FBP."
    )
    levels = (
        {"n_objects": 1, "radius": (3.0, 3.5), "metal_mu": 12.0, "beam_hardening": 0.15, "I0": 2e6},
        {"n_objects": 1, "radius": (4.5, 5.0), "metal_mu": 18.0, "beam_hardening": 0.25, "I0": 2e6},
        {"n_objects": 2, "radius": (4.5, 5.0), "metal_mu": 20.0, "beam_hardening": 0.25, "I0": 2e6},
        {"n_objects": 2, "radius": (5.0, 5.5), "metal_mu": 25.0, "beam_hardening": 0.30, "I0": 2e6},
        {"n_objects": 3, "radius": (5.5, 6.0), "metal_mu": 30.0, "beam_hardening": 0.35, "I0": 2e6},
    )

    def sample(self, level, rng):
        params = super().sample(level, rng)
        params["sites"] = [float(u) for u in rng.random(int(params["n_objects"]))]
        return params

    @staticmethod
    def _centres(att: np.ndarray, sites: list[float], radius: float) -> list[tuple[int, int]]:
        """Map uniform numbers to body pixels (display > 0.2 above air, eroded by the radius plus 2 px)."""
        import cv2

        body = (att > 0.2).astype(np.uint8)
        k = 2 * int(np.ceil(radius + 2)) + 1
        inner = cv2.erode(body, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        idx = np.flatnonzero(inner)
        if idx.size == 0:  # no body big enough: fall back to the central quarter
            n = att.shape[0]
            yy, xx = np.mgrid[:n, :n]
            idx = np.flatnonzero((np.abs(yy - n // 2) < n // 4) & (np.abs(xx - n // 2) < n // 4))
        picks = idx[np.minimum((np.asarray(sites) * idx.size).astype(int), idx.size - 1)]
        return [divmod(int(i), att.shape[1]) for i in picks]

    def apply(self, pixels, params):
        _grey(pixels, self.name)
        sq, crop = _to_square(pixels)
        att = _to_square(_attenuation(pixels))[0]
        size = sq.shape[0]
        mu = _mu_per_pixel(size)
        theta = _theta(N_VIEWS)
        p = radon(att, theta).astype(np.float64) * mu
        radius = float(params["radius"])
        metal_mu = float(params["metal_mu"]) * WATER_DISPLAY * mu  # per pixel
        q = np.zeros_like(p)
        painted = sq.copy()
        metal = np.zeros(sq.shape, bool)
        yy, xx = np.mgrid[:size, :size]
        for row, col in self._centres(att, params["sites"], radius):
            q += _disc_projection(p.shape[0], theta, row, col, radius, size // 2) * metal_mu
            disc = (yy - row) ** 2 + (xx - col) ** 2 <= radius**2
            painted[disc] = sq[disc] + float(params["metal_mu"]) * WATER_DISPLAY
            metal |= disc
        hardened = q / (1.0 + float(params["beam_hardening"]) * q)
        i0 = float(params["I0"])
        counts = np.random.default_rng(int(params["noise_seed"])).poisson(i0 * np.exp(-(p + hardened)))
        artifact = fbp(_log_counts(counts, i0) - (p + q), theta, size) / mu
        return _add_artifact(painted[crop], artifact[crop], keep=metal[crop])


class CTRing(CTDistortion):
    """Ring artifact: miscalibrated detector elements.

    A detector element whose gain is off by g (counts × (1 + g)) reads line integrals off by −log(1 + g) on
    every view. Over a full 360°
    rotation it measures the lines at distance r from the centre from both sides, so in the 180° parallel
    sinogram its error sits at bins ±r (half on each) on every view, and FBP turns it into a full circle of
    radius r about the rotation centre. `sample` draws the elements (r as a fraction of the half-width) and
    their gain errors (± gain_error × U(0.5, 1)); the output is the image plus FBP of the offsets alone.
    """

    name = "ct_ring"
    description = (
        "CT ring artifact: detector elements with fractional gain errors g give constant sinogram-row offsets "
        "−log(1+g) over all views of a 360° rotation; ramp FBP of the offsets (concentric rings) is added to the image."
    )
    levels = (
        {"n_bad": 10, "gain_error": 0.08},
        {"n_bad": 16, "gain_error": 0.12},
        {"n_bad": 24, "gain_error": 0.18},
        {"n_bad": 32, "gain_error": 0.25},
        {"n_bad": 48, "gain_error": 0.32},
    )

    def sample(self, level, rng):
        params = self.level_params(level)
        n = int(params["n_bad"])
        params["radii"] = [float(v) for v in rng.uniform(0.02, 0.9, n)]
        sign = rng.choice([-1.0, 1.0], n)
        params["gains"] = [float(v) for v in sign * rng.uniform(0.5, 1.0, n) * params["gain_error"]]
        return params

    def apply(self, pixels, params):
        _grey(pixels, self.name)
        size = max(pixels.shape)
        crop = _to_square(pixels)[1]
        theta = _theta(N_VIEWS)
        n_bins = int(np.ceil(np.sqrt(2) * size))  # skimage's circle=False sinogram height
        centre = n_bins // 2
        offsets = np.zeros(n_bins)
        for radius, gain in zip(params["radii"], params["gains"], strict=True):
            r = int(min(round(radius * size / 2), centre - 1))
            offsets[centre + r] += -0.5 * np.log1p(gain)  # the element's two conjugate views of each line
            offsets[centre - r] += -0.5 * np.log1p(gain)
        rings = fbp(np.repeat(offsets[:, None], len(theta), axis=1), theta, size) / _mu_per_pixel(size)
        return _add_artifact(pixels, rings[crop])
