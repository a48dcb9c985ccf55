"""MR artifacts: Rician noise, motion, ghosting, spikes, bias field, Gibbs ringing, undersampling aliasing.

A displayed MR slice is the magnitude of a complex image reconstructed from k-space, so the k-space types
transform the spectrum of the display image (treated as a real, zero-phase magnitude) and show the
magnitude of the result. Motion, ghosting, spikes and bias field go through TorchIO's deterministic
transforms (`Motion`, `Ghosting`, `Spike`, `BiasField`) with parameters drawn here from our generator,
mimicking their ``Random*`` counterparts. Rician noise, Gibbs ringing and Cartesian undersampling have no
TorchIO transform (its ``RandomNoise`` is Gaussian) and are a few lines of NumPy each.

TorchIO layout of a 2D slice: a 4D tensor (C, X, Y, Z). TorchIO's ``Motion`` fills k-space segments along
the *last* array axis (Z), so a slice laid out as (1, H, W, 1) would take its whole spectrum from one copy —
a plain rigid shift, no motion artifact. Here the slice is laid out as (1, H, 1, W): Z carries the phase-
encoding axis, the in-plane rotation is the Euler angle about Y and translations are along X and Z.
"""

from __future__ import annotations

import numpy as np

from ._base import Distortion, saturate

# --- helpers -----------------------------------------------------------------------------------------


def _uniform(value, rng: np.random.Generator) -> float:
    """A (low, high) tuple is a range drawn uniformly; a scalar is fixed."""
    if isinstance(value, tuple):
        return float(rng.uniform(value[0], value[1]))
    return float(value)


def _integer(value, rng: np.random.Generator) -> int:
    """A (low, high) tuple is an inclusive integer range; a scalar is fixed."""
    if isinstance(value, tuple):
        return int(rng.integers(value[0], value[1] + 1))
    return int(value)


def _magnitude_transform(cls):
    """Subclass a TorchIO k-space transform so that it returns |ifft| instead of Re(ifft).

    TorchIO's ``Motion``, ``Ghosting`` and ``Spike`` end with ``inv_fourier_transform(spectrum).real``; their
    modified spectra are not Hermitian, so the real part drops the imaginary half of the artifact and goes
    negative where a scanner's magnitude image would be bright. Overriding the inverse transform to return
    the modulus (a real tensor, whose ``.real`` is itself) gives the magnitude reconstruction.
    """

    class Magnitude(cls):
        @staticmethod
        def inv_fourier_transform(tensor):
            import torch

            return torch.fft.ifftn(torch.fft.ifftshift(tensor)).abs()

    Magnitude.__name__ = Magnitude.__qualname__ = f"Magnitude{cls.__name__}"
    return Magnitude


_TIO_CLASSES: dict[str, type] = {}


def _tio(name: str, magnitude: bool = False):
    key = f"{name}|{magnitude}"
    if key not in _TIO_CLASSES:
        import torchio

        cls = getattr(torchio, name)
        _TIO_CLASSES[key] = _magnitude_transform(cls) if magnitude else cls
    return _TIO_CLASSES[key]


def _run_torchio(transform, volume: np.ndarray) -> np.ndarray:
    """Apply a TorchIO transform to a (1, X, Y, Z) float32 array and return the transformed array.

    The subject is fresh, so TorchIO's deep copy is skipped (``copy=False`` at construction). TorchIO's
    ``Transform.__call__`` draws ``torch.rand(1)`` for its probability even when p = 1; the global torch RNG
    is forked so that applying a distortion never changes a caller's torch random stream.
    """
    import torch
    import torchio

    tensor = torch.tensor(np.ascontiguousarray(volume, dtype=np.float32))
    subject = torchio.Subject(image=torchio.ScalarImage(tensor=tensor))
    with torch.random.fork_rng(devices=[]):
        out = transform(subject)
    return out["image"].data.numpy().astype(np.float32, copy=False)


def _phase_last(pixels: np.ndarray, axis: int) -> np.ndarray:
    """View with the phase-encoding axis last: axis 1 (columns) as is, axis 0 (rows) transposed; an involution."""
    return pixels if axis == 1 else pixels.T


def _kspace(pixels: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(pixels))


def _magnitude(spectrum: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum))).astype(np.float32)


# --- noise -------------------------------------------------------------------------------------------


class MRDistortion(Distortion):
    """Magnitude MR artifacts: grey images of MR only."""

    family = "mr"
    modalities = ("MR",)
    color = False


class RicianNoise(MRDistortion):
    stochastic = True
    name = "rician_noise"
    description = (
        "Thermal noise of a magnitude image: independent Gaussian noise (sigma, display units) on the real and "
        "imaginary channels, then |x + n1 + i n2| — Rician, with a noise floor of sigma·sqrt(pi/2) in air."
    )
    levels = ({"sigma": 0.005}, {"sigma": 0.012}, {"sigma": 0.022}, {"sigma": 0.038}, {"sigma": 0.065})

    def apply(self, pixels, params):
        rng = np.random.default_rng(int(params["noise_seed"]))
        sigma = float(params["sigma"])
        n = rng.normal(0.0, sigma, (2,) + pixels.shape).astype(np.float32)
        # the noise floor lifts bright pixels past white; the display saturates
        return saturate(np.hypot(pixels + n[0], n[1]))


# --- TorchIO k-space and bias-field transforms -------------------------------------------------------


class MRMotion(MRDistortion):
    name = "mr_motion"
    description = (
        "Rigid in-plane patient motion during a sequential Cartesian acquisition (TorchIO Motion): still in the "
        "reference pose until `still` (fraction of k-space) past the centre line, then num_transforms moves of "
        "0.75–1 × degrees rotation and 0.75–1 × translation pixels (mm at 1 mm spacing); magnitude image."
    )
    levels = (
        {"num_transforms": 1, "still": 0.1, "degrees": 4.0, "translation": 4.0},
        {"num_transforms": 2, "still": 0.05, "degrees": 6.0, "translation": 6.0},
        {"num_transforms": 2, "still": 0.03, "degrees": 8.0, "translation": 8.0},
        {"num_transforms": 3, "still": 0.01, "degrees": 12.0, "translation": 12.0},
        {"num_transforms": 6, "still": 0.0, "degrees": 20.0, "translation": 20.0},
    )

    def sample(self, level, rng):
        """Motion times and poses, in-plane only.

        TorchIO's RandomMotion spaces the times evenly (± 30 % of a step) and draws angles and shifts uniformly
        in ±range, so how much of k-space, and how close to its centre, comes from moved poses — which sets how
        bad the image is — varies widely between draws (with 3 moves one often falls on the centre). For
        calibrated levels the patient holds still until ``still`` (fraction of k-space) past the centre line,
        then makes num_transforms moves evenly spaced (± 30 % of a step) over the rest of the acquisition; a
        random half of the draws run the acquisition backwards. Magnitudes are 0.75–1 × the level's range, with
        random rotation sign and translation direction.
        """
        table = self.level_params(level)
        n, h = int(table["num_transforms"]), float(table["still"])
        d, t = float(table["degrees"]), float(table["translation"])
        step = (0.5 - h) / n
        times = 0.5 + h + step * np.arange(n)
        times[1:] += rng.uniform(-0.3 * step, 0.3 * step, n - 1)
        if rng.integers(0, 2):
            times = 1.0 - times
        angles = rng.choice([-1.0, 1.0], n) * rng.uniform(0.75 * d, d, n)
        direction = rng.uniform(0.0, 2 * np.pi, n)
        length = rng.uniform(0.75 * t, t, n)
        shifts = np.stack([length * np.cos(direction), length * np.sin(direction)], axis=1)
        return {
            **table,
            "phase_axis": int(rng.integers(0, 2)),
            "times": np.sort(times).round(4).tolist(),
            "angles": angles.round(4).tolist(),
            "shifts": shifts.round(4).tolist(),
            "image_interpolation": "linear",
        }

    def apply(self, pixels, params):
        img = _phase_last(pixels, int(params["phase_axis"]))
        angles = np.asarray(params["angles"], dtype=float)
        shifts = np.asarray(params["shifts"], dtype=float).reshape(-1, 2)
        # (1, X=rows, Y=1, Z=phase-encoding columns): rotate about Y, translate along X and Z only
        degrees = np.stack([np.zeros_like(angles), angles, np.zeros_like(angles)], axis=1)
        translation = np.stack([shifts[:, 0], np.zeros(len(shifts)), shifts[:, 1]], axis=1)
        motion = _tio("Motion", magnitude=True)(
            degrees=degrees,
            translation=translation,
            times=np.asarray(params["times"], dtype=float),
            image_interpolation=params["image_interpolation"],
            copy=False,
        )
        out = _run_torchio(motion, img[None, :, None, :])[0, :, 0, :]
        # k-space artifacts overshoot past white (magnitude images never go below 0); the display saturates
        return saturate(_phase_last(out, int(params["phase_axis"])))


class Ghosting(MRDistortion):
    name = "ghosting"
    description = (
        "Periodic ghosting along the phase-encoding axis (pulsation, respiration, odd/even-echo mismatch; "
        "TorchIO Ghosting): every num_ghosts-th k-space line scaled by (1 − intensity), the central restore "
        "fraction kept; magnitude image. Ghosts at FOV/num_ghosts; intensity 1 makes a ghost as bright as the "
        "dimmed object."
    )
    # num_ghosts is fixed at 2 (the N/2 ghost): drawn from 2–4 as in RandomGhosting, the ghost count moves
    # SSIM as much as two levels of intensity do, and the levels would no longer be ordered.
    levels = (
        {"num_ghosts": 2, "intensity": (0.12, 0.16), "restore": 0.02},
        {"num_ghosts": 2, "intensity": (0.28, 0.34), "restore": 0.02},
        {"num_ghosts": 2, "intensity": (0.48, 0.54), "restore": 0.02},
        {"num_ghosts": 2, "intensity": (0.68, 0.74), "restore": 0.02},
        {"num_ghosts": 2, "intensity": (0.95, 1.0), "restore": 0.02},
    )

    def sample(self, level, rng):
        table = self.level_params(level)
        return {
            "num_ghosts": _integer(table["num_ghosts"], rng),
            "phase_axis": int(rng.integers(0, 2)),
            "intensity": _uniform(table["intensity"], rng),
            "restore": float(table["restore"]),
        }

    def apply(self, pixels, params):
        ghosting = _tio("Ghosting", magnitude=True)(
            num_ghosts=int(params["num_ghosts"]),
            axis=int(params["phase_axis"]),  # TorchIO's channel-less tensor is (H, W, 1): 0 rows, 1 columns
            intensity=float(params["intensity"]),
            restore=float(params["restore"]),
            copy=False,
        )
        # ghost copies add to bright tissue past white; the display saturates
        return saturate(_run_torchio(ghosting, pixels[None, :, :, None])[0, :, :, 0])


class Spike(MRDistortion):
    name = "spike"
    description = (
        "Herringbone (corduroy) stripes from spikes in k-space (TorchIO Spike): num_spikes points at random "
        "k-space positions raised by intensity × the k-space maximum (stripe amplitude ≈ intensity × image "
        "mean); magnitude image."
    )
    levels = (
        {"num_spikes": 1, "intensity": (0.025, 0.035)},
        {"num_spikes": 1, "intensity": (0.05, 0.07)},
        {"num_spikes": 1, "intensity": (0.1, 0.14)},
        {"num_spikes": (1, 2), "intensity": (0.18, 0.22)},
        {"num_spikes": 2, "intensity": (0.3, 0.35)},
    )
    # spikes nearer the k-space centre than this (fraction of k-space) would be a smooth shading, not stripes
    min_radius = 0.05

    def sample(self, level, rng):
        """Positions uniform in k-space as in TorchIO's RandomSpike (in-plane: Z = 0), away from the centre."""
        table = self.level_params(level)
        positions = []
        for _ in range(_integer(table["num_spikes"], rng)):
            while True:
                p = rng.uniform(0.0, 1.0, 2)
                if np.hypot(*(p - 0.5)) >= self.min_radius:
                    break
            positions.append([round(float(p[0]), 4), round(float(p[1]), 4), 0.0])
        return {"spikes_positions": positions, "intensity": _uniform(table["intensity"], rng)}

    def apply(self, pixels, params):
        spike = _tio("Spike", magnitude=True)(
            spikes_positions=np.asarray(params["spikes_positions"], dtype=float).reshape(-1, 3),
            intensity=float(params["intensity"]),
            copy=False,
        )
        # the spike's stripes overshoot past white; the display saturates
        return saturate(_run_torchio(spike, pixels[None, :, :, None])[0, :, :, 0])


class BiasField(MRDistortion):
    name = "bias_field"
    description = (
        "Smooth multiplicative intensity inhomogeneity (receive-coil sensitivity, B1; TorchIO BiasField): exp of "
        "a random in-plane polynomial of given order, zero-mean in log and spanning `log_range` (a max/min gain "
        "ratio of e^log_range) over the central disc of radius 0.8 half-FOV."
    )
    levels = (
        {"order": 3, "log_range": 0.5},
        {"order": 3, "log_range": 1.0},
        {"order": 3, "log_range": 1.7},
        {"order": 3, "log_range": 2.6},
        {"order": 3, "log_range": 3.8},
    )

    def sample(self, level, rng):
        """Coefficients in TorchIO's (x, y, z power) order, z terms 0 in 2D, rescaled to the level's strength.

        RandomBiasField draws every coefficient uniformly in ±c, so the span of the field varies several-fold
        between draws and a level's severity would be mostly luck. Here linear terms are uniform in ±1,
        quadratic ones in ±1/3 and cubic ones in ±1/9 (smooth, coil-like profiles; equal weights give wiggly
        cubics whose effect depends on where the wiggles fall), then the whole field is scaled so that over the
        central disc it has zero mean and spans exactly ``log_range``.
        """
        table = self.level_params(level)
        order = int(table["order"])
        g = np.linspace(-1.0, 1.0, 65)  # TorchIO normalises each axis to [-1, 1]
        gx, gy = np.meshgrid(g, g, indexing="ij")
        coefficients, field = [], np.zeros_like(gx)
        for x_order in range(order + 1):
            for y_order in range(order + 1 - x_order):
                for z_order in range(order + 1 - (x_order + y_order)):
                    if z_order > 0:  # the slice has a single z, where TorchIO's z mesh is 0
                        coefficients.append(0.0)
                        continue
                    c = float(rng.uniform(-1.0, 1.0)) / 3.0 ** max(0, x_order + y_order - 1)
                    coefficients.append(c)
                    field += c * gx**x_order * gy**y_order
        disc = gx**2 + gy**2 <= 0.8**2  # where the anatomy usually is; a cubic's extremes sit in the corners
        scale = float(table["log_range"]) / max(float(np.ptp(field[disc])), 1e-6)
        coefficients = [c * scale for c in coefficients]
        coefficients[0] -= float(field[disc].mean()) * scale  # term 0 is the constant: zero-mean log field
        return {**table, "coefficients": [round(c, 6) for c in coefficients]}

    def apply(self, pixels, params):
        bias = _tio("BiasField")(coefficients=list(params["coefficients"]), order=int(params["order"]), copy=False)
        # the bias field brightens regions past white; the display saturates
        return saturate(_run_torchio(bias, pixels[None, :, :, None])[0, :, :, 0])


# --- hand-written k-space truncation and undersampling -----------------------------------------------


class GibbsRinging(MRDistortion):
    name = "gibbs_ringing"
    description = (
        "Gibbs (truncation) ringing: only the central `keep` fraction of k-space along each axis is acquired "
        "(hard cutoff, no filter), zero-filled to the matrix; magnitude image."
    )
    levels = ({"keep": 0.55}, {"keep": 0.4}, {"keep": 0.28}, {"keep": 0.19}, {"keep": 0.12})

    def apply(self, pixels, params):
        # TorchIO has no truncation transform (MONAI's GibbsNoise does, but MONAI is not a dependency)
        spectrum = _kspace(pixels)
        mask = np.ones(pixels.shape, dtype=bool)
        for axis, n in enumerate(pixels.shape):
            keep = max(1, int(round(float(params["keep"]) * n)))
            lo = n // 2 - keep // 2
            line = np.zeros(n, dtype=bool)
            line[lo : lo + keep] = True
            mask &= line.reshape([-1 if a == axis else 1 for a in range(2)])
        # ringing overshoots past white at edges; the display saturates
        return saturate(_magnitude(np.where(mask, spectrum, 0)))


class Undersampling(MRDistortion):
    name = "undersampling"
    description = (
        "Cartesian undersampling aliasing (parallel-imaging acceleration without unfolding): a fully sampled "
        "centre (center fraction of lines) plus every R-th phase-encoding line from a random offset, "
        "zero-filled; magnitude image."
    )
    levels = (
        {"acceleration": 2, "center": 0.32},
        {"acceleration": 2, "center": 0.14},
        {"acceleration": 3, "center": 0.07},
        {"acceleration": 4, "center": 0.04},
        {"acceleration": 8, "center": 0.02},
    )

    def sample(self, level, rng):
        table = self.level_params(level)
        return {**table, "phase_axis": int(rng.integers(0, 2)),
                "offset": int(rng.integers(0, int(table["acceleration"])))}

    def apply(self, pixels, params):
        # the mask is a few index operations; no library ships a plain equispaced-plus-centre mask for 2D arrays
        img = _phase_last(pixels, int(params["phase_axis"]))
        n = img.shape[1]
        r = int(params["acceleration"])
        lines = np.arange(n) % r == int(params["offset"]) % r
        n_center = max(1, int(round(float(params["center"]) * n)))
        lo = n // 2 - n_center // 2
        lines[lo : lo + n_center] = True
        out = _magnitude(_kspace(img) * lines[None, :])
        # k-space artifacts overshoot past white (magnitude images never go below 0); the display saturates
        return saturate(_phase_last(out, int(params["phase_axis"])))
