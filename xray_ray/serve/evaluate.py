"""Evaluate an exported model on any data source, with onnxruntime (no torch).

    xray-ray evaluate --model results/demo/best --data path/to/chest_xray --split val

Scores one split of a source (a Kaggle-layout folder, a PneumoniaMNIST .npz, or synthetic) and prints
the metrics with patient-level bootstrap intervals: for a two-class model at the card's threshold and at
0.5; for K > 2 classes (read from the card) the arg-max class's accuracy, balanced accuracy, macro F1,
macro AUC, log-loss, each class's figures and the confusion matrix, and, when NORMAL is a class, normal
vs rest. The model's classes must be the data's (`--labels subtype` reads NORMAL / BACTERIA / VIRUS from
the file names of a Kaggle-layout folder).
`--split` names the source's own splits (a folder's split sub-folders), or `all`; with `--resplit` it
names the patient-grouped splits the search made (seed and fractions from the card).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from xray_ray import CLASSES
from xray_ray.common import DEFAULT_MAX_FILE_MB, SHOWN_METRICS, add_model_file_flags, cli, json_safe, one_line
from xray_ray.errors import DataError, UserError
from xray_ray.metrics import binary_metrics, bootstrap_ci
from xray_ray.serve.multiclass import fmt, format_k_table, summarize_k

if TYPE_CHECKING:  # the runtime (onnxruntime) and discovery load only once the arguments are good
    from xray_ray.data.manifest import Manifest
    from xray_ray.serve.runtime import ExportedModel

SPLITS = ("test", "val", "train", "extra_val", "all")
LABELS = ("folder", "subtype")  # a folder's class folders, or the Kaggle file names' pneumonia subtype
TABLE_METRICS = SHOWN_METRICS


def summarize(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    before_adaptation: float | None = None,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """Counts, prevalence and metrics with bootstrap CIs at `threshold` and at 0.5 for one split, and at
    `before_adaptation` (an adapted card's original threshold) when given, beside the adapted one.
    `y` is 1 for classes[1], the class whose probability `p` is."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    pos = int(y.sum())
    out: dict[str, Any] = {
        "n": int(len(y)),
        "patients": len(set(groups)) if groups is not None else None,
        "prevalence": pos / len(y) if len(y) else math.nan,
        "counts": {classes[0]: int(len(y) - pos), classes[1]: pos},
    }
    groups_arr = np.asarray(groups) if groups is not None else None
    points = [("at_threshold", threshold), ("at_0.5", 0.5)]
    if before_adaptation is not None:
        points.insert(1, ("at_threshold_before_adaptation", before_adaptation))
    for key, t in points:
        block = dict(binary_metrics(y, p, t))
        block["ci"] = bootstrap_ci(y, p, t, groups=groups_arr, n_boot=n_boot, seed=seed) if len(y) else {}
        out[key] = block
    return out


def _digest(uid: str, image: np.ndarray) -> tuple[str, str]:
    return str(uid), hashlib.sha1(np.ascontiguousarray(image).tobytes(), usedforsecurity=False).hexdigest()


def _combine(digests: list[tuple[str, str]]) -> str:
    return hashlib.sha1(repr(sorted(digests)).encode(), usedforsecurity=False).hexdigest()[:16]


def fingerprint(uids: Sequence[str], images: np.ndarray) -> str:
    """Order-free digest of a split's images as the model sees them (uid + resized pixels), so a later
    evaluation can tell whether it scored the very images the search did."""
    return _combine([_digest(u, img) for u, img in zip(uids, images)])


def format_table(summary: Mapping[str, Any], threshold: float, before: float | None = None) -> str:
    """The metrics of `summarize` as a plain-text table: one row per metric, value [95% CI]; an adapted
    card's original threshold (`before`) gets a column beside the adapted one."""

    def cell(block: Mapping[str, Any], name: str) -> str:
        ci = (block.get("ci") or {}).get(name)
        if ci is None or any(c is None or (isinstance(c, float) and math.isnan(c)) for c in ci):
            return fmt(block.get(name))
        return f"{fmt(block.get(name))} [{fmt(ci[0])}, {fmt(ci[1])}]"

    keys = ["at_threshold", *(["at_threshold_before_adaptation"] if before is not None else []), "at_0.5"]
    heads = [f"threshold {threshold:.4f}" + (" (adapted)" if before is not None else "")]
    heads += [f"card's {before:.4f}"] if before is not None else []
    heads += ["threshold 0.5"]
    rows = [["recall (sens.)" if m == "recall" else m, *(cell(summary[k], m) for k in keys)] for m in TABLE_METRICS]
    widths = [max(len(r[i]) for r in [["metric", *heads], *rows]) for i in range(len(heads) + 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(["metric", *heads], widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _read_rows(rows: list[dict], size: int, threads: int) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
    """Pixels of the rows that decode; (kept indices, uint8 [K, S, S], [(uid, reason)] of the rest)."""
    from xray_ray.data.images import ImageError
    from xray_ray.data.sources import read_pixels

    def one(row: dict) -> np.ndarray | str:
        try:
            return read_pixels(row, size)
        except (DataError, ImageError, OSError) as e:  # a file changed or vanished since discovery
            return str(e) or type(e).__name__

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, rows))
    kept = [i for i, r in enumerate(results) if not isinstance(r, str)]
    bad = [(rows[i]["uid"], r) for i, r in enumerate(results) if isinstance(r, str)]
    pixels = np.stack([results[i] for i in kept]) if kept else np.zeros((0, size, size), np.uint8)
    return kept, pixels, bad


def _search_split(df: pd.DataFrame, card: Mapping[str, Any]) -> pd.DataFrame:
    """The manifest with the `split` column the search gave it (seed and fractions from the card)."""
    from xray_ray.data.splits import assign_splits

    how = (card.get("data") or {}).get("split") or {}
    if "seed" not in how:
        raise UserError("the model card does not record how the search split its data; drop --resplit.")
    keys = ("val_fraction", "test_fraction", "min_val_images")
    df, _ = assign_splits(df, seed=int(how["seed"]), **{k: how[k] for k in keys if k in how})
    return df


def _one_split(df: pd.DataFrame, column: str, split: str, resplit: bool) -> pd.DataFrame:
    """The rows of `split` in `column` (all rows for "all"); a split the data lacks is a UserError."""
    if split == "all":
        return df
    have = sorted(df[column].astype(str).unique())
    if split not in have:
        hint = "" if resplit else " (--resplit splits it as the search did)"
        raise UserError(
            f"the data has no '{split}' split, only {', '.join(have) or 'no images'}; choose one of those or all{hint}."
        )
    return df[df[column] == split]


def _score_rows(model: Any, rows: list[dict], batch_size: int) -> tuple[list, list, list, list, list]:
    """Read and score the rows in batches: (labels, probability batches, patients, unreadable, digests)."""
    threads = min(8, os.cpu_count() or 1)
    labels, probs, patients, unreadable, digests = [], [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        kept, pixels, bad = _read_rows(chunk, model.image_size, threads)
        unreadable += bad
        if kept:
            probs.append(model.predict(pixels.astype(np.float32)[:, None] / 255.0))
            labels += [int(chunk[i]["label"]) for i in kept]
            patients += [str(chunk[i]["patient"]) for i in kept]
            digests += [_digest(chunk[i]["uid"], img) for i, img in zip(kept, pixels)]
    return labels, probs, patients, unreadable, digests


def _skipped_files(skipped: pd.DataFrame, unreadable: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The files skipped at discovery, then those that would not decode: [{path, reason}]."""
    listed = [{"path": str(r["path"]), "reason": str(r["reason"])} for r in skipped.to_dict(orient="records")]
    return listed + [{"path": str(u), "reason": r} for u, r in unreadable]


def data_classes(manifest: Manifest) -> tuple[str, ...]:
    """The classes a manifest's labels index (NORMAL, PNEUMONIA where discovery does not list them)."""
    return tuple(manifest.info.get("classes") or CLASSES)


def class_map(model_classes: Sequence[str], data_classes: Sequence[str], data: str) -> np.ndarray:
    """For each of the data's labels, the index of its class in the model's output; a UserError when the
    model and the data do not have the same classes."""
    if set(model_classes) == set(data_classes):
        return np.asarray([list(model_classes).index(c) for c in data_classes], np.int64)
    subtypes = {"BACTERIA", "VIRUS"} <= set(model_classes) and "PNEUMONIA" in data_classes
    hint = " (--labels subtype reads BACTERIA and VIRUS from the Kaggle file names)" if subtypes else ""
    raise UserError(
        f"the model's classes ({', '.join(model_classes)}) are not those of the data at {data} "
        f"({', '.join(data_classes)}); evaluate it on data of the same classes{hint}."
    )


def evaluate(
    model_dir: str,
    data: str,
    *,
    split: str = "test",
    seed: int | None = None,
    resplit: bool = False,
    batch_size: int = 64,
    n_boot: int = 1000,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
    allow_modified_model: bool = False,
    labels: str | None = None,
) -> dict[str, Any]:
    """Score one split of a data source with an exported model; returns a JSON-able result.

    Without `resplit`, splits are the source's own (a folder's train/val/test folders); with it, the
    patient-grouped split the search made, so "test" is the search's held-out test. `seed` defaults to
    the search's seed (it decides which synthetic images exist). `labels` "subtype" reads a Kaggle-layout
    folder's pneumonia files as BACTERIA or VIRUS by their names; None: as the model's search read them.
    Files of a folder that are not regular files or exceed `max_file_mb` are skipped without being read;
    every skipped file is listed in "skipped_files" with its reason.
    """
    from xray_ray.data.sources import load_source
    from xray_ray.serve.runtime import load_exported

    if not max_file_mb > 0:
        raise UserError(f"--max-file-mb must be positive, got {max_file_mb:g}.")
    model = load_exported(model_dir, allow_modified=allow_modified_model)
    if labels is None:  # as the search read its data (a card from before labels existed: the class folders)
        labels = ((model.card.get("data") or {}).get("source") or {}).get("labels") or "folder"
    if labels not in LABELS:
        raise UserError(f"--labels must be one of {', '.join(LABELS)}, not {labels!r}.")
    if seed is None:  # check_card made it an int or None
        seed = (model.card.get("data") or {}).get("seed") or 0
    # the folder's own classes are discovery's default; only another choice is passed on
    options = {} if labels == "folder" else {"labels": labels}
    manifest = load_source(data, seed=seed, max_file_bytes=int(max_file_mb * 2**20), **options)
    result = evaluate_manifest(
        model, manifest, data, split=split, seed=seed, resplit=resplit, batch_size=batch_size, n_boot=n_boot
    )
    return {**result, "model": str(model_dir), "labels": labels}


def evaluate_manifest(
    model: ExportedModel,
    manifest: Manifest,
    data: str,
    *,
    split: str = "test",
    seed: int = 0,
    resplit: bool = False,
    batch_size: int = 64,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Score one split of a discovered data source (a Manifest) with a loaded model (an ExportedModel).

    The data's classes (manifest.info["classes"]) must be the model's; its labels are mapped to the
    model's output order. Two classes: `summarize` at the card's threshold; K > 2: `summarize_k`.
    """
    to_model = class_map(model.classes, data_classes(manifest), data)
    df = _search_split(manifest.df, model.card) if resplit else manifest.df
    column = "split" if "split" in df.columns else "orig_split"
    df = _one_split(df, column, split, resplit)
    if not len(df):
        raise UserError(f"the data at {data} holds no usable images; check the path.")
    rows = df.to_dict("records")
    labels, probs, patients, unreadable, digests = _score_rows(model, rows, batch_size)
    if not labels:
        raise UserError(f"none of the {len(rows)} images in split '{split}' could be read.")
    y, p = to_model[np.asarray(labels, np.int64)], np.concatenate(probs)
    before = model.card["threshold"].get("adapted_from") if model.k == 2 else None  # an adapted model's original
    boot = {"groups": patients, "n_boot": n_boot, "seed": seed}
    summary = (
        summarize(y, p, model.threshold, before_adaptation=before, classes=model.classes, **boot)
        if model.k == 2
        else summarize_k(y, p, model.classes, **boot)
    )
    searched = ((model.card.get("data") or {}).get("fingerprints") or {}).get(split) if resplit else None
    return json_safe(
        {
            "model": str(model.model_dir),
            "data": data,
            "split": split,
            "split_column": column,
            "seed": seed,
            "classes": list(model.classes),
            "decision": "threshold" if model.k == 2 else "argmax",
            "threshold": model.threshold,
            "threshold_before_adaptation": before,
            "trial_id": model.card.get("trial_id"),
            "skipped": int(len(manifest.skipped)) + len(unreadable),
            "skipped_files": _skipped_files(manifest.skipped, unreadable),
            "unreadable": [{"uid": u, "reason": r} for u, r in unreadable],
            "fingerprint": _combine(digests),
            "same_images_as_search": None if searched is None else searched == _combine(digests),
            "metrics": summary,
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for problems the user can fix)."""
    ap = argparse.ArgumentParser(prog="xray-ray evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported model folder (model.json + model.onnx)")
    ap.add_argument("--data", required=True, help="a Kaggle-layout folder, a .npz, 'synthetic' or 'synthetic:N'")
    ap.add_argument("--split", default="test", choices=SPLITS, help="which of the source's splits (default test)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument(
        "--resplit",
        action="store_true",
        help="split the data as the search did (patient-grouped; seed and fractions from the card)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of synthetic data and of the bootstrap (default: the search's seed)",
    )
    ap.add_argument(
        "--labels",
        default=None,
        choices=LABELS,
        help="folder: the class folders' names; subtype: NORMAL / BACTERIA / VIRUS from Kaggle file names "
        "(default: as the model's search read its data)",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the 95%% intervals")
    add_model_file_flags(ap)
    args = ap.parse_args(argv)
    return cli(lambda: _main(args))


# evaluate()'s keyword options, each the flag of the same name
EVALUATE_OPTIONS = ("split", "seed", "resplit", "batch_size", "n_boot", "max_file_mb", "allow_modified_model", "labels")


def _main(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.n_boot < 1:
        raise UserError("--batch-size and --n-boot must be at least 1.")
    result = evaluate(args.model, args.data, **{k: getattr(args, k) for k in EVALUATE_OPTIONS})
    if result["same_images_as_search"] is False:
        print(
            f"warning: these are not the images the search scored as '{args.split}' (the data or its "
            "decoding changed since), so the numbers differ from the model card's.",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    m, (negative, *others) = result["metrics"], result["classes"]
    print(f"model {result['model']} (trial {result['trial_id']}), data {result['data']}, split '{result['split']}'")
    if result["decision"] == "threshold":  # two classes: the positive one first, then its prevalence
        counts = f"{m['counts'][others[0]]} {others[0]}, {m['counts'][negative]} {negative}, "
        counts += f"prevalence {fmt(m['prevalence'])}"
    else:
        counts = ", ".join(f"{m['counts'][c]} {c}" for c in result["classes"])
    print(f"{m['n']} images ({counts}) from {m['patients']} patients; {result['skipped']} skipped")
    for f in result["skipped_files"]:  # names quoted as JSON strings: a newline in a name stays on its line
        print(f"skipped {json.dumps(f['path'], ensure_ascii=False)}: {one_line(f['reason'])}")
    if result["decision"] == "threshold":
        print(format_table(m, result["threshold"], result.get("threshold_before_adaptation")))
    else:
        print(f"decision: the arg-max of the {len(result['classes'])} class probabilities")
        print(format_k_table(m))
    print("95% intervals: patient-level bootstrap.")
    return 0
