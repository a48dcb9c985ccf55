"""Case-level splits: reproducible, stratified, and leakage is refused."""

import pandas as pd
import pytest

from medqm.train import SplitLeakageError, assign_split, check_split, load_split, make_split, save_split


def _labels():
    rows = []
    sizes = {"CT": [30, 1, 1, 2, 5, 8], "MR": [10, 4, 4, 6, 12], "XR": [17, 4], "NM": [4]}
    for mod, ns in sizes.items():
        for c, n in enumerate(ns):
            case = f"{mod.lower()}-{c}"
            for i in range(n):
                ref = f"{case}-img{i // 2}"
                rows.append({"case_id": case, "modality": mod, "ref_id": ref, "ref_path": f"/d/{ref}.png",
                             "path": f"/d/{ref}-{i}.png", "quality": 0.5})
    return pd.DataFrame(rows)


def test_split_is_by_case_reproducible_and_stratified():
    labels = _labels()
    a, b = make_split(labels, seed=3), make_split(labels, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert a.case_id.is_unique and set(a.case_id) == set(labels.case_id)
    parts = a.groupby("group").split.agg(set).to_dict()
    assert parts["CT"] == parts["MR"] == {"train", "val", "test"}  # three or more cases: every part
    assert parts["XR"] == {"train", "test"} and parts["NM"] == {"train"}
    xr = a[a.group == "XR"].set_index("case_id").split
    assert xr["xr-0"] == "train"  # of two cases the larger one trains
    assert a[a.split == "train"].n_images.sum() > 0.55 * len(labels)
    assert any(not make_split(labels, seed=s).equals(a) for s in range(4, 10))  # the seed matters


def test_leaking_splits_are_refused(tmp_path):
    labels = _labels()
    split = make_split(labels, seed=0)
    case = split.case_id.iloc[0]
    other = "test" if split.split.iloc[0] != "test" else "train"
    leaky = pd.concat([split, pd.DataFrame([{"case_id": case, "split": other}])])
    with pytest.raises(SplitLeakageError, match="more than one part"):
        check_split(leaky)
    save_split(leaky, tmp_path / "split.csv")
    with pytest.raises(SplitLeakageError):
        load_split(tmp_path / "split.csv")
    # one reference image filed under two case ids lands in two parts: refused
    bad = labels.copy()
    ct_test = split[(split.group == "CT") & (split.split == "test")].case_id.iloc[0]
    ct_train = split[(split.group == "CT") & (split.split == "train")].case_id.iloc[0]
    victim = bad.index[bad.case_id == ct_train][0]
    bad.loc[bad.index[bad.case_id == ct_test][0], ["ref_id", "ref_path"]] = (
        bad.loc[victim, ["ref_id", "ref_path"]].values)
    with pytest.raises(SplitLeakageError, match="ref_id"):
        assign_split(bad, split)
    with pytest.raises(ValueError, match="no part"):
        check_split(split[split.case_id != case], labels)


def test_fractions_are_validated():
    with pytest.raises(ValueError, match="summing to 1"):
        make_split(_labels(), fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="three"):
        make_split(_labels(), fractions=(0.8, 0.2))
