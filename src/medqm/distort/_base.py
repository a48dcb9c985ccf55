"""Distortion registry and the sample/apply split.

Following TorchIO (``RandomMotion`` samples, ``Motion`` applies), every distortion type has two halves:

- `Distortion.sample(level, rng)` draws the random parameters of one severity level — everything random,
  including the seed of any noise realisation — and returns them as a JSON-able dict;
- `Distortion.apply(pixels, params)` is deterministic given those parameters.

So `distort(image, type, level, seed)` is reproducible to the bit, and the parameters stored in a manifest
replay the exact output. Each type's five severity levels are a *table* (`levels`), not a hidden formula;
`docs/distortions.md` prints those tables and the SSIM they measure on the demo collection.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from medqm.io import MODALITIES, MedImage, modality_family

ALL_MODALITIES: tuple[str, ...] = MODALITIES
N_LEVELS = 5

_REGISTRY: dict[str, type[Distortion]] = {}


class DistortionNotApplicable(ValueError):
    """A distortion was asked for on a modality it does not model (e.g. k-space spikes on a fundus photo)."""


class DistortionOutputError(RuntimeError):
    """A distortion broke the output contract (same shape, finite, in [0, 1]): a bug in that distortion."""


def saturate(pixels: np.ndarray) -> np.ndarray:
    """Clip to the display range [0, 1], as a detector or display does with signal past its range.

    Distortions call it explicitly where their physics leaves the range (noise, over-exposure, overshoot);
    `Distortion.replay` then checks, and never repairs, the output.
    """
    return np.clip(pixels, 0.0, 1.0)


@dataclass(frozen=True)
class DistortionResult:
    pixels: np.ndarray
    type: str
    level: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)


class Distortion:
    """Base class. Subclasses set the class attributes and implement `apply` (and `sample` if random).

    Attributes:
        name: registry key, snake_case.
        family: generic, mr, ct, xray, us, color — for documentation and galleries.
        modalities: canonical modalities the artifact occurs in. An image applies when its modality or its
            family does (`medqm.io.modality_family`: CR, DX, XA and RF images take the XR types).
        levels: five dicts of parameters, mildest first. Values that are (low, high) tuples are ranges that
            `sample` draws uniformly from; scalars are fixed.
        description: one line on what it simulates and in which domain.
        color: whether it accepts colour (H×W×3) images; grey-only physics (k-space, sinograms) say False.
        stochastic: whether `apply` draws random numbers; then `sample` adds a ``noise_seed`` for it.
    """

    name: ClassVar[str]
    family: ClassVar[str] = "generic"
    modalities: ClassVar[tuple[str, ...]] = ALL_MODALITIES
    levels: ClassVar[tuple[dict[str, Any], ...]]
    description: ClassVar[str] = ""
    color: ClassVar[bool] = True
    stochastic: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None) is None:
            return
        if len(cls.levels) != N_LEVELS:
            raise TypeError(f"distortion {cls.name!r} must define {N_LEVELS} levels, has {len(cls.levels)}")
        if cls.name in _REGISTRY:
            raise TypeError(f"distortion {cls.name!r} registered twice")
        _REGISTRY[cls.name] = cls

    # --- the random half -------------------------------------------------------------------------------
    def sample(self, level: int, rng: np.random.Generator) -> dict[str, Any]:
        """Draw the parameters of ``level`` (1..5): (low, high) ranges sampled uniformly, plus a noise seed if
        needed."""
        table = self.level_params(level)
        params: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
                params[key] = float(rng.uniform(value[0], value[1]))
            else:
                params[key] = value
        if self.stochastic:
            params["noise_seed"] = int(rng.integers(0, 2**31 - 1))
        return params

    # --- the deterministic half ------------------------------------------------------------------------
    def apply(self, pixels: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def display(self, out: np.ndarray) -> np.ndarray:
        """The output of `apply` as shown: unchanged here. A distortion whose `apply` models the physics past
        the display range (CT's window units) overrides this with `saturate`, saying why."""
        return out

    # --- helpers ---------------------------------------------------------------------------------------
    def level_params(self, level: int) -> dict[str, Any]:
        if not isinstance(level, (int, np.integer)) or not 1 <= level <= N_LEVELS:
            raise ValueError(f"level must be an integer 1..{N_LEVELS}, got {level!r}")
        return dict(self.levels[level - 1])

    def check(self, image: MedImage | None = None, *, modality: str | None = None, pixels: np.ndarray | None = None):
        """Raise `DistortionNotApplicable` when this artifact does not occur in the image's modality."""
        mod = modality or (image.modality if image is not None else None)
        px = pixels if pixels is not None else (image.pixels if image is not None else None)
        if mod is not None and not _models(self.modalities, mod):
            where = f" ({image.id})" if image is not None else ""
            raise DistortionNotApplicable(
                f"distortion {self.name!r} models {'/'.join(self.modalities)} images; this image{where} is {mod}"
            )
        if px is not None and px.ndim == 3 and not self.color:
            raise DistortionNotApplicable(f"distortion {self.name!r} applies to grayscale images; this one is colour")

    def applies_to(self, modality: str | None, *, color: bool = False) -> bool:
        return (modality is None or _models(self.modalities, modality)) and (self.color or not color)

    def __call__(self, image: MedImage | np.ndarray, level: int, seed: int = 0, *,
                 force: bool = False) -> DistortionResult:
        """Sample parameters for (level, seed) and apply them; ``force`` skips the modality check."""
        pixels = image.pixels if isinstance(image, MedImage) else np.asarray(image, dtype=np.float32)
        if not force:
            self.check(image if isinstance(image, MedImage) else None, pixels=pixels)
        # the level is deliberately not in the seed: one seed gives the same random shape (angles, positions,
        # signs) at every level, so severity changes only by the level table's magnitudes
        rng = np.random.default_rng([int(seed), _stable_hash(self.name)])
        params = self.sample(level, rng)
        out = self.replay(pixels, params, level=int(level))
        return DistortionResult(out, self.name, int(level), int(seed), params)

    def replay(self, pixels: np.ndarray, params: dict[str, Any], *, level: int | None = None) -> np.ndarray:
        """Apply recorded parameters and check the output contract: same shape, finite, in [0, 1].

        Nothing is repaired here: a distortion whose physics leaves the display range saturates explicitly
        (`saturate` in its `apply` or `display`, with a comment saying why). ``level`` only names the level in the
        error.

        Raises:
            DistortionOutputError: the output breaks the contract; the message names the distortion, the
                level and the parameters.
        """
        pixels = np.asarray(pixels, dtype=np.float32)
        out = np.asarray(self.display(self.apply(pixels, params)), dtype=np.float32)
        at = f" at level {level}" if level is not None else ""
        where = f"distortion {self.name!r}{at} with parameters {params}"
        if out.shape != pixels.shape:
            raise DistortionOutputError(f"{where} changed the shape {pixels.shape} → {out.shape}")
        finite = np.isfinite(out)
        if not finite.all():
            raise DistortionOutputError(f"{where} produced {int(out.size - finite.sum())} non-finite values "
                                        "(NaN or ±inf); its output must be finite and in [0, 1]")
        lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:
            raise DistortionOutputError(f"{where} produced values in [{lo:g}, {hi:g}], outside [0, 1]; a distortion "
                                        "that saturates must clip its own output (`saturate`)")
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


def _models(modalities: tuple[str, ...], modality: str) -> bool:
    """Whether a distortion modelling ``modalities`` applies to ``modality`` (itself or its family)."""
    return modality in modalities or modality_family(modality) in modalities


def _stable_hash(text: str) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(text.encode())


def list_distortions(modality: str | None = None, *, color: bool | None = None) -> list[str]:
    """Registered distortion names, optionally only those that apply to a modality (and colour images)."""
    _load_all()
    return sorted(
        n for n, cls in _REGISTRY.items()
        if (modality is None or _models(cls.modalities, modality)) and (color is None or not color or cls.color)
    )


def create_distortion(name: str) -> Distortion:
    """Instantiate a registered distortion by name; unknown names get close-match suggestions."""
    _load_all()
    try:
        return _REGISTRY[name]()
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_REGISTRY))}"
        raise ValueError(f"unknown distortion {name!r}{hint}") from None


def distort(image: MedImage | np.ndarray, name: str, level: int, seed: int = 0, *,
            force: bool = False) -> DistortionResult:
    """Apply distortion ``name`` at severity ``level`` (1 mild … 5 severe); same inputs → identical output."""
    return create_distortion(name)(image, level, seed, force=force)


def _load_all() -> None:
    # the family modules register their classes on import
    from . import ct, generic, mr, photo, xray_us  # noqa: F401
