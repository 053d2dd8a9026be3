"""The search's command line and its orchestration: Ray Tune + Optuna (TPE) + ASHA over the CNN family.

    python -m xray_ray.search --data synthetic --space search_spaces/smoke.yaml

Flow: data source -> patient-grouped splits -> prepare once per image size -> Ray Data train datasets ->
Tuner(OptunaSearch, ASHAScheduler) -> trials.parquet / epochs.parquet / run.json -> best/ (winner.finalize).
The pieces: trial (what one trial does), tuner (how Tune is wired), rayinit (how Ray is started and sized),
collect (the results tables), ship (the run folder and the exported winner), search_args (the flags),
search_data (the data every trial reads). This module and those import no torch: the driver loads it only
to export the winner.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xray_ray import faults
from xray_ray import results as R
from xray_ray.errors import UserError
from xray_ray.search.args import check_flags, options_of, parser_of
from xray_ray.search.ray_setup import DATA_SLOT, RayOptions, check_local_resources, data_slot, ray_session, trial_slots
from xray_ray.search.run_data import MAX_LISTED_SKIPS, RunData, load_data, trial_data
from xray_ray.search.run_folder import RunFolder, check_run_name, open_run
from xray_ray.search.spaces import SearchSpace, load_space
from xray_ray.search.tables import collect, every_trial_failed, overhead, print_leaderboard
from xray_ray.search.trial import Runtime
from xray_ray.search.tuner import CHECKPOINTS_KEPT, TunerSettings, fit, restored, rungs, search_tuner, trial_trainable
from xray_ray.ship.best import export_best

# the defaults the generalisation ablation supports (docs/results.md, "The defaults and why"): three greedy
# rounds over the best trials (a member joins only while it helps on validation); the card's threshold from
# the clean validation scores. The default selection metric is spaces.DEFAULT_METRIC.
DEFAULT_ENSEMBLE = 3
DEFAULT_THRESHOLD_RULE = "clean"


@dataclass(frozen=True)
class SearchOptions:
    """What a search is asked to do: the command line's flags, typed (defaults as the command line's)."""

    data: str = "synthetic"
    space: str = "search_spaces/smoke.yaml"
    labels: str | None = None  # None: the space's data.labels
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
    mlflow: str | None = None
    optuna_storage: str | None = None
    argv: tuple[str, ...] | None = None  # the command's arguments, for the resume command (None: sys.argv's)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: Sequence[str]) -> SearchOptions:
        """The options of build_parser()'s parsed arguments."""
        return options_of(cls, args, argv)

    @property
    def ray(self) -> RayOptions:
        return RayOptions(
            address=self.address,
            num_cpus=self.num_cpus,
            cpus_per_trial=self.cpus_per_trial,
            gpus_per_trial=self.gpus_per_trial,
            data_tasks=self.data_tasks,
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser, with this module's DEFAULT_ENSEMBLE and DEFAULT_THRESHOLD_RULE."""
    return parser_of(__doc__.split("\n\n")[0], ensemble=DEFAULT_ENSEMBLE, threshold_rule=DEFAULT_THRESHOLD_RULE)


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


def log_winner_to_mlflow(uri: str, folder: RunFolder, card: dict[str, Any]) -> None:
    from xray_ray.search.trackers import log_winner

    if R.is_uri(folder.path):
        print("[xray_ray] mlflow: the model stays in the results storage (no local folder to upload)", flush=True)
        return
    run_id = log_winner(uri, folder.name, card, Path(folder.path) / "best")
    print(f"[xray_ray] mlflow: the exported model and its figures are on run {run_id}", flush=True)


def resume_command(opts: SearchOptions) -> str:
    """The command line that continues this run, quoted for a POSIX shell."""
    argv = [a for a in (sys.argv[1:] if opts.argv is None else opts.argv) if a != "--resume"]
    return shlex.join(["python", "-m", "xray_ray.search", *argv, "--resume"])


def run(opts: SearchOptions) -> str:
    """Run (or resume) a search; returns the run folder.

    A KeyboardInterrupt leaves with ``run_started`` set on it: whether the run can be resumed.
    """
    space = load_space(opts.space)
    check_flags(opts, space)
    if opts.mlflow or opts.optuna_storage:  # imported only then: MLflow is an extra
        from xray_ray.search.trackers import check_trackers

        check_trackers(opts.mlflow, opts.optuna_storage, space)
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
            "classes": list(loaded.classes),
            "labels": opts.labels or space.labels,
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
    """Load the data, start Ray (or use the one this process runs), run the search on it, shut down what it started."""
    previous = folder.previous
    started = datetime.now(timezone.utc).isoformat(timespec="seconds") if previous is None else previous["started"]
    t_start = time.time()
    loaded = load_data(opts, space)
    run_info = run_info_of(opts, space, folder, started, loaded)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with ray_session(opts.ray):
        return search_on_ray(opts, space, folder, loaded, run_info, t_start)


def check_results_shared(opts: SearchOptions) -> None:
    """Refuse a node-local results path on a multi-node cluster (unless --allow-local-results)."""
    import ray

    problem = node_local_refusal(opts.results, sum(1 for n in ray.nodes() if n.get("Alive")), opts.allow_local_results)
    if problem:
        raise UserError(problem)


def node_local_refusal(results: str, nodes: int, allow_local: bool) -> str | None:
    """Why `results` cannot hold a run on a cluster of `nodes` live nodes (one sentence); None when it can."""
    if nodes > 1 and R.node_local(results) and not allow_local:
        return (
            f"this cluster has {nodes} nodes but --results {results} is a node-local "
            f"path; use shared storage such as s3://bucket/path (or --allow-local-results for an "
            f"NFS mount present on every node)."
        )
    return None


# the options a trial's Runtime takes as they are
TRIAL_RESOURCES = ("cpus_per_trial", "gpus_per_trial", "data_cpus", "data_tasks")


def runtime_of(opts: SearchOptions, space: SearchSpace, loaded: RunData, slot: Any, run_dir: str) -> Runtime:
    """What every trial is given: its resources, the metric, the positive fraction of train, the rungs."""
    train_labels = next(iter(loaded.prepared.values())).splits["train"].labels
    n_classes = len(loaded.classes)
    return Runtime(
        **{k: getattr(opts, k) for k in TRIAL_RESOURCES},
        metric=space.metric,
        mode=space.mode,
        pos_fraction=float(np.mean(train_labels)) if len(train_labels) else 0.5,
        classes=tuple(loaded.classes),
        class_fractions=tuple(float(np.mean(train_labels == c)) for c in range(n_classes)) if len(train_labels) else (),
        data_slot=slot,
        score_epochs=rungs(space),
        fault_dir=None if R.is_uri(run_dir) else str(Path(run_dir) / "tune" / ".faults"),
        faults=faults.spec(),
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
    runtime = runtime_of(opts, space, loaded, slot, run_dir)
    data = trial_data(loaded.prepared, space.seed)
    ray.data.DataContext.get_current().enable_progress_bars = False
    fn = trial_trainable(data, runtime, {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    tune_dir = R.join(run_dir, "tune")
    tuner = restored(tune_dir, fn, checkpoints_kept=CHECKPOINTS_KEPT) if opts.resume else None
    if tuner is None:
        tuner = search_tuner(fn, space, tuner_settings(opts, folder, tune_dir, concurrent))
    print(
        "[xray_ray] --export-only: no more trials; exporting the best so far"
        if opts.export_only
        else f"[xray_ray] searching: {space.num_samples} trials, {concurrent} at a time, "
        f"{space.searcher} + {space.scheduler} on {space.metric} ({space.mode}), "
        f"up to {space.max_epochs} epochs each",
        flush=True,
    )
    if not opts.export_only:  # what a kill -9, a lost head or a lost machine leaves to run (docs/cluster.md)
        print(f"[xray_ray] if this search stops before its end, continue it with: {resume_command(opts)}", flush=True)
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


def tuner_settings(opts: SearchOptions, folder: RunFolder, tune_dir: str, concurrent: int) -> TunerSettings:
    """A new search's Tuner settings, with the trackers' callback and study when their flags are given."""
    callbacks, study = (), None
    if opts.mlflow or opts.optuna_storage:
        from xray_ray.search import trackers

        callbacks = trackers.mlflow_callbacks(opts.mlflow, folder.name, folder.path)
        study = (trackers.optuna_storage(opts.optuna_storage), folder.name) if opts.optuna_storage else None
    return TunerSettings(
        tune_dir=tune_dir,
        concurrent=concurrent,
        max_failures=opts.max_failures,
        tensorboard=opts.tensorboard,
        callbacks=callbacks,
        study=study,
    )


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
            space.metric,
            space.mode,
            batteries={sz: d["shifted"] for sz, d in out.data.items()},
            ensemble=opts.ensemble,
            threshold_rule=opts.threshold_rule,
        )
        threshold = (card.get("threshold") or {}).get("value")  # none for K > 2 classes (arg-max)
        run_info["best"] = {"trial_id": card.get("trial_id"), "threshold": threshold}
        if opts.mlflow:
            log_winner_to_mlflow(opts.mlflow, folder, card)
    failure = every_trial_failed(trials)
    if failure:  # the tables and run.json still say what happened to each trial
        run_info.update(status="failed", error=failure)
    R.write_json(run_info, run_json)
    if failure:
        raise UserError(failure)
    errored = int((trials["status"] == "errored").sum()) if len(trials) else 0
    if errored:  # a fault beyond --max-failures (a storage outage longer than its patience, a lost node)
        print(
            f"[xray_ray] {errored} of {len(trials)} trials errored (each has an error.txt under "
            f"{R.join(run_dir, 'tune')}); "
            f"to train them on from their last checkpoints run: {resume_command(opts)}",
            flush=True,
        )
    print(f"[xray_ray] done in {out.wall:.0f}s; results in {run_dir}", flush=True)
    return run_dir
