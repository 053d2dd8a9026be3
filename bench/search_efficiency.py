"""How much training ASHA + Optuna needs versus FIFO + random search on the same space (a benchmark).

    python bench/search_efficiency.py [--space search_spaces/cpu.yaml] [--num-samples N] [--data synthetic] [--quick]

Runs two searches through ``xray_ray.search.main`` with the same space, trials, seed, data and concurrency:
  asha_optuna   searcher optuna (TPE), scheduler asha (the space's grace period and reduction factor)
  fifo_random   searcher random, scheduler fifo: every trial runs all its epochs
From each run's epochs.parquet, rows ordered by ``ended_at`` (when each epoch was reported), it draws the
best-so-far val AUC against cumulative trial-epochs, and reports the trial-epochs ASHA needed to reach the
best val AUC random search reached overall, as a share of random's total (target <= 1/3).
Writes search_efficiency.{json,csv,png} under --out (default bench/out/). The last line is JSON.
Caveat: on synthetic phantoms val AUC saturates near 1.0 within a few epochs, so read the real-data run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, derived_space, emit, machine, print_table  # noqa: E402

TARGET = 1 / 3
SEARCHES = {"asha_optuna": ("optuna", "asha"), "fifo_random": ("random", "fifo")}


def curve(epochs: pd.DataFrame, metric: str = "val_auc") -> pd.DataFrame:
    """Epoch rows in report order with cumulative trial-epochs and the best-so-far metric."""
    order = epochs.sort_values(["ended_at", "trial_id", "epoch"], kind="stable").reset_index(drop=True)
    return pd.DataFrame(
        {
            "trial_epochs": np.arange(1, len(order) + 1),
            "ended_at": order["ended_at"].astype(float),
            "trial_id": order["trial_id"],
            "epoch": order["epoch"].astype(int),
            metric: order[metric].astype(float),
            "best_so_far": order[metric].astype(float).cummax().ffill(),  # NaN (one-class val): keep the best so far
        }
    )


def epochs_to_reach(c: pd.DataFrame, level: float, tolerance: float = 0.0) -> int | None:
    """Cumulative trial-epochs at which the best-so-far first reaches ``level - tolerance`` (None: never)."""
    hit = c.index[c["best_so_far"] >= level - tolerance]
    return int(c.loc[hit[0], "trial_epochs"]) if len(hit) else None


def run_search(label: str, space: Path, args: argparse.Namespace, results: Path) -> dict:
    from xray_ray.search.command import main as search_main

    argv = [
        "--data",
        args.data,
        "--space",
        str(space),
        "--results",
        str(results),
        "--seed",
        str(args.seed),
        "--no-export",
    ]
    for flag, value in (
        ("--num-samples", args.num_samples),
        ("--max-concurrent", args.max_concurrent),
        ("--num-cpus", args.num_cpus),
        ("--cache", args.cache),
    ):
        if value is not None:
            argv += [flag, str(value)]
    t0 = time.perf_counter()
    rc = search_main(argv)
    if rc != 0:
        raise SystemExit(f"the {label} search failed (exit {rc})")
    run_dir = results / yaml.safe_load(space.read_text())["name"]
    run = json.loads((run_dir / "run.json").read_text())
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    trials = pd.read_parquet(run_dir / "trials.parquet")
    return {
        "label": label,
        "seconds": time.perf_counter() - t0,
        "run": run,
        "epochs": epochs,
        "trials": trials,
        "curve": curve(epochs),
    }


def save_plot(curves: dict[str, pd.DataFrame], level: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, c in curves.items():
        ax.step(c["trial_epochs"], c["best_so_far"], where="post", label=label)
    ax.axhline(level, color="grey", lw=0.8, ls="--", label="best of fifo_random")
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel("best val AUC so far")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> tuple[argparse.Namespace, dict]:
    """The flags, and the space's overrides (--quick: the smoke space cut to 1-2 epochs)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu.yaml")
    ap.add_argument("--num-samples", type=int, default=None, help="trials per search (default: the space's)")
    ap.add_argument("--data", default="synthetic", help="synthetic[:N] (default), a folder or .npz for real images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-concurrent", type=int, default=None, help="trials at once, the same for both searches")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of each search's local Ray (default: all)")
    ap.add_argument("--tolerance", type=float, default=0.0, help="count random's best as reached within this")
    ap.add_argument("--cache", default=None, help="pixel cache folder (default: the package's)")
    ap.add_argument("--results", type=Path, default=None, help="keep both runs here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for search_efficiency.{json,csv,png}")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke space, 1-2 epochs at 32 px, 2 trials one at a time on a 1-CPU Ray, 120 images (CI)",
    )
    args = ap.parse_args()
    overrides = {}
    if args.quick:
        args.space, args.num_samples, args.data = ROOT / "search_spaces" / "smoke.yaml", 2, "synthetic:120"
        args.max_concurrent, args.num_cpus = 1, 1  # one CPU: FIFO too runs its trials one after the other
        overrides = {"epochs": {"type": "int", "low": 1, "high": 2}, "image_size": 32}
    return args, overrides


def run_both(args: argparse.Namespace, overrides: dict) -> dict[str, dict]:
    """Both searches of SEARCHES on the same space, trials, seed and data; each on a Ray of its own, except
    under --quick (a CI check that the script runs), where they share one to save its start-up."""
    from contextlib import nullcontext

    from xray_ray.search.ray_setup import RayOptions, ray_session

    shared = ray_session(RayOptions(num_cpus=args.num_cpus)) if args.quick else nullcontext()
    with tempfile.TemporaryDirectory(prefix="xray_bench_") as tmp, shared:
        results = args.results or Path(tmp) / "results"
        runs = {}
        for label, (searcher, scheduler) in SEARCHES.items():
            space = derived_space(
                args.space,
                Path(tmp),
                label,
                {"searcher": {"algorithm": searcher}, "scheduler": {"algorithm": scheduler}, "space": overrides},
            )
            runs[label] = run_search(label, space, args, results)
    return runs


def summarize(args: argparse.Namespace, runs: dict[str, dict], level: float, rand_total: int):
    """The result's per-search facts, and the table's rows."""
    asha = runs["asha_optuna"]
    rows, result = (
        [],
        {
            "benchmark": "search_efficiency",
            "quick": args.quick,
            "machine": machine(),
            "space": str(args.space),
            "data": args.data,
            "seed": args.seed,
            "num_samples": int(len(asha["trials"])),
            "target_share": TARGET,
            "tolerance": args.tolerance,
            "searches": {},
        },
    )
    for label, r in runs.items():
        c = r["curve"]
        planned = int(r["trials"]["epochs"].sum())
        info = {
            "trial_epochs": int(len(r["epochs"])),
            "planned_trial_epochs": planned,
            "budget_share": len(r["epochs"]) / planned if planned else None,
            "best_val_auc": float(c["best_so_far"].max()),
            "wall_seconds": r["run"].get("wall_seconds"),
            "concurrency": r["run"].get("concurrency"),
            "overhead_share": r["run"].get("overhead", {}).get("share_outside"),
            "trials": r["run"].get("trials"),
        }
        result["searches"][label] = info
        rows.append(
            [
                label,
                info["trial_epochs"],
                planned,
                info["best_val_auc"],
                info["wall_seconds"],
                info["trial_epochs"] / rand_total,
            ]
        )
    return rows, result


def main() -> None:
    args, overrides = parse_args()
    t_start = time.perf_counter()
    runs = run_both(args, overrides)
    rand = runs["fifo_random"]
    level = float(rand["curve"]["best_so_far"].max())
    need = epochs_to_reach(runs["asha_optuna"]["curve"], level, args.tolerance)
    rand_total = int(len(rand["epochs"]))
    share = need / rand_total if need is not None and rand_total else None

    args.out.mkdir(parents=True, exist_ok=True)
    both = pd.concat([r["curve"].assign(search=k) for k, r in runs.items()], ignore_index=True)
    both = both[["search", *(c for c in both.columns if c != "search")]]
    both.to_csv(args.out / "search_efficiency.csv", index=False)
    save_plot({k: r["curve"] for k, r in runs.items()}, level, args.out / "search_efficiency.png")

    rows, result = summarize(args, runs, level, rand_total)
    result.update(
        {
            "random_best_val_auc": level,
            "asha_trial_epochs_to_reach_random_best": need,
            "random_total_trial_epochs": rand_total,
            "share_of_random": share,
            "meets_target": share is not None and share <= TARGET,
            "files": {k: str(args.out / f"search_efficiency.{k}") for k in ("csv", "png", "json")},
            "seconds": time.perf_counter() - t_start,
        }
    )
    print(
        f"\n{result['num_samples']} trials each on {args.space.name}, data {args.data}, seed {args.seed}; "
        f"epochs ordered by ended_at"
    )
    print_table(["search", "trial_epochs", "planned", "best_val_auc", "wall_s", "epochs/random"], rows)
    print(
        f"asha_optuna reached fifo_random's best val AUC {level:.4f} after "
        f"{need if need is not None else 'never (not reached)'} trial-epochs"
        + (f" = {share:.2f} of random's {rand_total} (target <= {TARGET:.2f})" if share is not None else "")
    )
    emit(result, args.out, "search_efficiency")


if __name__ == "__main__":
    sys.exit(main())
