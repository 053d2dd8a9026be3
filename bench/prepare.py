"""The one-time preparation and the epochs after it, side by side in one run (a benchmark, not a timed test).

    python bench/prepare.py [--data PATH] [--size 64] [--rounds 3] [--quick]

Rows (images per second; ratio against the baseline named in the last column). The decode rows run
--rounds times, interleaved (PIL, then each prepare variant, round after round) so that drift on a shared
machine hits them alike; each row's figure is the median of its rounds.
  pil_decode_resize     plain PIL, one thread: open + decode + grayscale + resize every train file
  prepare_cold_1w       this project's preparation (xray_ray.data.prepare.prepare), one worker, cache empty
  prepare_cold_threads  the same on every core as threads, cache empty
  prepare_cold          the same on every core as the default picks (forked processes on Linux), cache empty
                        (per_core_ratio = its rate / cores / plain PIL's)
  prepare_cached        the same call again in a new process, as a user's second run would: memory-maps the
                        cache (cached_share = its time / the cold time)
  memory_epoch          plain in-memory batches of the prepared arrays, augmented in-process
  ray_data_epoch        one augmented epoch streamed through Ray Data (map_batches + iter_torch_batches)
Targets: per_core_ratio >= 0.8, cached_share < 5%. The discovery scan that every run does before
preparing (xray_ray.data.sources.load_source: list, hash and verify every file) is timed on its own row too.
The last line is JSON with every figure and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, default_data, emit, machine, print_table  # noqa: E402

STRENGTHS = {"zoom": 0.3, "vflip": 0.5, "rotate": 10.0, "shift": 0.1, "brightness": 0.2, "contrast": 0.2}
TARGET_PER_CORE, TARGET_CACHED = 0.8, 0.05


def train_rows(data: str):
    """Every train file of the source, as one split (the same rows in this process and in the child)."""
    from xray_ray.data.sources import load_source
    from xray_ray.data.splits import assign_splits

    t = time.perf_counter()
    manifest = load_source(data, seed=0)
    scan_s = time.perf_counter() - t
    df, _ = assign_splits(manifest.df, seed=0)
    return manifest, df[df["orig_split"] == "train"].drop(columns=["split"]), scan_s


def cached_in_new_process(data: str, size: int, cache: Path) -> float:
    """Seconds of prepare() from a warm cache in a fresh interpreter (its imports and manifest not counted)."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from prepare import train_rows; "
        "from xray_ray.data.prepare import prepare; rows = train_rows(sys.argv[2])[1]; "
        "p = prepare(rows, int(sys.argv[3]), sys.argv[4]); assert p.cache_hit; print(json.dumps(p.seconds))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), data, str(size), str(cache)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the decode rows (median)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for prepare.json")
    ap.add_argument("--quick", action="store_true", help="60 synthetic images at 32 px, one round (CI)")
    args = ap.parse_args()
    if args.quick:
        args.data, args.size, args.rounds = "synthetic:60", 32, 1

    return args


def decode_rounds(args: argparse.Namespace, manifest, rows_df):
    """Median-able timings of plain PIL and of prepare (cold three ways, cached in a new process) per round;
    the cold prepare's result and who decoded it."""
    from PIL import Image

    from xray_ray.data.prepare import prepare
    from xray_ray.data.sources import read_pixels

    times: dict[str, list[float]] = {}

    def pil() -> None:  # over files, or rendered phantoms for the synthetic source
        if manifest.info.get("source") == "folder":
            for path in rows_df["location"]:
                with Image.open(path) as im:
                    np.asarray(im.convert("L").resize((args.size, args.size), Image.BILINEAR))
        else:
            for r in rows_df.to_dict("records"):
                read_pixels(r, args.size)

    with tempfile.TemporaryDirectory() as cache:
        cold = None
        for k in range(args.rounds):
            t = time.perf_counter()
            pil()
            times.setdefault("pil_decode_resize", []).append(time.perf_counter() - t)
            for name, kw in (
                ("prepare_cold_1w", {"workers": 1}),
                ("prepare_cold_threads", {"processes": False}),
                ("prepare_cold", {}),
            ):
                p = prepare(rows_df, args.size, Path(cache) / f"{name}-{k}", **kw)
                assert not p.cache_hit
                times.setdefault(name, []).append(p.seconds)
                cold = p if name == "prepare_cold" else cold
            times.setdefault("prepare_cached", []).append(
                cached_in_new_process(args.data, args.size, Path(cache) / f"prepare_cold-{k}")
            )
        warm = prepare(rows_df, args.size, Path(cache) / "prepare_cold-0")
        assert warm.cache_hit and np.array_equal(warm.splits["train"].images, cold.splits["train"].images)
        decoded_by = cold.stats["decoded_by"]
    return times, cold, decoded_by


def memory_epoch(args: argparse.Namespace, arr) -> tuple[str, int, float]:
    """One epoch augmented in-process in random order, batched as training would be."""
    import torch

    from xray_ray.data.augment import augment_batch

    torch.set_num_threads(1)
    t = time.perf_counter()
    idx = np.random.default_rng(0).permutation(len(arr))
    n = 0
    for i in range(0, len(arr), 256):
        sel = idx[i : i + 256]
        b = augment_batch({"image": arr.images[sel], "idx": sel}, strengths=STRENGTHS, seed=0, epoch=1)
        for j in range(0, len(sel), args.batch_size):
            n += len(torch.from_numpy(b["image"][j : j + args.batch_size]))
    return ("memory_epoch", n, time.perf_counter() - t)


def ray_data_epoch(args: argparse.Namespace, arr, cores: int) -> tuple[str, int, float]:
    """One epoch through Ray Data's streaming augmentation (after one epoch that warms the workers)."""
    import ray

    from xray_ray.data.streams import epoch_batches, train_dataset

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = train_dataset(arr)
    for epoch in (0, 1):  # epoch 0 warms the workers up; epoch 1 is measured
        t = time.perf_counter()
        n = sum(
            len(b["label"])
            for b in epoch_batches(ds, strengths=STRENGTHS, seed=0, epoch=epoch, batch_size=args.batch_size)
        )
    row = ("ray_data_epoch", n, time.perf_counter() - t)
    ray.shutdown()
    return row


def report(
    args: argparse.Namespace, rows: list, times: dict[str, list[float]], n_files: int, cores: int, decoded_by
) -> None:
    """Rates against their baselines, the targets, the table, and prepare.json."""
    by = {name: (k, sec) for name, k, sec in rows}
    base = {
        "discovery_scan": "pil_decode_resize",
        "pil_decode_resize": "pil_decode_resize",
        "prepare_cold_1w": "pil_decode_resize",
        "prepare_cold_threads": "pil_decode_resize",
        "prepare_cold": "pil_decode_resize",
        "prepare_cached": "prepare_cold",
        "memory_epoch": "memory_epoch",
        "ray_data_epoch": "memory_epoch",
    }
    rate = {name: k / sec for name, (k, sec) in by.items()}
    result = {
        "benchmark": "prepare",
        "quick": args.quick,
        "machine": machine(),
        "data": args.data,
        "size": args.size,
        "images": n_files,
    }
    table = []
    for name, (k, sec) in by.items():
        ratio = rate[name] / rate[base[name]]
        table.append([name, k, sec, rate[name], ratio, base[name]])
        result[name] = {
            "images": k,
            "seconds": round(sec, 6),
            "images_per_s": round(rate[name], 1),
            "ratio": round(ratio, 3),
            **({"rounds": [round(x, 6) for x in times[name]]} if name in times else {}),
        }
    per_core = rate["prepare_cold"] / cores / rate["pil_decode_resize"]
    cached_share = by["prepare_cached"][1] / by["prepare_cold"][1]
    result.update(
        {
            "cores": cores,
            "per_core_ratio": round(per_core, 4),
            "cached_share": round(cached_share, 6),
            "rounds": args.rounds,
            "decoded_by": decoded_by,
            "thread_speedup": round(rate["prepare_cold_threads"] / rate["prepare_cold_1w"], 3),
            "process_speedup": round(rate["prepare_cold"] / rate["prepare_cold_1w"], 3),
            "targets": {"per_core_ratio": TARGET_PER_CORE, "cached_share": TARGET_CACHED},
            "meets_targets": bool(per_core >= TARGET_PER_CORE and cached_share < TARGET_CACHED),
        }
    )
    print(
        f"\n{args.data} at {args.size} px, {n_files} train images, {cores} cores, median of {args.rounds} "
        f"rounds; prepare_cold decoded by {decoded_by}"
    )
    print_table(["stage", "images", "seconds", "images/s", "ratio", "vs"], table)
    print(
        f"prepare per core: {per_core:.2f}x plain PIL (target >= {TARGET_PER_CORE}); cached run: "
        f"{cached_share:.1%} of the cold one (target < {TARGET_CACHED:.0%})"
    )
    emit(result, args.out, "prepare")


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    manifest, rows_df, scan_s = train_rows(args.data)
    n_files = len(rows_df)
    times, cold, decoded_by = decode_rounds(args, manifest, rows_df)
    rows = [("discovery_scan", len(manifest.df), scan_s)]
    rows += [(name, n_files, float(np.median(ts))) for name, ts in times.items()]
    arr = cold.splits["train"]
    rows.append(memory_epoch(args, arr))
    rows.append(ray_data_epoch(args, arr, cores))
    report(args, rows, times, n_files, cores, decoded_by)


if __name__ == "__main__":
    sys.exit(main())
