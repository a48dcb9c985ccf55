"""Image collections on disk: a folder of images with a `manifest.csv` (the bundled demo collection's layout).

The manifest is the source of truth for metadata that files cannot carry (modality of a PNG, case id,
lesion labels); `summarize` counts it and `contact_sheet` draws a few images per modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._image import MedImage, MedQMReadError
from ._reader import read_image

MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("id", "case_id", "modality", "body_part", "path")


def default_collection() -> Path:
    """The bundled demo collection: ``./data/demo`` if present, else the one beside this source checkout."""
    here = Path("data/demo")
    return here if (here / MANIFEST).is_file() else Path(__file__).resolve().parents[3] / "data" / "demo"


def load_manifest(root: str | Path):
    """Read and validate ``root/manifest.csv``; returns a pandas DataFrame with ``path`` made absolute."""
    import pandas as pd

    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise MedQMReadError(path, "no manifest.csv in this folder (a collection needs one; see data/demo/README.md)")
    try:
        df = pd.read_csv(path, dtype={"case_id": str, "id": str}, keep_default_na=False)
    except Exception as e:
        raise MedQMReadError(path, f"unreadable manifest ({type(e).__name__}: {e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise MedQMReadError(path, f"manifest lacks columns {missing}")
    if df["id"].duplicated().any():
        dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
        raise MedQMReadError(path, f"duplicate image id {dup!r}")
    df["abs_path"] = [str(root / p) for p in df["path"]]
    return df


def load_manifests(roots) -> pd.DataFrame:  # noqa: F821
    """Several collections as one table (a ``collection`` column says which); image ids must not repeat."""
    import pandas as pd

    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    frames = []
    for root in roots:
        df = load_manifest(root)
        df["collection"] = str(root)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    dup = df["id"].duplicated()
    if dup.any():
        raise MedQMReadError(Path(df.loc[dup, "collection"].iloc[0]) / MANIFEST,
                             f"image id {df.loc[dup, 'id'].iloc[0]!r} is also in another collection given")
    return df


@dataclass
class CollectionSummary:
    root: Path
    n_images: int
    n_cases: int
    by_modality: dict[str, dict[str, int]]  # modality -> {"images", "cases", "lesion"}
    by_body_part: dict[tuple[str, str], int]
    missing_files: list[str]


def summarize(root) -> CollectionSummary:
    """Counts of one collection, or of several at once (a list of folders)."""
    df = load_manifests(root)
    by_mod = {}
    for mod, g in df.groupby("modality", sort=True):
        lesion = g["lesion"].astype(str).eq("1").sum() if "lesion" in g else 0
        by_mod[str(mod)] = {"images": len(g), "cases": g["case_id"].nunique(), "lesion": int(lesion)}
    by_part = {(str(m), str(b) or "-"): len(g) for (m, b), g in df.groupby(["modality", "body_part"], sort=True)}
    missing = [p for p in df["abs_path"] if not Path(p).is_file()]
    return CollectionSummary(Path(root) if isinstance(root, (str, Path)) else Path(str(root[0])), len(df),
                             df["case_id"].nunique(), by_mod, by_part, missing)


def contact_sheet(root, out: str | Path, *, per_modality: int = 8, thumb: int = 128) -> Path:
    """Draw ``per_modality`` images of each modality (spread over its cases) into one labelled PNG.

    ``root`` is a collection folder or a list of them (drawn together).
    """
    from PIL import Image, ImageDraw

    df = load_manifests(root)
    label_w = 90
    mods = sorted(df["modality"].unique())
    sheet = Image.new("RGB", (label_w + per_modality * thumb, len(mods) * thumb), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for row, mod in enumerate(mods):
        g = df[df["modality"] == mod]
        # round-robin over cases so one long volume does not fill the row
        picks, by_case = [], [list(c.index) for _, c in g.groupby("case_id", sort=True)]
        while len(picks) < per_modality and any(by_case):
            for idx in by_case:
                if idx and len(picks) < per_modality:
                    picks.append(idx.pop(len(idx) // 2))
        draw.text((8, row * thumb + thumb // 2 - 6), f"{mod} ({len(g)})", fill=(240, 240, 240))
        for col, i in enumerate(picks):
            try:
                px = read_image(df.at[i, "abs_path"]).to_uint8()
            except MedQMReadError:
                continue
            im = Image.fromarray(px).convert("RGB").resize((thumb, thumb), Image.Resampling.BOX)
            sheet.paste(im, (label_w + col * thumb, row * thumb))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


__all__ = ["MANIFEST", "load_manifest", "load_manifests", "summarize", "contact_sheet", "default_collection",
           "CollectionSummary",
           "read_collection_image"]


def read_collection_image(row) -> MedImage:
    """Read one manifest row as a MedImage carrying the manifest's metadata (PNG files carry none)."""
    img = read_image(row["abs_path"], modality=row["modality"], case_id=str(row["case_id"]),
                     body_part=(row.get("body_part") or None))
    img.meta["id"] = row["id"]
    return img
