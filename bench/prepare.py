"""The one-time preparation and the epochs after it, side by side in one run (a benchmark, not a timed test).

    python bench/prepare.py [--data PATH] [--size 64] [--quick]

Rows (images per second; ratio against the baseline named in the last column):
  pil_decode_resize     plain PIL, one thread: open + decode + grayscale + resize every train file
  prepare_cold_1t       this project's preparation (xray_ray.pipeline.prepare) on one thread, cache empty
  prepare_cold          the same on every core, cache empty (per_core_ratio = its rate / cores / plain PIL's)
  prepare_cached        the same call again: reads the Parquet cache (cached_share = its time / the cold time)
  memory_epoch          plain in-memory batches of the prepared arrays, augmented in-process
  ray_data_epoch        one augmented epoch streamed through Ray Data (map_batches + iter_torch_batches)
Targets (issue 7): per_core_ratio >= 0.8, cached_share < 5%. The discovery scan that every run does before
preparing (xray_ray.sources.load_source: list, hash and verify every file) is timed on its own row too.
The last line is JSON with every figure and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, default_data, emit, machine, print_table  # noqa: E402

STRENGTHS = {"zoom": 0.3, "vflip": 0.5, "rotate": 10.0, "shift": 0.1, "brightness": 0.2, "contrast": 0.2}
TARGET_PER_CORE, TARGET_CACHED = 0.8, 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT, help="folder for prepare.json")
    ap.add_argument("--quick", action="store_true", help="a few hundred synthetic images (CI proves it runs)")
    args = ap.parse_args()
    if args.quick:
        args.data = "synthetic:300"

    from PIL import Image

    from xray_ray.augment import augment_batch
    from xray_ray.pipeline import epoch_batches, prepare, train_dataset
    from xray_ray.sources import load_source, read_pixels
    from xray_ray.splits import assign_splits

    cores = os.cpu_count() or 1
    t = time.perf_counter()
    manifest = load_source(args.data, seed=0)
    scan_s = time.perf_counter() - t
    df, _ = assign_splits(manifest.df, seed=0)
    train_rows = df[df["orig_split"] == "train"].drop(columns=["split"])  # every train file, one split
    n_files = len(train_rows)
    rows = [("discovery_scan", len(manifest.df), scan_s)]

    # plain PIL, one thread, over files (or rendered phantoms for the synthetic source)
    t = time.perf_counter()
    if manifest.info.get("source") == "folder":
        for path in train_rows["location"]:
            with Image.open(path) as im:
                np.asarray(im.convert("L").resize((args.size, args.size), Image.BILINEAR))
    else:
        for r in train_rows.to_dict("records"):
            read_pixels(r, args.size)
    rows.append(("pil_decode_resize", n_files, time.perf_counter() - t))

    with tempfile.TemporaryDirectory() as cache:
        one = prepare(train_rows, args.size, Path(cache) / "one", threads=1)
        rows.append(("prepare_cold_1t", n_files, one.seconds))
        cold = prepare(train_rows, args.size, Path(cache) / "all")
        rows.append(("prepare_cold", n_files, cold.seconds))
        warm = prepare(train_rows, args.size, Path(cache) / "all")
        assert warm.cache_hit and np.array_equal(warm.splits["train"].images, cold.splits["train"].images)
        rows.append(("prepare_cached", n_files, warm.seconds))
    arr = cold.splits["train"]

    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    idx = np.random.default_rng(0).permutation(len(arr))
    n = 0
    for i in range(0, len(arr), 256):
        sel = idx[i:i + 256]
        b = augment_batch({"image": arr.images[sel], "idx": sel}, strengths=STRENGTHS, seed=0, epoch=1)
        for j in range(0, len(sel), args.batch_size):
            n += len(torch.from_numpy(b["image"][j:j + args.batch_size]))
    rows.append(("memory_epoch", n, time.perf_counter() - t))

    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = train_dataset(arr)
    for epoch in (0, 1):  # epoch 0 warms the workers up; epoch 1 is measured
        t = time.perf_counter()
        n = sum(len(b["label"]) for b in epoch_batches(ds, strengths=STRENGTHS, seed=0, epoch=epoch,
                                                      batch_size=args.batch_size))
    rows.append(("ray_data_epoch", n, time.perf_counter() - t))
    ray.shutdown()

    by = {name: (k, sec) for name, k, sec in rows}
    base = {"discovery_scan": "pil_decode_resize", "pil_decode_resize": "pil_decode_resize",
            "prepare_cold_1t": "pil_decode_resize", "prepare_cold": "pil_decode_resize",
            "prepare_cached": "prepare_cold", "memory_epoch": "memory_epoch", "ray_data_epoch": "memory_epoch"}
    rate = {name: k / sec for name, (k, sec) in by.items()}
    result = {"benchmark": "prepare", "quick": args.quick, "machine": machine(), "data": args.data,
              "size": args.size, "images": n_files}
    table = []
    for name, (k, sec) in by.items():
        ratio = rate[name] / rate[base[name]]
        table.append([name, k, sec, rate[name], ratio, base[name]])
        result[name] = {"images": k, "seconds": round(sec, 6), "images_per_s": round(rate[name], 1),
                        "ratio": round(ratio, 3)}
    per_core = rate["prepare_cold"] / cores / rate["pil_decode_resize"]
    cached_share = by["prepare_cached"][1] / by["prepare_cold"][1]
    result.update({"cores": cores, "per_core_ratio": round(per_core, 4), "cached_share": round(cached_share, 6),
                   "thread_speedup": round(rate["prepare_cold"] / rate["prepare_cold_1t"], 3),
                   "targets": {"per_core_ratio": TARGET_PER_CORE, "cached_share": TARGET_CACHED},
                   "meets_targets": bool(per_core >= TARGET_PER_CORE and cached_share < TARGET_CACHED)})
    print(f"\n{args.data} at {args.size} px, {n_files} train images, {cores} cores")
    print_table(["stage", "images", "seconds", "images/s", "ratio", "vs"], table)
    print(f"prepare per core: {per_core:.2f}x plain PIL (target >= {TARGET_PER_CORE}); cached run: "
          f"{cached_share:.1%} of the cold one (target < {TARGET_CACHED:.0%})")
    emit(result, args.out, "prepare")


if __name__ == "__main__":
    sys.exit(main())
