"""The manifest every data source produces, and the pieces its loaders share.

A :class:`Manifest` is one row per usable image (columns COLUMNS: where it is, its label, patient and
hash; no pixels yet), the files not used and why, and a summary. ``read_bytes`` reads a file named by a
local path or any URI pyarrow.fs opens (e.g. s3://).
"""

from __future__ import annotations

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

    info always has "source", "location", "images", "counts" (per orig_split and class) and "warnings".
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


def orig_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per class and in total, for each original split that holds any."""
    out = {}
    for split in ORIG_SPLITS:
        part = df[df["orig_split"] == split]
        if len(part):
            out[split] = {c: int((part["label"] == i).sum()) for i, c in enumerate(CLASSES)}
            out[split]["total"] = int(len(part))
    return out


def check_structure(df: pd.DataFrame, split_dirs: set[str]) -> list[str]:
    """Raise for a train split that lacks a class; warn about empty or one-class val/test folders.

    A split folder without usable images is only a warning: val and test can be carved from train.
    """
    warnings = []
    for split in ORIG_SPLITS:
        part = df[df["orig_split"] == split]
        missing = [c for i, c in enumerate(CLASSES) if not (part["label"] == i).any()]
        if part.empty:
            if split in split_dirs:
                warnings.append(f"{split}/ has no usable images; it is ignored.")
        elif missing and split == "train":
            raise DataError(
                f"train/ has no {missing[0]} images; a classifier needs both NORMAL and PNEUMONIA examples to train on."
            )
        elif missing:
            warnings.append(f"{split}/ has no {missing[0]} images.")
    return warnings
