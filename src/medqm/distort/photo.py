"""Optical artifacts of photographed specimens: histopathology slides and fundus photographs.

Stain/colour shift perturbs optical density per channel (Beer–Lambert; for H&E the HED stain space of
Ruifrok & Johnston, as in Tellez et al. 2018's HED augmentation), defocus is a pillbox (circle-of-confusion)
blur rather than a Gaussian, and uneven illumination is a smooth multiplicative field (vignetting plus a
tilt).
"""

from __future__ import annotations

import numpy as np

from ._base import Distortion, saturate

_PHOTO = ("PATH", "FUNDUS")


class _OpticalDensityShift(Distortion):
    family = "color"
    levels = ({"s": 0.1}, {"s": 0.25}, {"s": 0.45}, {"s": 0.7}, {"s": 1.0})

    def sample(self, level, rng):
        # fixed magnitude s with a random sign per channel, so severity grows with the level, not by luck
        params = super().sample(level, rng)
        s = params["s"]
        params["alpha"] = (s * rng.choice([-1.0, 1.0], 3)).tolist()
        params["beta"] = (s * rng.choice([-1.0, 1.0], 3)).tolist()
        return params

    @staticmethod
    def _od_shift(pixels, alpha, beta):
        od = -np.log(np.clip(pixels, 1e-3, 1))
        if pixels.ndim == 2:
            alpha, beta = alpha[:1], beta[:1]
        # a negative density shift brightens past white; the camera saturates
        return saturate(np.exp(-(od * (1 + alpha) + beta * 0.3)))


class StainShift(_OpticalDensityShift):
    name = "stain_shift"
    modalities = ("PATH",)
    description = ("H&E stain variation: haematoxylin, eosin and DAB concentrations (Ruifrok–Johnston HED space) "
                   "scaled by (1+α) and shifted by 0.05·β, α, β = ±s per stain (random signs).")

    def apply(self, pixels, params):
        from skimage.color import hed2rgb, rgb2hed

        alpha, beta = np.asarray(params["alpha"], np.float32), np.asarray(params["beta"], np.float32)
        if pixels.ndim == 2:
            return self._od_shift(pixels, alpha, beta)
        # HED concentrations span ~0–0.3, hence the smaller offset scale
        return hed2rgb(rgb2hed(pixels) * (1 + alpha) + beta * 0.05).astype(np.float32)


class ColorCast(_OpticalDensityShift):
    name = "color_cast"
    modalities = ("FUNDUS",)
    description = ("Colour cast of a fundus camera (white balance, flash, media opacity): each RGB channel's optical "
                   "density scaled by (1+α) and shifted by 0.3·β, α, β = ±s (random signs).")

    def apply(self, pixels, params):
        return self._od_shift(pixels, np.asarray(params["alpha"], np.float32), np.asarray(params["beta"], np.float32))


class Defocus(Distortion):
    name = "defocus"
    family = "color"
    modalities = _PHOTO
    description = "Out-of-focus optics: convolution with a pillbox (uniform disk) of radius r pixels."
    levels = ({"radius": 0.8}, {"radius": 1.6}, {"radius": 2.6}, {"radius": 4.0}, {"radius": 6.0})

    def apply(self, pixels, params):
        import cv2

        r = float(params["radius"])
        n = int(np.ceil(r))
        yy, xx = np.mgrid[-n : n + 1, -n : n + 1].astype(np.float32)
        # anti-aliased disk: pixel coverage approximated by a 1-px ramp at the rim
        kernel = np.clip(r + 0.5 - np.hypot(yy, xx), 0, 1)
        kernel /= kernel.sum()
        # a convex combination, in range up to float rounding
        return saturate(cv2.filter2D(pixels, -1, kernel, borderType=cv2.BORDER_REFLECT))


class UnevenIllumination(Distortion):
    name = "uneven_illumination"
    family = "color"
    modalities = _PHOTO
    description = ("Uneven illumination: x' = x·(1 − v·r²)·(1 + t·u), radial fall-off v around a random centre "
                   "and a linear tilt t along a random direction u.")
    levels = (
        {"vignette": 0.1, "tilt": 0.06},
        {"vignette": 0.22, "tilt": 0.14},
        {"vignette": 0.36, "tilt": 0.24},
        {"vignette": 0.52, "tilt": 0.36},
        {"vignette": 0.7, "tilt": 0.5},
    )

    def sample(self, level, rng):
        params = super().sample(level, rng)
        params["center"] = rng.uniform(0.3, 0.7, 2).round(6).tolist()
        params["direction"] = float(rng.uniform(0, 2 * np.pi))
        return params

    def apply(self, pixels, params):
        h, w = pixels.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        yy /= h
        xx /= w
        cy, cx = params["center"]
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / 0.5
        u = (xx - 0.5) * np.cos(params["direction"]) + (yy - 0.5) * np.sin(params["direction"])
        field = (1 - params["vignette"] * r2) * (1 + params["tilt"] * 2 * u)
        # the tilt brightens one side past white; the camera saturates
        return saturate(pixels * (field if pixels.ndim == 2 else field[..., None]))
