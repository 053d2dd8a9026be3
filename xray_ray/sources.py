"""Where images come from -> a Manifest: one row per usable image, no pixels yet.

Three sources share one table: a folder in the Kaggle layout (`<root>/<split>/<CLASS>/<image>`, local
or any URI pyarrow.fs opens, e.g. s3://), a PneumoniaMNIST-style .npz, and synthetic phantoms.
Folders are verified at discovery: every file is read, hashed and fully decoded once, so a broken file
is reported here (in `Manifest.skipped`, with a reason) instead of failing a training run hours later.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, quote, unquote, urlsplit

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from xray_ray import CLASSES
from xray_ray.common import read_regular_file
from xray_ray.errors import DataError
from xray_ray.images import IMAGE_EXTENSIONS, ImageError, decode_gray, load_gray, resize_gray
from xray_ray.phantoms import NATIVE_SIZE, render
from xray_ray.splits import patient_from_name

COLUMNS = ("uid", "location", "index", "label", "class_name", "orig_split", "patient", "sha1",
           "width", "height")
ORIG_SPLITS = ("train", "val", "test")
DEFAULT_SYNTHETIC = 1200
SYNTHETIC_PREVALENCE = 0.74  # share of PNEUMONIA in the real Kaggle train split (3875 / 5216)
MEDMNIST_SIZES = (28, 64, 128, 224)
_BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose first component is a bucket, part of the fs path
_WORKERS = 8  # hashing and decoding release the GIL; remote reads overlap too


@dataclass
class Manifest:
    """Usable images (`df`, columns COLUMNS), files not used and why (`skipped`: path, reason), `info`.

    info always has "source", "location", "images", "counts" (per orig_split and class) and "warnings".
    """

    df: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    info: dict = field(default_factory=dict)


def load_source(spec: str, *, seed: int = 0, max_file_bytes: int | None = None) -> Manifest:
    """Build the manifest for a data spec.

    spec: "synthetic" (1200 images) | "synthetic:N" | a .npz path or URI (PneumoniaMNIST layout) |
    "medmnist" / "medmnist:SIZE" (PneumoniaMNIST via the optional medmnist package, cached in
    $XRAY_RAY_CACHE or ~/.cache/xray_ray) | a Kaggle-layout folder, local path or URI (file://, s3://).
    `seed` only matters for synthetic data (it picks the images). Raises DataError for structural
    problems; files that cannot be used are listed in `skipped` instead (see _load_folder), among them
    files of a folder larger than `max_file_bytes` (refused by size, never read; None: no limit).
    """
    spec = str(spec).strip()
    if not spec:
        raise DataError("the data spec is empty; give a folder, a .npz file, 'synthetic' or 'medmnist'.")
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return _load_synthetic(_synthetic_count(arg), seed)
    if kind == "medmnist":
        return _load_npz(_medmnist_file(arg))
    if spec.lower().endswith(".npz"):
        return _load_npz(spec)
    return _load_folder(spec, max_file_bytes)


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
        return resize_gray(_npz_array(location, f"{row['orig_split']}_images")[index], size)
    try:
        return load_gray(read_bytes(location), size)
    except (ImageError, OSError) as e:
        raise DataError(f"cannot read image {location} ({e}); was it changed after discovery?") from None


def read_bytes(location: str) -> bytes:
    """The bytes of a file named by a local path or a URI (read through pyarrow.fs)."""
    if "://" not in location:  # a local path: a fraction of a pyarrow stream's cost; never a FIFO or device
        return read_regular_file(location, None)
    fs, path = _resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


# ---------------------------------------------------------------- folders


_LOCAL = pafs.LocalFileSystem()
_JUNK = (
    (lambda parts: "__MACOSX" in parts, "macOS resource fork (__MACOSX folder)"),
    (lambda parts: parts[-1].startswith("._"), "macOS AppleDouble metadata file"),
    (lambda parts: parts[-1] == ".DS_Store", "macOS folder metadata (.DS_Store)"),
    (lambda parts: ".ipynb_checkpoints" in parts, "Jupyter checkpoint copy (.ipynb_checkpoints)"),
    (lambda parts: any(p.startswith(".") for p in parts), "hidden file or folder"),
)
_SPLIT_NAMES = {s: s for s in ORIG_SPLITS}
_CLASS_NAMES = {c.lower(): i for i, c in enumerate(CLASSES)}


@lru_cache(maxsize=16)
def _remote_fs(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    base = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    return pafs.FileSystem.from_uri(base)[0]


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a location; filesystems are cached so per-file reads stay cheap."""
    if "://" not in location:
        return _LOCAL, location
    u = urlsplit(location)
    if u.scheme == "file":
        return _LOCAL, unquote(u.path)
    path = unquote(u.netloc + u.path) if u.scheme in _BUCKET_SCHEMES else unquote(u.path)
    return _remote_fs(u.scheme, u.netloc, u.query), path


def _location(spec_uri: SplitResult | None, fs_path: str) -> str:
    if spec_uri is None:
        return fs_path
    query = f"?{spec_uri.query}" if spec_uri.query else ""
    if spec_uri.scheme in _BUCKET_SCHEMES:
        return f"{spec_uri.scheme}://{quote(fs_path)}{query}"
    return f"{spec_uri.scheme}://{spec_uri.netloc}{quote(fs_path)}{query}"


def _open_root(spec: str) -> tuple[pafs.FileSystem, str, SplitResult | None]:
    """(filesystem, root path, parsed URI or None for local paths)."""
    if "://" in spec and not spec.startswith("file://"):
        try:
            fs, root = pafs.FileSystem.from_uri(spec)
            info = fs.get_file_info(root)
        except (OSError, ValueError) as e:  # pyarrow's errors subclass these
            raise DataError(f"cannot open data location {spec} ({e}).") from None
        if info.type != pafs.FileType.Directory:
            raise DataError(f"data folder {spec} does not exist or is not a folder.")
        return fs, root.rstrip("/"), urlsplit(spec)
    path = unquote(urlsplit(spec).path) if spec.startswith("file://") else spec
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data folder {spec} does not exist; give a Kaggle-layout folder, a .npz file, "
                        "'synthetic[:N]' or 'medmnist[:SIZE]'.")
    if not p.is_dir():
        raise DataError(f"{spec} is a file, not a folder; give a folder laid out as <split>/<CLASS>/<image> "
                        "or a .npz file.")
    return _LOCAL, os.path.realpath(p), None


def _walk_local(root: str) -> tuple[list[tuple[str, int]], list[str], list[tuple[str, str]]]:
    """(files with sizes, folders, skipped links) under root, never following symlinks.

    pyarrow's LocalFileSystem follows symlinks (a link to `..` recurses 40 levels deep) and silently
    drops broken ones, so local folders are walked with os.scandir instead.
    """
    files, dirs, skipped = [], [], []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError as e:
            skipped.append((rel, f"unreadable folder ({e.strerror})"))
            continue
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            if e.is_symlink():
                skipped.append((r, _symlink_reason(root, e.path)))
            elif e.is_dir(follow_symlinks=False):
                dirs.append(r)
                stack.append(r)
            elif e.is_file(follow_symlinks=False):
                files.append((r, e.stat(follow_symlinks=False).st_size))
            else:
                skipped.append((r, "not a regular file"))
    return files, dirs, skipped


def _symlink_reason(root: str, path: str) -> str:
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else "broken symlink (its target is missing)"
    if os.path.commonpath([root, target]) != root:
        return "symlink pointing outside the data folder"
    if os.path.isdir(target) and os.path.commonpath([target, path]) == target:
        return "symlink loop (it points to a folder that contains it)"
    rel = PurePosixPath(os.path.relpath(target, root)).as_posix()
    return f"symlink to {rel} (links are not followed; the target counts under its own path)"


def _walk_remote(fs: pafs.FileSystem, root: str) -> tuple[list[tuple[str, int]], list[str], list]:
    files, dirs = [], []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.Directory:
            dirs.append(rel)
        elif info.type == pafs.FileType.File:
            files.append((rel, int(info.size or 0)))
    return files, dirs, []


def _junk_reason(parts: tuple[str, ...]) -> str | None:
    for test, reason in _JUNK:
        if test(parts):
            return reason
    ext = PurePosixPath(parts[-1]).suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        return f"not an image file (extension '{ext}')" if ext else "not an image file (no extension)"
    return None


def _find_base(dirs: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The folder that holds the split folders: the root, or its chest_xray/ (how the Kaggle zip unpacks)."""
    def has_splits(prefix: tuple[str, ...]) -> bool:
        return any(len(d) == len(prefix) + 1 and d[:-1] == prefix and d[-1].lower() in _SPLIT_NAMES
                   for d in dirs)

    if has_splits(()):
        return ()
    top = [d for d in dirs if len(d) == 1]
    preferred = [d for d in top if d[0].lower() == "chest_xray"] or (top if len(top) == 1 else [])
    return next((d for d in preferred if has_splits(d)), None)


def _load_folder(spec: str, max_file_bytes: int | None = None) -> Manifest:
    """Manifest of a Kaggle-layout folder: <root>/<split>/<CLASS>/<image>, or the same under root/chest_xray/.

    Splits are train/val/test (any may be missing), classes NORMAL/PNEUMONIA, both matched ignoring
    case. uids are relative to the folder holding the splits; `skipped` paths to the given root.
    Skipped with a reason, never fatal: macOS/Jupyter/hidden junk, non-image extensions, a nested
    second copy of the tree (only the outermost one counts), symlinks (never followed: loops, links
    out of the root, broken links, and links to files that are used under their own path), and files
    that do not decode (empty, truncated, not an image, decompression bombs). A split folder with no
    usable images, or a val/test without one class, is a warning in info["warnings"], since val and
    test can be carved from train. DataError: the folder is missing, holds no split folders or no
    usable image, has an unknown class folder (e.g. train/COVID), or its train lacks a class.
    """
    fs, root, uri = _open_root(spec)
    files, dir_list, skipped = _walk_local(root) if uri is None else _walk_remote(fs, root)
    dirs = {tuple(d.split("/")) for d in dir_list}
    dirs |= {tuple(f.split("/"))[:k] for f, _ in files for k in range(1, f.count("/") + 1)}
    base = _find_base({d for d in dirs if not any(p.startswith(".") or p == "__MACOSX" for p in d)})
    if base is None:
        raise DataError(f"{spec} has no train/, val/ or test/ folder (looked in it and in chest_xray/); "
                        "arrange images as <split>/<CLASS>/<image>.")
    candidates = []
    for rel, size, target, reason in _classify(files, base):
        if reason is not None:
            skipped.append((rel, reason))
        else:
            location = _location(uri, f"{root}/{rel}" if uri else os.path.join(root, rel))
            candidates.append((rel, size, target, location))

    with ThreadPoolExecutor(_WORKERS) as pool:
        results = list(pool.map(lambda c: _verify(c[1], c[3], max_file_bytes), candidates))
    rows = []
    for (rel, _, (split, label), location), res in zip(candidates, results):
        if isinstance(res, str):
            skipped.append((rel, res))
            continue
        uid = "/".join(rel.split("/")[len(base):])
        name = PurePosixPath(rel).name
        patient = patient_from_name(name)
        rows.append({
            "uid": uid, "location": location, "index": -1, "label": label, "class_name": CLASSES[label],
            "orig_split": split, "patient": uid if patient == PurePosixPath(name).stem else patient,
            "sha1": res[0], "width": res[1], "height": res[2],
        })
    df = _frame(rows)
    skipped_df = pd.DataFrame(sorted(skipped), columns=["path", "reason"])
    if df.empty:
        example = f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"found no usable images in {spec} ({len(skipped)} files skipped{example}).")
    split_dirs = {d[len(base)].lower() for d in dirs if len(d) > len(base) and d[:len(base)] == base}
    info = {
        "source": "folder", "location": spec if uri else root, "data_root": "/".join(base) or ".",
        "files_seen": len(df) + len(skipped_df), "images": len(df), "skipped": len(skipped_df),
        "counts": _orig_counts(df), "warnings": _check_structure(df, split_dirs),
    }
    return Manifest(df, skipped_df, info)


def _classify(files: list[tuple[str, int]], base: tuple[str, ...]) -> list[tuple]:
    """(rel, size, (split, label) | None, skip reason | None) per file; raises for unknown class folders."""
    out, unknown = [], Counter()
    for rel, size in files:
        parts = tuple(rel.split("/"))
        reason = _junk_reason(parts)
        target = None
        if reason is None:
            reason, target = _place(parts, base)
            if target == "unknown-class":
                unknown["/".join(parts[len(base):len(base) + 2])] += 1
                continue
        out.append((rel, size, target, reason))
    if unknown:
        folder, n = sorted(unknown.items())[0]
        raise DataError(f"unknown class folder {folder} ({n} images); class folders must be NORMAL or "
                        "PNEUMONIA, so move or delete it.")
    return out


def _verify(size: int, location: str, max_bytes: int | None = None) -> tuple[str, int, int] | str:
    """(sha1, width, height) of a file that fully decodes, else the reason it cannot be used."""
    if size == 0:
        return "empty file (0 bytes)"
    if max_bytes is not None and size > max_bytes:
        return f"file too large ({size / 2**20:.0f} MB, the limit is {max_bytes / 2**20:g} MB)"
    try:
        # a local file is read only if it is still a regular file (never a FIFO swapped in since the walk)
        data = read_bytes(location) if "://" in location else read_regular_file(location, max_bytes)
        img = decode_gray(data)
    except ImageError as e:
        return str(e)
    except OSError as e:
        return f"unreadable file ({e.strerror or e})"
    return hashlib.sha1(data).hexdigest(), int(img.shape[1]), int(img.shape[0])


def _place(parts: tuple[str, ...], base: tuple[str, ...]) -> tuple[str | None, object]:
    """(skip reason or None, (split, label) | "unknown-class") for an image file's path parts."""
    if parts[:len(base)] != base:
        return "outside the data folder's train/val/test tree", None
    p = parts[len(base):]
    if len(p) == 1:
        return "not inside a <split>/<CLASS>/ folder", None
    if len(p) == 3 and p[0].lower() in _SPLIT_NAMES:
        label = _CLASS_NAMES.get(p[1].lower())
        return (None, (_SPLIT_NAMES[p[0].lower()], label)) if label is not None else (None, "unknown-class")
    if len(p) > 3 and p[-3].lower() in _SPLIT_NAMES and p[-2].lower() in _CLASS_NAMES:
        return "nested duplicate copy of the data set (only the outermost tree is used)", None
    if p[0].lower() in _SPLIT_NAMES:
        return "not directly inside a <split>/<CLASS>/ folder", None
    return f"folder {p[0]} is not train, val or test", None


def _check_structure(df: pd.DataFrame, split_dirs: set[str]) -> list[str]:
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
            raise DataError(f"train/ has no {missing[0]} images; a classifier needs both NORMAL and "
                            "PNEUMONIA examples to train on.")
        elif missing:
            warnings.append(f"{split}/ has no {missing[0]} images.")
    return warnings


# ---------------------------------------------------------------- npz (PneumoniaMNIST)


@lru_cache(maxsize=6)
def _npz_array(location: str, key: str) -> np.ndarray:
    with _open_npz(location) as z:
        return _images(z, key, location)


def _open_npz(location: str):
    try:
        source = location if "://" not in location else io.BytesIO(read_bytes(location))
        return np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"npz file {location} does not exist.") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{location} is not a readable .npz archive ({e}).") from None


def _images(z, key: str, location: str) -> np.ndarray:
    try:
        a = z[key]
    except ValueError:
        raise DataError(f"{location}: {key} holds pickled objects, which are never loaded; save plain "
                        "uint8 arrays.") from None
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3 or a.dtype != np.uint8:
        raise DataError(f"{location}: {key} must be a uint8 array [N, H, W], got {a.dtype} {list(a.shape)}.")
    return a


def _load_npz(location: str) -> Manifest:
    rows = []
    with _open_npz(location) as z:
        keys = set(z.files)
        if "train_images" not in keys or "train_labels" not in keys:
            missing = "train_images" if "train_images" not in keys else "train_labels"
            raise DataError(f"{location} has no {missing} array; expected the PneumoniaMNIST keys "
                            "train_images, train_labels, val_images, val_labels, test_images, test_labels.")
        for split in ORIG_SPLITS:
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in keys and lk not in keys:
                continue
            missing = ik if ik not in keys else (lk if lk not in keys else None)
            if missing:
                raise DataError(f"{location} has {ik if missing == lk else lk} but no {missing} array.")
            images = _images(z, ik, location)
            labels = _labels(z, lk, location, len(images))
            h, w = images.shape[1:]
            for i in range(len(images)):
                uid = f"{split}/{i:06d}"
                rows.append({
                    "uid": uid, "location": location, "index": i, "label": int(labels[i]),
                    "class_name": CLASSES[labels[i]], "orig_split": split, "patient": uid,
                    "sha1": hashlib.sha1(images[i].tobytes()).hexdigest(), "width": w, "height": h,
                })
    df = _frame(rows)
    if not (df["orig_split"] == "train").any():
        raise DataError(f"{location} has an empty train split.")
    warnings = _check_structure(df, set())
    info = {"source": "npz", "location": location, "image_size": int(df["width"].iat[0]),
            "images": len(df), "counts": _orig_counts(df), "warnings": warnings,
            "patients_known": False}
    return Manifest(df, pd.DataFrame(columns=["path", "reason"]), info)


def _labels(z, key: str, location: str, n: int) -> np.ndarray:
    try:
        y = z[key]
    except ValueError:
        raise DataError(f"{location}: {key} holds pickled objects, which are never loaded.") from None
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        raise DataError(f"{location}: {key} has shape {list(z[key].shape)}, expected [{n}] or [{n}, 1].")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"{location}: {key} must hold 0 (NORMAL) or 1 (PNEUMONIA) only.")
    return y.astype(np.int64)


def _medmnist_file(arg: str) -> str:
    """Path of the cached PneumoniaMNIST npz for a size, downloading it with medmnist if needed."""
    try:
        size = int(arg) if arg else 28
    except ValueError:
        size = -1
    if size not in MEDMNIST_SIZES:
        raise DataError(f"medmnist size must be one of {', '.join(map(str, MEDMNIST_SIZES))}, got '{arg}'.")
    cache = Path(os.environ.get("XRAY_RAY_CACHE", "~/.cache/xray_ray")).expanduser()
    path = cache / ("pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz")
    if path.exists():
        return str(path)
    try:
        import medmnist  # optional: only this spec needs it
    except ImportError:
        raise DataError("the medmnist data spec needs the optional medmnist package: pip install medmnist "
                        "(or pass a downloaded PneumoniaMNIST .npz file).") from None
    cache.mkdir(parents=True, exist_ok=True)
    try:
        medmnist.PneumoniaMNIST(split="train", download=True, root=str(cache), size=size)
    except Exception as e:  # network, disk, or API trouble inside a third-party package
        raise DataError(f"could not download PneumoniaMNIST ({e}); check the network or pass a .npz file.")
    if not path.exists():
        raise DataError(f"medmnist did not create {path}; download pneumoniamnist and pass the .npz file.")
    return str(path)


# ---------------------------------------------------------------- synthetic


def _synthetic_count(arg: str) -> int:
    if not arg:
        return DEFAULT_SYNTHETIC
    if not re.fullmatch(r"\d+", arg) or int(arg) < 20:
        raise DataError(f"synthetic:N needs a whole number of images N >= 20, got '{arg}'.")
    return int(arg)


def _load_synthetic(n: int, seed: int) -> Manifest:
    """n phantoms; patients own 1-3 images, all of one class; about 74% PNEUMONIA; all orig_split train."""
    rng = np.random.default_rng([seed, 2018])
    plan, patient, positives = [], 0, 0
    while len(plan) < n:
        k = min(int(rng.choice((1, 2, 3), p=(0.75, 0.17, 0.08))), n - len(plan))
        # random labels, nudged towards the target so small sets keep the real prevalence too
        lag = SYNTHETIC_PREVALENCE * (len(plan) + k) - positives
        label = int(rng.random() < np.clip(SYNTHETIC_PREVALENCE + lag / (2 * k), 0.05, 0.95))
        plan += [(label, f"synth-p{patient:04d}")] * k
        positives += label * k
        patient += 1
    location = f"synthetic:seed={seed}"
    rows = []
    for i, (label, patient_id) in enumerate(plan):
        img = render(seed, i, label)
        rows.append({
            "uid": f"synthetic/{i:06d}", "location": location, "index": i, "label": label,
            "class_name": CLASSES[label], "orig_split": "train", "patient": patient_id,
            "sha1": hashlib.sha1(img.tobytes()).hexdigest(), "width": NATIVE_SIZE, "height": NATIVE_SIZE,
        })
    df = _frame(rows)
    info = {"source": "synthetic", "location": location, "seed": int(seed), "images": n,
            "counts": _orig_counts(df), "warnings": []}
    return Manifest(df, pd.DataFrame(columns=["path", "reason"]), info)


# ---------------------------------------------------------------- shared


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.astype({"uid": str, "location": str, "index": "int64", "label": "int64", "class_name": str,
                    "orig_split": str, "patient": str, "sha1": str, "width": "int64", "height": "int64"})
    return df.sort_values("uid", kind="stable").reset_index(drop=True)


def _orig_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    out = {}
    for split in ORIG_SPLITS:
        part = df[df["orig_split"] == split]
        if len(part):
            out[split] = {c: int((part["label"] == i).sum()) for i, c in enumerate(CLASSES)}
            out[split]["total"] = int(len(part))
    return out
