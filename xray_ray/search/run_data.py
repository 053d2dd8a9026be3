"""The data of a search: read the source, split it by patient, prepare each image size once (load_data),
and what every trial reads per image size (trial_data)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from xray_ray import CLASSES
from xray_ray.data.balance import balanced_repeats
from xray_ray.data.prepare import prepare
from xray_ray.data.sources import load_source
from xray_ray.data.splits import assign_splits
from xray_ray.data.streams import train_dataset
from xray_ray.errors import UserError
from xray_ray.model.robustness import SHIFTS, battery
from xray_ray.search.spaces import SearchSpace


@dataclass
class RunData:
    """The data every trial reads: the source's manifest, its splits, each image size prepared once."""

    manifest: Any
    split_info: dict[str, Any]
    prepared: dict[int, Any]
    classes: tuple[str, ...] = CLASSES  # in label order


def load_data(opts: Any, space: SearchSpace) -> RunData:
    """Read the source, split it by patient, prepare each image size once (or find it in the cache)."""
    print(f"[xray_ray] loading data from {opts.data} ...", flush=True)
    labels = getattr(opts, "labels", None) or space.labels
    manifest = load_source(opts.data, seed=space.seed, labels=labels)
    df, split_info = assign_splits(
        manifest.df, seed=space.seed, val_fraction=space.val_fraction, test_fraction=space.test_fraction
    )
    print_data_problems(manifest, split_info)
    classes = tuple(manifest.info.get("classes", CLASSES))
    prepared = {s: prepare(df, s, opts.cache, classes=classes) for s in space.image_sizes}
    for s, p in prepared.items():
        counts = {k: len(v) for k, v in p.splits.items()}
        how = "cache hit" if p.cache_hit else "prepared"
        print(f"[xray_ray] {s}px: {how} in {p.seconds:.1f}s {counts}", flush=True)
    for need in ("train", "val"):
        if need not in next(iter(prepared.values())).splits:
            raise UserError(f"the data has no '{need}' images after splitting; add more images per class.")
    print(f"[xray_ray] classes: {', '.join(classes)}", flush=True)
    return RunData(manifest=manifest, split_info=split_info, prepared=prepared, classes=classes)


def trial_data(prepared: dict, seed: int) -> dict[int, dict[str, Any]]:
    """What every trial reads, per image size: the train Dataset, val, the class repeats of a balanced
    sampler and the shift battery built on val (fixed by the run's seed)."""
    out = {}
    for s, p in prepared.items():
        t0 = time.perf_counter()
        val = p.splits["val"]
        out[s] = {
            "train": train_dataset(p.splits["train"]),
            "val": val,
            "n_train": len(p.splits["train"]),
            "repeats": balanced_repeats(p.splits["train"].labels),
            "shifted": battery(val.images, val.labels, seed=seed),
        }
        print(
            f"[xray_ray] {s}px: shift battery of {len(SHIFTS)} shifts x {len(out[s]['shifted']['labels'])} "
            f"val images in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    return out


MAX_LISTED_SKIPS = 1000  # run.json lists this many skipped files (path, reason); the count is always whole


def print_data_problems(manifest, split_info: dict) -> None:
    """Say which files were skipped (by reason), the data's warnings, and train images dropped as leakage."""
    skipped = manifest.skipped
    if len(skipped):
        print(
            f"[xray_ray] {len(skipped)} files skipped (each with its reason in run.json's data.skipped_files):",
            flush=True,
        )
        for reason, n in skipped["reason"].value_counts().head(10).items():
            print(f"[xray_ray]   {n} x {reason}", flush=True)
    for w in [*manifest.info.get("warnings", []), *split_info.get("warnings", [])]:
        print(f"[xray_ray] warning: {w}", flush=True)
    if split_info.get("dropped"):
        print(
            f"[xray_ray] leakage: {split_info['dropped']} train images share a patient or identical bytes with "
            f"val/test and were dropped from train (listed in run.json's data.splits.leakage)",
            flush=True,
        )
