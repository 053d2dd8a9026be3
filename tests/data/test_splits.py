"""Splits: patients and identical bytes never straddle train/val/test; stratified; seeded; leakage reported."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from xray_ray.data.splits import (
    UNMATCHED,
    _majority_label,
    assign_splits,
    duplicate_groups,
    group_ids,
    parse_patient,
    patient_from_name,
    patient_key_report,
    pneumonia_subtype,
)
from xray_ray.errors import DataError


def manifest(
    n_patients: int = 600, seed: int = 0, *, val: int = 0, test: int = 0, prevalence: float = 0.74
) -> pd.DataFrame:
    """A manifest-like frame: patients own 1-3 images; some byte-identical copies cross patients."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < prevalence)
        split = "val" if p < val else "test" if p < val + test else "train"
        for k in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
            uid = f"{split}/{'PNEUMONIA' if label else 'NORMAL'}/p{p}_{k}.jpeg"
            rows.append({"uid": uid, "label": label, "orig_split": split, "patient": f"p{p}", "sha1": f"h{p}_{k}"})
    df = pd.DataFrame(rows)
    # a few byte-identical files under different patient ids (re-uploads): must join their groups
    for a, b in [(30, 31), (40, 77), (90, 91)]:
        src = df.index[(df["patient"] == f"p{a}") & (df["orig_split"] == "train")]
        dst = df.index[(df["patient"] == f"p{b}") & (df["orig_split"] == "train")]
        if len(src) and len(dst):
            df.loc[dst[0], "sha1"] = df.loc[src[0], "sha1"]
    return df


def k_manifest(k: int, n_patients: int = 900, seed: int = 0, **kw) -> pd.DataFrame:
    """`manifest` with k classes: each patient's class drawn with shares 1 : 2 : ... : k, named C0.. (C0 rarest)."""
    df = manifest(n_patients, seed, **kw)
    rng = np.random.default_rng(seed + 1)
    share = np.arange(1, k + 1) / np.arange(1, k + 1).sum()
    label = dict(zip(sorted(set(df["patient"])), rng.choice(k, size=df["patient"].nunique(), p=share)))
    df["label"] = df["patient"].map(label).astype("int64")
    df["class_name"] = "C" + df["label"].astype(str)
    return df


def split_digest(df: pd.DataFrame) -> str:
    text = "".join(f"{u}={s};" for u, s in zip(df["uid"], df["split"]))
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def sides(df: pd.DataFrame, column: str) -> pd.Series:
    return df.groupby(column)["split"].nunique()


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person1_bacteria_1.jpeg", "person1_bacteria"),
        ("person1946_virus_4874.jpeg", "person1946_virus"),
        ("person447_virus_921_1.jpeg", "person447_virus"),
        ("train/PNEUMONIA/person12_bacteria_48.jpeg", "person12_bacteria"),
        ("PERSON12_Bacteria_48.JPEG", "person12_bacteria"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0629-0001-0002.jpeg", "IM-0629"),
        ("NORMAL2-IM-0587-0001-0001.jpeg", "NORMAL2-IM-0587"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL2-IM-0115"),
        ("scan_42.png", "scan_42"),
        ("IM-0115.jpeg", "IM-0115"),
    ],
)
def test_patient_from_name(name, patient):
    assert patient_from_name(name) == patient


def test_normal2_series_is_a_separate_namespace():
    assert patient_from_name("IM-0001-0001.jpeg") != patient_from_name("NORMAL2-IM-0001-0001.jpeg")


def test_the_bacteria_and_virus_series_number_their_patients_separately():
    # person100_virus_184 and person100_bacteria_480 of the Kaggle download are unrelated children
    assert patient_from_name("person100_virus_184.jpeg") != patient_from_name("person100_bacteria_480.jpeg")
    assert patient_from_name("person100_virus_184.jpeg") == patient_from_name("person100_virus_185.jpeg")


def test_the_patient_key_report_counts_each_pattern_and_lists_what_none_matched():
    names = ["person1_bacteria_1.jpeg", "person1_virus_2.jpeg", "person2_virus_3.jpeg", "IM-0001-0001.jpeg", "x.png"]
    report = patient_key_report(names)
    assert report["patterns"] == {
        "personN_bacteria_M": 1,
        "personN_virus_M": 2,
        "NORMAL2-IM-XXXX-YYYY": 0,
        "IM-XXXX-YYYY": 1,
        UNMATCHED: 1,
    }
    assert report["unmatched_examples"] == ["x.png"]
    assert parse_patient("x.png") == ("x", UNMATCHED)


def test_groups_join_patients_and_identical_bytes():
    df = pd.DataFrame({"patient": ["a", "a", "b", "c", "d"], "sha1": ["1", "2", "2", "3", "4"]})
    g = group_ids(df)
    assert g[0] == g[1] == g[2]  # a and b share the bytes "2"
    assert len({g[0], g[3], g[4]}) == 3


def test_no_patient_or_bytes_on_two_sides():
    df, info = assign_splits(manifest(), seed=1)
    assert set(df["split"]) == {"train", "val", "test"}
    assert (sides(df, "patient") == 1).all()
    assert (sides(df, "sha1") == 1).all()
    assert info["duplicate_groups"] == 3


def test_stratified_and_sized_by_the_fractions():
    src = manifest(800)
    df, info = assign_splits(src, seed=2, val_fraction=0.1, test_fraction=0.15)
    overall = src["label"].mean()
    for split, share in (("val", 0.1), ("test", 0.15)):
        part = df[df["split"] == split]
        assert abs(part["label"].mean() - overall) < 0.03
        assert abs(len(part) / len(src) - share) < 0.02
    assert info["counts"]["val"]["total"] == int((df["split"] == "val").sum())
    assert sum(c["total"] for c in info["counts"].values()) == len(src)


def test_deterministic_for_a_seed_different_across_seeds_and_row_order_free():
    src = manifest()
    a, info_a = assign_splits(src, seed=5)
    b, info_b = assign_splits(src.sample(frac=1, random_state=3), seed=5)
    c, _ = assign_splits(src, seed=6)
    by_uid = lambda d: d.set_index("uid")["split"].sort_index()  # noqa: E731
    pd.testing.assert_series_equal(by_uid(a), by_uid(b))
    assert info_a == info_b
    assert (by_uid(a) != by_uid(c)).any()


def test_small_given_val_becomes_extra_val_and_val_is_carved():
    src = manifest(val=6)
    df, info = assign_splits(src, seed=0, min_val_images=100)
    given = src.loc[src["orig_split"] == "val", "uid"]
    assert set(df.loc[df["uid"].isin(given), "split"]) == {"extra_val"}
    assert (df["split"] == "val").sum() > 20 and set(df.loc[df["split"] == "val", "orig_split"]) == {"train"}
    assert info["val_source"] == "carved from train"


def test_large_given_val_and_given_test_are_used_as_they_are():
    src = manifest(val=120, test=100)
    df, info = assign_splits(src, seed=0, min_val_images=100)
    for split in ("val", "test"):
        assert set(df.loc[df["split"] == split, "uid"]) == set(src.loc[src["orig_split"] == split, "uid"])
    assert info["val_source"] == "given val" and info["test_source"] == "given test"
    assert "extra_val" not in set(df["split"])


def test_leakage_is_reported_and_the_train_copy_dropped():
    src = manifest(val=150, test=100)
    test_row = src[src["orig_split"] == "test"].iloc[0]
    val_row = src[src["orig_split"] == "val"].iloc[0]
    extra = pd.DataFrame(
        [
            # the same patient in train and test
            {
                "uid": "train/NORMAL/leak_patient.jpeg",
                "label": test_row["label"],
                "orig_split": "train",
                "patient": test_row["patient"],
                "sha1": "fresh-bytes",
            },
            # the same bytes in train (another patient) and val
            {
                "uid": "train/NORMAL/leak_bytes.jpeg",
                "label": val_row["label"],
                "orig_split": "train",
                "patient": "someone-else",
                "sha1": val_row["sha1"],
            },
        ]
    )
    df, info = assign_splits(pd.concat([src, extra], ignore_index=True), seed=0)
    dropped = {u for leak in info["leakage"] for u in leak["dropped"]}
    assert dropped == {"train/NORMAL/leak_patient.jpeg", "train/NORMAL/leak_bytes.jpeg"}
    assert not set(df["uid"]) & dropped
    assert test_row["uid"] in set(df["uid"]) and val_row["uid"] in set(df["uid"])
    assert info["dropped"] == 2 and "dropped" in info["dropped_reason"]
    kept = {leak["kept_split"] for leak in info["leakage"]}
    assert kept == {"test", "val"}
    assert any(leak["identical_bytes"] for leak in info["leakage"])
    assert len(df) == len(src)  # two leaky rows added, the same two dropped


def test_carved_test_when_the_source_has_none():
    df, info = assign_splits(manifest(val=150), seed=0)
    assert info["test_source"] == "carved from train"
    assert set(df.loc[df["split"] == "test", "orig_split"]) == {"train"}


def test_info_is_json_serialisable_and_complete():
    _, info = assign_splits(manifest(val=6), seed=4, val_fraction=0.12)
    text = json.dumps(info)
    assert json.loads(text)["seed"] == 4
    for key in (
        "method",
        "seed",
        "val_fraction",
        "test_fraction",
        "counts",
        "leakage",
        "duplicate_groups",
        "patients",
        "warnings",
    ):
        assert key in info
    assert set(info["counts"]) == {"train", "val", "test", "extra_val"}
    assert set(info["counts"]["train"]) == {"NORMAL", "PNEUMONIA", "total"}


def test_small_sets_still_get_both_classes_in_val_and_test():
    df, info = assign_splits(manifest(40, seed=3), seed=0)
    for split in ("val", "test"):
        assert set(df.loc[df["split"] == split, "label"]) == {0, 1}
    assert info["warnings"] == []


def test_binary_splits_are_the_same_as_before_k_classes():
    from xray_ray.data.sources import load_source

    # digests of the same calls on main before issue 21 (uid=split for every row)
    assert split_digest(assign_splits(load_source("synthetic:200", seed=0).df, seed=0)[0]) == (
        "c97e6b8555ffe84e0a68ece583bbe623094b6581"
    )
    assert split_digest(assign_splits(manifest(600, 0, val=20), seed=5)[0]) == (
        "3d5185bf1ef1a2b34d7bcea9c48fe5f511cd9cc4"
    )


@pytest.mark.parametrize("k", [3, 4, 6])
def test_k_classes_each_get_their_share_of_val_and_test(k):
    src = k_manifest(k, seed=k)
    df, info = assign_splits(src, seed=2, val_fraction=0.1, test_fraction=0.15)
    assert (sides(df, "patient") == 1).all() and (sides(df, "sha1") == 1).all()
    assert list(info["counts"]["train"]) == [*(f"C{i}" for i in range(k)), "total"]
    for c in range(k):
        n = int((src["label"] == c).sum())
        for split, share in (("val", 0.1), ("test", 0.15)):
            got = int(((df["split"] == split) & (df["label"] == c)).sum())
            assert abs(got - share * n) <= 3, (c, split, got, share * n)  # within one group of its share
            assert info["counts"][split][f"C{c}"] == got
    assert info["warnings"] == []
    shuffled, _ = assign_splits(src.sample(frac=1, random_state=1), seed=2, val_fraction=0.1, test_fraction=0.15)
    assert split_digest(shuffled.sort_values("uid")) == split_digest(df.sort_values("uid"))


@pytest.mark.parametrize("seed", range(4))
def test_small_k_class_sets_still_get_every_class_in_val_and_test(seed):
    # the rarest class has about 20 patients: a share of two or more images in val and in test
    df, info = assign_splits(k_manifest(4, n_patients=200, seed=seed), seed=seed)
    for split in ("val", "test"):
        assert set(df.loc[df["split"] == split, "label"]) == {0, 1, 2, 3}
    assert info["warnings"] == []


def test_a_split_without_one_of_k_classes_is_warned_about():
    src = k_manifest(3, seed=2, val=150)
    src = src[~((src["orig_split"] == "val") & (src["label"] == 1))]  # the given val lacks C1
    df, info = assign_splits(src, seed=0)
    assert info["val_source"] == "given val" and info["counts"]["val"]["C1"] == 0
    assert info["warnings"] == ["val split has no C1 images."]


def test_a_mixed_group_is_stratified_by_its_majority_class_ties_to_the_higher_label():
    df = pd.DataFrame({"_group": [0, 0, 0, 1, 1, 2, 2, 2, 2], "label": [0, 2, 2, 1, 3, 0, 0, 1, 1]})
    assert _majority_label(df).to_dict() == {0: 2, 1: 3, 2: 1}


@pytest.mark.parametrize(
    "name, subtype",
    [
        ("person1_bacteria_1.jpeg", "BACTERIA"),
        ("train/PNEUMONIA/PERSON12_Virus_48.JPEG", "VIRUS"),
        ("person447_virus_921_1.jpeg", "VIRUS"),
        ("IM-0115-0001.jpeg", None),
        ("NORMAL2-IM-0587-0001.jpeg", None),
        ("pneumonia_0001.jpeg", None),
        ("person1_bacteria.jpeg", None),  # the pattern wants _M after the subtype
    ],
)
def test_pneumonia_subtype_from_the_file_name(name, subtype):
    assert pneumonia_subtype(name) == subtype


def test_duplicate_groups_lists_uids():
    df = pd.DataFrame({"uid": ["a", "b", "c", "d"], "sha1": ["x", "y", "x", "x"]})
    assert duplicate_groups(df) == [["a", "c", "d"]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 0}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, "at least 10%"),
    ],
)
def test_bad_fractions_raise_data_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        assign_splits(manifest(50), seed=0, **kwargs)


def test_no_train_rows_raise_data_error():
    src = manifest(50)
    src["orig_split"] = "test"
    with pytest.raises(DataError, match="no train images"):
        assign_splits(src, seed=0)
