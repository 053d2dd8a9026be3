"""PneumoniaMNIST .npz archives (a local file, a URI, or medmnist's download) and synthetic phantoms -> a Manifest.

An archive's labels are 0..K-1: the names of its `classes` array when it has one, else CLASSES for two
classes and CLASS0.. for more. Phantoms are binary (NORMAL/PNEUMONIA) unless asked for K classes, each
with its own pattern (:data:`xray_ray.data.phantoms.PHANTOM_CLASSES`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from xray_ray import CLASSES
from xray_ray.data.manifest import ORIG_SPLITS, Manifest, check_structure, frame, orig_counts, read_bytes
from xray_ray.data.phantoms import NATIVE_SIZE, PHANTOM_CLASSES, render
from xray_ray.errors import DataError

DEFAULT_SYNTHETIC = 1200
SYNTHETIC_PREVALENCE = 0.74  # share of PNEUMONIA in the real Kaggle train split (3875 / 5216)
MEDMNIST_SIZES = (28, 64, 128, 224)


# ---------------------------------------------------------------- npz (PneumoniaMNIST)


@lru_cache(maxsize=6)
def npz_array(location: str, key: str) -> np.ndarray:
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
        raise DataError(
            f"{location}: {key} holds pickled objects, which are never loaded; save plain uint8 arrays."
        ) from None
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3 or a.dtype != np.uint8:
        raise DataError(f"{location}: {key} must be a uint8 array [N, H, W], got {a.dtype} {list(a.shape)}.")
    return a


def load_npz(location: str) -> Manifest:
    """Manifest of a PneumoniaMNIST-layout archive: <split>_images uint8 [N, H, W], <split>_labels [N] or [N, 1]."""
    rows = []
    with _open_npz(location) as z:
        keys = set(z.files)
        if "train_images" not in keys or "train_labels" not in keys:
            missing = "train_images" if "train_images" not in keys else "train_labels"
            raise DataError(
                f"{location} has no {missing} array; expected the PneumoniaMNIST keys "
                "train_images, train_labels, val_images, val_labels, test_images, test_labels."
            )
        classes = _classes(z, location)
        for split in ORIG_SPLITS:
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in keys and lk not in keys:
                continue
            missing = ik if ik not in keys else (lk if lk not in keys else None)
            if missing:
                raise DataError(f"{location} has {ik if missing == lk else lk} but no {missing} array.")
            images = _images(z, ik, location)
            labels = _labels(z, lk, location, len(images), classes)
            h, w = images.shape[1:]
            for i in range(len(images)):
                uid = f"{split}/{i:06d}"
                rows.append(
                    {
                        "uid": uid,
                        "location": location,
                        "index": i,
                        "label": int(labels[i]),
                        "class_name": classes[labels[i]],
                        "orig_split": split,
                        "patient": uid,
                        "sha1": hashlib.sha1(images[i].tobytes(), usedforsecurity=False).hexdigest(),
                        "width": w,
                        "height": h,
                    }
                )
    df = frame(rows)
    if not (df["orig_split"] == "train").any():
        raise DataError(f"{location} has an empty train split.")
    warnings = check_structure(df, set(), classes)
    info = {
        "source": "npz",
        "location": location,
        "image_size": int(df["width"].iat[0]),
        "images": len(df),
        "classes": list(classes),
        "counts": orig_counts(df, classes),
        "warnings": warnings,
        "patients_known": False,
    }
    return Manifest(df, pd.DataFrame(columns=["path", "reason"]), info)


def _label_array(z, key: str, location: str) -> np.ndarray:
    try:
        y = z[key]
    except ValueError:
        raise DataError(f"{location}: {key} holds pickled objects, which are never loaded.") from None
    return y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y


def _classes(z, location: str) -> tuple[str, ...]:
    """The archive's class names in label order: its `classes` array, else as many as train_labels has
    (at least two: CLASSES for two, CLASS0.. for more)."""
    if "classes" in z.files:
        try:
            names = z["classes"]
        except ValueError:
            raise DataError(f"{location}: classes holds pickled objects, which are never loaded.") from None
        if names.ndim != 1 or names.dtype.kind not in "US" or len({str(c).upper() for c in names}) != len(names):
            raise DataError(f"{location}: classes must be a 1-D array of distinct class names (strings).")
        return tuple(str(c.decode() if isinstance(c, bytes) else c).upper() for c in names)
    y = _label_array(z, "train_labels", location)
    top = int(y.max()) if y.size and np.issubdtype(y.dtype, np.number) and np.isfinite(y).all() else 1
    k = max(2, top + 1)
    return CLASSES if k == 2 else tuple(f"CLASS{i}" for i in range(k))


def _labels(z, key: str, location: str, n: int, classes: tuple[str, ...]) -> np.ndarray:
    y = _label_array(z, key, location)
    if y.shape != (n,):
        raise DataError(f"{location}: {key} has shape {list(z[key].shape)}, expected [{n}] or [{n}, 1].")
    if not np.isin(y, np.arange(len(classes))).all():
        if classes == CLASSES:
            raise DataError(f"{location}: {key} must hold 0 (NORMAL) or 1 (PNEUMONIA) only.")
        raise DataError(
            f"{location}: {key} must hold the labels 0..{len(classes) - 1} of the classes {', '.join(classes)} only."
        )
    return y.astype(np.int64)


def medmnist_file(arg: str) -> str:
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
        raise DataError(
            "the medmnist data spec needs the optional medmnist package: pip install medmnist "
            "(or pass a downloaded PneumoniaMNIST .npz file)."
        ) from None
    cache.mkdir(parents=True, exist_ok=True)
    try:
        medmnist.PneumoniaMNIST(split="train", download=True, root=str(cache), size=size)
    except Exception as e:  # network, disk, or API trouble inside a third-party package
        raise DataError(f"could not download PneumoniaMNIST ({e}); check the network or pass a .npz file.") from None
    if not path.exists():
        raise DataError(f"medmnist did not create {path}; download pneumoniamnist and pass the .npz file.")
    return str(path)


# ---------------------------------------------------------------- synthetic


def synthetic_count(arg: str) -> int:
    if not arg:
        return DEFAULT_SYNTHETIC
    if not re.fullmatch(r"\d+", arg) or int(arg) < 20:
        raise DataError(f"synthetic:N needs a whole number of images N >= 20, got '{arg}'.")
    return int(arg)


def synthetic_spec(arg: str) -> tuple[int, int]:
    """(images, classes) of the part after "synthetic:": "" | "N" | "N:K" | ":K" (K from 2 to 6)."""
    n, _, k = arg.partition(":")
    if not k:
        return synthetic_count(n), 2
    top = len(PHANTOM_CLASSES)
    if not re.fullmatch(r"\d+", k) or not 2 <= int(k) <= top:
        raise DataError(f"synthetic:N:K needs a number of classes K from 2 to {top}, got '{k}'.")
    return synthetic_count(n), int(k)


def synthetic_classes(k: int) -> tuple[str, ...]:
    """The class names of k-class phantoms: CLASSES for two, else the first k PHANTOM_CLASSES."""
    return CLASSES if k == 2 else PHANTOM_CLASSES[:k]


def load_synthetic(n: int, seed: int, classes: int = 2) -> Manifest:
    """n phantoms, all orig_split train; patients own 1-3 images, all of one class. Two classes: about 74%
    PNEUMONIA; more: each class about equally often, in shuffled rounds."""
    rng = np.random.default_rng([seed, 2018])
    plan, patient, positives, round_ = [], 0, 0, []
    while len(plan) < n:
        k = min(int(rng.choice((1, 2, 3), p=(0.75, 0.17, 0.08))), n - len(plan))
        if classes == 2:
            # random labels, nudged towards the target so small sets keep the real prevalence too
            lag = SYNTHETIC_PREVALENCE * (len(plan) + k) - positives
            label = int(rng.random() < np.clip(SYNTHETIC_PREVALENCE + lag / (2 * k), 0.05, 0.95))
        else:
            round_ = round_ or [int(c) for c in rng.permutation(classes)]
            label = round_.pop()
        plan += [(label, f"synth-p{patient:04d}")] * k
        positives += label * k
        patient += 1
    names = synthetic_classes(classes)
    location = f"synthetic:seed={seed}"
    rows = []
    for i, (label, patient_id) in enumerate(plan):
        img = render(seed, i, label)
        rows.append(
            {
                "uid": f"synthetic/{i:06d}",
                "location": location,
                "index": i,
                "label": label,
                "class_name": names[label],
                "orig_split": "train",
                "patient": patient_id,
                "sha1": hashlib.sha1(img.tobytes(), usedforsecurity=False).hexdigest(),
                "width": NATIVE_SIZE,
                "height": NATIVE_SIZE,
            }
        )
    df = frame(rows)
    info = {
        "source": "synthetic",
        "location": location,
        "seed": int(seed),
        "images": n,
        "classes": list(names),
        "counts": orig_counts(df, names),
        "warnings": [],
    }
    return Manifest(df, pd.DataFrame(columns=["path", "reason"]), info)
