"""Patient-grouped, class-stratified, seeded splits, and the leakage checks that go with them.

A patient's images, and byte-identical copies of an image, always land on the same side of a split:
groups are the connected components of "same patient" and "same sha1". Validation (and test, when
the source has none) is carved out of the source's train split group by group, class by class.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from xray_ray.data.manifest import classes_of
from xray_ray.errors import DataError

# How a Kermany/Kaggle file name gives its patient key: (the pattern as users read it, its regex, the key
# from the match). Each series numbers its patients on its own, so the key keeps the series:
# person12_bacteria_3 and person12_virus_40 are two patients, as IM-0012-0001 and NORMAL2-IM-0012-0001 are.
PATIENT_PATTERNS: tuple[tuple[str, re.Pattern, Callable[[re.Match], str]], ...] = (
    ("personN_bacteria_M", re.compile(r"^person(\d+)_bacteria_", re.IGNORECASE), lambda m: f"person{m[1]}_bacteria"),
    ("personN_virus_M", re.compile(r"^person(\d+)_virus_", re.IGNORECASE), lambda m: f"person{m[1]}_virus"),
    ("NORMAL2-IM-XXXX-YYYY", re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE), lambda m: m[1].upper()),
    ("IM-XXXX-YYYY", re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE), lambda m: m[1].upper()),
)
UNMATCHED = "none (the file is its own patient)"
# `--labels subtype`: the pneumonia subtype a Kermany/Kaggle file name carries, by the same patterns
SUBTYPE_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("BACTERIA", PATIENT_PATTERNS[0][1]),
    ("VIRUS", PATIENT_PATTERNS[1][1]),
)
SPLITS = ("train", "val", "test", "extra_val")
_PRIORITY = {"test": 0, "val": 1, "train": 2}  # which copy survives when a group spans given splits


def parse_patient(filename: str) -> tuple[str, str]:
    """(patient key, the pattern that gave it) for a Kermany/Kaggle file name; the file stem and
    :data:`UNMATCHED` when no pattern matches.

    personN_bacteria_M -> "personN_bacteria"; personN_virus_M -> "personN_virus"; IM-XXXX-YYYY -> "IM-XXXX";
    NORMAL2-IM-XXXX-YYYY -> "NORMAL2-IM-XXXX". One spelling per patient whatever the file name's case.
    """
    stem = PurePosixPath(filename.replace("\\", "/")).name.rsplit(".", 1)[0]
    for name, pattern, key in PATIENT_PATTERNS:
        m = pattern.match(stem)
        if m:
            return key(m), name
    return stem, UNMATCHED


def pneumonia_subtype(filename: str) -> str | None:
    """BACTERIA for personN_bacteria_M, VIRUS for personN_virus_M (any case), None for any other name."""
    stem = PurePosixPath(filename.replace("\\", "/")).name.rsplit(".", 1)[0]
    return next((name for name, pattern in SUBTYPE_PATTERNS if pattern.match(stem)), None)


def patient_from_name(filename: str) -> str:
    """The patient key of a Kermany/Kaggle file name (:func:`parse_patient`); the file stem when there is none."""
    return parse_patient(filename)[0]


def patient_key_report(filenames: Iterable[str], examples: int = 10) -> dict:
    """How file names were parsed into patient keys: files per pattern (every pattern listed, in order),
    and the first few files that no pattern matched."""
    counts = {name: 0 for name, _, _ in PATIENT_PATTERNS} | {UNMATCHED: 0}
    unmatched = []
    for f in filenames:
        _, how = parse_patient(f)
        counts[how] += 1
        if how == UNMATCHED and len(unmatched) < examples:
            unmatched.append(f)
    return {"patterns": counts, "unmatched_examples": unmatched}


def group_ids(df: pd.DataFrame) -> np.ndarray:
    """Group number per row: connected components over shared `patient` or shared `sha1`."""
    n = len(df)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in ("patient", "sha1"):
        first: dict[str, int] = {}
        for i, key in enumerate(df[column].to_numpy()):
            j = first.setdefault(key, i)
            if j != i:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1]


def duplicate_groups(df: pd.DataFrame) -> list[list[str]]:
    """Sets of byte-identical images (same sha1), as sorted uid lists, sorted by first uid."""
    dup = df[df["sha1"].duplicated(keep=False)]
    groups = [sorted(g["uid"].tolist()) for _, g in dup.groupby("sha1", sort=False)]
    return sorted(groups)


def assign_splits(
    df: pd.DataFrame, *, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1, min_val_images: int = 100
) -> tuple[pd.DataFrame, dict]:
    """Add a `split` column ("train" | "val" | "test" | "extra_val") and describe how it was made.

    Validation is the source's val split when it has at least `min_val_images` images; otherwise a
    grouped, stratified `val_fraction` of the source's train, and the small given val becomes
    "extra_val" (an extra check, never used for choices). Test is the source's test split, or a
    grouped, stratified `test_fraction` of train when there is none. A group (patient or identical
    bytes) found in train and in the given val/test is leakage: the val/test copy is kept, the
    train copy dropped from the returned frame, and both are listed in info["leakage"].
    Deterministic for a seed and independent of row order.
    """
    _check_args(df, val_fraction, test_fraction, min_val_images)
    df = df.reset_index(drop=True).copy()
    df["_group"] = group_ids(df)

    leakage, drop = _leakage(df)
    kept = df.drop(index=drop)
    train = kept[kept["orig_split"] == "train"]
    if train.empty:
        raise DataError("the data has no train images to learn from; add a train/ split.")

    given_val = kept[kept["orig_split"] == "val"]
    has_test = bool((kept["orig_split"] == "test").any())
    carve_val = len(given_val) < min_val_images
    fractions = {"test": 0.0 if has_test else test_fraction, "val": val_fraction if carve_val else 0.0}
    carved = _grouped_holdout(train, fractions, np.random.default_rng(seed))

    split = kept["orig_split"].copy()
    split[kept["orig_split"] == "val"] = "extra_val" if carve_val else "val"
    split.loc[carved.index] = carved
    kept = kept.assign(split=split.astype(str)).drop(columns="_group")

    info = {
        "method": "patient-grouped stratified hold-out",
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "min_val_images": int(min_val_images),
        "val_source": "carved from train" if carve_val else "given val",
        "test_source": "given test" if has_test else "carved from train",
        "extra_val": "given val, too small to choose on" if carve_val and len(given_val) else None,
        **_describe(df, kept, leakage, drop),
    }
    if drop:
        info["dropped_reason"] = (
            "train images whose patient or bytes also appear in the given "
            "val/test were dropped; the val/test copies were kept"
        )
    return kept.reset_index(drop=True), info


def _describe(df: pd.DataFrame, kept: pd.DataFrame, leakage: list[dict], drop: list[int]) -> dict:
    """What the split holds: counts, patients, duplicate groups, leakage dropped, one-class warnings."""
    dup = duplicate_groups(df)
    return {
        "counts": _counts(kept),
        "patients": {s: int(kept.loc[kept["split"] == s, "patient"].nunique()) for s in _present(kept)},
        "groups": int(df["_group"].nunique()),
        "duplicate_groups": len(dup),
        "duplicate_images": int(sum(len(g) for g in dup)),
        "leakage": leakage,
        "dropped": int(len(drop)),
        "warnings": _class_warnings(kept),
    }


def _class_warnings(kept: pd.DataFrame) -> list[str]:
    """A warning for each of train, val and test that holds no images, one class only, or (with more than
    two classes) lacks some class of the data."""
    warnings: list[str] = []
    classes = classes_of(kept)
    for name in ("train", "val", "test"):
        present = set(kept.loc[kept["split"] == name, "label"])
        missing = [c for i, c in enumerate(classes) if i not in present]
        if len(present) < 2:
            warnings.append(f"{name} split has {'no' if not present else 'only one class of'} images.")
        elif missing:
            warnings.append(f"{name} split has no {' or '.join(missing)} images.")
    return warnings


def _check_args(df: pd.DataFrame, val_fraction: float, test_fraction: float, min_val_images: int) -> None:
    missing = {"uid", "label", "orig_split", "patient", "sha1"} - set(df.columns)
    if missing:
        raise DataError(f"the manifest lacks the column(s) {sorted(missing)}; build it with load_source.")
    if df.empty:
        raise DataError("the data set is empty; there is nothing to split.")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise DataError(f"{name} must be between 0 and 1 (exclusive), got {f}.")
    if val_fraction + test_fraction >= 0.9:
        raise DataError("val_fraction + test_fraction must leave at least 10% of train for training.")
    if min_val_images < 0:
        raise DataError(f"min_val_images must not be negative, got {min_val_images}.")
    unknown = set(df["orig_split"]) - set(_PRIORITY)
    if unknown:
        raise DataError(f"unknown orig_split values {sorted(unknown)}; expected train, val or test.")


def _leakage(df: pd.DataFrame) -> tuple[list[dict], list[int]]:
    """Groups that span given splits: keep the copies in the highest-priority split (test > val > train)."""
    leakage, drop = [], []
    for _, g in df.groupby("_group", sort=False):
        splits = set(g["orig_split"])
        if len(splits) < 2:
            continue
        keep_split = min(splits, key=_PRIORITY.__getitem__)
        lost = g[g["orig_split"] != keep_split]
        kept = g[g["orig_split"] == keep_split]
        same_bytes = set(lost["sha1"]) & set(kept["sha1"])
        leakage.append(
            {
                "patients": sorted(set(g["patient"])),
                "kept_split": keep_split,
                "dropped_splits": sorted(set(lost["orig_split"])),
                "kept": sorted(kept["uid"]),
                "dropped": sorted(lost["uid"]),
                "identical_bytes": bool(same_bytes),
            }
        )
        drop.extend(lost.index.tolist())
    leakage.sort(key=lambda d: d["kept"][0])
    return leakage, sorted(drop)


def _grouped_holdout(train: pd.DataFrame, fractions: dict[str, float], rng: np.random.Generator) -> pd.Series:
    """Split label per train row: whole groups go to test/val until each class reaches its share."""
    groups = train.groupby("_group").agg(uid=("uid", "min"), n=("uid", "size"))
    # a group's stratum is its majority class; order groups by uid first so row order cannot matter
    groups["stratum"] = _majority_label(train)
    groups = groups.sort_values("uid")
    chosen: dict[str, list[int]] = {"test": [], "val": []}
    for _, stratum in groups.groupby("stratum", sort=True):
        order = stratum.iloc[rng.permutation(len(stratum))]
        sizes = order["n"].to_numpy()
        pos = 0
        for name in ("test", "val"):
            if fractions[name] <= 0:
                continue
            target = round(fractions[name] * int(sizes.sum()))
            if len(order) >= 3:
                target = max(target, 1)  # every class in every split when there are groups to spare
            got = 0
            # take whole groups while that brings the count closer to the target
            while pos < len(order) and abs(got + sizes[pos] - target) < abs(got - target):
                got += int(sizes[pos])
                chosen[name].append(order.index[pos])
                pos += 1
    out = pd.Series("train", index=train.index, dtype=object)
    for name, gids in chosen.items():
        out[train["_group"].isin(gids)] = name
    return out


def _majority_label(train: pd.DataFrame) -> pd.Series:
    """Each group's most frequent label; a tie goes to the higher label (for two classes: the mean >= 0.5)."""
    table = pd.crosstab(train["_group"], train["label"])  # groups x labels present, both sorted
    counts = table.to_numpy()[:, ::-1]  # reversed so that argmax, which takes the first maximum, takes the last
    labels = table.columns.to_numpy()[::-1]
    return pd.Series(labels[counts.argmax(axis=1)].astype(int), index=table.index)


def _present(df: pd.DataFrame) -> list[str]:
    return [s for s in SPLITS if (df["split"] == s).any()]


def _counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts, classes = {}, classes_of(df)
    for s in _present(df):
        part = df[df["split"] == s]
        row = {c: int((part["label"] == i).sum()) for i, c in enumerate(classes)}
        row["total"] = int(len(part))
        counts[s] = row
    return counts
