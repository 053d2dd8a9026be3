"""Data pipeline throughput, side by side in one run (a benchmark, not a timed test).

    python bench/pipeline.py [--data PATH] [--size 64] [--quick]

Rows (images per second; ratios against the plain baseline of the same kind):
  pil_decode_resize     plain PIL: read + decode + grayscale + resize every train file, one thread
  prepare_cold          this project's one-time preparation (all cores), cache empty
  prepare_cached        the same call again: reads the Parquet cache
  memory_epoch          plain in-memory batches of the prepared arrays, augmented in-process
  ray_data_epoch        one augmented epoch streamed through Ray Data (map_batches + iter_torch_batches)
The last line is JSON with every figure and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "chest_xray"
STRENGTHS = {"zoom": 0.3, "vflip": 0.5, "rotate": 10.0, "shift": 0.1, "brightness": 0.2, "contrast": 0.2}


def machine() -> str:
    model = "?"
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REAL) if REAL.is_dir() else "synthetic:2000")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a few hundred synthetic images (CI proves it runs)")
    args = ap.parse_args()
    if args.quick:
        args.data = "synthetic:300"

    from PIL import Image

    from xray_ray.augment import augment_batch
    from xray_ray.pipeline import epoch_batches, prepare, train_dataset
    from xray_ray.sources import load_source, read_pixels
    from xray_ray.splits import assign_splits

    manifest = load_source(args.data, seed=0)
    df, _ = assign_splits(manifest.df, seed=0)
    train_rows = df[df["orig_split"] == "train"].drop(columns=["split"])  # every train file, one split
    rows = []

    # plain PIL, one thread, over files (or rendered phantoms for the synthetic source)
    t = time.perf_counter()
    if manifest.info.get("source") == "folder":
        for path in train_rows["location"]:
            with Image.open(path) as im:
                np.asarray(im.convert("L").resize((args.size, args.size), Image.BILINEAR))
    else:
        for r in train_rows.to_dict("records"):
            read_pixels(r, args.size)
    rows.append(("pil_decode_resize", len(train_rows), time.perf_counter() - t))

    with tempfile.TemporaryDirectory() as cache:
        cold = prepare(train_rows, args.size, cache)
        rows.append(("prepare_cold", len(train_rows), cold.seconds))
        warm = prepare(train_rows, args.size, cache)
        rows.append(("prepare_cached", len(train_rows), warm.seconds))
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
            x = torch.from_numpy(b["image"][j:j + args.batch_size])
            n += len(x)
    rows.append(("memory_epoch", n, time.perf_counter() - t))

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = train_dataset(arr)
    for epoch in (0, 1):  # epoch 0 warms the workers up; epoch 1 is measured
        t = time.perf_counter()
        n = sum(len(b["label"]) for b in epoch_batches(ds, strengths=STRENGTHS, seed=0, epoch=epoch,
                                                      batch_size=args.batch_size))
    rows.append(("ray_data_epoch", n, time.perf_counter() - t))
    ray.shutdown()

    base = {"pil_decode_resize": rows[0], "prepare_cold": rows[0], "prepare_cached": rows[1],
            "memory_epoch": rows[3], "ray_data_epoch": rows[3]}
    out = {"machine": machine(), "data": args.data, "size": args.size, "images": len(train_rows)}
    print(f"{'stage':<20}{'images':>8}{'seconds':>10}{'images/s':>12}{'ratio':>8}  vs")
    for name, n, sec in rows:
        b = base[name]
        ratio = (n / sec) / (b[1] / b[2])
        print(f"{name:<20}{n:>8}{sec:>10.2f}{n / sec:>12.0f}{ratio:>8.2f}  {b[0]}")
        out[name] = {"images": n, "seconds": round(sec, 3), "images_per_s": round(n / sec, 1), "ratio": round(ratio, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
