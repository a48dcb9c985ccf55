"""Train MedQM-I and its ablations on one label set, same split, and compare held-out SRCC.

    python scripts/train_medqm_i.py --labels runs/labels-demo --out runs/medqm-i

writes OUT/<model>/ (a checkpoint each: split.csv, metrics.csv, test_metrics.json…) for the full model and
the ablations (no priors, no implicit queries, single head, all three), then OUT/comparison.json and
OUT/comparison.md, and prints the table and whether the issue's bar is met (full model SRCC ≥ 0.85 on
held-out cases and above every ablation). All models share the first model's split (case level) and the
cached backbone features, so the ablations cost only their head training.

``--install-default`` copies the full model into the package (src/medqm/model/checkpoints/medqm-i-demo) with
a model card naming the labels it was trained on (no ONNX export: scoring exports it once into the cache); it
refuses labels made by a random tiny test model (model_id starting with "tiny") unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from medqm.label.runner import read_labels
from medqm.model import ABLATIONS, MedQMI
from medqm.model.scoring import CHECKPOINT_DIR, DEFAULT_CHECKPOINT
from medqm.train import TrainConfig, train

BAR = 0.85
CHECKPOINT_FILES = ("config.json", "model.safetensors", "prompts.txt", "split.csv", "metrics.csv", "test_metrics.json",
                    "train_config.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, help="a `medqm label` output folder")
    ap.add_argument("--out", help="output folder (not needed with --install-from)")
    ap.add_argument("--models", default=",".join(("medqm_i", *ABLATIONS)))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--max-images", type=int, default=None, help="random subset, for quick runs")
    ap.add_argument("--cache", default=None, help="backbone feature cache folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--install-default", action="store_true",
                    help="ship the full model as the package's default checkpoint")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--install-from", default=None, help="install this already trained checkpoint folder (e.g. "
                    "runs/demo/train-<key>/medqm_i from `medqm demo`) as the default, without training")
    args = ap.parse_args()
    if args.install_from:
        install_from(Path(args.install_from), args.labels)
        return 0

    out = Path(args.out)
    models = args.models.split(",")
    rows, split_file = {}, None
    for name in models:
        print(f"== {name}", flush=True)
        cfg = TrainConfig(labels=args.labels, out=str(out / name), model=name, model_kwargs={"img_size": args.img_size},
                          epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed,
                          split_file=split_file, max_images=args.max_images, cache_dir=args.cache, device=args.device)
        r = train(cfg, log=lambda m: print(m, flush=True))
        split_file = split_file or str(out / name / "split.csv")
        n_params = sum(p.numel() for p in MedQMI.from_pretrained(out / name).parameters())
        o = r.test.get("overall", {})
        rows[name] = {"test_srcc": o.get("srcc"), "test_plcc_raw": o.get("plcc_raw"), "test_krcc": o.get("krcc"),
                      "test_rmse_raw": o.get("rmse_raw"), "test_n": o.get("n"), "val_srcc": r.best_val.get("srcc"),
                      "best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "params": n_params,
                      "by_modality_srcc": {k: v["srcc"] for k, v in r.test.get("by_modality", {}).items()}}

    full = rows.get("medqm_i", {}).get("test_srcc")
    checks = {}
    if full is not None:
        checks["full_srcc_at_least_0.85"] = bool(full >= BAR)
        for name in models:
            if name != "medqm_i" and rows[name]["test_srcc"] is not None:
                checks[f"beats_{name}"] = bool(full > rows[name]["test_srcc"])
    labels_meta = read_labels(args.labels).attrs.get("medqm", {})
    summary = {"labels": str(Path(args.labels).resolve()), "label_model_id": labels_meta.get("model_id"),
               "command": " ".join(["python", *sys.argv]), "split": split_file, "models": rows, "checks": checks}
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| model | params | test SRCC | test PLCC_raw | test KRCC | test RMSE_raw | val SRCC | best epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} M | {f(r['test_srcc'])} | {f(r['test_plcc_raw'])} | "
                     f"{f(r['test_krcc'])} | "
                     f"{f(r['test_rmse_raw'])} | {f(r['val_srcc'])} | {r['best_epoch']}/{r['epochs_run']} |")
    table = "\n".join(lines)
    (out / "comparison.md").write_text(f"Labels: {summary['labels']} (model {summary['label_model_id']})\n\n"
                                       f"Command: `{summary['command']}`\n\n{table}\n\nChecks: {json.dumps(checks)}\n")
    print(table)
    print(json.dumps({"checks": checks, "comparison": str(out / "comparison.json")}))

    if args.install_default:
        model_id = str(labels_meta.get("model_id") or "")
        if model_id.startswith("tiny") and not args.force:
            print(f"refusing --install-default: the labels come from {model_id!r}, a random test model (use --force)")
            return 1
        install(out / "medqm_i", summary)
    return 0


def install_from(ckpt: Path, labels: str) -> Path:
    """Install a checkpoint trained elsewhere (e.g. by `medqm demo`), with its own held-out metrics."""
    test = json.loads((ckpt / "test_metrics.json").read_text())
    o = test["test"]["overall"]
    meta = read_labels(labels).attrs.get("medqm", {})
    summary = {"command": f"medqm demo (checkpoint {ckpt})", "labels": str(Path(labels).resolve()),
               "label_model_id": meta.get("model_id"),
               "models": {"medqm_i": {"test_srcc": o["srcc"], "test_plcc_raw": o["plcc_raw"], "test_krcc": o["krcc"],
                                      "test_rmse_raw": o["rmse_raw"], "test_n": o["n"]}}}
    return install(ckpt, summary)


def install(src: Path, summary: dict) -> Path:
    """Copy a trained checkpoint into the package as the default, with a model card (the ONNX export is made
    and cached on first use, not shipped)."""
    dst = CHECKPOINT_DIR / DEFAULT_CHECKPOINT
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    cfg = MedQMI.from_pretrained(dst).cfg  # loads: the copy is a whole checkpoint
    r = summary["models"]["medqm_i"]
    head = ("Its head regresses the diagnostic loss on a log scale (target 'loss', docs/medqm-i.md \"What the head "
            "regresses\"), calibrated on its validation cases; scores are the quality map of the predicted loss."
            if cfg.target == "loss" else "Its head regresses the quality itself (target 'quality').")
    (dst / "MODEL_CARD.md").write_text(
        "# MedQM-I default checkpoint (medqm-i-demo)\n\n"
        f"Trained by `{summary['command']}` on the label set {summary['labels']} "
        f"(labelled by {summary['label_model_id']!r}), frozen ImageNet EfficientNet-Lite0 backbone. {head}\n\n"
        f"Held-out cases: SRCC {r['test_srcc']:.4f}, PLCC_raw {r['test_plcc_raw']:.4f}, KRCC {r['test_krcc']:.4f}, "
        f"RMSE_raw {r['test_rmse_raw']:.4f} (n = {r['test_n']}); split in split.csv, "
        "per-epoch metrics in metrics.csv.\n\n"
        "It predicts how well *that* labelling model could still answer diagnostic questions about an image of the "
        "demo collection's kinds; it is a demonstration, not a clinical device.\n")
    print(f"installed {dst}")
    return dst


if __name__ == "__main__":
    sys.exit(main())
