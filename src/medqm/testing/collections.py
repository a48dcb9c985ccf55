"""A tiny fake tumour collection in Br35H's layout (manifest ``finding`` 'tumour'), for tests without data/br35h."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# (case_id, lesion, images): both answers on both sides of the stand-in's seeded case split
FAKE_TUMOUR_CASES = [(f"br35h-fake{c:02d}", c % 2, 1 + c % 3) for c in range(12)]


def fake_tumour_collection(root: str | Path, cases=FAKE_TUMOUR_CASES, *, seed: int = 0) -> Path:
    """Write 256×256 grey "heads" (an ellipse with noise), a bright disc in those with a tumour, and their
    manifest into ``root``; returns ``root``. Deterministic."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images" / "MR").mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[:256, :256]
    for case, lesion, n in cases:
        for k in range(n):
            img = 80.0 * (((yy - 128) / 112.0) ** 2 + ((xx - 128) / 92.0) ** 2 < 1) + rng.normal(0, 6, (256, 256))
            if lesion:
                img += 120.0 * (((yy - 100 - 8 * k) ** 2 + (xx - 150) ** 2) < 15 ** 2)
            rel = f"images/MR/mr-br35h-{'y' if lesion else 'n'}-{case}-{k}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / rel)
            rows.append({"id": f"mr-br35h-{case}-{k}", "case_id": case, "modality": "MR", "body_part": "brain",
                         "plane": "axial", "lesion": lesion, "finding": "tumour", "mask": "", "path": rel})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root
