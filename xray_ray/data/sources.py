"""Where images come from -> a Manifest: one row per usable image, no pixels yet.

Three sources share one table: a folder in the Kaggle layout (`<root>/<split>/<CLASS>/<image>`, local
or any URI pyarrow.fs opens, e.g. s3://; :mod:`xray_ray.data.folders`), a PneumoniaMNIST-style .npz, and
synthetic phantoms (:mod:`xray_ray.data.loaders`); each names its classes in ``info["classes"]`` (label
order). Folders are verified at discovery: every file is read,
hashed and fully decoded once, so a broken file is reported here (in `Manifest.skipped`, with a reason)
instead of failing a training run hours later. The table itself is :mod:`xray_ray.data.manifest`'s.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from xray_ray.data.folders import load_folder
from xray_ray.data.images import ImageError, load_gray, resize_gray
from xray_ray.data.labels import LABELS
from xray_ray.data.loaders import (
    DEFAULT_SYNTHETIC,
    MEDMNIST_SIZES,
    SYNTHETIC_PREVALENCE,
    load_npz,
    load_synthetic,
    medmnist_file,
    npz_array,
    synthetic_spec,
)
from xray_ray.data.manifest import COLUMNS, ORIG_SPLITS, Manifest, read_bytes
from xray_ray.data.phantoms import render
from xray_ray.errors import DataError

__all__ = [
    "COLUMNS",
    "DEFAULT_SYNTHETIC",
    "LABELS",
    "MEDMNIST_SIZES",
    "ORIG_SPLITS",
    "SYNTHETIC_PREVALENCE",
    "Manifest",
    "load_source",
    "read_bytes",
    "read_pixels",
]


def load_source(spec: str, *, seed: int = 0, max_file_bytes: int | None = None, labels: str = "folder") -> Manifest:
    """Build the manifest for a data spec.

    spec: "synthetic" (1200 images) | "synthetic:N" | "synthetic:N:K" (K classes of phantoms, 2 to 6) |
    a .npz path or URI (PneumoniaMNIST layout, labels 0..K-1) |
    "medmnist" / "medmnist:SIZE" (PneumoniaMNIST via the optional medmnist package, cached in
    $XRAY_RAY_CACHE or ~/.cache/xray_ray) | a Kaggle-layout folder, local path or URI (file://, s3://).
    `seed` only matters for synthetic data (it picks the images). Raises DataError for structural
    problems; files that cannot be used are listed in `skipped` instead (see xray_ray.data.folders.load_folder),
    among them files of a folder larger than `max_file_bytes` (refused by size, never read; None: no limit).
    `labels`: "folder" (the class folders) or "subtype" (a Kaggle-layout folder only: NORMAL, BACTERIA,
    VIRUS from the pneumonia files' names; see xray_ray.data.labels).
    """
    spec = str(spec).strip()
    if not spec:
        raise DataError("the data spec is empty; give a folder, a .npz file, 'synthetic' or 'medmnist'.")
    if labels not in LABELS:
        raise DataError(f"labels must be one of {', '.join(LABELS)}, got '{labels}'.")
    kind, _, arg = spec.partition(":")
    folder = kind not in ("synthetic", "medmnist") and not spec.lower().endswith(".npz")
    if labels == "subtype" and not folder:
        raise DataError(
            f"--labels subtype reads the pneumonia subtype from a Kaggle-layout folder's file names, so {spec} "
            "cannot use it; give a folder."
        )
    if kind == "synthetic":
        n, k = synthetic_spec(arg)
        return load_synthetic(n, seed, k)
    if kind == "medmnist":
        return load_npz(medmnist_file(arg))
    if spec.lower().endswith(".npz"):
        return load_npz(spec)
    return load_folder(spec, max_file_bytes, labels)


def read_pixels(row: Mapping, size: int) -> np.ndarray:
    """uint8 [size, size] pixels of one manifest row, decoded and resized as everywhere else.

    Folder rows are read through pyarrow.fs and `images.load_gray`; npz rows resize the stored array;
    synthetic rows (location "synthetic:seed=S") re-render the phantom and resize it.
    """
    location, index = str(row["location"]), int(row["index"])
    if location.startswith("synthetic:"):
        seed = int(location.partition("seed=")[2])
        return resize_gray(render(seed, index, int(row["label"])), size)
    if index >= 0:
        return resize_gray(npz_array(location, f"{row['orig_split']}_images")[index], size)
    try:
        return load_gray(read_bytes(location), size)
    except (ImageError, OSError) as e:
        raise DataError(f"cannot read image {location} ({e}); was it changed after discovery?") from None
