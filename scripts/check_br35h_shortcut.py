"""Reproduce the Br35H shortcut check (docs/data.md): is the tumour label predictable without the head's pixels?

    python scripts/check_br35h_shortcut.py data/br35h          # after `medqm data build br35h --out data/br35h`

Prints one JSON line (balanced accuracy and AUC on case-level folds for what the images show outside the head,
the head's outline, and the source files' sizes) and writes it to ``<collection>/shortcut_check.json``.
Exits 1 when the outside-the-head classifier is above chance (balanced accuracy > 0.60).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medqm.io.datasets.br35h import shortcut_check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("collection", type=Path)
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args(argv)
    result = shortcut_check(args.collection, folds=args.folds)
    line = json.dumps(result, sort_keys=True)
    print(line)
    (args.collection / "shortcut_check.json").write_text(line + "\n")
    return 0 if result["outside_head"]["balanced_accuracy"] <= 0.60 else 1


if __name__ == "__main__":
    sys.exit(main())
