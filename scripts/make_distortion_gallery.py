"""Draw the distortion gallery: one demo image per modality, each applicable type at levels 1, 3 and 5.

    python scripts/make_distortion_gallery.py [--out docs/img/distortion_gallery.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medqm.distort import create_distortion, list_distortions
from medqm.io.collection import default_collection, load_manifest, read_collection_image

LEVELS = (1, 3, 5)
# one typical image per modality, by id prefix; lesion-positive slices preferred where there are any
REFERENCES = {"CT": "ct-lung1", "MR": "mr-brain1", "XR": "xr-chest", "US": "us-echo-clip", "NM": "nm-bonescan",
              "PATH": "path-tia-he", "FUNDUS": "fundus-normal"}


def pick_references():
    df = load_manifest(default_collection())
    refs = {}
    for mod, prefix in REFERENCES.items():
        rows = df[df["id"].str.startswith(prefix)]
        positive = rows[rows["lesion"].astype(str) == "1"]
        rows = positive if len(positive) else rows
        if len(rows):
            refs[mod] = read_collection_image(rows.iloc[len(rows) // 2])
    return refs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/distortion_gallery.png"))
    ap.add_argument("--thumb", type=int, default=88)
    args = ap.parse_args()
    t = args.thumb
    refs = pick_references()
    blocks = []
    for mod, ref in sorted(refs.items()):
        names = [n for n in list_distortions() if create_distortion(n).applies_to(mod, color=ref.is_color)]
        blocks.append((mod, ref, names))
    label_w, head_h = 70, 24
    width = label_w + t * (1 + max(len(b[2]) for b in blocks))
    height = sum(head_h + t * len(LEVELS) for _ in blocks)
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)

    def thumb(px):
        u8 = np.round(px * 255).astype(np.uint8)
        return Image.fromarray(u8).convert("RGB").resize((t, t), Image.Resampling.BOX)

    y = 0
    for mod, ref, names in blocks:
        draw.text((label_w + 4, y + 6), "reference", fill=(0, 0, 0))
        for j, name in enumerate(names):
            x = label_w + t * (j + 1)
            short = name.replace("_", " ")
            draw.text((x + 2, y + 2), short[:14], fill=(0, 0, 0))
            draw.text((x + 2, y + 12), short[14:28], fill=(0, 0, 0))
        y += head_h
        sheet.paste(thumb(ref.pixels), (label_w, y + t))
        for i, level in enumerate(LEVELS):
            draw.text((6, y + i * t + t // 2 - 5), f"{mod} L{level}", fill=(0, 0, 0))
            for j, name in enumerate(names):
                out = create_distortion(name)(ref, level, seed=0).pixels
                sheet.paste(thumb(out), (label_w + t * (j + 1), y + i * t))
        y += t * len(LEVELS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({width}×{height})")


if __name__ == "__main__":
    main()
