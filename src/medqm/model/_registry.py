"""Model registry: entrypoints register themselves by name; `create_model` builds any of them (timm's pattern)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

_entrypoints: dict[str, Callable[..., Any]] = {}
_default_cfgs: dict[str, dict[str, Any]] = {}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: register a model entrypoint under its function name."""
    name = fn.__name__
    if name in _entrypoints:
        raise ValueError(f"model {name!r} is registered twice")
    _entrypoints[name] = fn
    return fn


def register_default_cfg(name: str, cfg: dict[str, Any]) -> None:
    _default_cfgs[name] = dict(cfg)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell-style filter (``'medqm_i*'``)."""
    names = sorted(_entrypoints)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_default_cfg(name: str) -> dict[str, Any]:
    """The configuration a registered name stands for (the config table row)."""
    _check_name(name)
    return dict(_default_cfgs.get(name, {}))


def is_model(name: str) -> bool:
    return name in _entrypoints


def _check_name(name: str) -> None:
    if name not in _entrypoints:
        close = difflib.get_close_matches(name, list(_entrypoints), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Registered: {', '.join(list_models())}")


def create_model(name: str, **kwargs: Any):
    """Build a registered model by name.

    Keyword arguments that are ``None`` are dropped before they reach the entrypoint, so unset command-line
    options never override the model's defaults.

    Args:
        name: a registered name (see `list_models`), e.g. ``'medqm_i'`` or ``'medqm_i_no_priors'``.
        **kwargs: configuration overrides (``img_size=160``, ``num_experts=6``, ``pretrained_backbone=False``…).
    """
    _check_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _entrypoints[name](**kwargs)
