"""The search's command line: its flags (parser_of), the rules their values must meet (check_flags) and
the options a parse makes (options_of). xray_ray.search wraps these with its own defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from xray_ray.errors import UserError
from xray_ray.search.spaces import LABELS

if TYPE_CHECKING:
    from xray_ray.search.spaces import SearchSpace


LABELS_HELP = "classes from the class folders, or NORMAL/BACTERIA/VIRUS from Kaggle file names"


def parser_of(description: str, *, ensemble: int, threshold_rule: str) -> argparse.ArgumentParser:
    """The search's argument parser; `ensemble` and `threshold_rule` are the defaults of those flags."""
    p = argparse.ArgumentParser(prog="python -m xray_ray.search", description=description)
    p.add_argument("--data", default="synthetic", help="folder (Kaggle layout), .npz, 'synthetic[:N]', or a URI")
    p.add_argument("--space", default="search_spaces/smoke.yaml", help="search-space YAML file")
    p.add_argument("--labels", choices=LABELS, default=None, help=LABELS_HELP + " (default: the space's)")
    p.add_argument("--results", default="results", help="results root: local path or URI (s3://, gs://, file://)")
    p.add_argument("--name", default=None, help="run name (default: the space's name)")
    p.add_argument("--num-samples", type=int, default=None, help="trials to run (default: the space's)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what resources allow)")
    add_resource_flags(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its storage")
    p.add_argument("--seed", type=int, default=None, help="fixes splits, augmentation and the searcher")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial from its checkpoint")
    p.add_argument("--cache", default=None, help="pixel cache folder (default: ~/.cache/xray_ray)")
    p.add_argument("--no-export", action="store_true", help="skip evaluating and exporting the winner")
    p.add_argument(
        "--ensemble",
        type=int,
        default=ensemble,
        help="ship a greedy ensemble chosen in this many rounds among the best trials (default %(default)s; "
        "1: the single winner); works with --resume --export-only too",
    )
    p.add_argument(
        "--threshold-rule",
        choices=("clean", "shifted"),
        default=threshold_rule,
        help="meet the target sensitivity on clean validation, or on clean and shifted validation pooled "
        "(default %(default)s)",
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
        "--mlflow",
        metavar="URI",
        default=None,
        help="also log each trial to MLflow (sqlite:///path.db or an http(s):// server); needs xray_ray[tracking]",
    )
    p.add_argument(
        "--optuna-storage",
        metavar="URI",
        default=None,
        help="keep the searcher's Optuna study there (e.g. sqlite:///results/run/optuna.db), for optuna-dashboard",
    )
    p.add_argument(
        "--allow-local-results",
        action="store_true",
        help="accept a local path or file:// URI as results on a multi-node cluster (only for a "
        "mount shared by every node, such as NFS)",
    )
    return p


def add_resource_flags(p: argparse.ArgumentParser) -> None:
    """Where the search runs and what each trial and augmentation task asks of it."""
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


def options_of(cls: type, args: argparse.Namespace, argv: Sequence[str]) -> Any:
    """The options (a `cls` dataclass) of the parsed arguments; argv is kept for the resume command."""
    names = {f.name for f in fields(cls)} - {"argv"}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, argv=tuple(argv))


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


def check_flags(opts: Any, space: SearchSpace) -> None:
    """Refuse flag values no search can use, in one sentence naming the flag."""
    for attr, ok, rule in FLAG_RULES:
        value = getattr(opts, attr)
        if value is not None and not ok(value):
            raise UserError(f"--{attr.replace('_', '-')} must be {rule}, got {value}.")
    if not 1 <= opts.ensemble <= 32:
        raise UserError(f"--ensemble must be between 1 and 32 (selection rounds), got {opts.ensemble}.")
