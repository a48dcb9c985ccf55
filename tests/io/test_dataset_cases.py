"""The ``cases`` collection builder: pure helpers on synthetic inputs (fast), the real build (slow, downloads)."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from medqm.io.datasets import cases as C

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


# --- contour rasteriser -------------------------------------------------------------------------------


def _axial(shape=(20, 30)) -> C.SliceGeometry:
    # first pixel centre at x=-10, y=-20, z=5; 2 mm between rows, 1 mm between columns
    return C.SliceGeometry((-10.0, -20.0, 5.0), (1, 0, 0, 0, 1, 0), (2.0, 1.0), shape)


def _square(rows: tuple[float, float], cols: tuple[float, float], z: float) -> np.ndarray:
    """A square in patient mm whose edges lie on the given (fractional) pixel rows/columns of `_axial`."""
    (r0, r1), (c0, c1) = rows, cols
    y0, y1 = -20 + 2 * r0, -20 + 2 * r1
    x0, x1 = -10 + c0, -10 + c1
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])


def test_rasterise_square_gives_the_known_pixels():
    mask = C.rasterise_contours([_square((3.5, 12.5), (4.5, 15.5), 5.0)], _axial())
    want = np.zeros((20, 30), bool)
    want[4:13, 5:16] = True
    assert np.array_equal(mask, want)


def test_rasterise_ignores_other_planes_and_makes_holes():
    geometry = _axial()
    outer = _square((1.5, 15.5), (1.5, 25.5), 5.0)
    inner = _square((5.5, 9.5), (5.5, 9.5), 5.2)  # within tolerance of the plane
    elsewhere = _square((1.5, 3.5), (1.5, 3.5), 8.0)  # 3 mm away: another slice
    mask = C.rasterise_contours([outer, inner, elsewhere], geometry, tolerance=0.5)
    assert mask[2:16, 2:26].sum() == 14 * 24 - 4 * 4
    assert not mask[6:10, 6:10].any()
    assert C.rasterise_contours([elsewhere], geometry).sum() == 0


def test_rasterise_uses_the_orientation():
    # coronal plane y=30: rows run inferior (−z), columns run along +x
    geometry = C.SliceGeometry((0.0, 30.0, 100.0), (1, 0, 0, 0, 0, -1), (1.0, 1.0), (10, 10))
    pts = np.array([[1.5, 30, 98.5], [4.5, 30, 98.5], [4.5, 30, 96.5], [1.5, 30, 96.5]])  # rows 1.5–3.5, cols 1.5–4.5
    mask = C.rasterise_contours([pts], geometry)
    want = np.zeros((10, 10), bool)
    want[2:4, 2:5] = True
    assert np.array_equal(mask, want)
    assert abs(geometry.height() - 30.0) < 1e-9  # normal = row × column = (1,0,0) × (0,0,−1) = (0, 1, 0)


# --- slice picking, mosaics ----------------------------------------------------------------------------


def test_pick_tumour_slices_spreads_both_groups():
    flags = [False] * 10 + [True] * 9 + [False] * 11
    picked = C.pick_tumour_slices(flags, 3, 4)
    assert [i for i in picked if flags[i]] == [10, 14, 18]
    # positions 0, 7, 13, 20 of the 21 tumour-free slices (0–9, 19–29)
    assert [i for i in picked if not flags[i]] == [0, 7, 22, 29]
    assert C.pick_tumour_slices([True, False], 6, 6) == [0, 1]


def test_demosaic_reads_tiles_row_by_row():
    tiles = [np.full((4, 5), k, np.float32) for k in range(9)]
    mosaic = np.vstack([np.hstack(tiles[r * 3 : r * 3 + 3]) for r in range(3)])
    out = C.demosaic(mosaic, 7)  # 7 slices → a 3×3 grid, the last two tiles empty
    assert len(out) == 7 and all(t.shape == (4, 5) for t in out)
    assert [float(t[0, 0]) for t in out] == list(range(7))
    with pytest.raises(ValueError):
        C.demosaic(np.zeros((10, 10)), 9)


# --- .deb extraction -----------------------------------------------------------------------------------


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("suffix, mode", [("xz", "w:xz"), ("gz", "w:gz")])
def test_deb_read_finds_a_file_in_the_data_archive(tmp_path, suffix, mode):
    payload = b"odd-sized payload"
    deb = tmp_path / "tiny_1.0-1_all.deb"
    deb.write_bytes(_ar({
        "debian-binary": b"2.0\n",
        "control.tar.gz": _tar({"./control": b"Package: tiny\n"}, "w:gz"),
        f"data.tar.{suffix}": _tar({"./usr/share/tiny/a.bin": payload, "./usr/share/tiny/b.txt": b"b"}, mode),
    }))
    assert set(C.ar_members(deb.read_bytes())) == {"debian-binary", "control.tar.gz", f"data.tar.{suffix}"}
    assert C.deb_read(deb, "usr/share/tiny/a.bin") == payload
    assert C.deb_read(deb, "./usr/share/tiny/b.txt") == b"b"
    with pytest.raises(FileNotFoundError, match="missing"):
        C.deb_read(deb, "usr/share/tiny/missing")


def test_deb_without_data_or_not_ar_is_refused(tmp_path):
    deb = tmp_path / "x.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n"}))
    with pytest.raises(ValueError, match="no data.tar"):
        C.deb_data_tar(deb)
    with pytest.raises(ValueError, match="not an ar archive"):
        C.ar_members(b"PK\x03\x04")


# --- the source table ------------------------------------------------------------------------------------


def _demo_rows() -> list[dict]:
    with open(DEMO / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_source_table_is_consistent_and_disjoint_from_demo():
    names = {a.name for a in C.ARCHIVES}
    assert {s.package for s in C.SOURCES} <= names
    keys = [s.key for s in C.SOURCES]
    assert len(keys) == len(set(keys))
    assert len({s.case_id for s in C.SOURCES}) >= 20
    demo = _demo_rows()
    demo_ids = {r["id"] for r in demo}
    demo_cases = {r["case_id"] for r in demo}
    demo_modalities = {r["modality"] for r in demo}
    for s in C.SOURCES:
        assert not any(i == s.key or i.startswith(s.key + "-") for i in demo_ids), s.key
        assert s.case_id not in demo_cases, s.case_id
        assert s.key.split("-")[0] == s.modality.lower(), s.key
        assert s.modality in demo_modalities | {"OT"}
    assert C.DATASET.name == "cases" and C.DATASET.archives == C.ARCHIVES


# --- the real build ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_from_the_real_archives(tmp_path):
    from PIL import Image

    from medqm.io.datasets import CollectionWriter, fetch

    paths = {a.name: fetch(a) for a in C.ARCHIVES}
    writer = CollectionWriter(tmp_path / "cases")
    figures = C.DATASET.build(writer, paths, lambda _: None)
    writer.finish({"dataset": "cases", "figures": figures})
    rows = writer.rows
    assert figures["cases"] >= 20 and figures["mask_cases"] >= 4
    demo = _demo_rows()
    assert not {r["id"] for r in rows} & {r["id"] for r in demo}
    assert not {r["case_id"] for r in rows} & {r["case_id"] for r in demo}
    assert len({r["case_id"] for r in rows} | {r["case_id"] for r in demo}) >= 55
    mask_cases = {r["case_id"] for r in rows + demo if r.get("mask")}
    assert len(mask_cases) >= 8
    for r in rows:
        with Image.open(tmp_path / "cases" / r["path"]) as im:
            assert im.size == (256, 256) and im.mode in ("L", "RGB")
        if r.get("mask"):
            m = np.asarray(Image.open(tmp_path / "cases" / r["mask"]))
            assert set(np.unique(m)) <= {0, 255}
            assert m.any() == (r["lesion"] == "1"), r["id"]
    text = (tmp_path / "cases" / "LICENSES.md").read_text()
    for a in C.ARCHIVES:
        assert a.name in text
    assert "CC BY-NC 3.0" in text and "Looked at and not used" in text
