"""K-fold case-level splits: every case is tested exactly once, no fold leaks, reproducible and stratified."""

import pandas as pd
import pytest
from test_split import _labels  # tests/train: a table with cases of very different sizes, four modalities

from medqm.train import SplitLeakageError, check_folds, check_split, make_folds


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_case_is_tested_in_exactly_one_fold_and_no_fold_leaks(k):
    labels = _labels()
    folds = make_folds(labels, k=k, seed=1)
    assert len(folds) == k
    tested = pd.concat([f.loc[f.split == "test", "case_id"] for f in folds])
    assert tested.is_unique and set(tested) == set(labels.case_id)
    for i, f in enumerate(folds):
        assert f.case_id.is_unique and set(f.case_id) == set(labels.case_id)  # every case has one part per fold
        assert set(f.loc[f.split == "test", "fold"]) == {i}
        assert (f.loc[f.split == "test"].shape[0] >= 1) and "train" in set(f.split)
        check_split(f, labels)
        # no reference image or file is shared between the parts of a fold
        part = labels.case_id.map(f.set_index("case_id").split)
        assert (labels.assign(part=part).groupby("ref_id").part.nunique() == 1).all()
    # the fold column is the same table in every split: the fold in which each case is tested
    fold_of = folds[0].set_index("case_id").fold.sort_index()
    for f in folds[1:]:
        pd.testing.assert_series_equal(f.set_index("case_id").fold.sort_index(), fold_of)


def test_folds_are_reproducible_stratified_and_carve_a_validation_part():
    labels = _labels()
    a, b = make_folds(labels, k=3, seed=7), make_folds(labels, k=3, seed=7)
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x, y)
    c = make_folds(labels, k=3, seed=8)
    assert any(not x.equals(y) for x, y in zip(a, c, strict=True))
    # CT (6 cases) and MR (5) have at least k cases: every fold tests some of each (cases are dealt by images,
    # so the 30-image CT case can fill a fold's CT share alone)
    for f in a:
        test = f[f.split == "test"]
        assert (test.group == "CT").sum() >= 1 and (test.group == "MR").sum() >= 1
        assert "val" in set(f.split)  # CT and MR keep three or more non-test cases: a validation case each
    assert all("val" not in set(f.split) for f in make_folds(labels, k=3, seed=7, val_fraction=0.0))


def test_fold_count_is_validated():
    labels = _labels()
    n_cases = labels.case_id.nunique()
    assert len(make_folds(labels, k=n_cases)) == n_cases  # leave-one-case-out
    with pytest.raises(ValueError, match=f"at least {n_cases + 1} cases"):
        make_folds(labels, k=n_cases + 1)
    with pytest.raises(ValueError, match=">= 2"):
        make_folds(labels, k=1)
    with pytest.raises(ValueError, match="val_fraction"):
        make_folds(labels, k=2, val_fraction=1.0)


def test_check_folds_refuses_a_case_tested_twice_or_never():
    labels = _labels()
    folds = make_folds(labels, k=3, seed=0)
    case = folds[0].loc[folds[0].split == "test", "case_id"].iloc[0]
    twice = [f.copy() for f in folds]
    twice[1].loc[twice[1].case_id == case, "split"] = "test"
    with pytest.raises(SplitLeakageError, match=f"{case!r} is a test case in folds 0 and 1"):
        check_folds(twice, labels)
    never = [f.copy() for f in folds]
    never[0].loc[never[0].case_id == case, "split"] = "train"
    with pytest.raises(ValueError, match="test case in no fold"):
        check_folds(never, labels)
