"""How fast a trial scores images on CPU at different evaluation batch sizes (a benchmark).

    python bench/eval_batch.py [--sizes 64 128] [--images 2304] [--repeats 3] [--out DIR] [--quick]

A trial predicts its validation images every epoch and the shift battery (18 shifts of up to
``robustness.MAX_IMAGES`` images) at ASHA's rungs and its last epoch, with one torch thread. Batches are
sized by a pixel budget (``pipeline.rows_for``). For each image size, the seed notebook's CNN (the "seed"
preset: five double-conv blocks) predicts the same random uint8 images with each budget in turn, the
budgets interleaved over ``--repeats`` rounds so that drift on the machine hits them alike; the median
round counts. ratio = images/s of a budget / images/s of the largest budget (the one used before).
The last line is JSON with every figure and the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, emit, machine, print_table  # noqa: E402

BUDGETS = (256 * 64 * 64, 64 * 64 * 64, 32 * 64 * 64)  # pixels a batch: 256, 64 and 32 images at 64 px


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--images", type=int, default=2304, help="images predicted a round (18 shifts x 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="a few images, one round: checks that it runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.images, args.repeats = [32], 64, 1
    return args


def time_budgets(size: int, args: argparse.Namespace, rng: np.random.Generator) -> tuple[list, list[dict]]:
    """The table's rows and the results of every batch budget at one image size (median of the repeats)."""
    from xray_ray.model.cnn import build_model
    from xray_ray.model.train import array_batches, predict_probs

    net = build_model("seed", image_size=size)
    images = rng.integers(0, 256, (args.images, size, size), dtype=np.uint8)
    labels = np.zeros(args.images, np.int64)
    predict_probs(net, array_batches(images[:64], labels[:64], 32))  # warm-up
    seconds: dict[int, list[float]] = {b: [] for b in BUDGETS}
    for _ in range(args.repeats):
        for budget in BUDGETS:
            batch = max(16, min(256, budget // (size * size)))
            t = time.perf_counter()
            predict_probs(net, array_batches(images, labels, batch))
            seconds[budget].append(time.perf_counter() - t)
    base = args.images / statistics.median(seconds[BUDGETS[0]])
    rows, results = [], []
    for budget in BUDGETS:
        batch = max(16, min(256, budget // (size * size)))
        ips = args.images / statistics.median(seconds[budget])
        rows.append([f"{size} px, {budget} px a batch", batch, ips, ips / base])
        result = {"size": size, "budget": budget, "batch": batch, "images_per_s": ips, "ratio": ips / base}
        results.append({**result, "seconds": seconds[budget]})
    return rows, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows, results = [], []
    for size in args.sizes:
        size_rows, size_results = time_budgets(size, args, rng)
        rows += size_rows
        results += size_results
    print_table(["case", "batch", "images/s", "ratio"], rows)
    best = max(results, key=lambda r: r["ratio"])
    emit(
        {
            "bench": "eval_batch",
            "machine": machine(),
            "quick": args.quick,
            "images": args.images,
            "repeats": args.repeats,
            "results": results,
            "fastest": {"size": best["size"], "batch": best["batch"], "ratio": best["ratio"]},
        },
        args.out,
        "eval_batch",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
