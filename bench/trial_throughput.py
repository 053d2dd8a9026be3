"""Training throughput inside a real Tune trial versus a plain in-memory PyTorch loop (a benchmark).

    python bench/trial_throughput.py [--data PATH|synthetic:N] [--sizes 64 128] [--epochs 3] [--compare-prefetch]
                                     [--quick]

For each image size, the same model (the "seed" preset), batch size, optimizer and augmentation, one torch
thread, trained twice over the same prepared uint8 arrays:
  memory_loop   (a) this process: random-order batches of the arrays, augmented in-process with
                xray_ray.data.augment.augment_batch, fed to xray_ray.model.train.train_one_epoch
  tune_trial    (b) tune.Tuner running xray_ray.search.tuner.trainable (one trial at a time, cpus_per_trial=1), fed
                by the Ray Data pipeline (pipeline.train_dataset + epoch_batches, data_tasks=1, data_cpus=0);
                its images/s is the figure the trial itself reports each epoch (epochs.parquet images_per_s)
  no prefetch   (c, with --compare-prefetch) the same trial, each epoch's Ray Data stream started only when
                the epoch begins rather than while the one before validates (trial.Runtime.prefetch)
images/s counts training images over the wall time of train_one_epoch, data waits included. The first
epoch of each side is a warm-up and is left out; the rest are steady state. ratio = b / a (target >= 0.95).
Note (b) augments in a separate Ray worker process, so on a machine with a spare core it may beat (a).
epoch_s adds the validation pass each epoch runs (the trial's own `seconds`; the same pass in (a)).
The last line is JSON with every figure and the machine.
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
TARGET = 0.95


def trial_config(preset: str, size: int, epochs: int, batch_size: int):
    """The TrialConfig both sides train: the preset's model at ``size`` plus the fixed augmentation."""
    from xray_ray.config import TrialConfig
    from xray_ray.model.cnn import PRESETS

    model = {k: v for k, v in PRESETS[preset].to_dict().items() if k in TrialConfig.field_names()}
    return TrialConfig.from_dict(
        {**model, "image_size": size, "epochs": epochs, "batch_size": batch_size, **STRENGTHS, "seed": 0}
    )


def memory_loop(cfg, train, val, pos_fraction: float) -> list[dict]:
    """(a) Train ``cfg`` over in-memory arrays, augmenting each random-order batch in-process."""
    import torch

    from xray_ray.config import model_sizes
    from xray_ray.data.augment import augment_batch, strengths_of
    from xray_ray.data.streams import rows_for
    from xray_ray.model.cnn import build_model
    from xray_ray.model.train import (
        array_batches,
        make_loss,
        make_optimizer,
        make_scheduler,
        predict_probs,
        train_one_epoch,
    )
    from xray_ray.search.trial import trial_seed

    torch.set_num_threads(1)
    seed = trial_seed(cfg)
    torch.manual_seed(seed)
    model = build_model(**model_sizes(cfg))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, max(1, -(-len(train) // cfg.batch_size)))
    loss_fn = make_loss(cfg, pos_fraction)
    strengths = strengths_of(cfg.to_dict())

    def batches(epoch: int):
        order = np.random.default_rng(seed + epoch).permutation(len(train))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            b = augment_batch({"image": train.images[idx], "idx": idx}, strengths=strengths, seed=seed, epoch=epoch)
            yield {"image": torch.from_numpy(b["image"]), "label": torch.from_numpy(train.labels[idx])}

    rows = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        stats = train_one_epoch(model, batches(epoch), optimizer, loss_fn=loss_fn, scheduler=scheduler)
        predict_probs(model, array_batches(val.images, val.labels, rows_for(val.size)), device="cpu")
        rows.append(
            {
                "epoch": epoch,
                "images": stats["images"],
                "images_per_s": stats["images_per_s"],
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def tune_trials(
    cfgs: dict, prepared: dict, pos_fraction: float, num_cpus: int | None, storage: str, prefetch: bool = True
) -> dict:
    """(b) One real Tune trial per size, one at a time, through tuner.trainable; per-epoch rows by size."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # as search.run
    import ray
    from ray import tune

    from xray_ray.config import encode_value
    from xray_ray.data.streams import train_dataset
    from xray_ray.search.ray_setup import RayOptions, data_slot, init_ray
    from xray_ray.search.trial import Runtime
    from xray_ray.search.tuner import trial_trainable

    init_ray(RayOptions(address=None, num_cpus=num_cpus))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        data = {
            s: {"train": train_dataset(p.splits["train"]), "val": p.splits["val"], "n_train": len(p.splits["train"])}
            for s, p in prepared.items()
        }
        slot = data_slot()  # as search.run
        runtime = Runtime(
            cpus_per_trial=1.0,
            gpus_per_trial=0.0,
            data_cpus=0.0,
            data_tasks=1,
            metric="val_auc",
            mode="max",
            pos_fraction=pos_fraction,
            prefetch=prefetch,
            data_slot=slot,
        )
        fn = trial_trainable(data, runtime, {"cpu": 1, "gpu": 0})
        base = next(iter(cfgs.values())).to_dict()
        space = {k: encode_value(v) for k, v in base.items()}
        space["image_size"] = tune.grid_search(sorted(cfgs))
        tuner = tune.Tuner(
            fn,
            param_space=space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=1),
            run_config=tune.RunConfig(
                name="throughput",
                storage_path=storage,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        out = {}
        for res in tuner.fit():
            if res.error is not None:
                raise RuntimeError(f"the Tune trial failed: {res.error}")
            hist = res.metrics_dataframe.sort_values("epoch")
            out[int(res.config["image_size"])] = hist[["epoch", "images", "images_per_s", "seconds"]].to_dict("records")
        return out
    finally:
        ray.shutdown()


def steady(rows: list[dict], warmup: int) -> dict:
    """Images/s over the epochs after the warm-up (total images / total train wall time)."""
    kept = [r for r in rows if r["epoch"] > warmup] or rows[-1:]
    images = sum(int(r["images"]) for r in kept)
    train_s = sum(r["images"] / r["images_per_s"] for r in kept)
    return {
        "epochs": [int(r["epoch"]) for r in kept],
        "images": images,
        "images_per_s": images / train_s,
        "epoch_seconds": float(np.mean([r["seconds"] for r in kept])),
        "all_epochs_images_per_s": [round(float(r["images_per_s"]), 1) for r in rows],
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", default=default_data(), help="folder, .npz or synthetic:N (default: the real images if present)"
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--preset", default="seed", help="model preset (xray_ray.model.cnn.PRESETS)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per side, the first being the warm-up")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N train images only (0: all)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--cache", default=None, help="pixel cache folder (default: the package's)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for trial_throughput.json")
    ap.add_argument(
        "--compare-prefetch",
        action="store_true",
        help="also run the Tune trial without starting each next epoch's stream early (row c)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny model, 120 synthetic images, 2 epochs, 64 px (CI)")
    args = ap.parse_args()
    if args.quick:
        args.data, args.preset, args.epochs, args.limit, args.sizes = "synthetic:120", "tiny", 2, 0, [64]
    if args.epochs < 2:
        ap.error("--epochs must be at least 2: the first one is a warm-up")

    return args


def prepared_data(args: argparse.Namespace) -> dict:
    """Each size prepared from the data's own patient-grouped splits (train cut to --limit)."""
    from xray_ray.data.prepare import prepare
    from xray_ray.data.sources import load_source
    from xray_ray.data.splits import assign_splits

    manifest = load_source(args.data, seed=0)
    df, _ = assign_splits(manifest.df, seed=0)
    prepared = {s: prepare(df, s, args.cache) for s in args.sizes}
    if args.limit:
        for p in prepared.values():
            tr = p.splits["train"]
            p.splits["train"] = type(tr)(
                tr.images[: args.limit], tr.labels[: args.limit], tr.uids[: args.limit], tr.patients[: args.limit]
            )
    return prepared


def compare(args: argparse.Namespace, prepared: dict, memory: dict, tuned: dict, plain: dict | None):
    """The result per size (steady-state rates of (a), (b) and (c) and their ratios), and the table's rows."""
    result = {
        "benchmark": "trial_throughput",
        "quick": args.quick,
        "machine": machine(),
        "data": args.data,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "torch_threads": 1,
        "cpus_per_trial": 1,
        "augmentation": STRENGTHS,
        "epochs": args.epochs,
        "warmup_epochs_skipped": 1,
        "train_images": len(next(iter(prepared.values())).splits["train"]),
        "target_ratio": TARGET,
        "sizes": {},
    }
    rows = []
    for s in args.sizes:
        a, b = steady(memory[s], 1), steady(tuned[s], 1)
        ratio = b["images_per_s"] / a["images_per_s"]
        result["sizes"][str(s)] = {"memory_loop": a, "tune_trial": b, "ratio": ratio, "meets_target": ratio >= TARGET}
        rows.append([f"{s}px memory_loop (a)", a["images"], a["images_per_s"], a["epoch_seconds"], 1.0])
        rows.append([f"{s}px tune_trial (b)", b["images"], b["images_per_s"], b["epoch_seconds"], ratio])
        if plain is not None:
            c = steady(plain[s], 1)
            result["sizes"][str(s)].update(
                {"tune_trial_no_prefetch": c, "prefetch_epoch_seconds_ratio": b["epoch_seconds"] / c["epoch_seconds"]}
            )
            rows.append(
                [
                    f"{s}px tune_trial, no prefetch (c)",
                    c["images"],
                    c["images_per_s"],
                    c["epoch_seconds"],
                    c["images_per_s"] / a["images_per_s"],
                ]
            )
    return result, rows


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    prepared = prepared_data(args)
    pos_fraction = float(np.mean(next(iter(prepared.values())).splits["train"].labels))
    cfgs = {s: trial_config(args.preset, s, args.epochs, args.batch_size) for s in args.sizes}

    memory = {s: memory_loop(cfgs[s], p.splits["train"], p.splits["val"], pos_fraction) for s, p in prepared.items()}
    with tempfile.TemporaryDirectory(prefix="xray_bench_") as storage:
        tuned = tune_trials(cfgs, prepared, pos_fraction, args.num_cpus, storage)
    plain = None
    if args.compare_prefetch:
        with tempfile.TemporaryDirectory(prefix="xray_bench_") as storage:
            plain = tune_trials(cfgs, prepared, pos_fraction, args.num_cpus, storage, prefetch=False)
    result, rows = compare(args, prepared, memory, tuned, plain)
    result["seconds"] = time.perf_counter() - t_start
    print(
        f"steady state: epochs 2..{args.epochs} of {args.epochs} (epoch 1 is a warm-up, left out); "
        f"{args.preset} model, batch {args.batch_size}, 1 torch thread, {result['train_images']} train images"
    )
    print_table(["run", "images", "images/s", "epoch_s", "b/a"], rows)
    emit(result, args.out, "trial_throughput")


if __name__ == "__main__":
    sys.exit(main())
