"""The search: Ray Tune + Optuna (TPE) + ASHA over the CNN family. The only module that talks to Ray Tune.

    python -m xray_ray.search --data synthetic --space search_spaces/smoke.yaml

Flow: data source -> patient-grouped splits -> prepare once per image size -> Ray Data train datasets ->
Tuner(OptunaSearch, ASHAScheduler) -> trials.parquet / epochs.parquet / run.json -> best/ (winner.finalize).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from xray_ray import faults
from xray_ray import results as R
from xray_ray.config import CNNConfig, SearchSpace, TrialConfig, load_space
from xray_ray.errors import UserError
from xray_ray.faults import inject_fault
from xray_ray.robustness import COMPOSITES, SHIFTS

_TRIAL_FIELDS = set(TrialConfig.field_names())


@dataclass
class Runtime:
    """Per-trial settings that are not hyperparameters."""

    cpus_per_trial: float
    gpus_per_trial: float
    data_cpus: float
    data_tasks: int
    metric: str
    mode: str
    pos_fraction: float
    prefetch: bool = True  # start each next epoch's Ray Data stream while the current one validates
    data_slot: str | None = None  # custom resource capping augmentation tasks across trials (local runs)
    score_epochs: tuple[int, ...] = ()  # epochs scored on the shift battery besides each trial's last (ASHA's rungs)
    fault_dir: str | None = None  # where the tests' fault hook keeps its markers (xray_ray.faults): the run's own


# --------------------------------------------------------------------------- the trainable

def trainable(config: dict[str, Any], data: dict[int, dict[str, Any]], runtime: Runtime) -> None:
    """One trial: build the CNN from Tune's config, train epoch by epoch, report + checkpoint each epoch."""
    import ray
    import ray.data
    import torch
    from ray import tune
    from safetensors.torch import save_file

    from xray_ray import metrics as M
    from xray_ray.augment import strengths_of
    from xray_ray.models import build_model, config_from_dict
    from xray_ray.pipeline import Prefetch, epoch_batches, node_code, rows_for
    from xray_ray.robustness import score as shift_score
    from xray_ray.train import (array_batches, make_ema, make_loss, make_optimizer, make_scheduler, make_swa,
                                predict_probs, train_one_epoch)

    release_freed_memory()  # a reused worker: the previous trial's garbage goes before this one allocates
    cfg = TrialConfig.from_dict(decode_config(config))
    torch.set_num_threads(max(1, int(round(runtime.cpus_per_trial))))
    ray.data.DataContext.get_current().enable_progress_bars = False
    seed = trial_seed(cfg)
    torch.manual_seed(seed)
    device = torch.device("cuda" if runtime.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")

    d = data[cfg.image_size]
    train_ds, val = d["train"], d["val"]
    n_train = d["n_train"]
    steps = max(1, math.ceil(n_train / cfg.batch_size))
    model = build_model(**model_sizes(cfg)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    device_name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    ema = make_ema(model, cfg.ema)
    swa = make_swa(model, cfg.swa)
    swa_from = cfg.epochs - max(1, math.ceil(cfg.swa * cfg.epochs)) + 1 if swa is not None else cfg.epochs + 1
    loss_fn = make_loss(cfg, runtime.pos_fraction)
    eval_loss = make_loss(cfg.replace(label_smoothing=0.0, class_weighting="none"), runtime.pos_fraction)
    better = (lambda a, b: a > b) if runtime.mode == "max" else (lambda a, b: a < b)

    start_epoch, best, best_epoch, best_state = 1, None, 0, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a restarted trial continues where its last checkpoint left it
        with ckpt.as_directory() as cdir:
            state = torch.load(Path(cdir) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if swa is not None and "swa" in state:
            swa.load_state_dict(state["swa"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        best_state = state["best_model"]

    node_id = ray.get_runtime_context().get_node_id()
    codes = {node_code(n["NodeID"]): n["NodeID"] for n in ray.nodes()}
    data_nodes: set[str] = set()
    strengths = strengths_of(cfg.to_dict())
    repeats = d.get("repeats") if cfg.sampler == "balanced" else None
    shifted = d.get("shifted")
    rows = rows_for(cfg.image_size)

    def stream(epoch: int):  # an epoch's augmented batches, started in the background
        def make():
            return epoch_batches(train_ds, strengths=strengths, seed=seed, epoch=epoch, batch_size=cfg.batch_size,
                                 data_cpus=runtime.data_cpus, data_tasks=runtime.data_tasks,
                                 data_slot=runtime.data_slot, repeats=repeats)
        return Prefetch(make) if runtime.prefetch else make()

    upcoming = stream(start_epoch) if start_epoch <= cfg.epochs else None
    for epoch in range(start_epoch, cfg.epochs + 1):
        inject_fault(epoch, runtime.fault_dir)
        t0 = time.perf_counter()
        batches, upcoming = upcoming, None
        seen_nodes: set[int] = set()
        stats = train_one_epoch(model, batches, optimizer, loss_fn=loss_fn, device=device, scheduler=scheduler,
                                ema=ema, on_batch=lambda b: seen_nodes.update(b["node"].unique().tolist()),
                                mixup=cfg.mixup, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        if swa is not None and epoch >= swa_from:
            swa.update_parameters(model)
        data_nodes.update(codes.get(c, str(c)) for c in seen_nodes)
        if epoch < cfg.epochs:  # the next epoch's stream starts up while this one validates and reports
            upcoming = stream(epoch + 1)
        t1 = time.perf_counter()
        net = ema.module if ema is not None else swa.module if swa is not None and epoch >= swa_from else model
        y, p = predict_probs(net, array_batches(val.images, val.labels, rows), device=device)
        with torch.no_grad():
            logit = torch.logit(torch.from_numpy(p).clamp(1e-6, 1 - 1e-6))
            val_loss = float(eval_loss(logit, torch.from_numpy(y)))
        auc = M.roc_auc(y, p)
        brier = float(np.mean((p - y) ** 2))
        val_metrics = {"val_auc": auc, "val_loss": val_loss, "val_acc": float(np.mean((p >= 0.5) == y)),
                       "val_brier": brier, "val_score": auc - brier}
        t_rob = time.perf_counter()
        val_metrics.update(UNSCORED)  # every row carries the same columns (Tune's CSV keeps the first row's)
        if shifted is not None and (epoch == cfg.epochs or epoch in runtime.score_epochs):
            val_metrics.update(shift_score(
                lambda im: predict_probs(net, array_batches(im, np.zeros(len(im), np.int64), rows), device=device)[1],
                shifted))
        t2 = time.perf_counter()
        current = val_metrics.get(runtime.metric, float("nan"))
        # epochs not scored on the battery have no robustness metric (NaN): a finite value always beats it
        if best is None or (math.isfinite(current) and (not math.isfinite(best) or better(current, best))):
            best, best_epoch = current, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k != "n_averaged"}
        row = {
            "epoch": epoch, "train_loss": stats["train_loss"], **val_metrics,
            "lr": optimizer.param_groups[0]["lr"], "seconds": t2 - t0, "step_seconds": stats["step_seconds"],
            "eval_seconds": t2 - t1, "rob_seconds": t2 - t_rob, "images": stats["images"], "images_per_s": stats["images_per_s"],
            "node_id": node_id, "data_nodes": ",".join(sorted(data_nodes)), "device": device_name,
            "best_metric": best, "best_epoch": best_epoch, "epochs": cfg.epochs, "ended_at": time.time(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), **({"ema": ema.state_dict()} if ema is not None else {}),
                        **({"swa": swa.state_dict()} if swa is not None else {}),
                        "epoch": epoch, "best": best, "best_epoch": best_epoch, "best_model": best_state},
                       Path(tmp) / "state.pt")
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(Path(tmp) / "best.safetensors"))
            (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict()))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(tmp))


# the robustness columns of an epoch that was not scored on the battery
UNSCORED: dict[str, Any] = {**{f"shift_{m}__{n}": float("nan") for n in SHIFTS for m in ("auc", "loss")},
                            **{c: float("nan") for c in COMPOSITES}, "rob_worst_shift": ""}


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc keeps them otherwise).

    Trial workers are reused (``reuse_actors``); without this a worker's resident memory creeps up from
    trial to trial.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def model_sizes(cfg: TrialConfig) -> dict[str, Any]:
    """The CNNConfig sizes of a trial (build_model(**model_sizes(cfg)))."""
    names = CNNConfig.field_names()
    return {k: v for k, v in cfg.to_dict().items() if k in names and k != "in_channels"}


# settings added after the first release: left out of the seed's hash while at their default, so that a
# configuration that does not use them draws exactly what it drew before they existed
_LATER_SETTINGS = ("standardize", "swa", "sampler", "mixup", "crop", "erase")


def trial_seed(cfg: TrialConfig) -> int:
    """A seed fixed by the run's seed and the trial's own hyperparameters."""
    d, default = cfg.to_dict(), TrialConfig.defaults()
    for k in _LATER_SETTINGS:
        if d[k] == default[k]:
            del d[k]
    return zlib.crc32(json.dumps(d, sort_keys=True).encode()) % (2**31)


def encode_value(v: Any) -> Any:
    """Optuna's categoricals hold scalars only: lists (fc layer sizes) travel as JSON strings."""
    return json.dumps(list(v)) if isinstance(v, (list, tuple)) else v


def decode_config(config: dict[str, Any]) -> dict[str, Any]:
    """The trial settings of Tune's config (TrialConfig reads fc back from its JSON string itself)."""
    return {k: v for k, v in config.items() if k in _TRIAL_FIELDS}


# --------------------------------------------------------------------------- Tune wiring

def build_searcher(space: SearchSpace, seed: int):
    """OptunaSearch (TPE, seeded) over the space's parameters, or seeded random search.

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
    searcher = OptunaSearch(space=dists or None, metric=space.metric, mode=space.mode, sampler=sampler)
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
            out[p.name] = tune.lograndint(int(p.low), int(p.high) + 1) if p.log else tune.randint(int(p.low), int(p.high) + 1)
        else:
            out[p.name] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    return out


def build_scheduler(space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=space.max_epochs,
                         grace_period=space.grace_period, reduction_factor=space.reduction_factor)


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
                if v is not None and math.isfinite(v) and (
                        self.best is None or (v > self.best[0] if mode == "max" else v < self.best[0])):
                    self.best = (v, trial.trial_id)
                running = sum(t.status == "RUNNING" for t in trials)
                best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
                print(f"[xray_ray] trial {trial.trial_id} epoch {result.get('epoch')}/{result.get('epochs')} "
                      f"{metric}={v:.4f} | running {running}, finished {self.done}/{total}, best {metric} {best}",
                      flush=True)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1

            def on_trial_error(self, iteration, trials, trial, **info):
                self.done += 1
                print(f"[xray_ray] trial {trial.trial_id} errored; the search goes on", flush=True)

        return Progress()


# --------------------------------------------------------------------------- the run

# the defaults the generalisation ablation supports (docs/results.md)
DEFAULT_ENSEMBLE = 1
DEFAULT_THRESHOLD_RULE = "clean"


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
    p.add_argument("--data-cpus", type=float, default=0.0,
                   help="CPUs each augmentation task reserves (0: never starved by trials holding every CPU)")
    p.add_argument("--data-tasks", type=int, default=1,
                   help="augmentation tasks each trial keeps in flight (more on a cluster with CPU workers)")
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. 'auto' or host:port)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its storage")
    p.add_argument("--seed", type=int, default=None, help="fixes splits, augmentation and the searcher")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial from its checkpoint")
    p.add_argument("--cache", default=None, help="pixel cache folder (default: ~/.cache/xray_ray)")
    p.add_argument("--no-export", action="store_true", help="skip evaluating and exporting the winner")
    p.add_argument("--ensemble", type=int, default=DEFAULT_ENSEMBLE,
                   help="ship a greedy ensemble chosen in this many rounds among the best trials (1: the single "
                        "winner); works with --resume --export-only too")
    p.add_argument("--threshold-rule", choices=("clean", "shifted"), default=DEFAULT_THRESHOLD_RULE,
                   help="meet the target sensitivity on clean validation, or on clean and shifted validation pooled")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files per trial (loads torch into the driver: ~300 MB)")
    p.add_argument("--export-only", action="store_true",
                   help="with --resume: run no more trials; write the tables and export the best trial so far")
    p.add_argument("--allow-local-results", action="store_true",
                   help="accept a local path or file:// URI as results on a multi-node cluster (only for a "
                        "mount shared by every node, such as NFS)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "run_started", False):
            print(f"\ninterrupted. Resume with: {resume_command(args)}", file=sys.stderr)
        else:
            print("\ninterrupted before the search started; nothing to resume, run the same command again.",
                  file=sys.stderr)
        return 130
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run, quoted for a POSIX shell."""
    argv = [a for a in getattr(args, "argv", sys.argv[1:]) if a != "--resume"]
    return shlex.join(["python", "-m", "xray_ray.search", *argv, "--resume"])


def check_flags(args: argparse.Namespace, space: SearchSpace) -> None:
    if args.cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be positive, got {args.cpus_per_trial}.")
    if args.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be 0 or more, got {args.gpus_per_trial}.")
    if args.data_tasks < 1:
        raise UserError(f"--data-tasks must be at least 1, got {args.data_tasks}.")
    if args.data_cpus < 0:
        raise UserError(f"--data-cpus must be 0 or more, got {args.data_cpus}.")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}.")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be at least 1, got {args.max_concurrent}.")
    if args.max_failures < 0:
        raise UserError(f"--max-failures must be 0 or more, got {args.max_failures}.")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}.")
    if not 1 <= args.ensemble <= 32:
        raise UserError(f"--ensemble must be between 1 and 32 (selection rounds), got {args.ensemble}.")


def check_local_resources(args: argparse.Namespace) -> None:
    """Refuse per-trial CPUs or GPUs that the local Ray instance would not have, before anything starts.

    A cluster (--address or RAY_ADDRESS) is checked once joined instead: it may autoscale.
    """
    if args.address or os.environ.get("RAY_ADDRESS"):
        return
    cpus = args.num_cpus or os.cpu_count() or 1
    gpus = local_gpus() if args.gpus_per_trial > 0 else 0
    for flag, what, asked, have in (("--gpus-per-trial", "GPUs", args.gpus_per_trial, gpus),
                                    ("--cpus-per-trial", "CPUs", args.cpus_per_trial, cpus)):
        if asked > have:
            raise UserError(f"{flag} {asked:g} asks for more {what} than this machine has ({have:g}); "
                            f"lower it, or run on a cluster with --address.")


def local_gpus() -> int:
    """GPUs a local ray.init() would detect: Ray's own probe (CUDA_VISIBLE_DEVICES respected)."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        n = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return min(n, len(visible)) if visible is not None else n
    except (ImportError, AttributeError):  # pragma: no cover - Ray's private probe moved; torch counts CUDA
        import torch

        return torch.cuda.device_count()


def run(args: argparse.Namespace) -> str:
    """Run (or resume) a search; returns the run folder."""
    from xray_ray.common import json_safe

    space = load_space(args.space)
    check_flags(args, space)
    check_local_resources(args)
    space = replace(space,
                    num_samples=args.num_samples or space.num_samples,
                    seed=space.seed if args.seed is None else args.seed)
    name = check_run_name(args.name or space.name, "--name" if args.name else f"the space file {args.space}")
    run_dir = R.join(str(args.results), name) if R.is_uri(args.results) else str(Path(args.results).resolve() / name)
    run_json = R.join(run_dir, "run.json")
    previous = R.read_json(run_json) if R.exists(run_json) else None
    args.run_started = previous is not None  # what main() tells the user after a Ctrl-C
    if previous is None:
        check_not_foreign(run_dir)
    if previous is not None and not args.resume:
        raise UserError(f"the results folder {run_dir} already holds a run; pass --resume to continue it, "
                        f"or choose another --name or --results.")
    if previous is not None and (previous.get("data", {}).get("spec") != args.data
                                 or previous.get("space") != json_safe(space.to_dict())
                                 or previous.get("seed") != space.seed):
        raise UserError(f"the results folder {run_dir} holds a different run (data, space or seed differ); "
                        f"resume it with the same --data, --space and --seed, or choose another --name.")
    if args.export_only and not args.resume:
        raise UserError("--export-only works on an existing run; add --resume.")
    if args.resume and previous is None:
        raise UserError(f"there is no run to resume in {run_dir}; start it without --resume.")
    if not args.no_export and not R.is_uri(run_dir):
        check_best_is_ours(Path(run_dir) / "best")
    if args.resume and not R.is_uri(run_dir):
        try:
            clean_leftovers(Path(run_dir))
        except OSError as e:
            raise UserError(f"cannot clean up the results folder {run_dir} ({e.__class__.__name__}: {e}); "
                            f"choose a writable --results.") from None
    try:
        R.probe_writable(run_dir)
    except OSError as e:
        raise UserError(f"cannot write to the results folder {run_dir} ({e.__class__.__name__}: {e}); "
                        f"choose a writable --results.") from None

    started = datetime.now(timezone.utc).isoformat(timespec="seconds") if previous is None else previous["started"]
    t_start = time.time()
    print(f"[xray_ray] loading data from {args.data} ...", flush=True)
    from xray_ray.pipeline import prepare
    from xray_ray.sources import load_source
    from xray_ray.splits import assign_splits

    manifest = load_source(args.data, seed=space.seed)
    df, split_info = assign_splits(manifest.df, seed=space.seed, val_fraction=space.val_fraction,
                                   test_fraction=space.test_fraction)
    print_data_problems(manifest, split_info)
    prepared = {s: prepare(df, s, args.cache) for s in space.image_sizes}
    for s, p in prepared.items():
        counts = {k: len(v) for k, v in p.splits.items()}
        print(f"[xray_ray] {s}px: {'cache hit' if p.cache_hit else 'prepared'} in {p.seconds:.1f}s {counts}", flush=True)
    for need in ("train", "val"):
        if need not in next(iter(prepared.values())).splits:
            raise UserError(f"the data has no '{need}' images after splitting; add more images per class.")
    train_labels = next(iter(prepared.values())).splits["train"].labels
    run_info = {
        "name": name, "started": started, "command": R.command_line(), "seed": space.seed,
        "space": space.to_dict(), "space_file": str(args.space),
        "data": {"spec": args.data, "source": manifest.info, "skipped": int(len(manifest.skipped)),
                 "skipped_files": manifest.skipped.head(MAX_LISTED_SKIPS).to_dict(orient="records"),
                 "splits": split_info, "image_sizes": space.image_sizes},
        "resources": {"cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
                      "data_cpus": args.data_cpus, "data_tasks": args.data_tasks,
                      "address": args.address},
        "export": {"ensemble": args.ensemble, "threshold_rule": args.threshold_rule},
        "versions": R.versions(), "git_commit": R.git_commit(),
    }
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    init_ray(args)
    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    try:
        slot = None if joined else data_slot()
        run_info["resources"]["augment_slots"] = int(ray.cluster_resources()[DATA_SLOT]) if slot else None
        total_cpus = ray.cluster_resources().get("CPU", 0)
        total_gpus = ray.cluster_resources().get("GPU", 0)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        for what, asked, have in (("GPUs", args.gpus_per_trial, total_gpus), ("CPUs", args.cpus_per_trial, total_cpus)):
            if asked > have and not joined:
                raise UserError(f"--{what[:3].lower()}s-per-trial {asked:g} asks for more {what} than this machine "
                                f"has ({have:g}); lower it, or run on a cluster with --address.")
            if asked > have:  # an autoscaling cluster adds nodes once trials ask for them
                print(f"[xray_ray] the cluster has {have:g} {what} now; trials wait for the autoscaler to add "
                      f"nodes with {asked:g} {what} each", flush=True)
        if len(nodes) > 1 and R.node_local(args.results) and not args.allow_local_results:
            raise UserError(f"this cluster has {len(nodes)} nodes but --results {args.results} is a node-local "
                            f"path; use shared storage such as s3://bucket/path (or --allow-local-results for an "
                            f"NFS mount present on every node).")
        # written only once the cluster is accepted: a refused run leaves no run.json that would make the
        # corrected command ask for --resume
        R.write_json({**run_info, "status": "running"}, run_json)
        args.run_started = True  # from here on an interrupted run can be resumed
        by_cpu = int(total_cpus // args.cpus_per_trial)
        by_gpu = int(total_gpus // args.gpus_per_trial) if args.gpus_per_trial else by_cpu
        # joined to a cluster that may autoscale: what is up now is no limit, the space's setting is
        limit = space.num_samples if joined else max(1, min(by_cpu, by_gpu))
        wanted = args.max_concurrent or space.max_concurrent or limit
        concurrent = max(1, min(wanted, limit))
        runtime = Runtime(args.cpus_per_trial, args.gpus_per_trial, args.data_cpus, args.data_tasks,
                          space.metric, space.mode,
                          float(np.mean(train_labels)) if len(train_labels) else 0.5, data_slot=slot,
                          score_epochs=rungs(space),
                          fault_dir=None if R.is_uri(run_dir) else str(Path(run_dir) / "tune" / ".faults"))
        data = trial_data(prepared, space.seed)
        ray.data.DataContext.get_current().enable_progress_bars = False
        fn = tune.with_resources(tune.with_parameters(trainable, data=data, runtime=runtime),
                                 {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        tune_dir = R.join(run_dir, "tune")
        storage, exp_name = tune_dir.rsplit("/", 1)
        if args.resume and tune.Tuner.can_restore(tune_dir):
            print(f"[xray_ray] resuming {tune_dir}", flush=True)
            tuner = tune.Tuner.restore(tune_dir, trainable=fn, resume_unfinished=True, resume_errored=True)
        else:
            searcher, param_space = build_searcher(space, space.seed)
            tuner = tune.Tuner(
                fn,
                param_space=param_space,
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=searcher,
                                            scheduler=build_scheduler(space), num_samples=space.num_samples,
                                            max_concurrent_trials=concurrent,
                                            # a finished or stopped trial hands its worker process, torch
                                            # already imported, to the next trial. A stopped trial waits in
                                            # its last report (Tune does not ask for the next result), so
                                            # the reset that reuse needs never waits for an epoch.
                                            reuse_actors=True),
                run_config=tune.RunConfig(
                    name=exp_name, storage_path=storage, verbose=0,
                    callbacks=[ProgressPrinter(space.metric, space.mode, space.num_samples), *result_loggers(args)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                ),
            )
        print("[xray_ray] --export-only: no more trials; exporting the best so far" if args.export_only else
              f"[xray_ray] searching: {space.num_samples} trials, {concurrent} at a time, "
              f"{space.searcher} + {space.scheduler} on {space.metric} ({space.mode}), "
              f"up to {space.max_epochs} epochs each", flush=True)
        with env_set(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):  # result_loggers() adds the ones wanted
            grid = tuner.get_results() if args.export_only else tuner.fit()
        trials, epochs = collect(grid, space)
        meta = {"run": name, "space": space.to_dict(), "seed": space.seed, "versions": run_info["versions"]}
        R.write_parquet(trials, R.join(run_dir, "trials.parquet"), meta)
        R.write_parquet(epochs, R.join(run_dir, "epochs.parquet"), meta)
        # Tune catches Ctrl-C itself and returns early, leaving trials running or never started
        incomplete = bool(len(trials) < space.num_samples or trials["status"].isin(["running", "pending"]).any())
        unfinished = incomplete and not args.export_only  # --export-only exports what there is, and says so
        wall = time.time() - t_start
        trial_time = float(epochs["seconds"].sum()) if len(epochs) else 0.0
        run_info.update({
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "interrupted" if incomplete else "finished",
            "wall_seconds": wall + (previous or {}).get("wall_seconds", 0.0),  # summed over resumed parts
            "concurrency": concurrent,
            "trial_epochs": int(len(epochs)),
            "overhead": overhead(epochs, wall + (previous or {}).get("wall_seconds", 0.0), concurrent),
            "trials": trials["status"].value_counts().to_dict() if len(trials) else {},
        })
        print_leaderboard(trials, space)
        if unfinished:
            R.write_json(run_info, run_json)
            raise KeyboardInterrupt  # main() prints the resume command and exits 130
        if not args.no_export and trials["best_metric"].notna().any():
            card = export_best(grid, trials, epochs, prepared, run_info, run_dir, space,
                               batteries={sz: d["shifted"] for sz, d in data.items()}, ensemble=args.ensemble,
                               threshold_rule=args.threshold_rule)
            run_info["best"] = {"trial_id": card.get("trial_id"), "threshold": card.get("threshold", {}).get("value")}
        failure = every_trial_failed(trials)
        if failure:  # the tables and run.json still say what happened to each trial
            run_info.update(status="failed", error=failure)
        R.write_json(run_info, run_json)
        if failure:
            raise UserError(failure)
        print(f"[xray_ray] done in {wall:.0f}s; results in {run_dir}", flush=True)
        return run_dir
    finally:
        ray.shutdown()


def every_trial_failed(trials: pd.DataFrame) -> str | None:
    """One sentence when no trial has a finite best metric and every trial errored (the first one's error), else None."""
    if not len(trials) or not (trials["status"] == "errored").all():
        return None
    if pd.to_numeric(trials["best_metric"], errors="coerce").map(math.isfinite).any():
        return None
    first = trials.sort_values("trial_id").iloc[0]
    why = " ".join(str(first["error"] or "no error message").split()).rstrip(".")
    return (f"every trial failed ({len(trials)} of {len(trials)}), so there is no model; the first "
            f"({first['trial_id']}) with: {why}.")


def rungs(space: SearchSpace) -> tuple[int, ...]:
    """The epochs at which ASHA compares trials (grace_period * reduction_factor**k below max_t)."""
    if space.scheduler != "asha":
        return ()
    out, t = [], space.grace_period
    while t < space.max_epochs:
        out.append(t)
        t *= space.reduction_factor
    return tuple(out)


def trial_data(prepared: dict, seed: int) -> dict[int, dict[str, Any]]:
    """What every trial reads, per image size: the train Dataset, val, the class repeats of a balanced
    sampler and the shift battery built on val (fixed by the run's seed)."""
    from xray_ray.pipeline import balanced_repeats, train_dataset
    from xray_ray.robustness import battery

    out = {}
    for s, p in prepared.items():
        t0 = time.perf_counter()
        val = p.splits["val"]
        out[s] = {"train": train_dataset(p.splits["train"]), "val": val, "n_train": len(p.splits["train"]),
                  "repeats": balanced_repeats(p.splits["train"].labels),
                  "shifted": battery(val.images, val.labels, seed=seed)}
        print(f"[xray_ray] {s}px: shift battery of {len(SHIFTS)} shifts x {len(out[s]['shifted']['labels'])} "
              f"val images in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


MAX_LISTED_SKIPS = 1000  # run.json lists this many skipped files (path, reason); the count is always whole


def print_data_problems(manifest, split_info: dict) -> None:
    """Say which files were skipped (by reason), the data's warnings, and train images dropped as leakage."""
    skipped = manifest.skipped
    if len(skipped):
        print(f"[xray_ray] {len(skipped)} files skipped (each with its reason in run.json's data.skipped_files):",
              flush=True)
        for reason, n in skipped["reason"].value_counts().head(10).items():
            print(f"[xray_ray]   {n} x {reason}", flush=True)
    for w in [*manifest.info.get("warnings", []), *split_info.get("warnings", [])]:
        print(f"[xray_ray] warning: {w}", flush=True)
    if split_info.get("dropped"):
        print(f"[xray_ray] leakage: {split_info['dropped']} train images share a patient or identical bytes with "
              f"val/test and were dropped from train (listed in run.json's data.splits.leakage)", flush=True)


def init_ray(args: argparse.Namespace) -> None:
    """Start a local Ray (token authentication left on) or join a cluster (--address or RAY_ADDRESS)."""
    import ray

    # No worker set-up hook that imports torch: it would load torch into every Ray process,
    # Ray Data's own stats and autoscaling actors included. The first augmentation task warms its worker.
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    env["env_vars"].update(faults.worker_env())  # the tests' fault hook reaches every worker; empty otherwise
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        except ConnectionError as e:
            raise UserError(f"cannot reach the Ray cluster at {address} ({e}); check the address, and that "
                            f"RAY_AUTH_MODE=token and the cluster's token are set here.") from None
    else:
        # Keep idle data workers alive between trials: a new trial then reuses a warm worker (torch imported)
        # for its augmentation tasks instead of spawning one (seconds per trial). Ray's default soft limit
        # (one idle worker per CPU) caps how many stay, each holding torch. No warm-up task from the driver:
        # the trials would not reuse that worker but start another.
        os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
        # No prestarted idle workers: an augmentation task would land on one as readily as on the warm
        # worker and load torch into it as well. Trial workers start on demand.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        cpus = args.num_cpus or os.cpu_count() or 1
        slots = data_slots(args, cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING", resources={DATA_SLOT: slots} if slots else None)
        private_token_file()


def private_token_file() -> None:
    """Make Ray's token file (~/.ray/auth_token) readable by its owner only; Ray writes it world-readable.

    Ray 2.60 binds its local servers to every interface whatever the node address (see docs/reliability.md):
    the token is what keeps other machines and users out, so it must not be readable by them.
    """
    token = Path.home() / ".ray" / "auth_token"
    for path, mode in ((token.parent, 0o700), (token, 0o600)):
        try:
            if path.exists() and not path.is_symlink() and path.stat().st_uid == os.getuid():
                path.chmod(mode)
        except OSError:  # a read-only home: nothing more can be done here
            pass


@contextmanager
def env_set(**values: str) -> Iterator[None]:
    """Environment variables set for the block, restored after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def result_loggers(args: argparse.Namespace) -> list:
    """Tune's per-trial result.json and progress.csv, and TensorBoard files only when asked for.

    Tune adds a TensorBoard logger by default, and tensorboardX imports torch into a driver that
    otherwise never needs torch until the export. run() turns Tune's default loggers off
    (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, for the fit only) and adds these instead.
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    loggers = [JsonLoggerCallback(), CSVLoggerCallback()]
    if getattr(args, "tensorboard", False):
        from ray.tune.logger import TBXLoggerCallback

        loggers.append(TBXLoggerCallback())
    return loggers


DATA_SLOT = "xray_ray_augment"  # the custom resource of local runs' augmentation tasks (see data_slots)


def data_slot() -> str | None:
    """DATA_SLOT where the running Ray declares it (a local run that init_ray capped), else None."""
    import ray

    return DATA_SLOT if ray.cluster_resources().get(DATA_SLOT) else None


def data_slots(args: argparse.Namespace, cpus: int) -> int | None:
    """Augmentation tasks a local CPU-only search runs at once across all its trials; None: no cap.

    A CPU trial trains many times slower than one core augments (docs/performance.md), so one
    augmentation worker serves two trials; each worker process saved is torch's libraries and heap. GPU trials consume far faster, and a cluster's nodes
    would each need the resource: neither is capped.
    """
    if args.address or os.environ.get("RAY_ADDRESS") or getattr(args, "gpus_per_trial", 0) > 0:
        return None
    trials = max(1, int(cpus // max(getattr(args, "cpus_per_trial", 1.0), 1e-9)))
    return max(1, math.ceil(trials * getattr(args, "data_tasks", 1) / 2))


def overhead(epochs: pd.DataFrame, wall: float, concurrency: int) -> dict[str, float]:
    """Share of the search's slot-seconds not spent inside training and validation steps.

    ``share_outside`` counts every slot-second of the wall time. Once the last trial has started, a slot
    whose trial ended has nothing left to run: that idle tail (``idle_tail_slot_seconds``) depends on how
    long the last trials train, not on Ray, so ``share_outside_busy`` leaves it out. Everything else
    (Ray start-up, scheduling, worker start, data hand-over, checkpoints, reporting) stays in both.
    """
    inside = float((epochs["step_seconds"] + epochs["eval_seconds"]).sum()) if len(epochs) else 0.0
    slots = max(wall * concurrency, 1e-9)
    idle_tail = 0.0
    if len(epochs) and {"ended_at", "seconds", "epoch"} <= set(epochs.columns):
        first = epochs.sort_values("epoch").groupby("trial_id").head(1).set_index("trial_id")
        start = first["ended_at"] - first["seconds"]
        end = epochs.groupby("trial_id")["ended_at"].max().reindex(start.index)
        t0, t1 = float(start.max()), float(end.max())
        busy = float((end - start.clip(lower=t0)).clip(lower=0).sum())
        idle_tail = min(max(0.0, concurrency * (t1 - t0) - busy), slots)
    busy_slots = max(slots - idle_tail, 1e-9)
    return {"inside_steps_seconds": inside, "slot_seconds": slots, "share_outside": max(0.0, 1 - inside / slots),
            "idle_tail_slot_seconds": idle_tail, "share_outside_busy": max(0.0, 1 - inside / busy_slots)}


def collect(grid, space: SearchSpace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """trials (one row per trial) and epochs (one row per trial and epoch) from Tune's ResultGrid."""
    searched = [p.name for p in space.params]
    statuses = _trial_statuses(grid)
    trows, erows = [], []
    for res in grid:
        cfg = decode_config(res.config or {})
        # a trial that never reported has no metrics: its id is in its folder name, trainable_<id>_<n>_...
        trial_id = (res.metrics or {}).get("trial_id") or "_".join(Path(res.path).name.split("_")[1:3])
        hist = res.metrics_dataframe if res.metrics_dataframe is not None else pd.DataFrame()
        if len(hist) and "epoch" in hist:
            hist = hist.dropna(subset=["epoch"]).drop_duplicates(subset=["epoch"], keep="last").sort_values("epoch")
        for _, h in hist.iterrows():
            erows.append({"trial_id": trial_id, **{c: h.get(c) for c in R.EPOCH_COLUMNS if c != "trial_id"}})
        last = hist.iloc[-1] if len(hist) else {}
        epochs_planned = int(cfg.get("epochs", TrialConfig.defaults()["epochs"]))
        epochs_run = int(len(hist))
        if res.error is not None:
            status = "errored"
        elif epochs_run >= epochs_planned:
            status = "completed"
        elif statuses.get(trial_id, "TERMINATED") == "TERMINATED":
            status = "stopped"  # ended before its planned epochs: ASHA stopped it
        else:
            status = "running" if epochs_run else "pending"  # interrupted: --resume continues it
        best_row = _best_row(hist, space) if len(hist) else {}
        trows.append({
            "trial_id": trial_id, "status": status,
            "error": (str(res.error).strip().splitlines() or [""])[-1][:500] if res.error is not None else None,
            "epochs_run": epochs_run, "epochs": epochs_planned,
            "best_epoch": int(best_row["epoch"]) if len(best_row) else None,
            "best_metric": float(best_row[space.metric]) if len(best_row) else None,
            "best_val_auc": float(best_row["val_auc"]) if len(best_row) else None,
            "best_val_loss": float(best_row["val_loss"]) if len(best_row) else None,
            "best_val_acc": float(best_row["val_acc"]) if len(best_row) else None,
            "last_val_auc": float(last["val_auc"]) if len(hist) else None,
            "wall_seconds": float(hist["seconds"].sum()) if len(hist) else 0.0,
            "images_per_s": float(hist["images_per_s"].median()) if len(hist) else None,
            "node_id": last.get("node_id") if len(hist) else None,
            "data_nodes": last.get("data_nodes") if len(hist) else None,
            "device": last.get("device") if len(hist) else None,
            "checkpoint_path": _checkpoint_uri(res.checkpoint),
            **_robustness_of(hist, best_row),
            **{f"p_{k}": _scalar(cfg.get(k)) for k in searched},
        })
    trials = pd.DataFrame(trows)
    if len(trials):
        trials = trials.sort_values("best_metric", ascending=space.mode == "min", na_position="last").reset_index(drop=True)
    epochs = pd.DataFrame(erows, columns=R.EPOCH_COLUMNS)
    return trials, epochs


_ROB_COLUMNS = [c for c in R.TRIAL_COLUMNS if c.startswith(("rob_", "shift_")) and c != "rob_epoch"]


def _robustness_of(hist: pd.DataFrame, best_row) -> dict[str, Any]:
    """The robustness columns of the best epoch when it was scored, else of the last epoch that was."""
    scored = hist[hist["rob_auc_min"].notna()] if len(hist) and "rob_auc_min" in hist else hist.iloc[:0]
    if not len(scored):
        return {"rob_epoch": None, **{c: None for c in _ROB_COLUMNS}}
    row = best_row if len(best_row) and pd.notna(best_row.get("rob_auc_min")) else scored.iloc[-1]
    return {"rob_epoch": int(row["epoch"]), **{c: row.get(c) for c in _ROB_COLUMNS}}


def _checkpoint_uri(checkpoint) -> str | None:
    """Where a checkpoint lives: Tune's path drops the scheme of remote storage (s3://), so it is put back."""
    if checkpoint is None:
        return None
    scheme = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def _trial_statuses(grid) -> dict[str, str]:
    """Tune's own status of each trial (TERMINATED, ERROR, PENDING, PAUSED) at its last experiment checkpoint.

    Read back from storage, not from the live trials: after a Ctrl-C Tune's cleanup marks every live trial
    TERMINATED (which would read as "stopped by ASHA"), while the checkpoint it wrote just before still shows
    the interrupted trials unfinished (RUNNING comes back as PENDING).
    """
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(grid.experiment_path).trials}
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no state file: every early end reads "stopped"
        return {}


def _best_row(hist: pd.DataFrame, space: SearchSpace) -> pd.Series:
    col = hist[space.metric].astype(float)
    if col.notna().sum() == 0:
        return hist.iloc[-1]
    return hist.loc[col.idxmax() if space.mode == "max" else col.idxmin()]


def _scalar(v: Any) -> Any:
    return json.dumps(list(v)) if isinstance(v, (list, tuple)) else v


def print_leaderboard(trials: pd.DataFrame, space: SearchSpace, top: int = 10) -> None:
    if trials.empty:
        print("[xray_ray] no trials ran", flush=True)
        return
    cols = ["trial_id", "status", "epochs_run", "best_epoch", "best_val_auc", "best_val_loss"] + \
           [c for c in trials.columns if c.startswith("p_")]
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format):
        print(f"\nLeaderboard (by best {space.metric}, {space.mode}):")
        print(trials[cols].head(top).to_string(index=False), flush=True)


RUN_NAME = r"[A-Za-z0-9._-]{1,200}"
# what the export writes into best/ (report.PICTURES are the pictures; a test keeps the two lists equal)
EXPORT_FILES = frozenset({"weights.safetensors", "config.json", "model.onnx", "model.pt", "model.json",
                          "report.html", "confusion.png", "roc.png", "pr.png", "calibration.png",
                          "learning_curves.png", "search_history.png", "saliency.png"})


def check_run_name(name: str, source: str) -> str:
    """`name` if it is one plain path component (letters, digits, '-', '_', '.'; not '.' or '..')."""
    import re

    if not isinstance(name, str) or not re.fullmatch(RUN_NAME, name) or name in (".", ".."):
        fix = "choose another --name" if source == "--name" else "change its name: or pass --name"
        raise UserError(f"the run name {name!r} (from {source}) must be one plain folder name of letters, digits, "
                        f"'-', '_' and '.' (not '.' or '..'), at most 200 characters; {fix}.")
    return name


def _names_in(location: str) -> list[str] | None:
    """Names directly inside a folder (local or URI); None when there is no such folder."""
    import pyarrow.fs as pafs

    fs, path = R.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        return [""]  # a file where the folder should be: probe_writable says so in its own words
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))]


def check_not_foreign(run_dir: str) -> None:
    """Refuse a non-empty folder without run.json: it is not a run of this project, and nothing in it is ours."""
    from xray_ray.common import is_temp_name

    names = _names_in(run_dir)
    if names is None or names == [""]:
        return
    foreign = sorted(n for n in names if n != ".write-probe" and not is_temp_name(n))
    if foreign:
        raise UserError(f"{run_dir} is not empty and holds no run of xray_ray (no run.json; it has "
                        f"{', '.join(map(repr, foreign[:3]))}{', ...' if len(foreign) > 3 else ''}); choose "
                        "another --name or --results.")


def _ours_in_best(name: str) -> bool:
    from xray_ray.common import is_temp_name

    # the export's files, and temporary files of this and older versions (.model.onnx.abc123, .x.tmp-...)
    return name in EXPORT_FILES or is_temp_name(name) or any(name.startswith(f".{f}.") for f in EXPORT_FILES)


def check_best_is_ours(best: Path) -> None:
    """Refuse a best/ that holds anything the export did not write: replacing it would delete that."""
    if not os.path.lexists(best):
        return
    if best.is_symlink() or not best.is_dir():
        raise UserError(f"{best} is not a folder the export wrote; move it away, or choose another --name.")
    foreign = sorted(p.name for p in best.iterdir() if not _ours_in_best(p.name) or not p.is_file()
                     or p.is_symlink())
    if foreign:
        raise UserError(f"{best} holds files the export did not write ({', '.join(map(repr, foreign[:3]))}"
                        f"{', ...' if len(foreign) > 3 else ''}); move them out, since a new export replaces "
                        "best/, or choose another --name.")


def _whole_model(folder: Path) -> bool:
    from xray_ray.runtime import load_exported

    try:
        load_exported(folder)
        return True
    except UserError:
        return False


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what a killed run left (--resume): temporary files beside the tables and in best/, and
    unfinished or replaced best.new-*/best.old-* folders, after putting a whole best/ back if it is missing."""
    from xray_ray.common import is_temp_name, restore_dir

    removed = restore_dir(run_dir / "best", _whole_model)
    for folder, ours in ((run_dir, is_temp_name), (run_dir / "best", lambda n: n not in EXPORT_FILES
                                                   and _ours_in_best(n))):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                if ours(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def install_best(new: Path, best: Path) -> None:
    """Swap the finished export `new` in as `best` (whole at every moment; see common.replace_dir)."""
    from xray_ray.common import replace_dir

    check_best_is_ours(best)
    replace_dir(new, best)


ENSEMBLE_CANDIDATES = 8  # an ensemble is chosen among this many of the best trials (each loaded and scored)


def winner_model(grid, trials: pd.DataFrame, space: SearchSpace, prepared: dict,
                 batteries: dict[int, dict] | None, ensemble: int):
    """The model to ship: the best trial's kept weights, or a greedy ensemble over the best trials' weights
    (``ensemble`` selection rounds, on the space's metric over validation and, for ``rob_*``, its battery).

    Returns (model, config dict for best/config.json, the winner facts for the card, ensemble facts or None).
    """
    from xray_ray.ensemble import select
    from xray_ray.export import load_weights
    from xray_ray.models import build_model

    ranked = trials.dropna(subset=["best_metric", "checkpoint_path"])
    winner = ranked.iloc[0]
    by_id = {(r.metrics or {}).get("trial_id"): r for r in grid}
    facts = {"trial_id": winner["trial_id"], "best_epoch": int(winner["best_epoch"]),
             "selection_metric": space.metric, "selection_value": float(winner["best_metric"])}

    def load(trial_id: str):
        res = by_id[trial_id]
        cfg = TrialConfig.from_dict(decode_config(res.config))
        with res.checkpoint.as_directory() as cdir:
            return cfg, load_weights(build_model(**model_sizes(cfg)), Path(cdir) / "best.safetensors")

    cfg, model = load(winner["trial_id"])
    config = {**cfg.to_dict(), "trial_id": winner["trial_id"], "best_epoch": int(winner["best_epoch"])}
    if ensemble <= 1 or len(ranked) < 2:
        return model, config, facts, None
    members = {winner["trial_id"]: model}
    for tid in ranked["trial_id"].iloc[1:ENSEMBLE_CANDIDATES]:
        members[tid] = load(tid)[1]
    val = {s: (p.splits["val"].images, p.splits["val"].labels) for s, p in prepared.items()}
    chosen, info = select(members, val, batteries, space.metric, space.mode, ensemble)
    print(f"[xray_ray] ensemble: {info['picked']} of {len(members)} candidates, {space.metric} "
          f"{info['score']:.4f} (best single {info['best_single_score']:.4f})", flush=True)
    if chosen is model:
        return model, config, facts, info
    return chosen, chosen.config.to_dict(), {**facts, "trial_id": "ensemble"}, info


def export_best(grid, trials: pd.DataFrame, epochs: pd.DataFrame, prepared: dict, run_info: dict, run_dir: str,
                space: SearchSpace, batteries: dict[int, dict] | None = None, ensemble: int = 1,
                threshold_rule: str = "clean") -> dict:
    """Write the model to ship (the winner, or an ensemble) into best/, then evaluate and export it there."""
    import secrets

    import pyarrow.fs as pafs

    from xray_ray.common import write_text
    from xray_ray.export import save_weights
    from xray_ray.winner import finalize

    remote = R.is_uri(run_dir)
    if not remote:
        check_best_is_ours(Path(run_dir) / "best")  # before any work: it is never replaced if not ours
    model, config, facts, ens = winner_model(grid, trials, space, prepared, batteries, ensemble)
    # built beside the old best/ (or in a local scratch folder for remote storage) and swapped in whole
    scratch = Path(tempfile.mkdtemp(prefix="xray_best_")) if remote else None
    best_dir = scratch / "best" if remote else Path(run_dir) / f"best.new-{secrets.token_hex(4)}"
    best_dir.mkdir(parents=True)
    try:
        save_weights(model, best_dir / "weights.safetensors")
        write_text(best_dir / "config.json", json.dumps(config, indent=2))
        size = model.config.image_size
        card = finalize(best_dir, model, prepared[size].splits, {**run_info, "winner": facts}, trials, epochs,
                        battery=(batteries or {}).get(size), threshold_rule=threshold_rule, ensemble=ens)
        if remote:  # object stores have no folder rename: each file is overwritten whole, nothing deleted
            fs, path = R.resolve(R.join(run_dir, "best"))
            pafs.copy_files(str(best_dir), path, destination_filesystem=fs)
        else:
            install_best(best_dir, Path(run_dir) / "best")
    finally:
        shutil.rmtree(scratch or best_dir, ignore_errors=True)  # gone already once swapped in
    return card


if __name__ == "__main__":
    sys.exit(main())
