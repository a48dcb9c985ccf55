"""Do the stand-in VLM's frozen ImageNet features carry the synthetic lesions? Probes, held-out cases.

The stand-in VLM (``scripts/train_diagnostic_vlm.py``) misses its lesion targets. This script asks whether a
better decoder could fix that, or whether the frozen EfficientNet-Lite0 features are the limit: on the same
synthetic lesion set and the same case split, it trains lesion detectors directly on the features and reports
held-out (new-case) accuracy.

- ``linear``: a 1×1 linear score per feature-map cell, pooled by log-mean-exp (multiple-instance learning), at
  output strides 8, 16 and 32 of the frozen tower.
- ``finetune-top``: the tower's last stages (blocks 5–6, conv_head) made trainable on top of the frozen
  stride-16 features, with a per-cell lesion-mask loss as the VLM's auxiliary probe uses — what training the
  tower's top on a GPU would buy.

Thresholds are chosen on the training images (balanced accuracy); quadrant = the quadrant of the highest
scoring cell, on lesion-positive images. Prints one JSON line; ``--out FILE`` also writes it.

    python scripts/probe_lesion_features.py --lesions runs/vlm-data8/lesions --out runs/vlm-data8/lesion_probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bal(score, y, th) -> float:
    pos, neg = y > 0, y == 0
    return float(0.5 * ((score[pos] > th).mean() + (score[neg] <= th).mean()))


def _fit_threshold(score, y) -> float:
    cands = np.quantile(score, np.linspace(0.01, 0.99, 99))
    return float(max(cands, key=lambda t: _bal(score, y, t)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lesions", type=Path, default=ROOT / "runs" / "vlm-data8" / "lesions",
                    help="a make_lesion_set folder (the training script's work/lesions)")
    ap.add_argument("--collection", type=Path, default=None, help="demo collection (default: the bundled one)")
    ap.add_argument("--size", type=int, default=256, help="input size, as the VLM's processor")
    ap.add_argument("--steps", type=int, default=600, help="fine-tune-top steps (batch 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import pandas as pd
    import timm
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from PIL import Image

    from medqm._pretrained import efficientnet_lite0_imagenet
    from medqm.io.collection import default_collection, load_manifest
    from medqm.label.standin import case_split
    from medqm.label.standin.training import TrainConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = TrainConfig()
    t0 = time.perf_counter()
    man = pd.read_csv(args.lesions / "manifest.csv")
    split = case_split(load_manifest(args.collection or default_collection()), fraction=cfg.val_fraction,
                       seed=cfg.split_seed)
    man["split"] = man["case_id"].map(split)
    if man["split"].isna().any():
        raise SystemExit(f"{args.lesions}: cases missing from the collection's split")
    tr = (man["split"] == "train").to_numpy()
    va = ~tr
    y = man["lesion"].to_numpy(np.float32)
    rows = man["lesion_center_row"].fillna(0).to_numpy() / man["height_orig"].to_numpy()
    cols = man["lesion_center_col"].fillna(0).to_numpy() / man["width_orig"].to_numpy()
    quad = ((rows >= 0.5) * 2 + (cols >= 0.5)).astype(int)

    net = timm.create_model("tf_efficientnet_lite0")
    net.load_state_dict(efficientnet_lite0_imagenet())
    net.eval()
    S = args.size

    def load(p):
        im = Image.open(args.lesions / p).convert("RGB").resize((S, S), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5  # the VLM processor's mean/std

    def mask8(p):
        a = np.asarray(Image.open(args.lesions / p))
        a = (a.max(2) if a.ndim == 3 else a) > 0
        return F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=(S // 32, S // 32),
                             mode="area")[0, 0]

    feats: dict[int, list] = {2: [], 3: [], 4: []}
    with torch.no_grad():
        for i in range(0, len(man), 64):
            x = torch.stack([load(p) for p in man["path"][i:i + 64]])
            for k, f in enumerate(net.forward_intermediates(x, intermediates_only=True)):
                if k in feats:
                    feats[k].append(f)
    feats = {k: torch.cat(v) for k, v in feats.items()}
    masks = torch.stack([mask8(p) for p in man["mask"]])
    t_feat = time.perf_counter() - t0
    yt = torch.from_numpy(y)
    idx = np.flatnonzero(tr)
    w = torch.from_numpy(np.where(y[idx] > 0, 0.5 / y[idx].mean(), 0.5 / (1 - y[idx].mean())))

    def evaluate(score_fn) -> dict:
        with torch.no_grad():
            s = torch.cat([score_fn(j) for j in np.array_split(np.arange(len(man)), max(1, len(man) // 256))])
        s = s.flatten(1)
        pooled = (torch.logsumexp(s, 1) - np.log(s.shape[1])).numpy()
        th = _fit_threshold(pooled[tr], y[tr])
        side = int(round(s.shape[1] ** 0.5))
        am = s.argmax(1).numpy()
        pq = ((am // side) >= side / 2) * 2 + ((am % side) >= side / 2)
        pos_va = va & (y > 0)
        return {"heldout_balanced_acc": round(_bal(pooled[va], y[va], th), 3),
                "heldout_acc": round(float(((pooled[va] > th) == (y[va] > 0)).mean()), 3),
                "heldout_quadrant_acc": round(float((pq[pos_va] == quad[pos_va]).mean()), 3),
                "train_balanced_acc": round(_bal(pooled[tr], y[tr], th), 3)}

    results = {}
    for k, stride in ((2, 8), (3, 16), (4, 32)):
        X = feats[k]
        mu = X[tr].mean((0, 2, 3), keepdim=True)
        sd = X[tr].std((0, 2, 3), keepdim=True) + 1e-3
        X = (X - mu) / sd
        torch.manual_seed(0)
        head = nn.Conv2d(X.shape[1], 1, 1)
        opt = torch.optim.AdamW(head.parameters(), 3e-3, weight_decay=1e-2)
        for _ in range(300):
            b = idx[torch.multinomial(w, 128, replacement=True).numpy()]
            s = head(X[b]).flatten(1)
            loss = F.binary_cross_entropy_with_logits(torch.logsumexp(s, 1) - np.log(s.shape[1]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[f"linear_stride{stride}"] = {"features": list(X.shape[1:]),
                                             **evaluate(lambda j, head=head, X=X: head(X[j]))}
        print(f"linear stride {stride}: {results[f'linear_stride{stride}']}", file=sys.stderr, flush=True)

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = copy.deepcopy(nn.Sequential(*net.blocks[5:]))
            self.conv_head, self.bn2 = copy.deepcopy(net.conv_head), copy.deepcopy(net.bn2)
            self.cell = nn.Conv2d(net.num_features, 1, 1)

        def forward(self, h):
            return self.cell(self.bn2(self.conv_head(self.blocks(h))))

    torch.manual_seed(0)
    top = Top().train()
    H = feats[3]
    opt = torch.optim.AdamW(top.parameters(), 3e-4, weight_decay=0.05)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        b = idx[torch.multinomial(w, 64, replacement=True).numpy()]
        s = top(H[b]).flatten(1)
        pooled = torch.logsumexp(s, 1) - np.log(s.shape[1])
        loss = (F.binary_cross_entropy_with_logits(pooled, yt[b])
                + F.binary_cross_entropy_with_logits(s, (masks[b].flatten(1) > 0.02).float(),
                                                     pos_weight=torch.tensor(5.0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    top.eval()
    results["finetune_top_stride32"] = {"steps": args.steps,
                                        "trainable_params": sum(p.numel() for p in top.parameters()),
                                        **evaluate(lambda j: top(H[j]))}
    out = {"probe": "lesion_present / quadrant from the frozen tower's features", "lesion_set": str(args.lesions),
           "images": int(len(man)), "train_images": int(tr.sum()), "heldout_images": int(va.sum()),
           "heldout_cases": int(man.loc[va, "case_id"].nunique()), "lesion_fraction": round(float(y.mean()), 3),
           "input_size": S, "results": results, "seconds": {"features": round(t_feat, 1),
                                                            "finetune_top": round(time.perf_counter() - t1, 1)},
           "torch": torch.__version__}
    line = json.dumps(out)
    print(line)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
