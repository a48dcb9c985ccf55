"""Generic degradations that occur in every modality: noise, blur, compression, resolution, exposure, quantisation.

Intensities are display values in [0, 1] (what an MLLM is shown). Codecs go through Pillow (JPEG,
JPEG 2000 via OpenJPEG), blurs through OpenCV; TorchIO's ``Blur`` works on physical (mm) sigmas of 3D
volumes, which a display-space 2D level table does not need.
"""

from __future__ import annotations

import io

import numpy as np

from ._base import Distortion, saturate


def _rng(params) -> np.random.Generator:
    return np.random.default_rng(int(params["noise_seed"]))


def _per_channel(pixels: np.ndarray, fn) -> np.ndarray:
    if pixels.ndim == 2:
        return fn(pixels)
    return np.stack([fn(pixels[..., c]) for c in range(pixels.shape[2])], axis=-1)


class GaussianNoise(Distortion):
    stochastic = True
    name = "gaussian_noise"
    description = "Additive white Gaussian noise (electronic/thermal noise); sigma in display units."
    levels = ({"sigma": 0.01}, {"sigma": 0.03}, {"sigma": 0.06}, {"sigma": 0.10}, {"sigma": 0.16})

    def apply(self, pixels, params):
        # noise pushes pixels past the display range, which saturates
        return saturate(pixels + _rng(params).normal(0.0, params["sigma"], pixels.shape).astype(np.float32))


class PoissonNoise(Distortion):
    stochastic = True
    name = "poisson_noise"
    description = "Quantum (shot) noise: counts ~ Poisson(photons × intensity); fewer photons per pixel = noisier."
    levels = ({"photons": 3000}, {"photons": 300}, {"photons": 80}, {"photons": 25}, {"photons": 8})

    def apply(self, pixels, params):
        lam = params["photons"]
        # photon counts above the mean exceed full scale; the detector saturates
        return saturate(_rng(params).poisson(np.clip(pixels, 0, 1) * lam).astype(np.float32) / lam)


class GaussianBlur(Distortion):
    name = "gaussian_blur"
    description = ("Isotropic Gaussian blur (focal spot, detector or reconstruction-kernel unsharpness); "
                   "sigma in pixels of a 256² image.")
    levels = ({"sigma": 0.6}, {"sigma": 1.2}, {"sigma": 2.0}, {"sigma": 3.2}, {"sigma": 5.0})

    def apply(self, pixels, params):
        import cv2

        # a convex combination, in range up to float rounding (1 + 1e-7)
        return saturate(cv2.GaussianBlur(pixels, (0, 0), sigmaX=params["sigma"], borderType=cv2.BORDER_REFLECT))


class MotionBlur(Distortion):
    name = "motion_blur"
    description = "Linear motion blur during exposure: a line kernel of given length (pixels) at a random angle."
    levels = (
        {"length": 3, "angle": (0.0, 180.0)},
        {"length": 6, "angle": (0.0, 180.0)},
        {"length": 10, "angle": (0.0, 180.0)},
        {"length": 16, "angle": (0.0, 180.0)},
        {"length": 25, "angle": (0.0, 180.0)},
    )

    def apply(self, pixels, params):
        import cv2

        n = int(params["length"])
        size = n if n % 2 else n + 1
        kernel = np.zeros((size, size), np.float32)
        kernel[size // 2, (size - n) // 2 : (size - n) // 2 + n] = 1.0
        rot = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), params["angle"], 1.0)
        kernel = cv2.warpAffine(kernel, rot, (size, size), flags=cv2.INTER_LINEAR)
        kernel /= kernel.sum()
        # a convex combination, in range up to float rounding (-5e-16)
        return saturate(cv2.filter2D(pixels, -1, kernel, borderType=cv2.BORDER_REFLECT))


def _codec(pixels: np.ndarray, fmt: str, **save_kwargs) -> np.ndarray:
    from PIL import Image

    u8 = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format=fmt, **save_kwargs)
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB" if pixels.ndim == 3 else "L"), dtype=np.float32) / 255.0
    return out


class JPEG(Distortion):
    name = "jpeg"
    description = "Lossy JPEG (baseline, 4:2:0 for colour) at a given quality, as in PACS exports and screenshots."
    levels = ({"quality": 75}, {"quality": 40}, {"quality": 20}, {"quality": 10}, {"quality": 4})

    def apply(self, pixels, params):
        return _codec(pixels, "JPEG", quality=int(params["quality"]))


class JPEG2000(Distortion):
    name = "jpeg2000"
    description = "Lossy JPEG 2000 (irreversible wavelet, OpenJPEG) at a compression ratio, as in DICOM J2K archives."
    levels = ({"ratio": 15}, {"ratio": 40}, {"ratio": 80}, {"ratio": 160}, {"ratio": 320})

    def apply(self, pixels, params):
        return _codec(pixels, "JPEG2000", quality_mode="rates", quality_layers=[float(params["ratio"])],
                      irreversible=True)


class Downsample(Distortion):
    name = "downsample"
    description = "Resolution loss: area-downsample by a factor, then bicubic back up (low matrix size, digital zoom)."
    levels = ({"factor": 1.5}, {"factor": 2.0}, {"factor": 3.0}, {"factor": 4.5}, {"factor": 7.0})

    def apply(self, pixels, params):
        import cv2

        h, w = pixels.shape[:2]
        f = float(params["factor"])
        small = cv2.resize(pixels, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
        # bicubic interpolation overshoots at edges (ringing past 0 and 1); the display saturates
        return saturate(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))


class ContrastReduction(Distortion):
    name = "contrast_reduction"
    description = "Contrast compressed towards the mean: x' = mean + k (x - mean) (flat windowing, poor display)."
    levels = ({"k": 0.93}, {"k": 0.8}, {"k": 0.64}, {"k": 0.46}, {"k": 0.28})

    def apply(self, pixels, params):
        mean = pixels.mean(axis=(0, 1), keepdims=True)
        # in range by construction (k <= 1), up to float rounding
        return saturate(mean + params["k"] * (pixels - mean))


class Underexposure(Distortion):
    name = "underexposure"
    description = "Too little signal: intensities scaled down and the darkest tones crushed (x' = max(0, s·x − b))."
    levels = ({"s": 0.85, "b": 0.0}, {"s": 0.7, "b": 0.02}, {"s": 0.55, "b": 0.05}, {"s": 0.42, "b": 0.08},
              {"s": 0.3, "b": 0.1})

    def apply(self, pixels, params):
        # dark pixels fall below black and are crushed there
        return saturate(pixels * params["s"] - params["b"])


class Overexposure(Distortion):
    name = "overexposure"
    description = ("Too much signal: intensities raised and highlights clipped (x' = min(1, s·x + b)), "
                   "burning out detail.")
    levels = ({"s": 1.04, "b": 0.01}, {"s": 1.15, "b": 0.04}, {"s": 1.35, "b": 0.08}, {"s": 1.6, "b": 0.14},
              {"s": 2.0, "b": 0.2})

    def apply(self, pixels, params):
        # bright pixels burn out at white (the point of over-exposure)
        return saturate(pixels * params["s"] + params["b"])


class Gamma(Distortion):
    name = "gamma"
    description = "Wrong display gamma: x' = x^γ with γ drawn on either side of 1 (too dark or too bright mid-tones)."
    levels = ({"log2_gamma": 0.25}, {"log2_gamma": 0.55}, {"log2_gamma": 0.9}, {"log2_gamma": 1.3}, {"log2_gamma": 1.8})

    def sample(self, level, rng):
        params = self.level_params(level)
        params["gamma"] = float(2.0 ** (params["log2_gamma"] * rng.choice([-1.0, 1.0])))
        return params

    def apply(self, pixels, params):
        return np.power(np.clip(pixels, 0, 1), params["gamma"])


class BitDepth(Distortion):
    name = "bit_depth"
    description = ("Quantisation to fewer grey levels "
                   "(banding/posterisation from bad exports or 8-bit windows of 16-bit data).")
    levels = ({"bits": 6}, {"bits": 5}, {"bits": 4}, {"bits": 3}, {"bits": 2})

    def apply(self, pixels, params):
        n = 2 ** int(params["bits"]) - 1
        return np.round(pixels * n) / n
