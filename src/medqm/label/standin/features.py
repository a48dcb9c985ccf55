"""Training-time model inputs: token ids and pixels exactly as the hf backend builds them, the frozen vision
tower's features computed once per view, and the answer NLL from those features."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .augment import augment

if TYPE_CHECKING:  # pragma: no cover
    from .training import TrainConfig

__all__ = ["Encoder", "FeatureBank", "build_views", "closed_set", "image_features", "sequence_nll", "val_nll"]


class Encoder:
    """Token ids and pixel tensors exactly as the hf backend builds them, for training-time batches."""

    def __init__(self, model_dir: Path, items, pixels: dict[str, np.ndarray]):
        import torch
        from transformers import AutoProcessor

        from medqm.label.hf import HFDiagnosticModel, to_pil

        # the processor as `load_model` will load it from the saved folder (resize and crop included)
        self.processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        ip = self.processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id
        # the backend's view of the template: the scored tokens (answer + end-of-turn) of each (question, answer)
        probe = HFDiagnosticModel(_NoModel(), self.processor, model_id="probe", revision="-")
        self.prompt_ids: dict[str, list[int]] = {}
        self.answer_ids: dict[tuple[str, str], list[int]] = {}
        some = next(iter(pixels.values()))
        pil = to_pil(some, 0)
        for it in items:
            q = it.question
            if q not in self.prompt_ids:
                user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
                prompt = self.processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
                enc = self.processor(text=[prompt], images=[[pil]], return_tensors="pt")
                self.prompt_ids[q] = enc["input_ids"][0].tolist()
            for a in [it.answer, *(it.choices or [])]:
                if (q, a) not in self.answer_ids:
                    self.answer_ids[(q, a)] = tok.convert_tokens_to_ids(probe.scored_tokens(q, a))
        # pixel tensors in [0, 1] at the model's resolution (the processor's resize and crop, before normalising)
        self.index = {p: i for i, p in enumerate(pixels)}
        chunks = []
        paths = list(pixels)
        for lo in range(0, len(paths), 64):
            pils = [to_pil(pixels[p], i) for i, p in enumerate(paths[lo:lo + 64])]
            pv = self.processor.image_processor(pils, return_tensors="pt")["pixel_values"]
            chunks.append(pv * self.std + self.mean)
        self.images01 = torch.cat(chunks).contiguous()
        self.size = int(self.images01.shape[-1])

    def normalize(self, images01):
        return (images01 - self.mean) / self.std

    def tokens(self, questions, answers):
        """(input ids (B, S), attention mask (B, S), answer-position mask (B, S)), right-padded."""
        import torch

        seqs = [self.prompt_ids[q] + self.answer_ids[(q, a)] for q, a in zip(questions, answers, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        scored = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions holding an answer token
        for b, (s, q) in enumerate(zip(seqs, questions, strict=True)):
            ids[b, :len(s)] = torch.tensor(s)
            attn[b, :len(s)] = 1
            scored[b, len(self.prompt_ids[q]):len(s)] = True
        return ids, attn, scored


class _NoModel:
    """Stands in for a model where `HFDiagnosticModel` is only used for its template logic."""

    def eval(self):
        return self


def image_features(model, pixel_values, batch: int = 32):
    """The vision tower's token features (N, T, C), float32, in inference mode (the tower is frozen)."""
    import torch

    out = []
    with torch.inference_mode():
        for lo in range(0, len(pixel_values), batch):
            h = model.model.vision_tower(pixel_values[lo:lo + batch], return_dict=True).last_hidden_state
            out.append(h.flatten(2).transpose(1, 2).float())
    return torch.cat(out)


def sequence_nll(model, feats, ids, attn, scored, *, return_tokens: bool = False, smoothing: float = 0.0):
    """Per-sequence answer NLL (sum over the scored tokens) from precomputed vision features.

    The same computation as the model's forward with ``pixel_values`` (the projector's output replaces the
    ``<image>`` tokens' embeddings), minus the frozen vision tower; `check_consistency` compares it with the
    hf backend's ``answer_nll``. Position t−1 predicts token t.
    """
    import torch

    tokens = model.model.multi_modal_projector(feats)
    emb = model.get_input_embeddings()(ids)
    where = (ids == model.config.image_token_id)[..., None].expand_as(emb)
    emb = emb.masked_scatter(where, tokens.to(emb.dtype))
    logits = model(inputs_embeds=emb, attention_mask=attn, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok_lp = logp.gather(2, ids[:, 1:, None])[..., 0]
    if smoothing:  # training loss only: (1 − ε)·NLL + ε·(mean NLL over the vocabulary)
        tok_lp = (1.0 - smoothing) * tok_lp + smoothing * logp.mean(-1)
    nll = -(tok_lp * scored[:, 1:]).sum(1)
    return (nll, tokens) if return_tokens else nll


class FeatureBank:
    """Vision features of images (and of augmented views of training images), computed once: the tower is frozen.

    ``feats[row]`` is (T, C) float16; ``rows[(image, view)]`` its row; ``quadrant[(image, view)]`` the lesion's
    image quadrant in that view and ``targets[(image, view)]`` the per-token lesion targets (None if unknown).
    """

    def __init__(self):
        self.rows, self.quadrant, self.targets, self.chunks = {}, {}, {}, []

    def add(self, keys, feats, quadrants=None, targets=None):
        start = sum(len(c) for c in self.chunks)
        self.chunks.append(feats.half())
        for i, k in enumerate(keys):
            self.rows[k] = start + i
            self.quadrant[k] = quadrants[i] if quadrants else None
            self.targets[k] = targets[i] if targets else None

    def freeze(self):
        import torch

        self.feats = torch.cat(self.chunks)
        self.chunks = [self.feats]
        return self

    def get(self, keys):
        return self.feats[[self.rows[k] for k in keys]].float()


def build_views(model, enc: Encoder, images, masks, quadrant_answer, cfg: TrainConfig, views: int, seed: int,
                bank: FeatureBank) -> None:
    """Add ``views`` views of each image to ``bank`` (view 0 unaugmented), with their lesion quadrants/targets."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    stride = int(cfg.arch["output_stride"])
    t0 = time.perf_counter()
    for lo in range(0, len(images), 32):
        chunk = images[lo:lo + 32]
        keys, xs, quads, tgts = [], [], [], []
        for img in chunk:
            x0, m0 = enc.images01[enc.index[img]], masks.get(img)
            for v in range(views):
                if v == 0:
                    x, m, q = x0, m0, quadrant_answer.get(img)
                else:
                    q0 = quadrant_answer.get(img)
                    x, m, q = augment(x0, m0, q0, "lesion_quadrant" if q0 else None, rng, cfg, enc.size)
                keys.append((img, v))
                xs.append(x)
                quads.append(q)
                tgts.append(None if m is None else
                            (F.avg_pool2d(m[None], stride)[0, 0].flatten() > cfg.aux_min_fraction).float())
        bank.add(keys, image_features(model, enc.normalize(torch.stack(xs))), quads, tgts)
        done = min(lo + 32, len(images))
        if done % 320 < 32 or done == len(images):
            el = time.perf_counter() - t0
            print(f"  features: {done}/{len(images)} images × {views} views ({el:.0f} s, "
                  f"{done * views / max(el, 1e-9):.1f} views/s)", flush=True)


def val_nll(model, enc: Encoder, bank: FeatureBank, items, answers=None, batch: int = 64) -> np.ndarray:
    """NLL of each item's answer (or of ``answers``) on its unaugmented image (view 0)."""
    import torch

    answers = [it.answer for it in items] if answers is None else answers
    out = []
    model.eval()
    with torch.inference_mode():
        for lo in range(0, len(items), batch):
            chunk, ans = items[lo:lo + batch], answers[lo:lo + batch]
            ids, attn, scored = enc.tokens([it.question for it in chunk], ans)
            out += sequence_nll(model, bank.get([(it.image, 0) for it in chunk]), ids, attn, scored).tolist()
    return np.asarray(out)


def closed_set(model, enc: Encoder, bank: FeatureBank, items) -> list[dict]:
    """Per item: every choice's NLL, the prediction (lowest NLL; ties to the first listed) and correctness."""
    flat = [(i, c) for i, it in enumerate(items) for c in it.choices]
    nll = val_nll(model, enc, bank, [items[i] for i, _ in flat], [c for _, c in flat])
    out = [{"nll": {}} for _ in items]
    for (i, c), v in zip(flat, nll, strict=True):
        out[i]["nll"][c] = float(v)
    for it, rec in zip(items, out, strict=True):
        pred = min(it.choices, key=lambda c: (rec["nll"][c], it.choices.index(c)))
        rec.update(prediction=pred, correct=pred == it.answer, answer_nll=rec["nll"][it.answer])
    return out

