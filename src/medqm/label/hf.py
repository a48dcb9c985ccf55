"""Hugging Face backend for `DiagnosticModel`: answer NLLs from any image-text-to-text checkpoint.

`load_model(name_or_path)` loads a checkpoint with `AutoProcessor` + `AutoModelForImageTextToText`
(transformers ≥ 5) and returns an `HFDiagnosticModel` whose `answer_nll(images, questions, answers)` is the
teacher-forced negative log-likelihood, in nats, of each answer given its image and question.

What is scored
--------------
Each sample is the conversation the user's MLLM would see: one user turn holding the image and the question,
rendered with the model's own chat template and its generation prompt (``add_generation_prompt=True``), then
the assistant's answer. The scored tokens are

- the answer, exactly as the template writes it into the assistant turn (a separating space the template
  puts before it, e.g. SmolVLM's ``Assistant: yes``, belongs to the first answer token, as in generation), and
- the one end-of-turn token that closes it: the special token the template writes right after the answer
  (``<|im_end|>`` for Qwen2-VL, ``<end_of_utterance>`` for SmolVLM), or the tokenizer's EOS where the template
  has none (LLaVA-1.5 writes ``ASSISTANT: yes `` and the model stops with ``</s>``).

Counting the end token is what tells "yes" from "yes, and more": without it a prefix of a long answer would
always score at least as well as the whole. Anything after it (a template's trailing newline) and everything
before the answer (system turn, image tokens, question, the assistant header) is never counted. Answers are
stripped of surrounding whitespace; an empty answer raises `ValueError`.

How answer tokens are identified
--------------------------------
Per sample, the conversation is rendered once with a sentinel in place of the answer, which locates the
answer's slot in the template (searching for the answer itself could hit template text, e.g. ``im`` in
``<|im_end|>``); a second rendering with the real answer must match it, or the template is refused as not
writing answers verbatim. The text is then split into a prompt part and a scored part as above. The processor encodes
the prompt (with the image, so image placeholders are expanded exactly as at generation time), and the answer's
token ids are appended to it: a conversation is thus the prompt tokens the model would generate from, followed
by the answer tokens it would have to generate. The answer ids are the tail of the tokenised ``prompt +
scored`` text after the tokenised prompt; this is checked to be a prefix (byte-level BPE and SentencePiece
tokenisers keep it at these boundaries: a newline, a colon or a special token). Should a template ever merge
across the boundary, the scored text is tokenised on its own instead, with a warning.

Efficiency
----------
The decoder runs once per batch; only the hidden states at positions that predict an answer token (position
``t - 1`` predicts token ``t``) go through the LM head, via transformers' ``logits_to_keep`` with a boolean
``(batch, seq)`` mask, so no ``batch × seq × vocab`` logits are ever built (see `bench/label.py`). Going
through the model's own forward keeps whatever it does after the LM head (e.g. Gemma's
``final_logit_softcapping``). Models whose forward only accepts an integer ``logits_to_keep`` fall back to
keeping the last ``k`` positions that cover every answer. Batches are right-padded by default, so every token
keeps the position it has in an unpadded run whatever the position-embedding scheme; ``padding_side="left"``
gives the same NLLs (up to float rounding) for rotary and M-RoPE models, which the tested families are.

All choices at speed
--------------------
Labelling asks many things of one image: every question, and under ``medqm label --loss kl`` every choice of
every question, so one call holds each image many times. The samples of a call are grouped by image (the 8-bit
RGB the processor receives, hashed with its size: equal arrays group whatever object holds them). For a group of
two or more, each distinct prompt is encoded once with the image, and the longest common prefix of their token
ids (it must hold every image token, and leaves each prompt at least its last token) runs once through the model
with ``use_cache=True``: the vision tower runs once per image instead of once per sample. Each sample's
continuation (the rest of its prompt, then its answer, right-padded) is scored in batches of ``batch_size``
against a copy of that key/value cache repeated to the batch (``Cache.batch_repeat_interleave``), with explicit
positions after the prefix; for M-RoPE models (Qwen2-VL) the positions are offset by the ``rope_deltas`` the
prefill stored. As before, only positions predicting answer tokens go through the LM head. A group of one, a group
whose prompts share no prefix covering the image tokens, or a family that fails on this path (a warning, then the
per-sample path for every later call) is scored sample by sample as described above; the NLLs agree to float
rounding (tested to 1e-4 on three families and the stand-in). On the shipped stand-in, where the vision tower is
~90 % of a sample's cost, scoring every choice of the demo questions runs about 10× faster (``python
bench/label.py --all-choices``: 115 against 11 samples/s on 16 demo images, one thread).
``share_prefix=False`` turns the grouping off; `full_logit_nll`, the reference, never uses it.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medqm._extras import require

require("label", "the diagnostic-model backend (medqm label, medqm.label.hf)")

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

__all__ = ["AnswerScores", "HFDiagnosticModel", "load_model", "save_quietly", "to_pil"]

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SENTINEL = "MEDQMANSWERSENTINEL7F3A"


@dataclass(frozen=True)
class AnswerScores:
    """Per-sample answer NLLs (nats, float64) and how many tokens each sums over (answer + end token)."""

    nll: np.ndarray
    n_tokens: np.ndarray


@dataclass
class _Encoded:
    inputs: dict[str, Any]  # everything the model's forward takes, answers appended
    keep: torch.Tensor  # (B, S) bool: positions whose logits predict an answer token
    targets: torch.Tensor  # (N,) answer token ids, row-major over `keep`
    sample_of: torch.Tensor  # (N,) which sample each target belongs to
    n_tokens: np.ndarray  # (B,)


def to_pil(image: np.ndarray, index: int) -> Image.Image:
    """Float display pixels in [0, 1] (H×W, H×W×1 or H×W×3) -> 8-bit RGB, grey replicated to three channels."""
    from PIL import Image

    arr = np.asarray(image)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"images[{index}]: expected float pixels in [0, 1], got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or min(arr.shape[:2]) < 1:
        raise ValueError(f"images[{index}]: expected an H×W or H×W×3 array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"images[{index}]: contains NaN or infinite pixels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"images[{index}]: pixels must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    u8 = np.round(arr * 255.0).astype(np.uint8)
    if u8.ndim == 2:
        u8 = np.repeat(u8[..., None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(u8))  # uint8 H×W×3 -> RGB


class HFDiagnosticModel:
    """A `DiagnosticModel` around a transformers image-text-to-text model and its processor.

    Build it with `load_model`; the constructor takes already loaded objects (e.g. for tests).

    Args:
        model: an ``AutoModelForImageTextToText`` model (any family whose forward takes ``logits_to_keep``).
        processor: its ``AutoProcessor``, with a chat template.
        model_id: name recorded with labels (folder name or hub id).
        revision: version recorded with labels (hub commit or a content fingerprint, see `load_model`).
        batch_size: samples per forward pass.
        padding_side: ``"right"`` (default) or ``"left"``; both give the same NLLs up to float rounding.
        share_prefix: score the samples of an image that occurs several times in one call against one prefill
            of their common prompt prefix (see "All choices at speed" in the module docstring); ``False`` runs
            every sample through the whole model (same NLLs up to float rounding).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        model_id: str,
        revision: str,
        batch_size: int = 8,
        padding_side: str = "right",
        share_prefix: bool = True,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{model_id}: the processor has no tokenizer")
        if not getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{model_id}: the processor has no chat template; set processor.chat_template")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.share_prefix = bool(share_prefix)
        self._keep_mode = "mask"  # "mask" (boolean logits_to_keep) or "last" (integer), set on first failure
        self._warned_split = False
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self._specials = sorted(
            {str(t) for t in tokenizer.all_special_tokens}
            | {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)},
            key=len,
            reverse=True,
        )
        # tokens the tokenizer adds around a text by itself (BOS; a few also append EOS)
        probe = "a"
        bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        self._n_auto_suffix = 0
        if len(full) > len(bare):
            start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
            self._n_auto_suffix = len(full) - start - len(bare)
        # what the shared-prefix path needs to know about the model (see `_score_shared`)
        config = getattr(model, "config", None)
        self._image_token_ids = sorted({
            int(t) for t in (getattr(processor, "image_token_id", None), getattr(config, "image_token_id", None),
                             getattr(config, "image_token_index", None))
            if isinstance(t, int)
        })
        forward = getattr(model, "forward", None)  # absent on the prompt-only probes of medqm.label.standin
        params = inspect.signature(forward).parameters if callable(forward) else {}
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self._takes_cache_position = "cache_position" in params  # older transformers 5 releases
        self._prefix_failed = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (
            f"HFDiagnosticModel(model_id={self.model_id!r}, revision={self.revision!r}, "
            f"class={type(self.model).__name__}, device={self.device}, batch_size={self.batch_size})"
        )

    # ------------------------------------------------------------------ public API

    def answer_nll(
        self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str]
    ) -> np.ndarray:
        """Per-sample NLL (nats, float64) of the answer tokens and the end-of-turn token that closes them."""
        return self.score(images, questions, answers).nll

    def score(self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str]) -> AnswerScores:
        """`answer_nll` plus the number of tokens each NLL sums over."""
        return self._run(images, questions, answers, full_logits=False)

    def full_logit_nll(
        self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str]
    ) -> np.ndarray:
        """Reference implementation: the same NLLs from logits at every position (batch × seq × vocab).

        Memory-hungry by design; for tests and `bench/label.py` only.
        """
        return self._run(images, questions, answers, full_logits=True).nll

    def scored_tokens(self, question: str, answer: str) -> list[str]:
        """The tokens `answer_nll` sums over for this question and answer (for inspection and tests)."""
        _, ids = self._split(question, self._clean_answer(answer, 0))
        return self.tokenizer.convert_ids_to_tokens(ids)

    # ------------------------------------------------------------------ prompt construction

    @staticmethod
    def _clean_answer(answer: str, index: int) -> str:
        if not isinstance(answer, str):
            raise TypeError(f"answers[{index}] must be a str, got {type(answer).__name__}")
        answer = answer.strip()
        if not answer:
            raise ValueError(f"answers[{index}] is empty; an empty answer has no tokens to score")
        return answer

    def _render(self, messages: list[dict], **kwargs) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kwargs)

    def _end_of_turn(self, tail: str) -> str:
        """The text closing an assistant turn: the template's special token after the answer, or EOS."""
        stripped = tail.lstrip(" \t")
        for special in self._specials:
            if stripped.startswith(special):
                return tail[: len(tail) - len(stripped) + len(special)]
        eos = self.tokenizer.eos_token
        return str(eos) if eos else ""

    def _split(self, question: str, answer: str) -> tuple[str, list[int]]:
        """(prompt text the processor encodes with the image, token ids of the scored part)."""
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}

        def reply(text: str) -> dict:
            return {"role": "assistant", "content": [{"type": "text", "text": text}]}

        prompt = self._render([user], add_generation_prompt=True)
        # locate the answer with a sentinel: searching for the answer itself could hit template text ("im" in
        # "<|im_end|>", "think" in "<think>")
        marked = self._render([user, reply(_SENTINEL)])
        if not marked.startswith(prompt) or marked.count(_SENTINEL) != 1:
            raise ValueError(
                f"{self.model_id}: the chat template's conversation does not extend its generation prompt "
                f"(prompt ends {prompt[-40:]!r}, conversation reads {marked[len(prompt) - 40:len(prompt) + 40]!r}); "
                "cannot tell the answer apart"
            )
        rest = marked[len(prompt):]
        at = rest.index(_SENTINEL)
        lead, tail = rest[:at], rest[at + len(_SENTINEL):]
        if self._render([user, reply(answer)]) != prompt + lead + answer + tail:
            raise ValueError(f"{self.model_id}: the chat template does not write the answer {answer!r} verbatim")
        space = lead[len(lead.rstrip()):]
        # template text between the generation prompt and the answer (e.g. an empty reasoning block) is context
        prompt += lead[: len(lead) - len(space)]
        scored = space + answer + self._end_of_turn(tail)
        tok = self.tokenizer
        ids_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
        ids_full = tok(prompt + scored, add_special_tokens=False)["input_ids"]
        if ids_full[: len(ids_prompt)] == ids_prompt and len(ids_full) > len(ids_prompt):
            return prompt, ids_full[len(ids_prompt):]
        if not self._warned_split:
            warnings.warn(
                f"{self.model_id}: the tokeniser merges the prompt's end with the answer; answers are tokenised "
                "on their own",
                stacklevel=4,
            )
            self._warned_split = True
        return prompt, tok(scored, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ encoding and scoring

    def _process(self, pil_images: list, prompts: list[str]) -> tuple[dict[str, Any], list[str], list]:
        """The processor's encoding of prompts with their images, which of its keys are per-token, and per row
        the indices of its real tokens (padding and an EOS the tokenizer appends to every text dropped)."""
        import torch

        bos = self.tokenizer.bos_token
        add_special = not (bos and prompts[0].startswith(str(bos)))  # as processor.apply_chat_template does
        enc = self.processor(
            text=prompts, images=[[im] for im in pil_images], padding=True, return_tensors="pt",
            add_special_tokens=add_special,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        per_token = [
            k for k, v in enc.items()
            if isinstance(v, torch.Tensor) and v.shape == ids.shape
            and (k in ("input_ids", "attention_mask") or k.endswith("token_type_ids"))
        ]
        n_suffix = self._n_auto_suffix if add_special else 0
        real = [torch.nonzero(mask[b]).flatten() for b in range(len(prompts))]
        real = [r[: len(r) - n_suffix] for r in real]  # drop an EOS the tokenizer appends to every text
        return enc, per_token, real

    def _encode(self, pil_images: list, prompts: list[str], answer_ids: list[list[int]]) -> _Encoded:
        import torch

        enc, per_token, real = self._process(pil_images, prompts)
        ids = enc["input_ids"]
        lengths = [len(r) + len(a) for r, a in zip(real, answer_ids, strict=True)]
        width = max(lengths)
        out: dict[str, Any] = {k: v for k, v in enc.items() if k not in per_token}
        new = {
            k: torch.full((len(prompts), width), self._pad_id if k == "input_ids" else 0, dtype=enc[k].dtype)
            for k in per_token
        }
        keep = torch.zeros((len(prompts), width), dtype=torch.bool)
        for b, (r, a) in enumerate(zip(real, answer_ids, strict=True)):
            start = 0 if self.padding_side == "right" else width - lengths[b]
            p = len(r)
            for k in per_token:
                new[k][b, start:start + p] = enc[k][b, r]
            new["input_ids"][b, start + p:start + p + len(a)] = torch.tensor(a, dtype=ids.dtype)
            new["attention_mask"][b, start + p:start + p + len(a)] = 1
            keep[b, start + p - 1:start + p + len(a) - 1] = True
        out.update(new)
        targets = torch.cat([torch.tensor(a, dtype=torch.long) for a in answer_ids])
        sample_of = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(a) for a in answer_ids]))
        return _Encoded(out, keep, targets, sample_of, np.array([len(a) for a in answer_ids]))

    def _answer_logprobs(
        self, inputs: dict[str, Any], keep: torch.Tensor, full_logits: bool, cache: Callable[[], Any] | None = None
    ) -> torch.Tensor:
        """Float32 log-probabilities (N, vocab) at the positions of ``keep``, row-major.

        ``cache``, when given, makes a fresh key/value cache of the prompt prefix for each forward pass (a pass
        extends the cache it is given, so a retry must not reuse it).
        """
        import torch

        def forward(**kwargs):
            if cache is None:
                return self.model(**inputs, use_cache=False, **kwargs)
            return self.model(**inputs, use_cache=True, **{self._cache_kw: cache()}, **kwargs)

        if full_logits:  # the memory-hungry reference: logits and log-probs at every position
            logp = torch.log_softmax(forward().logits.float(), dim=-1)  # (B, S, V)
            return logp[keep.to(logp.device)]
        if self._keep_mode == "mask":
            try:
                logits = forward(logits_to_keep=keep).logits
            except torch.OutOfMemoryError:
                raise
            except (TypeError, IndexError, RuntimeError) as err:  # forwards that slice with an int only
                log.info("%s: boolean logits_to_keep unsupported (%s); keeping the last positions", self.model_id, err)
                logits = None
            if logits is not None and logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
                return torch.log_softmax(logits.float(), dim=-1)
            self._keep_mode = "last"
        first = int(keep.any(0).nonzero().min())
        k = keep.shape[1] - first
        try:
            logits = forward(logits_to_keep=k).logits  # (B, k, V)
        except TypeError as err:
            raise ValueError(
                f"{self.model_id}: {type(self.model).__name__}.forward does not take logits_to_keep; "
                "this backend needs a transformers>=5 generative model"
            ) from err
        if logits.ndim != 3 or logits.shape[1] != k:
            raise RuntimeError(f"{self.model_id}: forward ignores logits_to_keep (got logits {tuple(logits.shape)})")
        return torch.log_softmax(logits[keep[:, first:].to(logits.device)].float(), dim=-1)

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        device, dtype = self.device, self.model.dtype

        def move(v):
            if not isinstance(v, torch.Tensor):
                return v
            return v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)

        return {k: move(v) for k, v in inputs.items()}

    def _run(self, images, questions, answers, *, full_logits: bool) -> AnswerScores:
        import torch

        n = len(images)
        if not (len(questions) == n and len(answers) == n):
            raise ValueError(
                f"images, questions and answers must have the same length, got {n}, {len(questions)}, {len(answers)}"
            )
        if n == 0:
            return AnswerScores(np.zeros(0), np.zeros(0, dtype=np.int64))
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise TypeError(f"questions[{i}] must be a str, got {type(q).__name__}")
        clean = [self._clean_answer(a, i) for i, a in enumerate(answers)]
        converted: dict[int, Image.Image] = {}  # one conversion per array object (the runner repeats them)
        pils = [converted[id(im)] if id(im) in converted else converted.setdefault(id(im), to_pil(im, i))
                for i, im in enumerate(images)]
        splits = [self._split(q, a) for q, a in zip(questions, clean, strict=True)]
        nll = np.zeros(n)
        n_tokens = np.zeros(n, dtype=np.int64)
        rest = list(range(n))
        with torch.inference_mode():
            if self.share_prefix and not full_logits and not self._prefix_failed:
                rest = self._score_shared(pils, splits, nll, n_tokens)
            # longest first, so that a batch holds similar lengths (image tokens vary with size for some families)
            order = sorted(rest, key=lambda i: -(len(splits[i][0]) + 4 * len(splits[i][1])))
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo:lo + self.batch_size]
                enc = self._encode([pils[i] for i in idx], [splits[i][0] for i in idx], [splits[i][1] for i in idx])
                logp = self._answer_logprobs(self._to_device(enc.inputs), enc.keep.to(self.device), full_logits)
                token_lp = logp.gather(1, enc.targets.to(logp.device)[:, None])[:, 0].double().cpu()
                sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, enc.sample_of, token_lp)
                nll[idx] = -sums.numpy()
                n_tokens[idx] = enc.n_tokens
        return AnswerScores(nll, n_tokens)

    # ------------------------------------------------------------------ all choices at speed

    def _score_shared(self, pils: list, splits: list[tuple[str, list[int]]], nll: np.ndarray,
                      n_tokens: np.ndarray) -> list[int]:
        """Score the samples of every image that occurs more than once with one prefill of their common prefix;
        returns the indices left for the per-sample path (images seen once, groups that cannot share)."""
        import torch

        groups: dict[bytes, list[int]] = {}
        for i, pil in enumerate(pils):
            # the 8-bit RGB the processor receives: equal arrays group whatever object holds them
            key = hashlib.blake2b(f"{pil.size}".encode() + pil.tobytes(), digest_size=16).digest()
            groups.setdefault(key, []).append(i)
        rest: list[int] = []
        for idx in groups.values():
            if len(idx) < 2 or self._prefix_failed:
                rest.extend(idx)
                continue
            try:
                scored = self._score_group(pils[idx[0]], idx, splits)
            except torch.OutOfMemoryError:
                raise
            except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError,
                    NotImplementedError) as err:
                warnings.warn(
                    f"{self.model_id}: scoring against a shared prompt prefix failed ({type(err).__name__}: {err}); "
                    "every sample runs the whole model from now on",
                    stacklevel=5,
                )
                self._prefix_failed = True
                scored = None
            if scored is None:
                rest.extend(idx)
                continue
            nll[idx], n_tokens[idx] = scored
        return sorted(rest)

    def _score_group(self, pil, idx: list[int], splits: list[tuple[str, list[int]]]):
        """(NLLs, token counts) of samples ``idx``, all of image ``pil``: the common prompt prefix (every image
        token included) runs once with a key/value cache, then each sample's continuation (the rest of its prompt
        and its answer, right-padded) runs against a copy of that cache expanded to the batch. None when the
        prompts share no prefix covering the image tokens."""
        import torch

        if not self._image_token_ids:
            return None
        prompts = list(dict.fromkeys(splits[i][0] for i in idx))
        rows: dict[str, torch.Tensor] = {}
        first = None
        for p in prompts:  # one processor call per distinct prompt: its image tokens expanded as at generation
            enc, per_token, real = self._process([pil], [p])
            rows[p] = enc["input_ids"][0, real[0]]
            first = first or (enc, per_token, real[0])
        ids = list(rows.values())
        # the longest common prefix, leaving every prompt at least one token: its last prompt token, which
        # predicts the first answer token, is then part of the continuation
        shared = min(len(r) for r in ids) - 1
        stacked = torch.stack([r[: shared] for r in ids])
        differ = (stacked != stacked[0]).any(0).nonzero()
        if len(differ):
            shared = int(differ[0])
        image_ids = torch.tensor(self._image_token_ids, dtype=ids[0].dtype)
        image_at = torch.isin(ids[0], image_ids).nonzero()
        if not len(image_at) or int(image_at.max()) >= shared or any(torch.isin(r[shared:], image_ids).any()
                                                                      for r in ids):
            return None

        # the prefix, once: image inputs plus the first `shared` prompt tokens
        enc, per_token, real = first
        prefix = {k: v for k, v in enc.items() if k not in per_token}
        prefix.update({k: enc[k][:, real[:shared]] for k in per_token})
        inner = getattr(self.model, "model", None)
        mrope = hasattr(inner, "rope_deltas")  # Qwen2-VL-style M-RoPE: text positions shifted after the image
        if mrope:
            inner.rope_deltas = None  # recomputed by this prefill, never left over from another call
        out = self.model(**self._to_device(prefix), use_cache=True, logits_to_keep=1)
        prefix_cache = getattr(out, "cache", None)  # `past_key_values` before transformers 5.2x
        prefix_cache = getattr(out, "past_key_values", None) if prefix_cache is None else prefix_cache
        if prefix_cache is None or prefix_cache.get_seq_length() != shared:
            return None
        delta = inner.rope_deltas if mrope else None
        if mrope and delta is None:
            return None

        nll, n_tok = np.zeros(len(idx)), np.zeros(len(idx), dtype=np.int64)
        where = {i: k for k, i in enumerate(idx)}
        order = sorted(idx, key=lambda i: -(len(rows[splits[i][0]]) + len(splits[i][1])))
        device = self.device
        for lo in range(0, len(order), self.batch_size):
            batch = order[lo:lo + self.batch_size]
            conts = [torch.cat([rows[splits[i][0]][shared:], torch.tensor(splits[i][1], dtype=ids[0].dtype)])
                     for i in batch]
            b, width = len(batch), max(len(c) for c in conts)
            input_ids = torch.full((b, width), self._pad_id, dtype=ids[0].dtype)
            mask = torch.zeros((b, shared + width), dtype=enc["attention_mask"].dtype)
            mask[:, :shared] = 1
            keep = torch.zeros((b, width), dtype=torch.bool)
            for r, (i, c) in enumerate(zip(batch, conts, strict=True)):
                input_ids[r, : len(c)] = c
                mask[r, shared:shared + len(c)] = 1
                n_prompt = len(rows[splits[i][0]]) - shared
                keep[r, n_prompt - 1:n_prompt - 1 + len(splits[i][1])] = True
            positions = torch.arange(shared, shared + width).expand(b, width)
            inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
            if self._takes_cache_position:
                inputs["cache_position"] = torch.arange(shared, shared + width)
            if mrope:  # (3, B, W): temporal, height and width positions are equal for text, offset by the delta
                positions = (positions + delta.to("cpu")).unsqueeze(0).expand(3, b, width)
            inputs["position_ids"] = positions

            def expanded(n_rows=b):
                c = copy.deepcopy(prefix_cache)
                c.batch_repeat_interleave(n_rows)
                return c

            logp = self._answer_logprobs(self._to_device(inputs), keep.to(device), False, cache=expanded)
            targets = torch.cat([torch.tensor(splits[i][1], dtype=torch.long) for i in batch])
            sample_of = torch.repeat_interleave(torch.arange(b), torch.tensor([len(splits[i][1]) for i in batch]))
            token_lp = logp.gather(1, targets.to(logp.device)[:, None])[:, 0].double().cpu()
            sums = torch.zeros(b, dtype=torch.float64).index_add_(0, sample_of, token_lp)
            for r, i in enumerate(batch):
                nll[where[i]] = -float(sums[r])
                n_tok[where[i]] = len(splits[i][1])
        return nll, n_tok


# ---------------------------------------------------------------------- loading


def _parse_device(device: str):
    import torch

    dev = str(device)
    if dev == "cpu":
        return torch.device("cpu")
    if dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")
        d = torch.device(dev)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return d
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _local_fingerprint(folder: Path) -> str:
    """``local-`` + 12 hex of sha256 over config.json's bytes and every weight file's name and size.

    Content-based where cheap (the config), size-based for the weights (hashing GBs on every load would be
    slow); mtimes are left out so that a copied folder keeps its revision.
    """
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json")):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return "local-" + h.hexdigest()[:12]


def load_model(
    name_or_path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    padding_side: str = "right",
) -> HFDiagnosticModel:
    """Load an image-text-to-text checkpoint as a `DiagnosticModel`.

    Args:
        name_or_path: a local checkpoint folder (loaded with ``local_files_only=True``) or a Hugging Face hub id
            (passed through; needs network access or the hub cache).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: weights' dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (log-softmax is always float32).
        batch_size: samples per forward pass.
        padding_side: ``"right"`` or ``"left"`` (see `HFDiagnosticModel`).

    Returns:
        An `HFDiagnosticModel` in eval mode whose ``model_id`` is the folder's name or the hub id and whose
        ``revision`` is the hub commit hash when transformers knows it (``config._commit_hash``), else a content
        fingerprint of the local folder (``local-`` + sha256 of config.json and the weight files' names and
        sizes, see `_local_fingerprint`).

    Raises:
        ValueError: bad ``device``/``dtype``, a missing folder, or a checkpoint transformers cannot load (the
            original error is chained).
    """
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    torch_device = _parse_device(device)
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise ImportError("the Hugging Face backend needs transformers>=5: pip install 'medqm[label]'") from err

    text = str(name_or_path)
    path = Path(text).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or text.startswith(("/", "./", "../", "~")) or isinstance(name_or_path, Path)):
        raise ValueError(f"{text!r} is not a model folder (expected config.json, weights and processor files)")
    source = str(path) if local else text
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        model = AutoModelForImageTextToText.from_pretrained(
            source, local_files_only=local, dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        where = f"the folder {source!r}" if local else f"the hub id {source!r} (network or hub cache needed)"
        raise ValueError(f"could not load an image-text-to-text model from {where}: {err}") from err
    model = model.to(torch_device).eval()
    commit = getattr(model.config, "_commit_hash", None)
    revision = str(commit) if commit else (_local_fingerprint(path) if local else "unknown")
    model_id = path.resolve().name if local else text
    return HFDiagnosticModel(
        model, processor, model_id=model_id, revision=revision, batch_size=batch_size, padding_side=padding_side
    )



@dataclass(frozen=True)
class ModelIdentity:
    """What a label row records about its model, without the weights."""

    model_id: str
    revision: str


def model_identity(name_or_path: str | Path) -> ModelIdentity:
    """The (model_id, revision) `load_model` would report, read from the config only (for Ray drivers)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        from transformers import AutoConfig

        commit = getattr(AutoConfig.from_pretrained(str(path), local_files_only=True), "_commit_hash", None)
        return ModelIdentity(path.resolve().name, str(commit) if commit else _local_fingerprint(path))
    from transformers import AutoConfig

    commit = getattr(AutoConfig.from_pretrained(text), "_commit_hash", None)
    return ModelIdentity(text, str(commit) if commit else "unknown")


def save_quietly(model, processor, out: str | Path) -> Path:
    """``save_pretrained`` model and processor into ``out`` without HF's progress bars (for a 1-shard, MB-sized
    model the "Writing model shards" bars are noise)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(out)
