"""Helpers for MedQM's tests and benchmarks: tiny, randomly initialised vision-language models (no downloads).

Not a pipeline stage: it may import any of them, and nothing in the pipeline imports it.
"""

from .vlm import TINY_FAMILIES, build_tiny_vlm

__all__ = ["TINY_FAMILIES", "build_tiny_vlm"]
