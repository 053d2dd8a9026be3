"""Scale on paper: expected wall time of search_spaces/seed.yaml on 1, 4 and 16 GPUs (an estimate, not a run).

    python bench/scale.py [--throughput bench/out/trial_throughput.json] [--efficiency bench/out/search_efficiency.json]
                          [--gpu-images-per-s 3000] [--quick]

Inputs, each printed with where it came from:
  per-trial CPU images/s   measured: trial_throughput.json (the Tune trial at --size px), or --cpu-images-per-s
  ASHA's share of budget   measured: search_efficiency.json (asha trial-epochs / planned trial-epochs, on the
                           space it ran), or --asha-share; and always on paper from seed.yaml's rungs (grace 5,
                           factor 3: 1/3 of the trials pass epoch 5, 1/9 pass 15, 1/27 pass 45), side by side;
                           asynchronous ASHA promotes more freely early on, so the paper share is optimistic
  GPU images/s             ASSUMPTION (no GPU was measured): --gpu-images-per-s per GPU, shared evenly by the
                           trials on it; a trial is also capped by its augmentation feed (--augment-images-per-s
                           per data task x --data-tasks, ASSUMPTION; bench/prepare.py measures it on CPU)
Model: trial-epochs = share x trials x mean planned epochs; an epoch = train images at the trial's rate plus
validation at --eval-speedup times that; wall = max(trial-epochs x epoch / slots, the longest trial (max
epochs)) / (1 - overhead share). seed.yaml's 160 px draws cost (160/128)^2 of a 128 px one. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, emit, machine, print_table  # noqa: E402


def seed_space(path: Path) -> dict:
    """What the estimate needs from the space: trials, epochs range, sizes, ASHA's rungs."""
    from xray_ray.config import load_space

    s = load_space(path)
    epochs = next((p for p in s.params if p.name == "epochs"), None)
    lo, hi = (int(epochs.low), int(epochs.high)) if epochs else (s.max_epochs, s.max_epochs)
    return {"name": s.name, "trials": s.num_samples, "epochs": (lo, hi), "sizes": s.image_sizes,
            "grace": s.grace_period, "factor": s.reduction_factor, "max_t": s.max_epochs, "scheduler": s.scheduler}


def asha_share_on_paper(epochs: tuple[int, int], grace: int, factor: int, max_t: int) -> float:
    """Expected trial-epochs under ASHA over those of FIFO, if 1/factor of the trials pass each rung."""
    rungs = [0]
    while grace * factor ** (len(rungs) - 1) < max_t:
        rungs.append(grace * factor ** (len(rungs) - 1))
    rungs.append(max_t)
    planned = np.arange(epochs[0], epochs[1] + 1)
    run = sum(factor ** -j * np.clip(planned - rungs[j], 0, rungs[j + 1] - rungs[j]) for j in range(len(rungs) - 1))
    return float(run.mean() / planned.mean())


def load(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def estimate(*, rate: float, slots: float, trial_epochs: float, max_epochs: int, train_images: int,
             val_images: int, eval_speedup: float, overhead_share: float) -> dict:
    """Wall hours of the search for one per-trial rate (images/s) and number of concurrent trials."""
    epoch_s = train_images / rate + val_images / (rate * eval_speedup)
    busy = trial_epochs * epoch_s / slots
    longest = max_epochs * epoch_s
    wall = max(busy, longest) / (1 - overhead_share)
    return {"slots": slots, "trial_images_per_s": rate, "epoch_s": epoch_s, "wall_h": wall / 3600,
            "bound": "work/slots" if busy >= longest else "longest trial"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "seed.yaml")
    ap.add_argument("--throughput", type=Path, default=OUT / "trial_throughput.json")
    ap.add_argument("--efficiency", type=Path, default=OUT / "search_efficiency.json")
    ap.add_argument("--size", type=int, default=128, help="the measured image size to read from --throughput")
    ap.add_argument("--cpu-images-per-s", type=float, default=None, help="per-trial CPU rate (overrides the file)")
    ap.add_argument("--asha-share", type=float, default=None, help="ASHA trial-epochs / planned (overrides the file)")
    ap.add_argument("--gpu-images-per-s", type=float, default=3000.0,
                    help="ASSUMPTION, not a measurement: training images/s of one GPU on the seed CNN at 128 px, "
                         "bf16, batch 32-64 (default 3000, a mid-range data-centre GPU, e.g. an A10G or L4)")
    ap.add_argument("--gpus-per-trial", type=float, default=0.5, help="as seed.yaml's comment suggests")
    ap.add_argument("--augment-images-per-s", type=float, default=1500.0,
                    help="ASSUMPTION: augmented 128 px images/s of one Ray Data task (one CPU core)")
    ap.add_argument("--data-tasks", type=int, default=4, help="augmentation tasks per trial (search --data-tasks)")
    ap.add_argument("--cores", type=int, default=None,
                    help="CPU trials at once on the CPU row (default: this machine's cores)")
    ap.add_argument("--train-images", type=int, default=4170, help="train split of the real data (run.json)")
    ap.add_argument("--val-images", type=int, default=523)
    ap.add_argument("--eval-speedup", type=float, default=3.0, help="ASSUMPTION: validation images/s over training's")
    ap.add_argument("--overhead-share", type=float, default=0.10,
                    help="ASSUMPTION: share of slot time outside train/val steps on GPUs (start-up, checkpoints)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="ignore the default measurement files (CI)")
    args = ap.parse_args()
    if args.quick:
        args.throughput = args.throughput if args.throughput != OUT / "trial_throughput.json" else None
        args.efficiency = args.efficiency if args.efficiency != OUT / "search_efficiency.json" else None

    space = seed_space(args.space)
    size_factor = float(np.mean([(s / 128) ** 2 for s in space["sizes"]]))
    sources = {}

    cpu_rate, tp = args.cpu_images_per_s, load(args.throughput)
    if cpu_rate is not None:
        sources["cpu_images_per_s"] = "flag --cpu-images-per-s"
    elif tp is not None and str(args.size) in tp.get("sizes", {}):
        cpu_rate = tp["sizes"][str(args.size)]["tune_trial"]["images_per_s"]
        sources["cpu_images_per_s"] = f"measured: {args.throughput} ({tp['preset']} model, {args.size} px" + \
                                      (", QUICK run: meaningless)" if tp.get("quick") else ")")
    else:
        sources["cpu_images_per_s"] = ("none: run bench/trial_throughput.py or pass --cpu-images-per-s "
                                       "(CPU row left out)")

    # ASHA's share of the planned trial-epochs: measured (or given) and on paper for this space's rungs
    paper = asha_share_on_paper(space["epochs"], space["grace"], space["factor"], space["max_t"])
    shares, eff = {}, load(args.efficiency)
    if args.asha_share is not None:
        shares["given"] = args.asha_share
        sources["asha_share_given"] = "flag --asha-share"
    elif eff is not None and eff.get("searches", {}).get("asha_optuna", {}).get("budget_share") is not None:
        shares["measured"] = eff["searches"]["asha_optuna"]["budget_share"]
        sources["asha_share_measured"] = (f"measured: {args.efficiency} on {Path(eff['space']).name}, whose rungs "
                                          f"differ from {space['name']}.yaml's" +
                                          (" (QUICK run: meaningless)" if eff.get("quick") else ""))
    shares["paper"] = paper
    sources["asha_share_paper"] = (f"on paper: {space['name']}.yaml's rungs (grace {space['grace']}, factor "
                                   f"{space['factor']}, max {space['max_t']}), 1/{space['factor']} passing each")
    sources["gpu_images_per_s"] = "ASSUMPTION (flag default; no GPU measured)"

    mean_epochs = float(np.mean(space["epochs"]))
    planned = space["trials"] * mean_epochs
    rates = {}  # setup -> (per-trial images/s, concurrent trials, overhead share)
    if cpu_rate is not None:
        cores = args.cores or os.cpu_count() or 1
        rates[f"cpu_{cores}_cores"] = (cpu_rate / size_factor, min(cores, space["trials"]), 0.0)
    feed = args.augment_images_per_s * args.data_tasks / size_factor
    gpu_rate = args.gpu_images_per_s * min(1.0, args.gpus_per_trial) / size_factor
    for g in args.gpus:
        rates[f"{g}_gpu"] = (min(gpu_rate, feed), min(g / args.gpus_per_trial, space["trials"]), args.overhead_share)
    estimates, table = {}, []
    for setup, (rate, slots, over) in rates.items():
        estimates[setup] = {k: estimate(rate=rate, slots=slots, trial_epochs=v * planned, max_epochs=space["max_t"],
                                        train_images=args.train_images, val_images=args.val_images,
                                        eval_speedup=args.eval_speedup, overhead_share=over)
                            for k, v in shares.items()}
        first = next(iter(estimates[setup].values()))
        table.append([setup, int(slots) if float(slots).is_integer() else slots, rate, first["epoch_s"],
                      *(f"{e['wall_h']:.2f}" + ("*" if e["bound"] == "longest trial" else " ")
                        for e in estimates[setup].values())])

    print(f"{space['name']}.yaml on paper: {space['trials']} trials, epochs {space['epochs'][0]}-{space['epochs'][1]} "
          f"(mean {mean_epochs:g}, {planned:.0f} trial-epochs planned), sizes {space['sizes']} "
          f"(cost x{size_factor:.2f} of 128 px), {args.train_images} train + {args.val_images} val images an epoch")
    for k, v in sources.items():
        print(f"  {k}: {v}")
    print("  ASHA share " + ", ".join(f"{k} {v:.3f} ({v * planned:.0f} trial-epochs)" for k, v in shares.items())
          + f"; GPU {args.gpu_images_per_s:g} img/s per GPU (ASSUMED), {args.gpus_per_trial:g} GPU a trial; "
          f"feed {args.data_tasks} x {args.augment_images_per_s:g} img/s (ASSUMED); GPU overhead "
          f"{args.overhead_share:.0%} (ASSUMED); CPU row: measured rate, no extra overhead")
    print_table(["setup", "slots", "trial_img/s", "epoch_s", *(f"wall_h@{k}_share" for k in shares)], table)
    print("  * bound by the longest trial (max epochs at one trial's rate), not by work / slots")
    emit({"benchmark": "scale", "quick": args.quick, "machine": machine(), "space": space["name"],
          "planned_trial_epochs": planned, "asha_shares": shares, "size_factor": size_factor,
          "cpu_images_per_s": cpu_rate, "data_bound": feed < gpu_rate,
          "assumptions": {"gpu_images_per_s": args.gpu_images_per_s, "gpus_per_trial": args.gpus_per_trial,
                          "augment_images_per_s": args.augment_images_per_s, "data_tasks": args.data_tasks,
                          "eval_speedup": args.eval_speedup, "overhead_share": args.overhead_share,
                          "train_images": args.train_images, "val_images": args.val_images},
          "sources": sources, "estimates": estimates}, args.out, "scale")


if __name__ == "__main__":
    sys.exit(main())
