"""How the tuner is wired: searcher, scheduler, the rungs it compares at, progress, loggers, the Tuner.

The one module that builds Ray Tune objects for the search (stability and ablation use its pieces too).
Ray is imported inside the functions: a command refused before the search starts never pays for it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from xray_ray import results as R
from xray_ray.common import env_set, write_bytes_fs
from xray_ray.config import encode_value
from xray_ray.errors import UserError
from xray_ray.search.spaces import SearchSpace
from xray_ray.search.trial import CHECKPOINT_FILES, Runtime


def trainable(config: dict[str, Any], data: dict[int, dict[str, Any]], runtime: Runtime) -> None:
    """One trial: build the CNN from Tune's config, train epoch by epoch, report + checkpoint each epoch."""
    from xray_ray.search import trial_loop  # the torch side: loaded in the trial worker only

    trial_loop.run_trial(config, data, runtime)


def build_searcher(space: SearchSpace, seed: int, study: tuple[Any, str] | None = None):
    """OptunaSearch (TPE, seeded) over the space's parameters, or seeded random search.

    `study`: (Optuna storage, study name) to keep the searcher's study in (``--optuna-storage``); in memory
    without it.

    A space of constants has nothing to search: its configuration is trained num_samples times, trial i
    with seed + i, so that the trials are replicas that differ in their trial seed only.
    """
    if not space.params:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        replicas = [{"seed": seed + i} for i in range(space.num_samples)]
        return BasicVariantGenerator(points_to_evaluate=replicas), {**tune_space(space), "seed": seed}
    if space.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed), {**tune_space(space), "seed": seed}
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    dists: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "categorical":
            dists[p.name] = optuna.distributions.CategoricalDistribution([encode_value(c) for c in p.choices])
        elif p.kind == "int":
            dists[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            dists[p.name] = optuna.distributions.FloatDistribution(float(p.low), float(p.high), log=p.log)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, space.num_samples // 3)))
    storage, study_name = study or (None, None)
    searcher = OptunaSearch(
        space=dists or None,
        metric=space.metric,
        mode=space.mode,
        sampler=sampler,
        storage=storage,
        study_name=study_name,
    )
    # the run's seed travels in every trial's config: trial_seed() hashes it with the hyperparameters
    return searcher, {**{k: encode_value(v) for k, v in space.constants.items()}, "seed": seed}


def tune_space(space: SearchSpace) -> dict[str, Any]:
    """The space as Tune distributions (for the random-search baseline)."""
    from ray import tune

    out: dict[str, Any] = {k: encode_value(v) for k, v in space.constants.items()}
    for p in space.params:
        if p.kind == "categorical":
            out[p.name] = tune.choice([encode_value(c) for c in p.choices])
        elif p.kind == "int":
            draw = tune.lograndint if p.log else tune.randint
            out[p.name] = draw(int(p.low), int(p.high) + 1)
        else:
            out[p.name] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    return out


def build_scheduler(space: SearchSpace):
    """ASHA on training iterations (epochs), or FIFO (every trial runs all its epochs)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=space.max_epochs,
        grace_period=space.grace_period,
        reduction_factor=space.reduction_factor,
    )


def rungs(space: SearchSpace) -> tuple[int, ...]:
    """The epochs at which ASHA compares trials (grace_period * reduction_factor**k below max_t)."""
    if space.scheduler != "asha":
        return ()
    out, t = [], space.grace_period
    while t < space.max_epochs:
        out.append(t)
        t *= space.reduction_factor
    return tuple(out)


class ProgressPrinter:
    """A Tune callback printing one line per reported epoch: the trial, its metric, the best so far."""

    def __new__(cls, metric: str, mode: str, total: int):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(self) -> None:
                self.best: tuple[float, str] | None = None
                self.done = 0

            def on_trial_result(self, iteration, trials, trial, result, **info):
                v = result.get(metric)
                if (
                    v is not None
                    and math.isfinite(v)
                    and (self.best is None or (v > self.best[0] if mode == "max" else v < self.best[0]))
                ):
                    self.best = (v, trial.trial_id)
                running = sum(t.status == "RUNNING" for t in trials)
                best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
                # a robustness metric is scored at ASHA's rungs and the last epoch only
                value = f"{v:.4f}" if v is not None and math.isfinite(v) else "not scored this epoch"
                print(
                    f"[xray_ray] trial {trial.trial_id} epoch {result.get('epoch')}/{result.get('epochs')} "
                    f"{metric}={value} | running {running}, finished {self.done}/{total}, best {metric} {best}",
                    flush=True,
                )

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1

            def on_trial_error(self, iteration, trials, trial, **info):
                self.done += 1
                print(f"[xray_ray] trial {trial.trial_id} errored; the search goes on", flush=True)

        return Progress()


def result_loggers(tensorboard: bool = False) -> list:
    """Tune's per-trial result.json and progress.csv, and TensorBoard files only when asked for.

    Tune adds a TensorBoard logger by default, and tensorboardX imports torch into a driver that
    otherwise never needs torch until the export. :func:`fit` turns Tune's default loggers off
    (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, for the fit only) and these are added instead.
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    loggers = [JsonLoggerCallback(), CSVLoggerCallback()]
    if tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        loggers.append(TBXLoggerCallback())
    return loggers


def trial_trainable(data: dict[int, dict[str, Any]], runtime: Runtime, resources: dict[str, float]) -> Callable:
    """:func:`trainable` bound to the trials' data and runtime, asking for `resources` per trial."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(trainable, data=data, runtime=runtime), resources)


# checkpoints the search keeps per trial (Tune deletes older ones as soon as a newer one is registered)
CHECKPOINTS_KEPT = 1


def restored(tune_dir: str, fn: Callable, *, checkpoints_kept: int | None = None):
    """The Tuner of an interrupted experiment in `tune_dir`, continuing unfinished and errored trials; else None.

    `checkpoints_kept`: the experiment's CheckpointConfig.num_to_keep, when it has one (see forget_lost_checkpoints).
    """
    from ray import tune

    damaged, whole = set_aside_damaged_states(tune_dir)
    if damaged and whole is None:
        raise UserError(
            f"the experiment state in {tune_dir} is damaged and no earlier one is whole, so the run cannot "
            "be resumed; start it again under another --name (its tables and run.json are kept)."
        )
    if damaged:
        print(
            f"[xray_ray] the newest experiment state was damaged ({', '.join(damaged)}: cut short by the "
            f"interruption); set aside as damaged-*, resuming from {whole}",
            flush=True,
        )
    path, fs = tune_storage(tune_dir)
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        return None
    print(f"[xray_ray] resuming {tune_dir}", flush=True)
    lost = forget_lost_checkpoints(tune_dir, checkpoints_kept) if checkpoints_kept else []
    if lost:
        print(
            f"[xray_ray] the interruption left {len(lost)} trial(s) naming a checkpoint that is gone or not whole "
            f"(already replaced, or cut short while it was deleted: {', '.join(lost)}); they train again from their "
            "first epoch",
            flush=True,
        )
    return tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)


def tune_storage(tune_dir: str) -> tuple[str, Any]:
    """Tune's (path, filesystem) for an experiment folder: remote storage through R.resolve's patient
    filesystem (an outage makes the driver's syncing and the trials' checkpoint uploads wait), node-local
    storage as it is (filesystem None: Tune resolves it)."""
    if R.node_local(tune_dir):
        return tune_dir, None
    fs, path = R.resolve(tune_dir)
    return path, fs


STATE_PATTERN = "experiment_state-*.json"  # Tune's CKPT_FILE_TMPL: one file a session, named by its start


def set_aside_damaged_states(tune_dir: str) -> tuple[list[str], str | None]:
    """Rename the newest experiment states that do not parse, newest first, until one does.

    Returns (the names set aside, the name of the newest whole state or None). Tune restores from the newest
    ``experiment_state-<session>.json``, which it rewrites in place (a plain open-and-write) every few
    seconds: a kill during that write leaves it cut short, and Tune's restore then fails on it. The
    session's other files (searcher and callback states) go with it, so Tune restores a coherent earlier
    session; trials that session had not finished train on from their checkpoints.
    """
    fs, folder = R.resolve(tune_dir)
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return [], None
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(folder)) if i.type == pafs.FileType.File]
    damaged = []
    for state in sorted(fnmatch.filter(names, STATE_PATTERN), reverse=True):
        try:
            with fs.open_input_stream(f"{folder}/{state}") as f:
                json.loads(f.read())
            return damaged, state
        except ValueError:
            session = state[len("experiment_state-") : -len(".json")]
            for name in names:
                if name.rsplit(".", 1)[0].endswith(f"-{session}"):
                    fs.move(f"{folder}/{name}", f"{folder}/damaged-{name}")
            damaged.append(state)
    return damaged, None


def checkpoint_whole(fs: pafs.FileSystem, path: str) -> bool:
    """Whether the trial checkpoint folder `path` holds every file a trial writes (CHECKPOINT_FILES)."""
    listed = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return set(CHECKPOINT_FILES) <= {i.base_name for i in listed if i.type == pafs.FileType.File}


def named_checkpoints(meta: dict) -> list[str]:
    """The checkpoint folders (checkpoint_NNNNNN) a trial's saved run metadata names, from Tune's experiment state.
    Its checkpoint record is pickled: the bytes are only searched for the names, never unpickled."""
    value = bytes.fromhex((meta.get("checkpoint_manager") or {}).get("value", ""))
    return [n.decode() for n in re.findall(rb"checkpoint_\d{6}", value)]


def forget_lost_checkpoints(tune_dir: str, checkpoints_kept: int) -> list[str]:
    """Rewrite Tune's saved experiment state so that an unfinished trial whose checkpoint is not whole starts again.

    With num_to_keep set, Tune deletes a trial's older checkpoint as soon as a newer one is registered, but
    writes its experiment state only every few seconds (and syncs it to remote storage less often). A kill in
    between leaves a state that names a deleted checkpoint, and Tune would error that trial when it restores
    it ("Could not recover from checkpoint"). A kill while the folder is being deleted leaves it there without
    some of its files (on S3 the folder's marker goes last), and the restored trial then errors on the missing
    state.pt. Such a trial gets an empty checkpoint record instead, so Tune trains it again from its first
    epoch; the tables keep the last row of each epoch. The state is read as JSON and its pickled parts only
    searched for checkpoint names, never unpickled. Returns the changed ids.
    """
    from ray import tune
    from ray.tune.experiment import Trial

    fs, folder = R.resolve(tune_dir)
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(folder)) if i.type == pafs.FileType.File]
    states = fnmatch.filter(names, STATE_PATTERN)
    if not states:
        return []
    state = f"{folder}/{max(states)}"  # the one Tune restores from
    try:
        with fs.open_input_stream(state) as f:
            doc, lost = json.loads(f.read()), []
    except ValueError:  # not whole: Tune's own restore says so
        return []

    empty = Trial("trainable", stub=True, checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_kept))
    fresh = json.loads(empty.run_metadata.get_json_state())["checkpoint_manager"]
    for pair in doc.get("trial_data", []):
        trial, meta = json.loads(pair[0]), json.loads(pair[1])
        where = f"{folder}/{trial['relative_logdir']}"
        named = named_checkpoints(meta)
        if trial["status"] != "TERMINATED" and not all(checkpoint_whole(fs, f"{where}/{n}") for n in named):
            meta["checkpoint_manager"] = fresh
            pair[1] = json.dumps(meta, indent=2)
            lost.append(trial["trial_id"])
    if lost:
        write_bytes_fs(fs, state, json.dumps(doc, indent=2).encode())
    return lost


@dataclass(frozen=True)
class TunerSettings:
    """What a new search's Tuner needs besides its space."""

    tune_dir: str  # where Tune keeps the experiment (its last component is the experiment's name)
    concurrent: int
    max_failures: int
    tensorboard: bool = False
    callbacks: tuple = ()  # more Tune callbacks (the trackers': search.trackers)
    study: tuple[Any, str] | None = None  # (Optuna storage, study name) of --optuna-storage


def search_tuner(fn: Callable, space: SearchSpace, settings: TunerSettings):
    """A new Tuner for the search: the space's searcher and scheduler, progress lines, one kept checkpoint."""
    from ray import tune

    experiment, fs = tune_storage(settings.tune_dir)
    storage, exp_name = experiment.rsplit("/", 1)
    searcher, param_space = build_searcher(space, space.seed, settings.study)
    return tune.Tuner(
        fn,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=build_scheduler(space),
            num_samples=space.num_samples,
            max_concurrent_trials=settings.concurrent,
            # a finished or stopped trial hands its worker process, torch
            # already imported, to the next trial. A stopped trial waits in
            # its last report (Tune does not ask for the next result), so
            # the reset that reuse needs never waits for an epoch.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=exp_name,
            storage_path=storage,
            storage_filesystem=fs,
            verbose=0,
            callbacks=[
                ProgressPrinter(space.metric, space.mode, space.num_samples),
                *result_loggers(settings.tensorboard),
                *settings.callbacks,
            ],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        ),
    )


def fit(tuner, results_only: bool = False):
    """Run the Tuner (or, with `results_only`, read what it has) with only result_loggers()'s loggers."""
    with env_set(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
        return tuner.get_results() if results_only else tuner.fit()
