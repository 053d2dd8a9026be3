"""Kaggle-layout folders -> a Manifest: discovery, verification and the files that cannot be used.

A folder is `<root>/<split>/<CLASS>/<image>` (or the same under chest_xray/), local or any URI pyarrow.fs
opens; every folder under a split folder is a class (:mod:`xray_ray.data.labels` says which and how each
image is labelled). Every file is read, hashed and fully decoded once here, so a broken file is reported
in `Manifest.skipped` with a reason instead of failing a training run hours later.
"""

from __future__ import annotations

import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, quote, unquote, urlsplit

import pandas as pd
import pyarrow.fs as pafs

from xray_ray.common import read_regular_file
from xray_ray.data.images import IMAGE_EXTENSIONS, ImageError, decode_gray
from xray_ray.data.labels import check_class_folders, class_folders, hidden, label_candidates
from xray_ray.data.manifest import (
    BUCKET_SCHEMES,
    LOCAL_FS,
    ORIG_SPLITS,
    Manifest,
    check_structure,
    frame,
    orig_counts,
    read_bytes,
)
from xray_ray.data.splits import patient_from_name, patient_key_report
from xray_ray.errors import DataError

_WORKERS = 8  # hashing and decoding release the GIL; remote reads overlap too
_JUNK = (
    (lambda parts: "__MACOSX" in parts, "macOS resource fork (__MACOSX folder)"),
    (lambda parts: parts[-1].startswith("._"), "macOS AppleDouble metadata file"),
    (lambda parts: parts[-1] == ".DS_Store", "macOS folder metadata (.DS_Store)"),
    (lambda parts: ".ipynb_checkpoints" in parts, "Jupyter checkpoint copy (.ipynb_checkpoints)"),
    (lambda parts: any(p.startswith(".") for p in parts), "hidden file or folder"),
)
_SPLIT_NAMES = {s: s for s in ORIG_SPLITS}


def _location(spec_uri: SplitResult | None, fs_path: str) -> str:
    if spec_uri is None:
        return fs_path
    query = f"?{spec_uri.query}" if spec_uri.query else ""
    if spec_uri.scheme in BUCKET_SCHEMES:
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
        raise DataError(
            f"data folder {spec} does not exist; give a Kaggle-layout folder, a .npz file, "
            "'synthetic[:N]' or 'medmnist[:SIZE]'."
        )
    if not p.is_dir():
        raise DataError(
            f"{spec} is a file, not a folder; give a folder laid out as <split>/<CLASS>/<image> or a .npz file."
        )
    return LOCAL_FS, os.path.realpath(p), None


def _walk_local(root: str) -> tuple[list[tuple[str, int]], list[str], list[tuple[str, str]]]:
    """(files with sizes, folders, skipped links) under root, never following symlinks inside the image tree.

    pyarrow's LocalFileSystem follows symlinks (a link to `..` recurses 40 levels deep) and silently
    drops broken ones, so local folders are walked with os.scandir instead. A link that stands for one of
    the layout's own folders (chest_xray/, a split folder, a class folder: what a user links on purpose on
    a shared machine) is followed; every other link is skipped with its reason.
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
                reason = _layout_link_refusal(root, r, e.path)
                if reason is None:  # a linked layout folder: walked like a folder of its own
                    dirs.append(r)
                    stack.append(r)
                else:
                    skipped.append((r, reason))
            elif e.is_dir(follow_symlinks=False):
                dirs.append(r)
                stack.append(r)
            elif e.is_file(follow_symlinks=False):
                files.append((r, e.stat(follow_symlinks=False).st_size))
            else:
                skipped.append((r, "not a regular file"))
    return files, dirs, skipped


def _is_layout_folder(parts: tuple[str, ...]) -> bool:
    """chest_xray, <split>, <split>/<CLASS>, or the same under chest_xray/ (names matched ignoring case)."""
    names = [p.lower() for p in parts]
    if names and names[0] == "chest_xray":
        names = names[1:]
        if not names:
            return True
    return len(names) in (1, 2) and names[0] in _SPLIT_NAMES and not hidden(names[-1])


def _layout_link_refusal(root: str, rel: str, path: str) -> str | None:
    """None when the link at `rel` is a layout folder linked to a real folder elsewhere (followed);
    else why it is skipped."""
    reason = _symlink_reason(root, path)
    if not _is_layout_folder(tuple(rel.split("/"))) or reason.startswith(("symlink loop", "broken symlink")):
        return reason
    target = os.path.realpath(path)
    if not os.path.isdir(target):
        return f"{reason}; a linked {rel}/ must point to a folder"
    if os.path.commonpath([root, target]) == target:
        return "symlink loop (it points to the data folder or a folder above it)"
    return None


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
        rel = info.path[len(root) :].lstrip("/")
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
        return any(len(d) == len(prefix) + 1 and d[:-1] == prefix and d[-1].lower() in _SPLIT_NAMES for d in dirs)

    if has_splits(()):
        return ()
    top = [d for d in dirs if len(d) == 1]
    preferred = [d for d in top if d[0].lower() == "chest_xray"] or (top if len(top) == 1 else [])
    return next((d for d in preferred if has_splits(d)), None)


def load_folder(spec: str, max_file_bytes: int | None = None, labels: str = "folder") -> Manifest:
    """Manifest of a Kaggle-layout folder: <root>/<split>/<CLASS>/<image>, or the same under root/chest_xray/.

    Splits are train/val/test (any may be missing). Every folder under a split folder is a class, named
    ignoring case and recorded upper-case (see :func:`xray_ray.data.labels.label_candidates` for their
    order, the binary case and labels="subtype"). uids are relative to the folder holding the splits;
    `skipped` paths to the given root.
    Skipped with a reason, never fatal: macOS/Jupyter/hidden junk, non-image extensions, a nested copy of
    the tree, symlinks inside the image tree (a linked chest_xray/, split or class folder is followed), and
    files that do not decode (empty, truncated, not an image, decompression bombs). A split folder with no
    usable images, or a val/test without one class, is a warning in info["warnings"], since val and
    test can be carved from train. DataError: the folder is missing, holds no split folders or no
    usable image, has one class only or a class folder with no usable image, or its train lacks a class.
    """
    fs, root, uri = _open_root(spec)
    files, dir_list, skipped = _walk_local(root) if uri is None else _walk_remote(fs, root)
    dirs = {tuple(d.split("/")) for d in dir_list}
    dirs |= {tuple(f.split("/"))[:k] for f, _ in files for k in range(1, f.count("/") + 1)}
    base = _find_base({d for d in dirs if not any(p.startswith(".") or p == "__MACOSX" for p in d)})
    if base is None:
        links = [f"{rel} ({reason})" for rel, reason in skipped if _is_layout_folder(tuple(rel.split("/")))]
        refused = f"; links skipped: {'; '.join(links[:3])}" if links else ""
        raise DataError(
            f"{spec} has no train/, val/ or test/ folder (looked in it and in chest_xray/{refused}); "
            "arrange images as <split>/<CLASS>/<image>."
        )
    folders = class_folders(dirs, [f for f, _ in files] + [f for f, _ in skipped], base)
    candidates = []
    for rel, size, target, reason in _classify(files, base, {d[-1].lower() for d in folders}):
        if reason is not None:
            skipped.append((rel, reason))
        else:
            location = _location(uri, f"{root}/{rel}" if uri else os.path.join(root, rel))
            candidates.append((rel, size, target, location))
    classes, candidates = label_candidates(candidates, folders, labels, skipped)

    with ThreadPoolExecutor(_WORKERS) as pool:
        results = list(pool.map(lambda c: _verify(c[1], c[3], max_file_bytes), candidates))
    rows = _rows(candidates, results, base, skipped, classes)
    df = frame(rows)
    skipped_df = pd.DataFrame(sorted(skipped), columns=["path", "reason"])
    if df.empty:
        example = f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"found no usable images in {spec} ({len(skipped)} files skipped{example}).")
    check_class_folders(df, folders, skipped, base)
    split_dirs = {d[len(base)].lower() for d in dirs if len(d) > len(base) and d[: len(base)] == base}
    info = {
        "source": "folder",
        "location": spec if uri else root,
        "data_root": "/".join(base) or ".",
        "files_seen": len(df) + len(skipped_df),
        "images": len(df),
        "skipped": len(skipped_df),
        "labels": labels,
        "classes": list(classes),
        "counts": orig_counts(df, classes),
        "warnings": check_structure(df, split_dirs, classes),
        "patient_keys": patient_key_report(df["uid"]),
    }
    return Manifest(df, skipped_df, info)


def _rows(
    candidates: list[tuple], results: list, base: tuple[str, ...], skipped: list, classes: tuple[str, ...]
) -> list[dict]:
    """The manifest rows of the files that verified; each that did not goes to `skipped` with its reason."""
    rows = []
    for (rel, _, (split, label), location), res in zip(candidates, results):
        if isinstance(res, str):
            skipped.append((rel, res))
            continue
        uid = "/".join(rel.split("/")[len(base) :])
        name = PurePosixPath(rel).name
        patient = patient_from_name(name)
        rows.append(
            {
                "uid": uid,
                "location": location,
                "index": -1,
                "label": label,
                "class_name": classes[label],
                "orig_split": split,
                "patient": uid if patient == PurePosixPath(name).stem else patient,
                "sha1": res[0],
                "width": res[1],
                "height": res[2],
            }
        )
    return rows


def _classify(files: list[tuple[str, int]], base: tuple[str, ...], classes: set[str]) -> list[tuple]:
    """(rel, size, (split, CLASS) | None, skip reason | None) per file; `classes`: class folder names, lower-case."""
    out = []
    for rel, size in files:
        parts = tuple(rel.split("/"))
        reason = _junk_reason(parts)
        target = None
        if reason is None:
            reason, target = _place(parts, base, classes)
        out.append((rel, size, target, reason))
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
    return hashlib.sha1(data, usedforsecurity=False).hexdigest(), int(img.shape[1]), int(img.shape[0])


def _place(parts: tuple[str, ...], base: tuple[str, ...], classes: set[str]) -> tuple[str | None, object]:
    """(skip reason or None, (split, CLASS)) for an image file's path parts; `classes` lower-case."""
    if parts[: len(base)] != base:
        return "outside the data folder's train/val/test tree", None
    p = parts[len(base) :]
    if len(p) == 1:
        return "not inside a <split>/<CLASS>/ folder", None
    if len(p) == 3 and p[0].lower() in _SPLIT_NAMES and p[1].lower() in classes:
        return None, (_SPLIT_NAMES[p[0].lower()], p[1].upper())
    if len(p) > 3 and p[-3].lower() in _SPLIT_NAMES and p[-2].lower() in classes:
        return "nested duplicate copy of the data set (only the outermost tree is used)", None
    if p[0].lower() in _SPLIT_NAMES:
        return "not directly inside a <split>/<CLASS>/ folder", None
    return f"folder {p[0]} is not train, val or test", None
