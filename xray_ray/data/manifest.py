"""The manifest every data source produces, and the pieces its loaders share.

A :class:`Manifest` is one row per usable image (columns COLUMNS: where it is, its label, patient and
hash; no pixels yet), the files not used and why, and a summary. A data set's classes are upper-case
names in label order (``order_classes``: NORMAL first, the others sorted), in ``info["classes"]``.
``read_bytes`` reads a file named by a local path or any URI pyarrow.fs opens (e.g. s3://).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import unquote, urlsplit

import pandas as pd
import pyarrow.fs as pafs

from xray_ray import CLASSES
from xray_ray.common import read_regular_file
from xray_ray.errors import DataError

COLUMNS = ("uid", "location", "index", "label", "class_name", "orig_split", "patient", "sha1", "width", "height")
ORIG_SPLITS = ("train", "val", "test")
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose first component is a bucket, part of the fs path
LOCAL_FS = pafs.LocalFileSystem()


@dataclass
class Manifest:
    """Usable images (`df`, columns COLUMNS), files not used and why (`skipped`: path, reason), `info`.

    info always has "source", "location", "images", "classes" (names in label order), "counts" (per
    orig_split and class) and "warnings".
    """

    df: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    info: dict = field(default_factory=dict)


def read_bytes(location: str) -> bytes:
    """The bytes of a file named by a local path or a URI (read through pyarrow.fs)."""
    if "://" not in location:  # a local path: a fraction of a pyarrow stream's cost; never a FIFO or device
        return read_regular_file(location, None)
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


@lru_cache(maxsize=16)
def _remote_fs(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    base = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    return pafs.FileSystem.from_uri(base)[0]


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a location; filesystems are cached so per-file reads stay cheap."""
    if "://" not in location:
        return LOCAL_FS, location
    u = urlsplit(location)
    if u.scheme == "file":
        return LOCAL_FS, unquote(u.path)
    path = unquote(u.netloc + u.path) if u.scheme in BUCKET_SCHEMES else unquote(u.path)
    return _remote_fs(u.scheme, u.netloc, u.query), path


def frame(rows: list[dict]) -> pd.DataFrame:
    """The manifest table of some rows: COLUMNS with their types, sorted by uid."""
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.astype(
        {
            "uid": str,
            "location": str,
            "index": "int64",
            "label": "int64",
            "class_name": str,
            "orig_split": str,
            "patient": str,
            "sha1": str,
            "width": "int64",
            "height": "int64",
        }
    )
    return df.sort_values("uid", kind="stable").reset_index(drop=True)


def order_classes(names: Iterable[str]) -> tuple[str, ...]:
    """Class names upper-cased, each once, in label order: NORMAL first when present, the others sorted.

    NORMAL and PNEUMONIA so keep labels 0 and 1 whatever else a data set holds.
    """
    upper = {str(n).upper() for n in names}
    return (("NORMAL",) if "NORMAL" in upper else ()) + tuple(sorted(upper - {"NORMAL"}))


def classes_of(df: pd.DataFrame) -> tuple[str, ...]:
    """The classes of a manifest table in label order, read from its label and class_name columns.

    For tables without a Manifest's info (e.g. after splitting): at least two classes; a label no row
    names is CLASSES' name for binary data, CLASSi otherwise.
    """
    labels = df["label"].to_numpy()
    k = max(2, int(labels.max()) + 1) if len(labels) else 2
    names = {}
    if "class_name" in df.columns:
        names = dict(zip(df["label"].astype(int), df["class_name"].astype(str)))
    default = CLASSES if k == 2 else tuple(f"CLASS{i}" for i in range(k))
    return tuple(names.get(i, default[i]) for i in range(k))


def orig_counts(df: pd.DataFrame, classes: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Images per class and in total, for each original split that holds any (classes: label order,
    default ``classes_of(df)``)."""
    classes = tuple(classes) if classes is not None else classes_of(df)
    out = {}
    for split in ORIG_SPLITS:
        part = df[df["orig_split"] == split]
        if len(part):
            out[split] = {c: int((part["label"] == i).sum()) for i, c in enumerate(classes)}
            out[split]["total"] = int(len(part))
    return out


def check_structure(df: pd.DataFrame, split_dirs: set[str], classes: Iterable[str] | None = None) -> list[str]:
    """Raise for data of one class or a train split that lacks a class; warn about empty val/test folders
    or ones that lack a class (classes: label order, default ``classes_of(df)``).

    A split folder without usable images is only a warning: val and test can be carved from train.
    """
    classes = tuple(classes) if classes is not None else classes_of(df)
    if len(classes) < 2:
        raise DataError(
            f"the data has one class only ({classes[0] if classes else 'none'}); a classifier needs at least two "
            "classes, each in its own <split>/<CLASS>/ folder."
        )
    warnings = []
    for split in ORIG_SPLITS:
        part = df[df["orig_split"] == split]
        missing = [c for i, c in enumerate(classes) if not (part["label"] == i).any()]
        if part.empty:
            if split in split_dirs:
                warnings.append(f"{split}/ has no usable images; it is ignored.")
        elif missing and split == "train":
            raise DataError(_train_lacks(df, classes, missing))
        elif missing:
            warnings.append(f"{split}/ has no {' or '.join(missing)} images.")
    return warnings


def _train_lacks(df: pd.DataFrame, classes: tuple[str, ...], missing: list[str]) -> str:
    """Why a train split without some class cannot be searched, in one sentence."""
    train = df[df["orig_split"] == "train"]
    present = [c for i, c in enumerate(classes) if (train["label"] == i).any()]
    if len(present) < 2:
        return (
            f"train/ has no {missing[0]} images; a classifier needs at least two classes to train on, "
            f"and train/ has {present[0]} only."
        )
    c = missing[0]
    where = sorted(set(df.loc[df["label"] == classes.index(c), "orig_split"]))
    though = (
        f", though {' and '.join(f'{s}/' for s in where)} {'has' if len(where) == 1 else 'have'} some" if where else ""
    )
    return f"train/ has no {c} images{though}; every class needs examples in train/ to learn from."
