"""`python -m xray_ray.data inspect DATA [--labels subtype] [--json] [--seed S]`: what a data source holds,
and how it would split.

Reports the classes, images per split and class, patients (per class too), byte-identical duplicate
groups, skipped files with their reasons, and the split that `assign_splits` makes for the seed, without
training anything.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import pandas as pd

from xray_ray.common import cli
from xray_ray.data.sources import LABELS, Manifest, load_source
from xray_ray.data.splits import assign_splits, duplicate_groups


def inspect(
    spec: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_val_images: int = 100,
    labels: str = "folder",
) -> dict:
    """JSON-able summary of a data source and the split it would get (raises UserError/DataError).

    Data without train images (say, only a test/ folder, to score with evaluate) is summarised too; its
    "split" is None, since a search could not train on it. "classes" lists the classes in label order,
    "patients_by_class" the patients of each, and the split its "patients_by_class" per split.
    """
    start = time.perf_counter()
    manifest: Manifest = load_source(spec, seed=seed, labels=labels)
    df = manifest.df
    classes = list(manifest.info["classes"])
    split_info = None  # a folder with test/ (or val/) but no train/ can be looked at, though not searched
    if (df["orig_split"] == "train").any():
        split_df, split_info = assign_splits(
            df, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, min_val_images=min_val_images
        )
        split_info["patients_by_class"] = {
            s: _patients_by_class(split_df[split_df["split"] == s], classes) for s in split_info["counts"]
        }
    dups = duplicate_groups(df)
    return {
        "data": spec,
        "source": manifest.info,
        "classes": classes,
        "images": int(len(df)),
        "by_split": manifest.info.get("counts", {}),
        "patients": int(df["patient"].nunique()),
        "patients_by_class": _patients_by_class(df, classes),
        "duplicates": {"groups": len(dups), "images": int(sum(map(len, dups))), "list": dups},
        "skipped": manifest.skipped.to_dict(orient="records"),
        "split": split_info,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _patients_by_class(df: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    """Distinct patients among each class's images (a patient with images of two classes counts in both)."""
    return {c: int(df.loc[df["label"] == i, "patient"].nunique()) for i, c in enumerate(classes)}


def format_report(r: dict) -> str:
    """The human-readable version of `inspect`'s summary."""
    cols = [*r["classes"], "total"]
    by_class = ", ".join(f"{c} {n}" for c, n in r["patients_by_class"].items())
    lines = [
        f"data: {r['data']} ({r['source']['source']}, {r['seconds']:.1f} s)",
        f"classes ({len(r['classes'])}, labels 0..{len(r['classes']) - 1}): {', '.join(r['classes'])}",
        "",
        "images as given:",
        _table(r["by_split"], cols),
        f"patients: {r['patients']} ({by_class})",
        *_patient_keys(r["source"].get("patient_keys")),
        f"byte-identical duplicate groups: {r['duplicates']['groups']} ({r['duplicates']['images']} images)",
    ]
    skipped = r["skipped"]
    lines.append(f"skipped files: {len(skipped)}")
    for reason, n in Counter(s["reason"] for s in skipped).most_common():
        example = next(s["path"] for s in skipped if s["reason"] == reason)
        lines.append(f"  {n:6d}  {reason}  (e.g. {example})")
    s = r["split"]
    if s is None:
        lines += [
            "",
            "split: none; the data has no train images, so a search cannot use it (evaluate can "
            "score its splits with --split).",
        ]
        lines += [f"warning: {w}" for w in r["source"].get("warnings", [])]
        return "\n".join(lines)
    lines += [
        "",
        f"split (seed {s['seed']}, {s['method']}; val: {s['val_source']}, test: {s['test_source']}):",
        _table({k: {**v, "patients": s["patients"][k]} for k, v in s["counts"].items()}, [*cols, "patients"]),
        "patients per class:",
        _table(s["patients_by_class"], r["classes"]),
    ]
    if s["leakage"]:
        lines.append(
            f"leakage: {len(s['leakage'])} groups in train and in the given val/test; "
            f"{s['dropped']} train images dropped"
        )
        for leak in s["leakage"][:10]:
            lines.append(
                f"  {', '.join(leak['patients'])}: kept {leak['kept_split']}, dropped {', '.join(leak['dropped'])}"
            )
    for w in [*r["source"].get("warnings", []), *s["warnings"]]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _patient_keys(report: dict | None) -> list[str]:
    """How file names became patient keys (folder sources): files per pattern, and those no pattern matched."""
    if not report:
        return []
    out = ["patient keys from file names (files per pattern; each series numbers its patients on its own):"]
    out += [f"  {n:6d}  {pattern}" for pattern, n in report["patterns"].items()]
    if report["unmatched_examples"]:
        out.append(f"  matched by none, e.g. {', '.join(report['unmatched_examples'][:3])}")
    return out


def _table(rows: dict[str, dict[str, int]], cols: list[str]) -> str:
    out = ["  " + f"{'':10s}" + "".join(f"{c:>11s}" for c in cols)]
    for name, row in rows.items():
        out.append("  " + f"{name:10s}" + "".join(f"{row.get(c, 0):11d}" for c in cols))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for user errors)."""
    parser = argparse.ArgumentParser(prog="python -m xray_ray.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise a data source and the split it would get")
    p.add_argument("data", help="folder (Kaggle layout), .npz, synthetic[:N] or medmnist[:SIZE]")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--min-val-images", type=int, default=100)
    p.add_argument(
        "--labels",
        choices=LABELS,
        default="folder",
        help="folder: the class folders; subtype: NORMAL, BACTERIA, VIRUS from a Kaggle-layout folder's file names",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        report = inspect(
            args.data,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            min_val_images=args.min_val_images,
            labels=args.labels,
        )
        print(json.dumps(report, indent=1) if args.json else format_report(report))
        return 0

    return cli(body)
