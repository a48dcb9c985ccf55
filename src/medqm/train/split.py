"""Case-level train / validation / test splits, and the leakage check every split must pass.

Images of one case (patient, volume, slide) are correlated, and distorted versions of one reference share
its content: a model that saw any of them in training has seen the test image. So a split assigns whole
*cases*; no case, reference image or image file may sit in two parts. `make_folds` makes K such splits for
cross-validation, each case a test case in exactly one of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


class SplitLeakageError(ValueError):
    """A split puts one case, reference image or file in more than one of train / val / test."""


def _check_fractions(fractions) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1) > 1e-6 or f[0] <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1 with "
                         f"train > 0, got {fractions}")
    return f


def make_split(labels, *, fractions=(0.7, 0.15, 0.15), seed: int = 0, stratify: str | None = "modality"):
    """Assign every case of a label table to train, val or test.

    Cases are shuffled with ``seed`` within each ``stratify`` group (modality), then dealt one by one to the
    part furthest below its share of the group's *images* (cases differ a lot in size: one volume can hold
    sixty slices). Every group keeps at least one training case; a group of three or more cases gets at least
    one validation and one test case (when those fractions are non-zero); of two cases, the larger trains
    and the other is tested.
    Returns a DataFrame: case_id, split, group, n_images.
    """
    import pandas as pd

    fr = dict(zip(SPLITS, _check_fractions(fractions), strict=True))
    if "case_id" not in labels:
        raise ValueError("the label table has no case_id column")
    by_case = labels.groupby("case_id", sort=True)
    group_of = (by_case[stratify].agg(lambda s: s.mode().iloc[0]) if stratify
                else pd.Series("all", index=by_case.size().index))
    n_images = by_case.size()
    rng = np.random.default_rng(seed)
    rows = []
    for group in sorted(group_of.unique()):
        cases = sorted(group_of.index[group_of == group])
        rng.shuffle(cases)
        n = len(cases)
        assign: dict[str, str] = {}
        if n <= 2:
            cases = sorted(cases, key=lambda c: (-n_images[c], c))  # the larger case trains
            parts = ["train", "test"] if fr["test"] > 0 else ["train", "val"] if fr["val"] > 0 else ["train", "train"]
            assign = dict(zip(cases, parts, strict=False))
        else:
            total = float(n_images[cases].sum())
            have = dict.fromkeys(SPLITS, 0.0)
            for c in cases:
                part = max(SPLITS, key=lambda s: (fr[s] * total - have[s], fr[s]))
                assign[c] = part
                have[part] += n_images[c]
            for part in ("val", "test"):  # a non-empty share gets at least one case: the smallest training case
                train_cases = [c for c in cases if assign[c] == "train"]
                if fr[part] > 0 and part not in assign.values() and len(train_cases) > 1:
                    assign[min(train_cases, key=lambda c: (n_images[c], c))] = part
            if "train" not in assign.values():
                assign[max(cases, key=lambda c: (n_images[c], c))] = "train"
        for case in cases:
            rows.append({"case_id": case, "split": assign[case], "group": group, "n_images": int(n_images[case])})
    split = pd.DataFrame(rows).sort_values(["split", "case_id"]).reset_index(drop=True)
    check_split(split, labels)
    return split


def check_split(split, labels=None) -> None:
    """Refuse a split that leaks: raises `SplitLeakageError` naming what is shared between parts.

    Checks that each case has exactly one part, and (given the label table) that every labelled case is
    assigned and that no reference image (ref_id, ref_path) or image file (path) appears in two parts.
    """
    bad = set(split["split"]) - set(SPLITS)
    if bad:
        raise ValueError(f"split names must be {SPLITS}, got {sorted(bad)}")
    parts_per_case = split.groupby("case_id")["split"].nunique()
    leaked = parts_per_case[parts_per_case > 1]
    if len(leaked):
        raise SplitLeakageError(f"{len(leaked)} case(s) assigned to more than one part, e.g. {leaked.index[0]!r}: "
                                f"{sorted(split.loc[split.case_id == leaked.index[0], 'split'].unique())}")
    if labels is None:
        return
    assign = split.drop_duplicates("case_id").set_index("case_id")["split"]
    missing = sorted(set(labels["case_id"].astype(str)) - set(assign.index.astype(str)))
    if missing:
        raise ValueError(f"{len(missing)} labelled case(s) have no part in the split, e.g. {missing[0]!r}")
    part = labels["case_id"].astype(str).map(assign.rename(index=str))
    for col in ("ref_id", "ref_path", "path"):
        if col not in labels:
            continue
        n_parts = part.groupby(labels[col].astype(str)).nunique()
        shared = n_parts[n_parts > 1]
        if len(shared):
            key = shared.index[0]
            where = sorted(part[labels[col].astype(str) == key].unique())
            raise SplitLeakageError(f"{col} {key!r} appears in {where} (its rows carry different case ids); "
                                    f"{len(shared)} such value(s) in all — fix the case ids or the split")


def assign_split(labels, split):
    """The label table with a ``split`` column, after `check_split`."""
    check_split(split, labels)
    assign = split.drop_duplicates("case_id").set_index("case_id")["split"].rename(index=str)
    out = labels.copy()
    out["split"] = out["case_id"].astype(str).map(assign)
    return out


def make_folds(labels, *, k: int = 5, val_fraction: float = 0.15, seed: int = 0,
               stratify: str | None = "modality") -> list:
    """K case-level cross-validation splits: every case is a test case in exactly one of them.

    Cases are shuffled with ``seed`` within each ``stratify`` group, then dealt one by one to the fold with the
    fewest *images* of that group so far (ties: fewest images in all, then the lower fold), so each fold gets
    its share of every group and folds hold similar numbers of images; while a fold is empty it takes the next
    case, so with at least ``k`` cases no fold is empty. In fold ``i`` the other cases are divided into train
    and validation (for early stopping) by `make_split` with fractions ``(1 - val_fraction, val_fraction, 0)``
    and seed ``seed + i``. Every split passes `check_split` against ``labels``.
    Returns a list of ``k`` split tables (case_id, split, group, n_images, fold), ``fold`` being the fold in
    which the case is tested.
    """
    import pandas as pd

    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k (folds) must be an integer >= 2, got {k!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if "case_id" not in labels:
        raise ValueError("the label table has no case_id column")
    labels = labels.assign(case_id=labels["case_id"].astype(str))
    by_case = labels.groupby("case_id", sort=True)
    n_images = by_case.size()
    if k > len(n_images):
        raise ValueError(f"k={k} folds need at least {k} cases; the labels have {len(n_images)}")
    group_of = (by_case[stratify].agg(lambda s: s.mode().iloc[0]).astype(str) if stratify
                else pd.Series("all", index=n_images.index))
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    total = np.zeros(k)
    for group in sorted(group_of.unique()):
        cases = sorted(group_of.index[group_of == group])
        rng.shuffle(cases)
        in_group = np.zeros(k)
        for c in cases:
            f = min(range(k), key=lambda j: (in_group[j], total[j], j))
            fold_of[c] = f
            in_group[f] += n_images[c]
            total[f] += n_images[c]
    splits = []
    for i in range(k):
        test = sorted(c for c, f in fold_of.items() if f == i)
        if not test:  # cannot happen with k <= cases (an empty fold takes the next case); kept as a guard
            raise ValueError(f"fold {i} has no test case")
        rest = labels[~labels["case_id"].isin(test)]
        inner = make_split(rest, fractions=(1 - val_fraction, val_fraction, 0.0), seed=seed + i, stratify=stratify)
        inner["group"] = inner["group"].astype(str)
        outer = pd.DataFrame({"case_id": test, "split": "test", "group": group_of[test].to_numpy(),
                              "n_images": n_images[test].to_numpy().astype(int)})
        split = pd.concat([inner, outer], ignore_index=True)
        split["fold"] = split["case_id"].map(fold_of).astype(int)
        split = split.sort_values(["split", "case_id"]).reset_index(drop=True)
        check_split(split, labels)
        splits.append(split)
    check_folds(splits, labels)
    return splits


def check_folds(splits, labels=None) -> None:
    """Refuse cross-validation splits where a case is tested in no fold or in two, or any fold leaks.

    Raises `SplitLeakageError` (a case tested twice, or a fold sharing a case, reference or file between parts)
    or ValueError (a case never tested, or a case missing from a fold).
    """
    tested: dict[str, int] = {}
    for i, split in enumerate(splits):
        check_split(split, labels)
        for c in split.loc[split["split"] == "test", "case_id"].astype(str):
            if c in tested:
                raise SplitLeakageError(f"case {c!r} is a test case in folds {tested[c]} and {i}")
            tested[c] = i
    every = set().union(*(set(s["case_id"].astype(str)) for s in splits)) if splits else set()
    if labels is not None:
        every |= set(labels["case_id"].astype(str))
    never = sorted(every - set(tested))
    if never:
        raise ValueError(f"{len(never)} case(s) are a test case in no fold, e.g. {never[0]!r}")
    for i, split in enumerate(splits):
        missing = sorted(every - set(split["case_id"].astype(str)))
        if missing:
            raise ValueError(f"fold {i} leaves out {len(missing)} case(s), e.g. {missing[0]!r}")


def save_split(split, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(path, index=False)
    return path


def load_split(path: str | os.PathLike):
    import pandas as pd

    split = pd.read_csv(path, dtype={"case_id": str, "split": str}, keep_default_na=False)
    if not {"case_id", "split"} <= set(split.columns):
        raise ValueError(f"{path}: a split file needs columns case_id and split")
    check_split(split)
    return split


__all__ = ["SPLITS", "SplitLeakageError", "make_split", "make_folds", "check_split", "check_folds",
           "assign_split", "save_split", "load_split"]
