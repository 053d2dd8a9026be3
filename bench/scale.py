"""Scale on paper: expected wall time of search_spaces/seed.yaml on 1, 4 and 16 GPUs (an estimate, not a run).

    python bench/scale.py [--throughput bench/out/trial_throughput.json] [--efficiency bench/out/search_efficiency.json]
                          [--gpu-measured bench/measured/gpu_h200.json]
                          [--gpu-search bench/measured/gpu_search_h200_reuse]
                          [--quick]

Inputs, each printed with where it came from:
  per-trial CPU images/s   measured: trial_throughput.json (the Tune trial at --size px), or --cpu-images-per-s
  ASHA's share of budget   measured: search_efficiency.json (asha trial-epochs / planned trial-epochs, on the
                           space it ran), or --asha-share; and always on paper from seed.yaml's rungs (grace 5,
                           factor 3: 1/3 of the trials pass epoch 5, 1/9 pass 15, 1/27 pass 45), side by side;
                           asynchronous ASHA promotes more freely early on, so the paper share is optimistic
  GPU per-trial images/s   measured by bench/gpu.py on a real card (--gpu-measured; committed: an H200 and an
                           H100): the seed CNN at 128 px, batch 32, each of K processes training at once on
                           one GPU, K = 1 / --gpus-per-trial; other sizes scaled by the measured 128 -> 160 px
                           ratio; augmentation images/s per CPU core and validation speed from the same file.
                           Without the file: --gpu-images-per-s etc., marked ASSUMPTION.
                           A trial is also capped by its augmentation feed (per-core rate x --data-tasks)
  GPU overheads            measured by a real GPU search (--gpu-search: `python -m xray_ray.search` on the
                           H200, smoke.yaml, 8 trials at 0.25 GPU): per trial, the slot time outside its epochs
                           (Ray start, trial start, CUDA and Ray Data warm-up, reporting, checkpoints, export,
                           spread over the trials: an upper bound); per epoch, the time inside an epoch but
                           outside its train and validation steps
Model: trial-epochs = share x trials x mean planned epochs; an epoch = train images at the trial's rate plus
validation at eval-speedup times that (plus the per-epoch overhead on GPUs); wall = max((trial-epochs x epoch +
trials x per-trial overhead) / slots, the longest trial); the CPU row adds no overhead. seed.yaml's 160 px
draws cost (160/128)^2 of a 128 px one on CPUs. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, emit, machine, print_table  # noqa: E402

MEASURED = ROOT / "bench" / "measured"


def seed_space(path: Path) -> dict:
    """What the estimate needs from the space: trials, epochs range, sizes, ASHA's rungs."""
    from xray_ray.search.spaces import load_space

    s = load_space(path)
    epochs = next((p for p in s.params if p.name == "epochs"), None)
    lo, hi = (int(epochs.low), int(epochs.high)) if epochs else (s.max_epochs, s.max_epochs)
    return {
        "name": s.name,
        "trials": s.num_samples,
        "epochs": (lo, hi),
        "sizes": s.image_sizes,
        "grace": s.grace_period,
        "factor": s.reduction_factor,
        "max_t": s.max_epochs,
        "scheduler": s.scheduler,
    }


def asha_share_on_paper(epochs: tuple[int, int], grace: int, factor: int, max_t: int) -> float:
    """Expected trial-epochs under ASHA over those of FIFO, if 1/factor of the trials pass each rung."""
    rungs = [0]
    while grace * factor ** (len(rungs) - 1) < max_t:
        rungs.append(grace * factor ** (len(rungs) - 1))
    rungs.append(max_t)
    planned = np.arange(epochs[0], epochs[1] + 1)
    run = sum(factor**-j * np.clip(planned - rungs[j], 0, rungs[j + 1] - rungs[j]) for j in range(len(rungs) - 1))
    return float(run.mean() / planned.mean())


def load(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def estimate(
    *,
    rate: float,
    slots: float,
    trials: int,
    trial_epochs: float,
    max_epochs: int,
    train_images: int,
    val_images: int,
    eval_speedup: float,
    epoch_overhead_s: float = 0.0,
    trial_overhead_s: float = 0.0,
) -> dict:
    """Wall hours of the search for one per-trial rate (images/s) and number of concurrent trials."""
    epoch_s = train_images / rate + val_images / (rate * eval_speedup) + epoch_overhead_s
    busy = (trial_epochs * epoch_s + trials * trial_overhead_s) / slots
    longest = max_epochs * epoch_s + trial_overhead_s
    wall = max(busy, longest)
    return {
        "slots": slots,
        "trial_images_per_s": rate,
        "epoch_s": epoch_s,
        "wall_h": wall / 3600,
        "bound": "work/slots" if busy >= longest else "longest trial",
    }


def add_gpu_flags(ap: argparse.ArgumentParser) -> None:
    """The GPU row's flags: a measured card and search, or the rates assumed without them."""
    ap.add_argument(
        "--gpu-measured",
        type=Path,
        default=MEASURED / "gpu_h200.json",
        help="bench/gpu.py's JSON from a real card ('' for none: the flags below are then assumed)",
    )
    ap.add_argument(
        "--gpu-search",
        type=Path,
        default=MEASURED / "gpu_search_h200_reuse",
        help="a GPU search's results folder (run.json, epochs.parquet) for the overheads",
    )
    ap.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=3000.0,
        help="ASSUMPTION, used without --gpu-measured: one trial's images/s at 128 px on its GPU share",
    )
    ap.add_argument(
        "--gpus-per-trial",
        type=float,
        default=0.25,
        help="GPU share of a trial (bench/gpu.py: 4 trials on one H200 train 3.7x one trial's images/s)",
    )
    ap.add_argument(
        "--augment-images-per-s",
        type=float,
        default=1500.0,
        help="ASSUMPTION, used without --gpu-measured: augmented 128 px images/s of one CPU core",
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "seed.yaml")
    ap.add_argument("--throughput", type=Path, default=OUT / "trial_throughput.json")
    ap.add_argument("--efficiency", type=Path, default=OUT / "search_efficiency.json")
    ap.add_argument("--size", type=int, default=128, help="the measured image size to read from --throughput")
    ap.add_argument("--cpu-images-per-s", type=float, default=None, help="per-trial CPU rate (overrides the file)")
    ap.add_argument("--asha-share", type=float, default=None, help="ASHA trial-epochs / planned (overrides the file)")
    add_gpu_flags(ap)
    ap.add_argument("--data-tasks", type=int, default=2, help="augmentation tasks per trial (search --data-tasks)")
    ap.add_argument(
        "--cores", type=int, default=None, help="CPU trials at once on the CPU row (default: this machine's cores)"
    )
    ap.add_argument("--train-images", type=int, default=4170, help="train split of the real data (run.json)")
    ap.add_argument("--val-images", type=int, default=523)
    ap.add_argument(
        "--eval-speedup",
        type=float,
        default=3.0,
        help="ASSUMPTION, used without --gpu-measured: validation images/s over training's",
    )
    ap.add_argument("--trial-overhead-s", type=float, default=None, help="per GPU trial (default: --gpu-search)")
    ap.add_argument("--epoch-overhead-s", type=float, default=None, help="per GPU epoch (default: --gpu-search)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="ignore the default measurement files (CI)")
    args = ap.parse_args()
    if args.quick:
        args.throughput = args.throughput if args.throughput != OUT / "trial_throughput.json" else None
        args.efficiency = args.efficiency if args.efficiency != OUT / "search_efficiency.json" else None

    return args


def cpu_rate_of(args: argparse.Namespace, sources: dict) -> float | None:
    """One CPU trial's images/s at --size: the flag, or bench/trial_throughput.py's measurement."""
    cpu_rate, tp = args.cpu_images_per_s, load(args.throughput)
    if cpu_rate is not None:
        sources["cpu_images_per_s"] = "flag --cpu-images-per-s"
    elif tp is not None and str(args.size) in tp.get("sizes", {}):
        cpu_rate = tp["sizes"][str(args.size)]["tune_trial"]["images_per_s"]
        sources["cpu_images_per_s"] = f"measured: {args.throughput} ({tp['preset']} model, {args.size} px" + (
            ", QUICK run: meaningless)" if tp.get("quick") else ")"
        )
    else:
        sources["cpu_images_per_s"] = (
            "none: run bench/trial_throughput.py or pass --cpu-images-per-s (CPU row left out)"
        )

    return cpu_rate


def asha_shares(args: argparse.Namespace, space: dict, sources: dict) -> dict[str, float]:
    """ASHA's share of the planned trial-epochs: given, measured, and on paper for this space's rungs."""
    paper = asha_share_on_paper(space["epochs"], space["grace"], space["factor"], space["max_t"])
    shares, eff = {}, load(args.efficiency)
    if args.asha_share is not None:
        shares["given"] = args.asha_share
        sources["asha_share_given"] = "flag --asha-share"
    elif eff is not None and eff.get("searches", {}).get("asha_optuna", {}).get("budget_share") is not None:
        shares["measured"] = eff["searches"]["asha_optuna"]["budget_share"]
        sources["asha_share_measured"] = (
            f"measured: {args.efficiency} on {Path(eff['space']).name}, whose rungs "
            f"differ from {space['name']}.yaml's" + (" (QUICK run: meaningless)" if eff.get("quick") else "")
        )
    shares["paper"] = paper
    sources["asha_share_paper"] = (
        f"on paper: {space['name']}.yaml's rungs (grace {space['grace']}, factor "
        f"{space['factor']}, max {space['max_t']}), 1/{space['factor']} passing each"
    )
    return shares


def gpu_rates(args: argparse.Namespace, space: dict, size_factor: float, sources: dict) -> dict[str, Any]:
    """The card, a trial's GPU images/s at 128 px, the size factor, augmentation rate and eval speed-up."""
    gpu = load(args.gpu_measured) if str(args.gpu_measured) not in ("", ".") else None
    k = round(1 / args.gpus_per_trial) if args.gpus_per_trial < 1 else 1
    share_rows = {r["processes"]: r for r in (gpu or {}).get("sharing", [])}
    if gpu is not None and gpu.get("device") == "cuda" and k in share_rows:
        card = gpu["machine"]["gpu"]["name"]
        gpu_128 = float(np.mean(share_rows[k]["per_process_images_per_s"]))
        by_size = {r["size"]: r["images_per_s"] for r in gpu["train"] if r["batch_size"] == share_rows[k]["batch_size"]}
        # a larger image never trains faster: a measured ratio under 1 is the noise of a launch-bound step
        gpu_factor = (
            float(
                np.mean(
                    [max(1.0, by_size[128] / by_size[s]) if s in by_size else (s / 128) ** 2 for s in space["sizes"]]
                )
            )
            if 128 in by_size
            else size_factor
        )
        augment, eval_speedup = gpu["augment"]["images_per_s"], gpu["eval_speedup"]
        sources["gpu_images_per_s"] = (
            f"measured: {args.gpu_measured} on {card}: each of {k} trials on one GPU "
            f"at 128 px, batch {share_rows[k]['batch_size']}; the space's sizes cost x{gpu_factor:.2f} "
            "(measured 128 vs 160 px, at least 1)"
        )
        sources["augment_and_eval"] = f"measured: {args.gpu_measured} ({gpu['machine']['cpu']} core; {card})"
    else:
        card, gpu_factor = None, size_factor
        gpu_128, augment, eval_speedup = args.gpu_images_per_s, args.augment_images_per_s, args.eval_speedup
        sources["gpu_images_per_s"] = "ASSUMPTION (flags; no bench/gpu.py measurement for this GPU share)"
    return {
        "card": card,
        "gpu_128": gpu_128,
        "gpu_factor": gpu_factor,
        "augment": augment,
        "eval_speedup": eval_speedup,
    }


def gpu_overheads(args: argparse.Namespace, sources: dict) -> tuple[float, float]:
    """Seconds outside training per GPU trial and per epoch: the flags, or a GPU search's measurement."""
    trial_over, epoch_over = args.trial_overhead_s, args.epoch_overhead_s
    run_json = args.gpu_search / "run.json" if args.gpu_search else None
    if (trial_over is None or epoch_over is None) and run_json is not None and run_json.is_file():
        import pandas as pd

        run = json.loads(run_json.read_text())
        ep = pd.read_parquet(args.gpu_search / "epochs.parquet")
        outside = ep["seconds"] - ep["step_seconds"] - ep["eval_seconds"]
        o = run["overhead"]
        between = o["slot_seconds"] - o["idle_tail_slot_seconds"] - ep["seconds"].sum()
        trial_over = (
            trial_over
            if trial_over is not None
            else float((between + outside[ep["epoch"] == 1].sum()) / sum(run["trials"].values()))
        )
        epoch_over = epoch_over if epoch_over is not None else float(outside[ep["epoch"] > 1].median())
        sources["gpu_overheads"] = (
            f"measured: {args.gpu_search} ({sum(run['trials'].values())} trials, "
            f"{run['resources']['gpus_per_trial']:g} GPU each, {run['wall_seconds']:.0f} s)"
        )
    else:
        trial_over, epoch_over = trial_over or 0.0, epoch_over or 0.0
        sources["gpu_overheads"] = "flags --trial-overhead-s / --epoch-overhead-s (0 unless given)"

    return trial_over, epoch_over


def estimates_of(
    args: argparse.Namespace,
    space: dict,
    size_factor: float,
    cpu_rate: float | None,
    shares: dict[str, float],
    g: dict[str, Any],
    overheads: tuple[float, float],
):
    """Per setup (CPU row, each GPU count) and ASHA share: the estimate; and the printed table's rows."""
    gpu_128, gpu_factor, augment, eval_speedup = g["gpu_128"], g["gpu_factor"], g["augment"], g["eval_speedup"]
    trial_over, epoch_over = overheads
    mean_epochs = float(np.mean(space["epochs"]))
    planned = space["trials"] * mean_epochs
    rates = {}  # setup -> (per-trial images/s, concurrent trials, per-trial overhead s, per-epoch overhead s)
    if cpu_rate is not None:
        cores = args.cores or os.cpu_count() or 1
        rates[f"cpu_{cores}_cores"] = (cpu_rate / size_factor, min(cores, space["trials"]), 0.0, 0.0)
    feed = augment * args.data_tasks / size_factor
    gpu_rate = gpu_128 / gpu_factor
    for g in args.gpus:
        rates[f"{g}_gpu"] = (min(gpu_rate, feed), min(g / args.gpus_per_trial, space["trials"]), trial_over, epoch_over)
    estimates, table = {}, []
    for setup, (rate, slots, t_over, e_over) in rates.items():
        ev = args.eval_speedup if setup.startswith("cpu") else eval_speedup
        estimates[setup] = {
            n: estimate(
                rate=rate,
                slots=slots,
                trials=space["trials"],
                trial_epochs=v * planned,
                max_epochs=space["max_t"],
                train_images=args.train_images,
                val_images=args.val_images,
                eval_speedup=ev,
                epoch_overhead_s=e_over,
                trial_overhead_s=t_over,
            )
            for n, v in shares.items()
        }
        first = next(iter(estimates[setup].values()))
        table.append(
            [
                setup,
                int(slots) if float(slots).is_integer() else slots,
                rate,
                first["epoch_s"],
                *(
                    f"{e['wall_h']:.2f}" + ("*" if e["bound"] == "longest trial" else " ")
                    for e in estimates[setup].values()
                ),
            ]
        )

    return estimates, table, feed < gpu_rate


def assumptions_of(args: argparse.Namespace, g: dict, trial_over: float, epoch_over: float) -> dict:
    """The record's assumptions: the GPU rates and overheads used, and the data an epoch reads."""
    return {
        "gpu_images_per_s_128px": g["gpu_128"],
        "gpu_size_factor": g["gpu_factor"],
        "gpus_per_trial": args.gpus_per_trial,
        "augment_images_per_s": g["augment"],
        "data_tasks": args.data_tasks,
        "eval_speedup": g["eval_speedup"],
        "trial_overhead_s": trial_over,
        "epoch_overhead_s": epoch_over,
        "train_images": args.train_images,
        "val_images": args.val_images,
    }


def main() -> None:
    args = parse_args()
    space = seed_space(args.space)
    size_factor = float(np.mean([(s / 128) ** 2 for s in space["sizes"]]))
    sources: dict[str, str] = {}
    cpu_rate = cpu_rate_of(args, sources)
    shares = asha_shares(args, space, sources)
    g = gpu_rates(args, space, size_factor, sources)
    trial_over, epoch_over = gpu_overheads(args, sources)
    estimates, table, data_bound = estimates_of(args, space, size_factor, cpu_rate, shares, g, (trial_over, epoch_over))
    card, gpu_128, augment = g["card"], g["gpu_128"], g["augment"]
    mean_epochs = float(np.mean(space["epochs"]))
    planned = space["trials"] * mean_epochs
    print(
        f"{space['name']}.yaml on paper: {space['trials']} trials, epochs {space['epochs'][0]}-{space['epochs'][1]} "
        f"(mean {mean_epochs:g}, {planned:.0f} trial-epochs planned), sizes {space['sizes']} "
        f"(cost x{size_factor:.2f} of 128 px), {args.train_images} train + {args.val_images} val images an epoch"
    )
    for k, v in sources.items():
        print(f"  {k}: {v}")
    print(
        "  ASHA share "
        + ", ".join(f"{k} {v:.3f} ({v * planned:.0f} trial-epochs)" for k, v in shares.items())
        + f"; GPU {gpu_128:.0f} img/s a trial at 128 px ({card or 'ASSUMED'}), {args.gpus_per_trial:g} GPU a "
        f"trial; feed {args.data_tasks} x {augment:.0f} img/s; GPU overheads {trial_over:.1f} s a trial, "
        f"{epoch_over:.2f} s an epoch; CPU row: measured rate, no extra overhead"
    )
    print_table(["setup", "slots", "trial_img/s", "epoch_s", *(f"wall_h@{k}_share" for k in shares)], table)
    print("  * bound by the longest trial (max epochs at one trial's rate), not by work / slots")
    emit(
        {
            "benchmark": "scale",
            "quick": args.quick,
            "machine": machine(),
            "space": space["name"],
            "planned_trial_epochs": planned,
            "asha_shares": shares,
            "size_factor": size_factor,
            "cpu_images_per_s": cpu_rate,
            "data_bound": data_bound,
            "gpu": card,
            "assumptions": assumptions_of(args, g, trial_over, epoch_over),
            "sources": sources,
            "estimates": estimates,
        },
        args.out,
        "scale",
    )


if __name__ == "__main__":
    sys.exit(main())
