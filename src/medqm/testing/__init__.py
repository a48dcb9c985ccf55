"""Helpers for MedQM's tests and benchmarks: tiny, randomly initialised vision-language models (no downloads)
and a tiny fake tumour collection.

Not a pipeline stage: it may import any of them, and nothing in the pipeline imports it.
"""

from .collections import FAKE_TUMOUR_CASES, fake_tumour_collection
from .vlm import TINY_FAMILIES, build_tiny_vlm

__all__ = ["FAKE_TUMOUR_CASES", "TINY_FAMILIES", "build_tiny_vlm", "fake_tumour_collection"]
