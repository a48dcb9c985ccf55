"""Task files (JSONL/CSV), the VQA-RAD and SLAKE readers, and the demo collection's generated questions."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medqm.io.collection import default_collection, load_manifest
from medqm.label.tasks import (
    MODALITY_WORDS,
    PLANES,
    QUADRANTS,
    QUESTION_TEMPLATES,
    TaskFileError,
    VQAItem,
    demo_questions,
    image_quadrant,
    read_slake,
    read_tasks,
    read_vqa_rad,
    write_tasks,
)

DEMO = default_collection()


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    return path


@pytest.fixture
def items(tmp_path):
    inside = _png(tmp_path / "tasks" / "img" / "a.png")
    outside = _png(tmp_path / "elsewhere" / "b.png")
    return [
        VQAItem(str(inside), "Is there a lesion?", "yes", "case-1", "lesion_present", "a", "CT", ["yes", "no"]),
        VQAItem(str(outside), "What is abnormal, d'you think?", "a 2 cm nodule, \"spiculated\"", "case 2"),
        VQAItem(str(inside), "Où est la lésion ?", "upper left", "case-1", "lesion_quadrant", "a", "CT",
                list(QUADRANTS),
                {"qid": 7, "source": "unit test", "organ": "肺"}),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_round_trip(items, tmp_path, suffix):
    path = write_tasks(items, tmp_path / "tasks" / f"t{suffix}")
    back = read_tasks(path)
    assert back == items
    text = path.read_text(encoding="utf-8")
    assert "img/a.png" in text and str(tmp_path / "tasks") not in text  # relative inside the folder
    assert str((tmp_path / "elsewhere" / "b.png").resolve()) in text  # absolute outside it
    # rewriting what was read gives the same file
    again = write_tasks(back, tmp_path / "tasks" / f"u{suffix}")
    assert again.read_text(encoding="utf-8") == text


def test_csv_choices_are_pipe_separated(items, tmp_path):
    path = write_tasks(items[:1], tmp_path / "tasks" / "t.csv")
    assert "yes|no" in path.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="separator"):
        write_tasks([VQAItem(items[0].image, "q", "a|b", "c", choices=["a|b", "c"])], tmp_path / "x.csv")


def test_relative_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    _png(tmp_path / "d" / "imgs" / "x.png")
    (tmp_path / "d" / "t.jsonl").write_text(json.dumps({"image": "imgs/x.png", "question": "q", "answer": "a",
                                                        "case_id": 3}) + "\n")
    monkeypatch.chdir(tmp_path)  # not the file's folder
    [it] = read_tasks("d/t.jsonl")
    assert it.image == str((tmp_path / "d" / "imgs" / "x.png").resolve()) and Path(it.image).is_absolute()
    assert it.case_id == "3" and it.choices is None and it.meta == {}


def test_validation_names_file_and_lines(tmp_path):
    _png(tmp_path / "x.png")
    lines = [
        {"image": "x.png", "question": "q", "answer": "a", "case_id": "c"},
        {"image": "x.png", "question": "q", "case_id": "c"},
        {"image": "x.png", "question": "q", "answer": "  ", "case_id": "c"},
        {"image": "x.png", "question": "q", "answer": "maybe", "case_id": "c", "choices": ["yes", "no"]},
        {"image": "x.png", "question": "q", "answer": "a", "case_id": "c", "anwser": "typo"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in lines) + "\n{not json\n")
    with pytest.raises(TaskFileError) as ei:
        read_tasks(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "line 2: missing field(s) ['answer']" in msg
    assert "line 3: empty answer" in msg
    assert "line 4: answer 'maybe' is not among choices" in msg
    assert "line 5: unknown field(s) ['anwser']" in msg
    assert "line 6: not valid JSON" in msg
    assert [ln for ln, _ in ei.value.problems] == [2, 3, 4, 5, 6]


def test_csv_validation_and_missing_images(tmp_path):
    _png(tmp_path / "ok.png")
    path = tmp_path / "t.csv"
    path.write_text("image,question,answer,case_id,choices\n"
                    "ok.png,q,yes,c,yes|no\n"
                    "gone1.png,q,no,c,yes|no\n"
                    ",q,no,c,\n"
                    "gone2.png,q,a,c,\n", encoding="utf-8")
    with pytest.raises(TaskFileError) as ei:
        read_tasks(path)
    assert "line 4: missing field(s) ['image']" in str(ei.value)
    path.write_text("image,question,answer,case_id,choices\nok.png,q,yes,c,yes|no\ngone1.png,q,no,c,yes|no\n"
                    "gone2.png,q,a,c,\n", encoding="utf-8")
    with pytest.raises(TaskFileError) as ei:
        read_tasks(path)
    msg = str(ei.value)
    assert "line 3: image file not found" in msg and "gone1.png" in msg and "line 4" in msg and "gone2.png" in msg
    assert len(read_tasks(path, check_images=False)) == 3
    assert read_tasks(path, check_images=False)[0].choices == ["yes", "no"]


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(TaskFileError, match="use .jsonl or .csv"):
        read_tasks(tmp_path / "t.txt")
    with pytest.raises(TaskFileError, match="no such file"):
        read_tasks(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        write_tasks([], tmp_path / "t.json")


# --- public datasets: fixtures follow the official files' schemas field for field


def _vqa_rad_entry(qid, image, question, answer, answer_type, question_type, organ="HEAD", phrase="freeform"):
    # the 14 variables of "VQA_RAD Dataset Public.json" (OSF 89kps, readme section 3.0)
    return {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"{qid:08x}-5e2f-4b7a-9d8a-1c3f0e6b7a21",
            "image_case_url": "https://medpix.nlm.nih.gov/case?id=48e1dd0e-8552-46ad-a354-5eb55be86de6",
            "image_name": image, "image_organ": organ, "evaluation": "not evaluated", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": question_type, "answer": answer, "answer_type": answer_type}


@pytest.fixture
def vqa_rad(tmp_path):
    img_dir = tmp_path / "VQA_RAD Image Folder"
    for name in ("synpic54610.jpg", "synpic29265.jpg"):
        img_dir.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(img_dir / name)
    entries = [
        _vqa_rad_entry(1, "synpic54610.jpg", "Are regions of the brain infarcted?", "Yes", "CLOSED", "PRES"),
        _vqa_rad_entry(2, "synpic54610.jpg", "Is there infarction in the brain?", "yes", "CLOSED", "PRES",
                       phrase="para"),
        _vqa_rad_entry(3, "synpic29265.jpg", "How was this image taken?", "MRI - DWI", "OPEN", "MODALITY", "CHEST"),
        _vqa_rad_entry(4, "synpic29265.jpg", "How many lesions are there?", 2, "OPEN", "COUNT", "CHEST",
                       "test_freeform"),
        _vqa_rad_entry(5, "synpic29265.jpg", "Is the lesion on the left or right?", "Left", "CLOSED", "POS", "CHEST"),
    ]
    path = tmp_path / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(entries, indent=2))
    return path, img_dir


def test_read_vqa_rad(vqa_rad):
    path, img_dir = vqa_rad
    items = read_vqa_rad(path, img_dir)
    assert len(items) == 5
    a, b, c, d, e = items
    assert (a.answer, a.choices, a.answer_type) == ("yes", ["yes", "no"], "CLOSED")
    assert b.answer == "yes" and b.meta["phrase_type"] == "para"
    assert a.case_id == b.case_id == a.image_id == "synpic54610.jpg"  # no patient id: the image is the case
    assert a.image == str((img_dir / "synpic54610.jpg").resolve())
    assert (c.answer, c.choices, c.answer_type) == ("MRI - DWI", None, "OPEN")
    assert d.answer == "2"  # numeric answers in the JSON become strings
    assert e.choices is None  # closed but not yes/no: no choice set invented
    assert a.meta["question_type"] == "PRES" and a.meta["image_organ"] == "HEAD" and a.meta["qid"] == 1
    assert "question_rephrase" not in a.meta  # 'NULL' placeholders are dropped
    assert all(it.modality is None for it in items)


def test_read_vqa_rad_errors(vqa_rad, tmp_path):
    path, img_dir = vqa_rad
    (img_dir / "synpic29265.jpg").unlink()
    with pytest.raises(TaskFileError, match="synpic29265.jpg"):
        read_vqa_rad(path, img_dir)
    assert len(read_vqa_rad(path, img_dir, check_images=False)) == 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"qid": 9, "image_name": "x.jpg", "question": "q", "answer_type": "OPEN"}]))
    with pytest.raises(TaskFileError, match=r"entry 1 \(qid 9\): missing field\(s\) \['answer'\]"):
        read_vqa_rad(bad, img_dir)
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(TaskFileError, match="expected a JSON list"):
        read_vqa_rad(bad, img_dir)


def _slake_entry(qid, img_id, question, answer, lang, answer_type, content_type, modality="CT", location="Lung"):
    # the fields of SLAKE's train.json / validate.json / test.json
    return {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": location, "modality": modality, "answer_type": answer_type,
            "base_type": "vqa", "content_type": content_type, "triple": ["vhead", "_", "_"], "qid": qid}


@pytest.fixture
def slake(tmp_path):
    imgs = tmp_path / "Slake1.0" / "imgs"
    for i in (102, 384):
        (imgs / f"xmlab{i}").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(imgs / f"xmlab{i}" / "source.jpg")
    entries = [
        _slake_entry(11934, 102, "Does the picture contain lung?", "Yes", "en", "CLOSED", "Organ"),
        _slake_entry(11935, 102, "What modality is used to take this image?", "CT", "en", "OPEN", "Modality"),
        _slake_entry(11936, 102, "图中有肺吗?", "是", "zh", "CLOSED", "Organ"),
        _slake_entry(2725, 384, "What scanning plane does this image belong to?", "Coronal Plane", "en", "OPEN",
                     "Plane", "X-Ray", "Chest"),
        _slake_entry(2726, 384, "Is this a MRI?", "No", "en", "CLOSED", "Modality", "MRI", "Brain"),
    ]
    path = tmp_path / "Slake1.0" / "train.json"
    path.write_text(json.dumps(entries, ensure_ascii=False))
    return path, imgs


def test_read_slake(slake):
    path, imgs = slake
    en = read_slake(path, imgs)
    assert [it.meta["qid"] for it in en] == [11934, 11935, 2725, 2726]
    a, b, c, d = en
    assert (a.answer, a.choices, a.answer_type, a.case_id, a.image_id) == ("yes", ["yes", "no"], "CLOSED", "xmlab102",
                                                                           "102")
    assert a.image == str((imgs / "xmlab102" / "source.jpg").resolve())
    assert (b.answer, b.choices) == ("CT", None)
    assert (c.modality, c.case_id, c.answer) == ("XR", "xmlab384", "Coronal Plane")
    assert (d.modality, d.answer) == ("MR", "no")
    assert a.meta["content_type"] == "Organ" and a.meta["location"] == "Lung" and a.meta["q_lang"] == "en"
    [zh] = read_slake(path, imgs, lang="zh")
    assert (zh.answer, zh.choices) == ("是", ["是", "否"])
    assert len(read_slake(path, imgs, lang=None)) == 5
    with pytest.raises(ValueError, match="lang"):
        read_slake(path, imgs, lang="fr")


# --- questions from the demo collection


@pytest.fixture(scope="module")
def demo_items():
    return demo_questions(DEMO)


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(DEMO)


def test_demo_counts_per_type(demo_items, manifest):
    counts = Counter(it.answer_type for it in demo_items)
    n = len(manifest)
    assert counts["modality"] == n == 402
    assert counts["body_part"] == int((manifest["body_part"].str.strip() != "").sum()) == 355
    assert counts["plane"] == int(manifest["plane"].str.lower().isin(PLANES).sum()
                                  + ((manifest["modality"] == "XR")
                                     & manifest["plane"].isin(["AP", "PA"])).sum()) == 298
    known = manifest["lesion"].astype(str).isin(["0", "1"])
    assert counts["lesion_present"] == int(known.sum()) == 239
    assert counts["lesion_quadrant"] == 28
    # every image has exactly one modality question, with the answer in words
    by_image = Counter(it.image_id for it in demo_items if it.answer_type == "modality")
    assert set(by_image) == set(manifest["id"]) and set(by_image.values()) == {1}
    for it in demo_items:
        assert it.choices is not None and it.answer in it.choices, it
        assert it.question == QUESTION_TEMPLATES["view" if it.answer in ("AP", "PA") else it.answer_type]
        assert Path(it.image).is_absolute() and Path(it.image).is_file()
    mods = {it.image_id: it.answer for it in demo_items if it.answer_type == "modality"}
    assert all(mods[r.id] == MODALITY_WORDS[r.modality] for r in manifest.itertuples())
    assert demo_items[0].choices == ["CT", "MRI", "X-ray", "ultrasound", "nuclear medicine", "histopathology",
                                     "fundus photograph"]


def test_demo_lesion_questions_follow_the_lesion_field(demo_items, manifest):
    lesion = dict(zip(manifest["id"], manifest["lesion"].astype(str), strict=True))
    present = {it.image_id: it.answer for it in demo_items if it.answer_type == "lesion_present"}
    assert all(lesion[i] in ("0", "1") for i in present)  # an empty lesion field asks nothing
    assert all(present[i] == ("yes" if lesion[i] == "1" else "no") for i in present)
    assert sum(a == "yes" for a in present.values()) == 30


def test_tumour_finding_replaces_the_lesion_questions(tmp_path):
    """A manifest whose `finding` is 'tumour' gets the tumour question right after modality, no lesion questions;
    a row without the column keeps the generic ones."""
    import csv

    (tmp_path / "images").mkdir()
    rows = []
    for k, (lesion, finding) in enumerate([("1", "tumour"), ("0", "tumour"), ("", "tumour"), ("1", "")]):
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / "images" / f"i{k}.png")
        rows.append({"id": f"i{k}", "case_id": f"c{k}", "modality": "MR", "body_part": "brain", "plane": "axial",
                     "lesion": lesion, "finding": finding, "mask": "", "path": f"images/i{k}.png"})
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    items = demo_questions(tmp_path)
    types = {i: [it.answer_type for it in items if it.image_id == i] for i in ("i0", "i1", "i2", "i3")}
    assert types["i0"] == types["i1"] == ["modality", "tumour", "body_part", "plane"]
    assert types["i2"] == ["modality", "body_part", "plane"]  # unknown flag: nothing asked
    assert types["i3"] == ["modality", "body_part", "plane", "lesion_present"]
    tumour = {it.image_id: it for it in items if it.answer_type == "tumour"}
    assert tumour["i0"].answer == "yes" and tumour["i1"].answer == "no" and tumour["i0"].choices == ["yes", "no"]
    assert tumour["i0"].question == QUESTION_TEMPLATES["tumour"]
    assert [it.answer_type for it in demo_questions(tmp_path, lesions=False) if it.image_id == "i0"] == [
        "modality", "body_part", "plane"]


def test_demo_quadrants_match_the_mask_centroid(demo_items, manifest):
    quads = {it.image_id: it.answer for it in demo_items if it.answer_type == "lesion_quadrant"}
    positive = manifest[(manifest["lesion"].astype(str) == "1") & (manifest["mask"] != "")]
    assert set(quads) == set(positive["id"])
    assert (positive["source_package"] == "pyradiomics").sum() >= 27  # plus a DICOM overlay's MR lesion
    for r in positive.itertuples():
        m = np.asarray(Image.open(DEMO / r.mask)) > 127
        ys, xs = np.nonzero(m)
        h, w = m.shape
        expect = (("upper" if ys.mean() < (h - 1) / 2 else "lower") + " "
                  + ("left" if xs.mean() < (w - 1) / 2 else "right"))
        assert quads[r.id] == expect, r.id


def test_demo_body_parts_and_determinism(demo_items):
    parts = {it.answer for it in demo_items if it.answer_type == "body_part"}
    assert "brain" not in parts and "head" in parts  # folded: never two right choices
    assert all(p == p.lower() for p in parts)
    assert demo_questions(DEMO) == demo_items
    no_lesions = demo_questions(DEMO, lesions=False)
    assert {it.answer_type for it in no_lesions} == {"modality", "body_part", "plane"}


def test_demo_questions_round_trip(demo_items, tmp_path):
    path = write_tasks(demo_items, tmp_path / "demo.csv")
    assert read_tasks(path) == demo_items


def test_image_quadrant_convention():
    assert image_quadrant(0, 0, (256, 256)) == "upper left"
    assert image_quadrant(127, 128, (256, 256)) == "upper right"
    assert image_quadrant(128, 127, (256, 256)) == "lower left"
    assert image_quadrant(127.5, 127.5, (256, 256)) == "lower right"  # on both midlines
