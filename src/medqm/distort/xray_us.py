"""Projection X-ray and ultrasound artifacts, written by hand: neither TorchIO nor scikit-image models them.

X-ray: scatter veil (a low-frequency fog that lowers contrast) and anti-scatter grid lines (Moiré stripes
from a stationary grid). Ultrasound: speckle (multiplicative, fully developed: intensity ~ Gamma(L, 1/L)
with L looks) and gain/shadowing (a wrong time-gain-compensation curve with depth plus an acoustic shadow).
"""

from __future__ import annotations

import numpy as np

from ._base import Distortion, saturate

_XRAY = ("XR", "MG")


class ScatterVeil(Distortion):
    name = "xray_scatter"
    family = "xray"
    modalities = _XRAY
    description = "Scatter without a grid: x' = (1−a)·x + a·(blur_σ=40px(x) + fog); fraction a of scattered signal."
    levels = ({"a": 0.08, "fog": 0.1}, {"a": 0.2, "fog": 0.15}, {"a": 0.35, "fog": 0.2}, {"a": 0.5, "fog": 0.25},
              {"a": 0.68, "fog": 0.3})

    def apply(self, pixels, params):
        import cv2

        low = cv2.GaussianBlur(pixels, (0, 0), sigmaX=40, borderType=cv2.BORDER_REFLECT)
        # the fog lifts bright pixels past white; the detector saturates
        return saturate((1 - params["a"]) * pixels + params["a"] * (low + params["fog"]))


class GridLines(Distortion):
    name = "grid_lines"
    family = "xray"
    modalities = _XRAY
    description = ("Stationary anti-scatter grid: sinusoidal stripes, x' = x·(1 − m·(½+½ sin(2π f t + φ))); "
                   "period in pixels.")
    levels = (
        {"modulation": 0.02, "period": (3.0, 6.0)},
        {"modulation": 0.05, "period": (3.0, 6.0)},
        {"modulation": 0.1, "period": (3.0, 6.0)},
        {"modulation": 0.18, "period": (3.0, 6.0)},
        {"modulation": 0.3, "period": (3.0, 6.0)},
    )

    def sample(self, level, rng):
        params = super().sample(level, rng)
        params["vertical"] = bool(rng.integers(0, 2))
        params["phase"] = float(rng.uniform(0, 2 * np.pi))
        return params

    def apply(self, pixels, params):
        h, w = pixels.shape[:2]
        t = np.arange(w if params["vertical"] else h, dtype=np.float32)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * t / params["period"] + params["phase"])
        gain = 1 - params["modulation"] * wave
        gain = gain[None, :] if params["vertical"] else gain[:, None]
        return pixels * (gain if pixels.ndim == 2 else gain[..., None])


class Speckle(Distortion):
    name = "speckle"
    family = "us"
    modalities = ("US",)
    stochastic = True
    description = ("Fully developed speckle: x' = x·G, G ~ Gamma(L, 1/L) correlated over ~1.5 px; "
                   "fewer looks L = stronger.")
    levels = ({"looks": 60.0}, {"looks": 16.0}, {"looks": 6.0}, {"looks": 2.5}, {"looks": 1.0})

    def apply(self, pixels, params):
        import cv2

        rng = np.random.default_rng(params["noise_seed"])
        L = params["looks"]
        g = rng.gamma(L, 1.0 / L, size=pixels.shape[:2]).astype(np.float32)
        # speckle grains span a few pixels (the resolution cell); smoothing lowers variance, so rescale it back
        sm = cv2.GaussianBlur(g, (0, 0), sigmaX=0.8)
        sm = 1 + (sm - sm.mean()) * (g.std() / max(sm.std(), 1e-6))
        # multiplicative speckle exceeds the display range both ways; the display saturates
        return saturate(pixels * (sm if pixels.ndim == 2 else sm[..., None]))


class GainShadow(Distortion):
    name = "us_gain_shadow"
    family = "us"
    modalities = ("US",)
    description = ("Wrong time-gain compensation (gain ramps by g dB over the depth) plus an acoustic shadow band "
                   "of relative width w and depth d starting at a random lateral position.")
    levels = (
        {"gain_db": 1.5, "shadow_width": 0.04, "shadow_depth": 0.25},
        {"gain_db": 3.0, "shadow_width": 0.08, "shadow_depth": 0.45},
        {"gain_db": 5.0, "shadow_width": 0.12, "shadow_depth": 0.65},
        {"gain_db": 7.5, "shadow_width": 0.17, "shadow_depth": 0.8},
        {"gain_db": 10.0, "shadow_width": 0.24, "shadow_depth": 0.92},
    )

    def sample(self, level, rng):
        params = super().sample(level, rng)
        params["gain_sign"] = float(rng.choice([-1.0, 1.0]))
        params["shadow_x"] = float(rng.uniform(0.25, 0.75))
        params["shadow_top"] = float(rng.uniform(0.2, 0.5))
        return params

    def apply(self, pixels, params):
        h, w = pixels.shape[:2]
        depth = np.linspace(0, 1, h, dtype=np.float32)[:, None]
        gain = 10 ** (params["gain_sign"] * params["gain_db"] * depth / 20)
        x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
        # soft-edged band below the reflector, fading in over 5 % of the depth
        lateral = np.exp(-0.5 * ((x - params["shadow_x"]) / (params["shadow_width"] / 2.355)) ** 2)
        below = np.clip((depth - params["shadow_top"]) / 0.05, 0, 1)
        field = gain * (1 - params["shadow_depth"] * lateral * below)
        # a positive gain ramp amplifies past white; the display saturates
        return saturate(pixels * (field if pixels.ndim == 2 else field[..., None]))
