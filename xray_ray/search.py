"""The search's command line and its orchestration: Ray Tune + Optuna (TPE) + ASHA over the CNN family.

    python -m xray_ray.search --data synthetic --space search_spaces/smoke.yaml

Flow: data source -> patient-grouped splits -> prepare once per image size -> Ray Data train datasets ->
Tuner(OptunaSearch, ASHAScheduler) -> trials.parquet / epochs.parquet / run.json -> best/ (winner.finalize).
The pieces: trial (what one trial does), tuner (how Tune is wired), rayinit (how Ray is started and sized),
collect (the results tables), ship (the run folder and the exported winner). This module and those import
no torch: the driver loads it only to export the winner.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xray_ray import results as R
from xray_ray.collect import collect, every_trial_failed, overhead, print_leaderboard
from xray_ray.config import SearchSpace, load_space
from xray_ray.errors import UserError
from xray_ray.pipeline import balanced_repeats, prepare, train_dataset
from xray_ray.rayinit import DATA_SLOT, RayOptions, check_local_resources, data_slot, init_ray, trial_slots
from xray_ray.robustness import SHIFTS, battery
from xray_ray.ship import RunFolder, check_run_name, export_best, open_run
from xray_ray.sources import load_source
from xray_ray.splits import assign_splits
from xray_ray.trial import Runtime
from xray_ray.tuner import TunerSettings, fit, restored, rungs, search_tuner, trial_trainable

# the defaults the generalisation ablation supports (docs/results.md)
DEFAULT_ENSEMBLE = 1
DEFAULT_THRESHOLD_RULE = "clean"


@dataclass(frozen=True)
class SearchOptions:
    """What a search is asked to do: the command line's flags, typed (defaults as the command line's)."""

    data: str = "synthetic"
    space: str = "search_spaces/smoke.yaml"
    results: str = "results"
    name: str | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    data_cpus: float = 0.0
    data_tasks: int = 1
    address: str | None = None
    num_cpus: int | None = None
    resume: bool = False
    seed: int | None = None
    max_failures: int = 1
    cache: str | None = None
    no_export: bool = False
    ensemble: int = DEFAULT_ENSEMBLE
    threshold_rule: str = DEFAULT_THRESHOLD_RULE
    tensorboard: bool = False
    export_only: bool = False
    allow_local_results: bool = False
    argv: tuple[str, ...] | None = None  # the command's arguments, for the resume command (None: sys.argv's)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: Sequence[str]) -> SearchOptions:
        """The options of build_parser()'s parsed arguments."""
        names = {f.name for f in fields(cls)} - {"argv"}
        return cls(**{k: v for k, v in vars(args).items() if k in names}, argv=tuple(argv))

    @property
    def ray(self) -> RayOptions:
        return RayOptions(
            address=self.address,
            num_cpus=self.num_cpus,
            cpus_per_trial=self.cpus_per_trial,
            gpus_per_trial=self.gpus_per_trial,
            data_tasks=self.data_tasks,
        )


@dataclass
class RunData:
    """The data every trial reads: the source's manifest, its splits, each image size prepared once."""

    manifest: Any
    split_info: dict[str, Any]
    prepared: dict[int, Any]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xray_ray.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic", help="folder (Kaggle layout), .npz, 'synthetic[:N]', or a URI")
    p.add_argument("--space", default="search_spaces/smoke.yaml", help="search-space YAML file")
    p.add_argument("--results", default="results", help="results root: local path or URI (s3://, gs://, file://)")
    p.add_argument("--name", default=None, help="run name (default: the space's name)")
    p.add_argument("--num-samples", type=int, default=None, help="trials to run (default: the space's)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what resources allow)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.5")
    p.add_argument(
        "--data-cpus",
        type=float,
        default=0.0,
        help="CPUs each augmentation task reserves (0: never starved by trials holding every CPU)",
    )
    p.add_argument(
        "--data-tasks",
        type=int,
        default=1,
        help="augmentation tasks each trial keeps in flight (more on a cluster with CPU workers)",
    )
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. 'auto' or host:port)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its storage")
    p.add_argument("--seed", type=int, default=None, help="fixes splits, augmentation and the searcher")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial from its checkpoint")
    p.add_argument("--cache", default=None, help="pixel cache folder (default: ~/.cache/xray_ray)")
    p.add_argument("--no-export", action="store_true", help="skip evaluating and exporting the winner")
    p.add_argument(
        "--ensemble",
        type=int,
        default=DEFAULT_ENSEMBLE,
        help="ship a greedy ensemble chosen in this many rounds among the best trials (1: the single "
        "winner); works with --resume --export-only too",
    )
    p.add_argument(
        "--threshold-rule",
        choices=("clean", "shifted"),
        default=DEFAULT_THRESHOLD_RULE,
        help="meet the target sensitivity on clean validation, or on clean and shifted validation pooled",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files per trial (loads torch into the driver: ~300 MB)",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="with --resume: run no more trials; write the tables and export the best trial so far",
    )
    p.add_argument(
        "--allow-local-results",
        action="store_true",
        help="accept a local path or file:// URI as results on a multi-node cluster (only for a "
        "mount shared by every node, such as NFS)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = SearchOptions.from_args(build_parser().parse_args(argv), argv)
    try:
        run(opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if getattr(e, "run_started", False):  # set by run() once the run can be resumed
            print(f"\ninterrupted. Resume with: {resume_command(opts)}", file=sys.stderr)
        else:
            print(
                "\ninterrupted before the search started; nothing to resume, run the same command again.",
                file=sys.stderr,
            )
        return 130
    return 0


def resume_command(opts: SearchOptions) -> str:
    """The command line that continues this run, quoted for a POSIX shell."""
    argv = [a for a in (sys.argv[1:] if opts.argv is None else opts.argv) if a != "--resume"]
    return shlex.join(["python", "-m", "xray_ray.search", *argv, "--resume"])


# (flag's option, the rule its value must meet, the rule in words); None is a flag left at its default
FLAG_RULES = (
    ("cpus_per_trial", lambda v: v > 0, "positive"),
    ("gpus_per_trial", lambda v: v >= 0, "0 or more"),
    ("data_tasks", lambda v: v >= 1, "at least 1"),
    ("data_cpus", lambda v: v >= 0, "0 or more"),
    ("num_samples", lambda v: v >= 1, "at least 1"),
    ("max_concurrent", lambda v: v >= 1, "at least 1"),
    ("max_failures", lambda v: v >= 0, "0 or more"),
    ("seed", lambda v: v >= 0, "0 or more"),
)


def check_flags(opts: SearchOptions, space: SearchSpace) -> None:
    """Refuse flag values no search can use, in one sentence naming the flag."""
    for attr, ok, rule in FLAG_RULES:
        value = getattr(opts, attr)
        if value is not None and not ok(value):
            raise UserError(f"--{attr.replace('_', '-')} must be {rule}, got {value}.")
    if not 1 <= opts.ensemble <= 32:
        raise UserError(f"--ensemble must be between 1 and 32 (selection rounds), got {opts.ensemble}.")


def run(opts: SearchOptions) -> str:
    """Run (or resume) a search; returns the run folder.

    A KeyboardInterrupt leaves with ``run_started`` set on it: whether the run can be resumed.
    """
    space = load_space(opts.space)
    check_flags(opts, space)
    check_local_resources(opts.ray)
    space = replace(
        space, num_samples=opts.num_samples or space.num_samples, seed=space.seed if opts.seed is None else opts.seed
    )
    name = check_run_name(opts.name or space.name, "--name" if opts.name else f"the space file {opts.space}")
    folder = open_run(
        opts.results,
        name,
        data=opts.data,
        space=space,
        resume=opts.resume,
        export_only=opts.export_only,
        export=not opts.no_export,
    )
    try:
        return search(opts, space, folder)
    except KeyboardInterrupt as e:
        e.run_started = folder.started  # what main() tells the user after a Ctrl-C
        raise


def load_data(opts: SearchOptions, space: SearchSpace) -> RunData:
    """Read the source, split it by patient, prepare each image size once (or find it in the cache)."""
    print(f"[xray_ray] loading data from {opts.data} ...", flush=True)
    manifest = load_source(opts.data, seed=space.seed)
    df, split_info = assign_splits(
        manifest.df, seed=space.seed, val_fraction=space.val_fraction, test_fraction=space.test_fraction
    )
    print_data_problems(manifest, split_info)
    prepared = {s: prepare(df, s, opts.cache) for s in space.image_sizes}
    for s, p in prepared.items():
        counts = {k: len(v) for k, v in p.splits.items()}
        how = "cache hit" if p.cache_hit else "prepared"
        print(f"[xray_ray] {s}px: {how} in {p.seconds:.1f}s {counts}", flush=True)
    for need in ("train", "val"):
        if need not in next(iter(prepared.values())).splits:
            raise UserError(f"the data has no '{need}' images after splitting; add more images per class.")
    return RunData(manifest=manifest, split_info=split_info, prepared=prepared)


def run_info_of(
    opts: SearchOptions, space: SearchSpace, folder: RunFolder, started: str, loaded: RunData
) -> dict[str, Any]:
    """run.json's facts known before the search: what was asked, of which data, with what resources."""
    manifest = loaded.manifest
    return {
        "name": folder.name,
        "started": started,
        "command": R.command_line(),
        "seed": space.seed,
        "space": space.to_dict(),
        "space_file": str(opts.space),
        "data": {
            "spec": opts.data,
            "source": manifest.info,
            "skipped": int(len(manifest.skipped)),
            "skipped_files": manifest.skipped.head(MAX_LISTED_SKIPS).to_dict(orient="records"),
            "splits": loaded.split_info,
            "image_sizes": space.image_sizes,
        },
        "resources": {
            "cpus_per_trial": opts.cpus_per_trial,
            "gpus_per_trial": opts.gpus_per_trial,
            "data_cpus": opts.data_cpus,
            "data_tasks": opts.data_tasks,
            "address": opts.address,
        },
        "export": {"ensemble": opts.ensemble, "threshold_rule": opts.threshold_rule},
        "versions": R.versions(),
        "git_commit": R.git_commit(),
    }


def search(opts: SearchOptions, space: SearchSpace, folder: RunFolder) -> str:
    """Load the data, start Ray, run the search on it, and shut Ray down whatever happens."""
    previous = folder.previous
    started = datetime.now(timezone.utc).isoformat(timespec="seconds") if previous is None else previous["started"]
    t_start = time.time()
    loaded = load_data(opts, space)
    run_info = run_info_of(opts, space, folder, started, loaded)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    init_ray(opts.ray)
    try:
        return search_on_ray(opts, space, folder, loaded, run_info, t_start)
    finally:
        ray.shutdown()


def check_results_shared(opts: SearchOptions) -> None:
    """Refuse a node-local results path on a multi-node cluster (unless --allow-local-results)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and R.node_local(opts.results) and not opts.allow_local_results:
        raise UserError(
            f"this cluster has {len(nodes)} nodes but --results {opts.results} is a node-local "
            f"path; use shared storage such as s3://bucket/path (or --allow-local-results for an "
            f"NFS mount present on every node)."
        )


def search_on_ray(
    opts: SearchOptions,
    space: SearchSpace,
    folder: RunFolder,
    loaded: RunData,
    run_info: dict[str, Any],
    t_start: float,
) -> str:
    """Accept the cluster, write run.json, run (or resume) the Tuner, write the tables, then finish."""
    import ray

    run_dir = folder.path
    slot = None if opts.ray.joined else data_slot()
    run_info["resources"]["augment_slots"] = int(ray.cluster_resources()[DATA_SLOT]) if slot else None
    concurrent = trial_slots(opts.ray, opts.max_concurrent or space.max_concurrent, space.num_samples)
    check_results_shared(opts)
    # written only once the cluster is accepted: a refused run leaves no run.json that would make the
    # corrected command ask for --resume
    R.write_json({**run_info, "status": "running"}, R.join(run_dir, "run.json"))
    folder.started = True  # from here on an interrupted run can be resumed
    train_labels = next(iter(loaded.prepared.values())).splits["train"].labels
    runtime = Runtime(
        cpus_per_trial=opts.cpus_per_trial,
        gpus_per_trial=opts.gpus_per_trial,
        data_cpus=opts.data_cpus,
        data_tasks=opts.data_tasks,
        metric=space.metric,
        mode=space.mode,
        pos_fraction=float(np.mean(train_labels)) if len(train_labels) else 0.5,
        data_slot=slot,
        score_epochs=rungs(space),
        fault_dir=None if R.is_uri(run_dir) else str(Path(run_dir) / "tune" / ".faults"),
    )
    data = trial_data(loaded.prepared, space.seed)
    ray.data.DataContext.get_current().enable_progress_bars = False
    fn = trial_trainable(data, runtime, {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    tune_dir = R.join(run_dir, "tune")
    tuner = restored(tune_dir, fn) if opts.resume else None
    if tuner is None:
        tuner = search_tuner(
            fn,
            space,
            TunerSettings(
                tune_dir=tune_dir, concurrent=concurrent, max_failures=opts.max_failures, tensorboard=opts.tensorboard
            ),
        )
    print(
        "[xray_ray] --export-only: no more trials; exporting the best so far"
        if opts.export_only
        else f"[xray_ray] searching: {space.num_samples} trials, {concurrent} at a time, "
        f"{space.searcher} + {space.scheduler} on {space.metric} ({space.mode}), "
        f"up to {space.max_epochs} epochs each",
        flush=True,
    )
    grid = fit(tuner, results_only=opts.export_only)
    trials, epochs = collect(grid, space)
    meta = {"run": folder.name, "space": space.to_dict(), "seed": space.seed, "versions": run_info["versions"]}
    R.write_parquet(trials, R.join(run_dir, "trials.parquet"), meta)
    R.write_parquet(epochs, R.join(run_dir, "epochs.parquet"), meta)
    outcome = Outcome(
        grid=grid, trials=trials, epochs=epochs, data=data, concurrent=concurrent, wall=time.time() - t_start
    )
    return finish(opts, space, folder, loaded, run_info, outcome)


@dataclass
class Outcome:
    """What the Tuner gave: its ResultGrid, the tables, and the run's trial data, concurrency and wall time."""

    grid: Any
    trials: pd.DataFrame
    epochs: pd.DataFrame
    data: dict[int, dict[str, Any]]
    concurrent: int
    wall: float


def finish(
    opts: SearchOptions, space: SearchSpace, folder: RunFolder, loaded: RunData, run_info: dict[str, Any], out: Outcome
) -> str:
    """Record how the run ended, print the leaderboard, export the winner; an unfinished run leaves as a
    KeyboardInterrupt (resumable), a run whose every trial failed as a UserError."""
    trials, epochs, run_dir = out.trials, out.epochs, folder.path
    # Tune catches Ctrl-C itself and returns early, leaving trials running or never started
    incomplete = bool(len(trials) < space.num_samples or trials["status"].isin(["running", "pending"]).any())
    unfinished = incomplete and not opts.export_only  # --export-only exports what there is, and says so
    wall_total = out.wall + (folder.previous or {}).get("wall_seconds", 0.0)  # summed over resumed parts
    run_info.update(
        {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "interrupted" if incomplete else "finished",
            "wall_seconds": wall_total,
            "concurrency": out.concurrent,
            "trial_epochs": int(len(epochs)),
            "overhead": overhead(epochs, wall_total, out.concurrent),
            "trials": trials["status"].value_counts().to_dict() if len(trials) else {},
        }
    )
    print_leaderboard(trials, space)
    run_json = R.join(run_dir, "run.json")
    if unfinished:
        R.write_json(run_info, run_json)
        raise KeyboardInterrupt  # main() prints the resume command and exits 130
    if not opts.no_export and trials["best_metric"].notna().any():
        card = export_best(
            out.grid,
            trials,
            epochs,
            loaded.prepared,
            run_info,
            run_dir,
            space,
            batteries={sz: d["shifted"] for sz, d in out.data.items()},
            ensemble=opts.ensemble,
            threshold_rule=opts.threshold_rule,
        )
        run_info["best"] = {"trial_id": card.get("trial_id"), "threshold": card.get("threshold", {}).get("value")}
    failure = every_trial_failed(trials)
    if failure:  # the tables and run.json still say what happened to each trial
        run_info.update(status="failed", error=failure)
    R.write_json(run_info, run_json)
    if failure:
        raise UserError(failure)
    print(f"[xray_ray] done in {out.wall:.0f}s; results in {run_dir}", flush=True)
    return run_dir


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


if __name__ == "__main__":
    sys.exit(main())
