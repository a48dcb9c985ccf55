"""MedQM-D label definitions (--loss nll|kl, --temperature, --views) and the reliability of a label set.

Every test builds a tiny `medqm distort`-shaped folder by hand (a few 32×32 PNGs and a manifest.parquet), and
scores it with fake models whose NLLs are known, so the expected labels are computed here by hand.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fakes import Stop, stop_past_half  # tests/label, on sys.path (pytest prepends the test folder)
from PIL import Image

from medqm.io import read_image
from medqm.label.quality import DEFAULT_MAP
from medqm.label.reliability import label_reliability, oracle_loco, retest_srcc
from medqm.label.runner import (
    LabelDefinition,
    apply_view,
    choice_kl,
    mirror_text,
    read_labels,
    run_labels,
)
from medqm.label.tasks import QUADRANTS, VQAItem

MODALITIES = ["CT", "MRI", "X-ray"]
# NLL of each answer on a flat image of grey 0.2 (the references) and of grey 0.6 (the distorted images)
NLL = {
    0.2: {"CT": 0.1, "MRI": 2.0, "X-ray": 3.0, "normal": 0.3},
    0.6: {"CT": 1.0, "MRI": 0.7, "X-ray": 2.5, "normal": 1.1},
}


class TableModel:
    """NLL looked up from `NLL` by the image's mean grey level (rounded to 0.1) and the answer."""

    model_id, revision = "fake-table", "1"

    def __init__(self):
        self.samples = 0

    def answer_nll(self, images, questions, answers):
        self.samples += len(images)
        return np.array([NLL[round(float(img.mean()), 1)][a] for img, a in zip(images, answers, strict=True)])


def _blob_quadrant(img) -> str:
    g = img.mean(axis=2) if img.ndim == 3 else img
    r, c = np.argwhere(g > 0.5).mean(axis=0)
    h, w = g.shape
    return f"{'upper' if r < (h - 1) / 2 else 'lower'} {'left' if c < (w - 1) / 2 else 'right'}"


class BlobModel:
    """Finds the bright blob: its quadrant's NLL is 0.1, any other 4.0; 'yes' to a lesion 0.2 + blob size."""

    model_id, revision = "fake-blob", "1"

    def __init__(self):
        self.calls = 0

    def answer_nll(self, images, questions, answers):
        self.calls += 1
        out = []
        for img, q, a in zip(images, questions, answers, strict=True):
            if "quadrant" in q:
                out.append(0.1 if a == _blob_quadrant(img) else 4.0)
            else:
                area = float((img > 0.5).mean())
                out.append(0.2 + 3 * area if a == "yes" else 1.5 - area)
        return np.asarray(out)


def _png(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return str(path.resolve())


def _distort_folder(root: Path, refs: dict, dists: list) -> Path:
    """refs: ref_id -> (case_id, uint8 array); dists: (dist_id, ref_id, type, level, uint8 array)."""
    ref_paths = {rid: _png(root / "refs" / f"{rid}.png", arr) for rid, (_, arr) in refs.items()}
    rows = []
    for dist_id, rid, typ, level, arr in dists:
        _png(root / "dist" / "images" / f"{dist_id}.png", arr)
        rows.append({"dist_id": dist_id, "ref_id": rid, "case_id": refs[rid][0], "modality": "CT", "type": typ,
                     "level": level, "seed": 0, "params": "{}", "path": f"images/{dist_id}.png",
                     "ref_path": ref_paths[rid]})
    pd.DataFrame(rows).to_parquet(root / "dist" / "manifest.parquet")
    return root / "dist"


def _flat(v: int) -> np.ndarray:
    return np.full((32, 32), v, np.uint8)


@pytest.fixture
def grey(tmp_path):
    """One reference (grey 0.2), a distorted image (grey 0.6) and a distorted copy of the reference."""
    dist = _distort_folder(tmp_path, {"r1": ("c1", _flat(51))},
                           [("r1__dark", "r1", "brightness", 3, _flat(153)), ("r1__same", "r1", "jpeg", 1, _flat(51))])
    ref = str((tmp_path / "refs" / "r1.png").resolve())
    items = [VQAItem(ref, "What imaging modality is this?", "CT", "c1", "modality", "r1", "CT", list(MODALITIES)),
             VQAItem(ref, "Describe the image.", "normal", "c1", "open", "r1", "CT")]
    assert read_image(ref).pixels.mean() == pytest.approx(0.2)
    return dist, items


def _hand_kl(nll_ref: list[float], nll_dist: list[float], t: float) -> float:
    p = [math.exp(-x / t) for x in nll_ref]
    q = [math.exp(-x / t) for x in nll_dist]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_against_a_hand_computation(grey, tmp_path, temperature):
    dist, items = grey
    out = tmp_path / f"kl{temperature}"
    model = TableModel()
    run_labels(items, model, out, distorted=dist, loss="kl", temperature=temperature)
    lab = read_labels(out).set_index("dist_id")
    # every choice of the modality question (3) and the open question's answer (1), on 3 images
    assert model.samples == 3 * 4
    kl = _hand_kl([NLL[0.2][m] for m in MODALITIES], [NLL[0.6][m] for m in MODALITIES], temperature)
    fallback = NLL[0.6]["normal"] - NLL[0.2]["normal"]  # the open question has no choices: nll difference
    row = lab.loc["r1__dark"]
    assert json.loads(row.loss_kind) == ["kl", "nll"]
    assert json.loads(row.loss_items) == pytest.approx([kl, fallback], abs=1e-6)
    assert row.diag_loss == pytest.approx((kl + fallback) / 2, rel=1e-12)
    assert row.quality == pytest.approx(DEFAULT_MAP(row.diag_loss))
    # the correct answers' NLLs are still stored, whatever the definition
    assert json.loads(row.nll_ref_items) == pytest.approx([0.1, 0.3])
    assert json.loads(row.nll_dist_items) == pytest.approx([1.0, 1.1])
    assert (row.loss, row.temperature, row.views) == ("kl", temperature, 1)
    # a distorted image identical to its reference, and the reference itself: exactly 0, Q = 0.9
    for same in ("r1__same", "r1__reference"):
        assert lab.loc[same].diag_loss == 0.0 and json.loads(lab.loc[same].loss_items) == [0.0, 0.0]
        assert lab.loc[same].quality == pytest.approx(0.9)
    meta = read_labels(out).attrs["medqm"]
    assert (meta["loss"], meta["temperature"], meta["views"]) == ("kl", temperature, 1)
    assert json.loads((out / "label_config.json").read_text())["loss"] == "kl"
    # the reference cache holds every choice's NLL, not only the correct answer's
    cached = pd.read_parquet(out / "cache" / "refs-00000.parquet")
    assert json.loads(cached.nll[0]) == pytest.approx([NLL[0.2][a] for a in [*MODALITIES, "normal"]])


def test_nll_definition_is_the_mean_nll_difference(grey, tmp_path):
    dist, items = grey
    run_labels(items, TableModel(), tmp_path / "nll", distorted=dist, loss="nll")
    row = read_labels(tmp_path / "nll").set_index("dist_id").loc["r1__dark"]
    assert row.diag_loss == pytest.approx(((1.0 - 0.1) + (1.1 - 0.3)) / 2, rel=1e-12)
    assert json.loads(row.loss_kind) == ["nll", "nll"] and row.loss == "nll"
    assert json.loads(row.view_losses) == pytest.approx([row.diag_loss], abs=1e-6)


def test_questions_without_choices_fall_back_to_nll():
    d = LabelDefinition("kl", 2.0)
    open_q = VQAItem("x.png", "Describe.", "normal", "c")
    one_choice = VQAItem("x.png", "Which?", "a", "c", choices=["a", "a"])  # a single distinct choice: no distribution
    answer_outside = VQAItem("x.png", "Which?", "c", "c", choices=["a", "b"])
    assert [d.uses_choices(it) for it in (open_q, one_choice, answer_outside)] == [False, False, True]
    assert d.answers(answer_outside) == (["a", "b", "c"], 2, 2)  # the correct answer scored too, for nll_*_items
    ref, dist = np.array([0.5, 1.0, 1.0, 2.0, 3.0]), np.array([0.9, 1.0, 1.0, 0.5, 3.5])  # 1 + 1 + 3 answers
    loss, nr, nd = d.losses([open_q, one_choice, answer_outside], ref, dist)
    assert loss[0, 0] == pytest.approx(0.4) and loss[0, 1] == pytest.approx(0.0)
    assert loss[0, 2] == pytest.approx(_hand_kl([1.0, 2.0], [1.0, 0.5], 2.0))
    assert nr.tolist() == [[0.5, 1.0, 3.0]] and nd.tolist() == [[0.9, 1.0, 3.5]]
    assert choice_kl([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 0.5) == 0.0


def test_config_guard_covers_the_definition(grey, tmp_path):
    dist, items = grey
    out = tmp_path / "l"
    run_labels(items, TableModel(), out, distorted=dist, loss="nll")
    with pytest.raises(ValueError, match=r"different configuration \(loss\)"):
        run_labels(items, TableModel(), out, distorted=dist, loss="kl", temperature=1.0)
    with pytest.raises(ValueError, match=r"different configuration \(views\)"):
        run_labels(items, TableModel(), out, distorted=dist, views=2, loss="nll")
    kl = tmp_path / "kl"
    run_labels(items, TableModel(), kl, distorted=dist, loss="kl", temperature=1.0)
    with pytest.raises(ValueError, match=r"different configuration \(temperature\)"):
        run_labels(items, TableModel(), kl, distorted=dist, loss="kl")  # the default temperature, 3
    with pytest.raises(ValueError, match="applies to --loss kl only"):
        LabelDefinition("nll", 3.0)
    assert LabelDefinition() == LabelDefinition("kl", 3.0, 1) and LabelDefinition("nll").temperature == 1.0
    # a folder made before the definition was stored (nll, 1 view: the legacy definition) still resumes with it
    cfg = json.loads((out / "label_config.json").read_text())
    (out / "label_config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                       if k not in ("loss", "temperature", "views")}))
    run_labels(items, TableModel(), out, distorted=dist, loss="nll")
    with pytest.raises(ValueError, match=r"\(loss\)"):
        run_labels(items, TableModel(), out, distorted=dist, loss="kl", temperature=1.0)


def test_mirrored_views_mirror_left_and_right():
    assert [mirror_text(q) for q in QUADRANTS] == ["upper right", "upper left", "lower right", "lower left"]
    assert mirror_text("Left lung, not the RIGHT one; leftover") == "Right lung, not the LEFT one; leftover"
    assert mirror_text("yes") == "yes"
    d = LabelDefinition("kl", views=4)
    quad = VQAItem("x.png", "In which quadrant of the image is the lesion?", "upper left", "c", choices=QUADRANTS)
    yes = VQAItem("x.png", "Is there a lesion in this image?", "yes", "c", choices=["yes", "no"])
    triples = d.triples("o", "x.png", [quad, yes])
    assert len(triples) == 4 * (4 + 2) and [t[4] for t in triples[:7]] == [0] * 6 + [1]
    assert [t[3] for t in triples[6:12]] == [mirror_text(q) for q in QUADRANTS] + ["yes", "no"]  # view 1: flipped
    assert [t[3] for t in triples[12:18]] == QUADRANTS + ["yes", "no"]  # view 2: shifted only
    assert d.answers(quad)[2] == 0  # view 1 asks for 'upper right' at the same index: the answer is mirrored too
    img = np.arange(40 * 30 * 3, dtype=np.float32).reshape(40, 30, 3)
    assert apply_view(img, 0) is img
    assert np.array_equal(apply_view(img, 1), img[:, ::-1])
    shifted = apply_view(img, 2)
    assert np.array_equal(shifted[6:, 6:], img[:-6, :-6])
    assert np.array_equal(shifted[:6, 6:], np.repeat(img[:1, :-6], 6, 0))  # the vacated border repeats the edge
    assert np.array_equal(apply_view(img, 3), apply_view(apply_view(img, 1), 2))


def _blob(r: int, c: int, size: int = 6) -> np.ndarray:
    a = _flat(20)
    a[r : r + size, c : c + size] = 230
    return a


@pytest.fixture
def blobs(tmp_path):
    """Three cases with one reference each (a blob in the upper left); distortions shrink or move the blob."""
    refs, dists = {}, []
    for k in range(3):
        rid = f"r{k}"
        refs[rid] = (f"c{k}", _blob(4 + k, 8))
        for level, size in ((1, 5), (2, 3)):
            dists.append((f"{rid}__shrink{level}", rid, "shrink", level, _blob(4 + k, 8, size)))
        dists.append((f"{rid}__move1", rid, "move", 1, _blob(4 + k, 20)))
    dist = _distort_folder(tmp_path, refs, dists)
    items = []
    for k in range(3):
        ref = str((tmp_path / "refs" / f"r{k}.png").resolve())
        items.append(VQAItem(ref, "In which quadrant of the image is the lesion?", "upper left", f"c{k}",
                             "lesion_quadrant", f"r{k}", "CT", list(QUADRANTS)))
        items.append(VQAItem(ref, "Is there a lesion in this image?", "yes", f"c{k}", "lesion_present", f"r{k}",
                             "CT", ["yes", "no"]))
    return dist, items


def test_flip_view_scores_the_mirrored_answer(blobs, tmp_path):
    dist, items = blobs
    run_labels(items, BlobModel(), tmp_path / "v", distorted=dist, views=2, loss="nll")
    lab = read_labels(tmp_path / "v").set_index("dist_id")
    ref = lab.loc["r0__reference"]
    # the flipped reference has its blob upper right, and the flipped question's answer is 'upper right'
    quad = json.loads(ref.answer_types).index("lesion_quadrant")  # a reference's questions are sorted by type
    assert json.loads(ref.nll_ref_items)[quad] == pytest.approx(0.1)
    moved = lab.loc["r0__move1"]  # blob moved to the upper right: wrong in both views, by the same amount
    assert json.loads(moved.view_losses) == pytest.approx([3.9 / 2, 3.9 / 2], abs=1e-6)
    assert moved.views == 2 and moved.diag_loss == pytest.approx(3.9 / 2)
    rel = json.loads((tmp_path / "v" / "reliability.json").read_text())
    assert rel["test_retest"]["n_images"] == 9 and rel["test_retest"]["flip"] == pytest.approx(1.0)
    assert rel["oracle_loco"]["n_cases"] == 3


def test_resume_after_interrupt_under_kl(blobs, tmp_path):
    dist, items = blobs
    full = tmp_path / "full"
    run_labels(items, BlobModel(), full, distorted=dist, shard_size=1, loss="kl", temperature=3.0, views=4)

    part = tmp_path / "part"
    with pytest.raises(Stop):
        run_labels(items, BlobModel(), part, distorted=dist, shard_size=1, loss="kl", temperature=3.0, views=4,
                   progress=stop_past_half)
    (part / "shards" / "shard-00000.parquet").unlink()  # its reference cache stays and is used
    again = BlobModel()
    summary = run_labels(items, again, part, distorted=dist, shard_size=1, loss="kl", temperature=3.0, views=4)
    assert summary.shards_done_before == 1
    a, b = read_labels(full), read_labels(part)
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs == b.attrs and (a.loss == "kl").all() and (a.views == 4).all()
    assert a.view_losses.map(lambda v: len(json.loads(v))).eq(4).all()
    assert json.loads(a.set_index("dist_id").loc["r2__move1"].loss_kind) == ["kl", "kl"]


def test_oracle_loco_on_a_hand_made_table():
    rows = [("A", "t", 1, 0.8), ("A", "t", 2, 0.4), ("B", "t", 1, 0.7), ("B", "t", 2, 0.5), ("C", "t", 1, 0.9),
            ("C", "t", 2, 0.1), ("A", "u", 1, 0.3), ("A", "reference", 0, 0.9)]
    table = pd.DataFrame(rows, columns=["case_id", "type", "level", "quality"])
    o = oracle_loco(table)
    # predictions: A1 (.7+.9)/2, A2 (.5+.1)/2, B1 .85, B2 .25, C1 .75, C2 .45; rank differences 0 0 2 2 2 2
    assert o["srcc"] == pytest.approx(1 - 6 * 16 / (6 * 35))
    assert (o["n_images"], o["n_uncovered"], o["n_cases"]) == (6, 1, 3)


def test_retest_and_the_reliability_file_contents():
    table = pd.DataFrame({
        "ref_id": ["r"] * 4, "case_id": ["a", "a", "b", "b"], "type": ["t"] * 4, "level": [1, 2, 1, 2],
        "quality": [0.8, 0.5, 0.7, 0.2],
        "view_losses": [json.dumps(v) for v in ([0.1, 0.2], [0.5, 0.4], [0.3, 0.9], [1.0, 1.1])]})
    r = retest_srcc(table)
    assert r == {"flip": pytest.approx(0.8), "n_images": 4}
    rel = label_reliability(table)
    assert set(rel) == {"severity_monotonicity", "oracle_loco", "test_retest"}
    assert retest_srcc(table.assign(view_losses=[json.dumps([v]) for v in range(4)])) is None


def test_cli_label_kl_with_views_prints_the_reliability(blobs, tmp_path):
    """`medqm label --loss kl --temperature 3 --views 2` with a tiny LLaVA: the definition reaches the labels."""
    from typer.testing import CliRunner

    from medqm.cli import app
    from medqm.testing import build_tiny_vlm

    dist, items = blobs
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in items))
    model = build_tiny_vlm("llava", tmp_path / "tiny-llava", seed=0)
    args = ["label", "--tasks", str(tasks), "--distorted", str(dist), "--model", str(model)]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "l"), "--loss", "kl", "--temperature", "3",
                                 "--views", "2"])
    assert r.exit_code == 0, r.output
    assert "distortion-oracle ceiling (leave one case out, 3 cases)" in r.output
    assert "test–retest SRCC of D, original view against: flip" in r.output
    lab = read_labels(tmp_path / "l")
    assert (lab.loss == "kl").all() and (lab.temperature == 3.0).all() and (lab.views == 2).all()
    assert set(json.loads((tmp_path / "l" / "reliability.json").read_text())) == {
        "severity_monotonicity", "oracle_loco", "test_retest"}
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--views", "3"])
    assert r.exit_code == 2 and "views must be 1, 2 or 4" in r.output


def test_per_question_monotonicity_follows_the_definition():
    """Under kl, the per-question series are the kl terms (here rising with the level), not NLL differences."""
    from medqm.label.reliability import severity_monotonicity

    rows = [{"ref_id": "r", "case_id": "a", "type": "t", "level": lv, "quality": 0.9 - 0.1 * lv, "loss": "kl",
             "answer_types": json.dumps(["modality"]), "nll_ref_items": "[1.0]",
             "nll_dist_items": json.dumps([1.0 - 0.1 * lv]), "loss_items": json.dumps([0.2 * lv])}
            for lv in (1, 2, 3)]
    table = pd.DataFrame(rows)
    assert severity_monotonicity(table)["by_answer_type"]["modality"]["mean_rho"] == pytest.approx(1.0)
    nll = severity_monotonicity(table.assign(loss="nll"))["by_answer_type"]["modality"]["mean_rho"]
    assert nll == pytest.approx(-1.0)


def test_oracle_by_answer_type_uses_each_types_own_losses():
    """Per answer type: the images' mean loss over that type's questions, and the leave-one-case-out oracle of it,
    computed here by hand on a table where one type follows the level and the other is noise."""
    from medqm.label.reliability import oracle_by_answer_type, task_losses

    rng = np.random.default_rng(0)
    rows = []
    for c in range(6):
        for lv in (1, 2, 3):
            noise = float(rng.random())
            tumour = [] if c % 2 else ["tumour"]
            rows.append({"case_id": f"c{c}", "ref_id": f"r{c}", "type": "blur", "level": lv, "quality": 0.5,
                         "answer_types": json.dumps(["modality", "modality", *tumour]),
                         "loss_items": json.dumps([0.1 * lv, 0.1 * lv + 0.01 * c, *([noise] if tumour else [])])})
    t = pd.DataFrame(rows)
    losses = task_losses(t)
    assert losses["modality"][0] == pytest.approx(0.1) and np.isnan(losses["tumour"][3])  # case c1: no tumour
    by = oracle_by_answer_type(t)
    assert by["modality"]["srcc"] == pytest.approx(oracle_loco(t.assign(x=-losses["modality"]), label="x")["srcc"])
    assert by["modality"]["srcc"] > 0.7 and by["tumour"]["n_cases"] == 3 and by["tumour"]["n_images"] == 9
    assert label_reliability(t)["oracle_loco"]["by_answer_type"].keys() == {"modality", "tumour"}
