"""Train MedQM's stand-in diagnostic VLM (``medqm-vlm-demo``) from scratch on CPU, evaluate it, write its card.

    python scripts/train_diagnostic_vlm.py              # build the lesion set, train (~30 min on 2 cores), evaluate
    python scripts/train_diagnostic_vlm.py --eval-only  # re-measure the saved model and rewrite MODEL_CARD.md
    python scripts/train_diagnostic_vlm.py --update-card  # add checks a saved evaluation lacks, rewrite the card
    python scripts/train_diagnostic_vlm.py --smoke      # < 1 min: every stage on a few images, into --work/smoke
    python scripts/train_diagnostic_vlm.py --br35h data/br35h --out runs/vlm-v2   # + Br35H's tumour question

Data: the demo collection's diagnostic questions (`medqm.label.tasks.demo_questions`) plus those of a synthetic
lesion set built from its lesion-free backgrounds (`medqm.synth.make_lesion_set`, cached under ``--work``/lesions,
deterministic). Cases are split into training and held-out ones per modality (`medqm.label.standin.case_split`);
a synthetic image keeps its background's case and split. With ``--br35h DIR`` (default: none, the recipe above
unchanged) the Br35H brain-tumour MR collection is added: modality, body part and plane questions as for the demo
images, and "Is there a tumour in this brain MR image?" (answer type ``tumour``, yes/no from its ``lesion`` flag)
instead of the generic lesion question; it is split by its ``case_id`` (near-duplicate clusters) with the same
case-level split, and the tumour question gets ``--tumour-share`` of the samples (the other types' shares scaled
down to fill the rest).

Training (`medqm.label.standin.training`): teacher forcing with the loss on the answer tokens and the end-of-turn
token (``</s>``), the prompt rendered by the model's own chat template exactly as
`medqm.label.hf.HFDiagnosticModel` renders it (checked at the end: the training path's NLLs equal
``answer_nll``'s). AdamW, linear warm-up then cosine decay, fixed number of steps, one seed for the
initialisation, the sampling order and the augmentation. Augmentation is light and geometric/photometric only:
integer shifts (≤ ``--shift`` px at the model's resolution, never moving a lesion across a midline), horizontal
flips (quadrant answers mirrored), gain and contrast within ±10 %; none of the distortion types (no noise, blur,
compression, ...), so that the loss can react to them. Question types are balanced by weighted sampling.

Evaluation (`medqm.label.standin.evaluation`, written into MODEL_CARD.md and eval_subset.json in the model folder):
closed-set accuracy per question type on held-out cases (the most likely answer among the choices, via the
generic hf backend), the expected calibration error over the closed answer sets, with Br35H the tumour question's
balanced accuracy and AUC on held-out clusters, and the reaction check (``--skip-reaction`` leaves it out): the mean
NLL of the correct answers at every distortion level over demo images.

Progress goes to the console and to ``--work``/train_log.csv. This script is only the command line: the library
code is the package `medqm.label.standin`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from medqm._fs import write_json
from medqm.io.collection import default_collection
from medqm.label.standin import DEMO_VLM_DIR, folder_size
from medqm.label.standin.card import write_card
from medqm.label.standin.data import load_data
from medqm.label.standin.evaluation import evaluate
from medqm.label.standin.training import TrainConfig, train, with_tumour_share

ROOT = Path(__file__).resolve().parents[1]
MAX_FOLDER_BYTES = 25 * 2**20
REACTION_PER_MODALITY = 24
# --smoke: every stage (lesion set, features, training, evaluation, card) on a few images, in well under a minute
TUMOUR_SHARE = 0.3
SMOKE = {"steps": 3, "batch_size": 4, "warmup": 1, "eval_every": 3, "views": 2, "lesion_variants": 1,
         "lesion_per_modality": {"CT": 1, "MR": 1}, "max_images_per_modality": 2}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", type=Path, default=default_collection())
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "vlm-data", help="cache: lesion set, logs")
    ap.add_argument("--out", type=Path, default=None, help=f"model folder to write (default {DEMO_VLM_DIR}; "
                    "with --smoke, --work/smoke/model)")
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
    ap.add_argument("--br35h", type=Path, default=None,
                    help="also train on this Br35H collection (data/br35h) with its tumour question")
    ap.add_argument("--tumour-share", type=float, default=TUMOUR_SHARE,
                    help="share of the samples given to the tumour question (with --br35h)")
    ap.add_argument("--skip-reaction", action="store_true", help="leave out the distortion-reaction check")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the model in --out and rewrite its card")
    ap.add_argument("--update-card", action="store_true",
                    help="reuse --work/eval_results.json (an evaluation of the model in --out), run the checks it "
                         "lacks (the occlusion check) and rewrite the card")
    ap.add_argument("--smoke", action="store_true",
                    help="check every stage in < 1 min on a few images (never writes the shipped model)")
    return ap.parse_args(argv)


def make_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                      views=args.views, eval_every=args.eval_every, lesion_variants=args.lesion_variants,
                      label_smoothing=args.label_smoothing, token_dropout=args.token_dropout)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(cfg, k, v)
    if args.br35h is not None:
        cfg.br35h = str(args.br35h)
        cfg.type_share = with_tumour_share(cfg.type_share, args.tumour_share)
    return cfg


def reproduce_command(cfg: TrainConfig, args: argparse.Namespace) -> str:
    """The command line that trains this model: the script with every option that differs from its default."""
    defaults = TrainConfig()
    command = "python scripts/train_diagnostic_vlm.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(cfg, k)}"
        for k in ("steps", "batch_size", "lr", "seed", "threads", "views", "lesion_variants", "label_smoothing",
                  "token_dropout")
        if getattr(cfg, k) != getattr(defaults, k))
    if cfg.br35h:
        command += f" --br35h {cfg.br35h}"
        if args.tumour_share != TUMOUR_SHARE:
            command += f" --tumour-share {args.tumour_share}"
        if args.out is not None and args.out.resolve() != DEMO_VLM_DIR.resolve():
            command += f" --out {args.out}"
    if args.skip_reaction:
        command += " --skip-reaction"
    elif args.reaction_per_modality != REACTION_PER_MODALITY:
        command += f" --reaction-per-modality {args.reaction_per_modality}"
    return command + (" --smoke" if args.smoke else "")


def update_card(args: argparse.Namespace, data, summary_path: Path) -> int:
    """--update-card: the saved evaluation plus the checks it lacks, then the card (no re-scoring of the rest)."""
    from medqm.label.hf import load_model
    from medqm.label.standin.data import read_pixels
    from medqm.label.standin.evaluation import OCCLUSIONS, occlusion_check

    res_path = args.work / "eval_results.json"
    if not (summary_path.is_file() and res_path.is_file()):
        print(f"--update-card needs {summary_path} and {res_path}", file=sys.stderr)
        return 2
    summary = json.loads(summary_path.read_text())
    res = json.loads(res_path.read_text())
    for r in ((res.get("reaction") or {}).get("types") or {}).values():  # JSON keeps the levels as strings
        r["mean_nll"] = {int(k): v for k, v in r["mean_nll"].items()}
    dm = load_model(args.out, batch_size=32)
    if res.get("revision") != dm.revision:
        print(f"{res_path} measured revision {res.get('revision')}, the model in {args.out} is {dm.revision}",
              file=sys.stderr)
        return 2
    cfg = TrainConfig(**summary["config"])
    if res.get("occlusion") is None:
        val = [it for it in data.items if data.split[it.case_id] == "val" and it.answer_type == "tumour"]
        occ = occlusion_check(dm, val, read_pixels(sorted({it.image for it in val})))
        if occ:
            print("occlusion check (tumour AUC): " + ", ".join(f"{v} {occ[v]['auc']:.3f}" for v in OCCLUSIONS)
                  + f" on {occ['n']} images in {occ['seconds']:.0f} s", flush=True)
        res["occlusion"] = occ
        write_json(res, res_path, indent=1, default=str)
    from medqm.label.standin.evaluation import TARGETS, missed_targets

    subset_path = args.out / "eval_subset.json"  # the targets the card and the shipped-model test judge by
    subset = json.loads(subset_path.read_text())
    subset.update(targets=TARGETS, missed=missed_targets(res["accuracy"]))
    write_json(subset, subset_path, indent=1, ensure_ascii=False)
    card = write_card(args.out, data, cfg, summary, res, reproduce_command(cfg, args))
    print(f"wrote {card}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.smoke:
        args.work = args.work / "smoke"
        args.out = args.out or args.work / "model"
        args.reaction_per_modality = 1
    if args.skip_reaction:
        args.reaction_per_modality = 0
    args.out = args.out or DEMO_VLM_DIR
    cfg = make_config(args)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_data(args.collection, args.work, cfg)
    summary_path = args.out / "training_summary.json"
    if args.update_card:
        return update_card(args, data, summary_path)
    if args.eval_only:
        if not summary_path.is_file():
            print(f"--eval-only needs a trained model with {summary_path}", file=sys.stderr)
            return 2
        summary = json.loads(summary_path.read_text())
        cfg = TrainConfig(**summary["config"])
    else:
        summary = train(data, cfg, args.work, args.out)
        shutil.copyfile(args.work / "train_log.csv", args.out / "training_log.csv")
    from transformers import AutoTokenizer

    summary["vocab"] = len(AutoTokenizer.from_pretrained(str(args.out), local_files_only=True))
    write_json(summary, summary_path, indent=1)
    smoke = {"reaction_levels": (1, 5), "reaction_types": 2} if args.smoke else {}
    res = evaluate(args.out, data, cfg, reaction_per_modality=args.reaction_per_modality, **smoke)
    write_json(res, args.work / "eval_results.json", indent=1, default=str)
    card = write_card(args.out, data, cfg, summary, res, reproduce_command(cfg, args))
    size = folder_size(args.out)
    print(f"wrote {card}; folder {size / 2**20:.1f} MB; total {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if size > MAX_FOLDER_BYTES:
        print(f"the model folder is {size / 2**20:.1f} MB > 25 MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
