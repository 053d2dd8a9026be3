"""What a folder's images are labelled: its class folders, the classes in label order, and the subtype labels.

Every folder directly under a split folder is a class, its name matched ignoring case across splits and
recorded upper-case; classes are ordered by :func:`xray_ray.data.manifest.order_classes` (NORMAL first,
the others sorted). A folder of NORMAL and/or PNEUMONIA only is the binary data set, CLASSES, whichever
of the two it holds, so binary data keeps labels 0/1 exactly. labels="subtype" reads the Kaggle layout's
pneumonia subtype from the file names instead (SUBTYPE_CLASSES); a PNEUMONIA file whose name carries no
subtype is skipped with NO_SUBTYPE, never guessed.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pandas as pd

from xray_ray import CLASSES, SUBTYPE_CLASSES
from xray_ray.data.manifest import ORIG_SPLITS, order_classes
from xray_ray.data.splits import pneumonia_subtype
from xray_ray.errors import DataError

LABELS = ("folder", "subtype")  # where a folder's labels come from: its class folders, or the file names' subtype
NO_SUBTYPE = "no bacteria/virus subtype in its name"


def hidden(name: str) -> bool:
    """A folder or file name that never holds data: hidden (.name) or a macOS resource fork folder."""
    return name.startswith(".") or name.upper() == "__MACOSX"


def class_folders(dirs: set[tuple[str, ...]], entries: list[str], base: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The class folders (path parts, as spelled on disk) among `dirs`: each folder directly under a split
    folder that directly holds one of `entries` (files and skipped links, root-relative) or nothing at all.
    A folder holding only folders (a nested copy of the tree, say) is no class."""
    n = len(base)
    holds_entries = {tuple(rel.split("/"))[:-1] for rel in entries}
    holds_folders = {d[:-1] for d in dirs}
    return {
        d
        for d in dirs
        if len(d) == n + 2
        and d[:n] == base
        and d[n].lower() in ORIG_SPLITS
        and not hidden(d[-1])
        and (d in holds_entries or d not in holds_folders)
    }


def label_candidates(
    candidates: list[tuple], folders: set[tuple[str, ...]], labels: str, skipped: list
) -> tuple[tuple[str, ...], list[tuple]]:
    """(classes, candidates) with each candidate's (split, CLASS) target made (split, label index).

    labels="folder": the class folders' names. labels="subtype": NORMAL stays NORMAL, a PNEUMONIA file
    is BACTERIA or VIRUS by its name, or goes to `skipped` (NO_SUBTYPE). DataError for labels="subtype"
    on a folder with other class folders, none at all, or no PNEUMONIA file that names its subtype.
    """
    found = order_classes(d[-1] for d in folders)
    if labels == "folder":
        classes = CLASSES if set(found) <= set(CLASSES) else found  # NORMAL/PNEUMONIA keep labels 0/1
        return classes, [(rel, size, (split, classes.index(c)), loc) for rel, size, (split, c), loc in candidates]
    others = sorted(set(found) - set(CLASSES))
    if others or not found:
        raise DataError(
            "--labels subtype reads the bacteria/virus subtype of a folder of NORMAL and PNEUMONIA images, "
            f"but this folder has {'the class folder(s) ' + ', '.join(others) if others else 'no class folder'}."
        )
    out, pneumonia, matched = [], [], 0
    for rel, size, (split, c), loc in candidates:
        name = "NORMAL" if c == "NORMAL" else pneumonia_subtype(PurePosixPath(rel).name)
        pneumonia += [rel] if c == "PNEUMONIA" else []
        if name is None:
            skipped.append((rel, NO_SUBTYPE))
            continue
        matched += c == "PNEUMONIA"
        out.append((rel, size, (split, SUBTYPE_CLASSES.index(name)), loc))
    if pneumonia and not matched:
        raise DataError(
            f"--labels subtype found no bacteria/virus subtype in the names of the {len(pneumonia)} PNEUMONIA "
            f"images (e.g. {PurePosixPath(pneumonia[0]).name}); name them like personN_bacteria_M or "
            "personN_virus_M, or use the folder labels."
        )
    return SUBTYPE_CLASSES, out


def check_class_folders(
    df: pd.DataFrame, folders: set[tuple[str, ...]], skipped: list[tuple[str, str]], base: tuple[str, ...]
) -> None:
    """Raise, naming the folders and why, for a class none of whose folders gave a usable image."""
    used = {uid.split("/")[1].upper() for uid in df["uid"]}  # uids are <split>/<Class>/<name>
    by_class: dict[str, list[tuple[str, ...]]] = {}
    for d in sorted(folders):
        by_class.setdefault(d[-1].upper(), []).append(d)
    for name, ds in sorted(by_class.items()):
        if name in used:
            continue
        n = len(base) + 2
        why = [(rel, reason) for rel, reason in sorted(skipped) if tuple(rel.split("/"))[:n] in ds]
        where = " and ".join("/".join(d[len(base) :]) + "/" for d in ds)
        example = f"e.g. {PurePosixPath(why[0][0]).name}: {why[0][1]}" if why else ""
        detail = f"{len(why)} file{'s' if len(why) > 1 else ''} skipped, {example}" if why else "it is empty"
        raise DataError(
            f"class folder{'s' if len(ds) > 1 else ''} {where} {'have' if len(ds) > 1 else 'has'} no usable "
            f"image ({detail}); add images of class {name} or remove the folder."
        )
