"""Is the winner a lucky draw? Retrain its config with other seeds, each thresholded on val, scored on test.

    xray-ray stability --run results/reference [--seeds 1 2 3] [--max-concurrent K]

The splits stay the run's own (its data, seed and fractions; checked against the model card's fingerprints);
only the trial seed changes, which sets the initial weights, the batch order and every augmentation draw.
When best/ holds an ensemble, a replica is every member retrained under one seed, combined with the
exported weights. Each replica is trained by the search's own trainable in a Tune run (FIFO, no early
stopping: every replica gets the winner's full epochs) kept under <run>/stability/, so an interrupted
call picks up where it stopped.
Each replica's best epoch on the search's metric is kept, as the search keeps it; its threshold is chosen on
val by the model card's rule, and only then is test scored, once. Writes <run>/stability.parquet (one row a
replica, plus the search's own winner as source "search") and <run>/stability.json (spreads in points).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xray_ray import results as R
from xray_ray.config import TrialConfig, encode_value
from xray_ray.errors import UserError
from xray_ray.search.ray_setup import RayOptions, data_slot, ray_session
from xray_ray.search.run_data import trial_data
from xray_ray.search.trial import Runtime
from xray_ray.search.tuner import restored, trial_trainable
from xray_ray.ship.best import trained_models

TARGET_SPREAD_POINTS = 1.5  # the target: three seeds of the winning config within 1.5 points of each other
SPLITS = ("val", "test", "extra_val")
METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def _read_run(run_dir: str) -> tuple[dict, dict, dict]:
    """run.json, best/config.json and best/model.json of an exported run (UserError when missing)."""
    need = {
        "run.json": "is it a search's results folder?",
        "best/config.json": "export its winner first (python -m xray_ray.search ... --resume --export-only).",
        "best/model.json": "export its winner first (python -m xray_ray.search ... --resume --export-only).",
    }
    out = []
    for name, hint in need.items():
        loc = R.join(run_dir, name)
        if not R.exists(loc):
            raise UserError(f"{loc} not found; {hint}")
        out.append(R.read_json(loc))
    return out[0], out[1], out[2]


def _row(source: str, seed: int, metrics: dict[str, dict], threshold: float, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"source": source, "seed": int(seed), **extra, "threshold": float(threshold)}
    for split in SPLITS:
        at = (metrics.get(split) or {}).get("at_threshold") or {}
        for m in METRICS:
            row[f"{split}_{m}"] = float(at[m]) if at.get(m) is not None else np.nan
    return row


def spread_points(values: Sequence[float]) -> float:
    """max - min of proportions, in percentage points (NaN when fewer than two values)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return float((v.max() - v.min()) * 100) if len(v) >= 2 else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the run's winner again under each of ``args.seeds``, score every replica, write the tables."""
    t0 = time.time()
    run_dir = args.run if R.is_uri(args.run) else str(Path(args.run).resolve())
    run_info, best_cfg, card = _read_run(run_dir)
    if len(card.get("classes") or ()) > 2:  # replicas are thresholded on val and compared at their thresholds
        raise UserError(
            f"stability handles two-class runs only, and {run_dir} tells {len(card['classes'])} classes apart; "
            "retrain its space with other --seed values to see the spread."
        )
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UserError(f"--seeds must be distinct non-negative integers, got {args.seeds}.")
    members = winner_members(best_cfg)
    taken = sorted({c.seed for _, _, c in members} & set(args.seeds))
    if taken:
        raise UserError(f"seed {taken[0]} is the search's own (its winner is already scored); choose other --seeds.")
    what = f"trial {members[0][0]}" if len(members) == 1 else f"the ensemble of {', '.join(t for t, _, _ in members)}"
    print(
        f"[xray_ray] stability of {what} in {run_dir}: seeds {args.seeds}, "
        f"{' + '.join(str(c.epochs) for _, _, c in members)} epochs each",
        flush=True,
    )
    prepared = _the_runs_splits(args, run_info, card, members)
    rows = _replicas(args, run_dir, run_info, best_cfg, card, members, prepared)
    return _write_summary(args, run_dir, best_cfg, members, rows, t0)


def winner_members(best_cfg: dict) -> list[tuple[str, float, TrialConfig]]:
    """(trial id, weight, training settings) of each model that best/ combines: one for a single winner."""
    if best_cfg.get("kind") != "ensemble":
        cfg = TrialConfig.from_dict({k: v for k, v in best_cfg.items() if k in TrialConfig.field_names()})
        return [(str(best_cfg.get("trial_id")), 1.0, cfg)]
    out = []
    for m in best_cfg.get("members") or []:
        if not isinstance(m.get("trial_config"), dict):
            raise UserError(
                "this ensemble's best/config.json does not record its members' training settings (it was exported "
                "by an older xray_ray); export it again with --resume --export-only, then run stability."
            )
        out.append((str(m["trial_id"]), float(m["weight"]), TrialConfig.from_dict(m["trial_config"])))
    if not out:
        raise UserError("best/config.json names an ensemble without members; export the run again.")
    return out


def _the_runs_splits(args: argparse.Namespace, run_info: dict, card: dict, members: list) -> dict:
    """Each member's image size prepared from the run's own data and splits (UserError when they changed);
    the card's fingerprints are checked at the model's input size."""
    from xray_ray.data.prepare import prepare
    from xray_ray.data.sources import load_source
    from xray_ray.data.splits import assign_splits
    from xray_ray.serve.evaluate import fingerprint

    spec, seed = run_info["data"]["spec"], int(run_info["seed"])
    manifest = load_source(spec, seed=seed)
    df, _ = assign_splits(manifest.df, seed=seed, **run_info["space"]["data"])
    prepared = {size: prepare(df, size, args.cache) for size in sorted({c.image_size for _, _, c in members})}
    splits = prepared[max(prepared)].splits
    expected = (card.get("data") or {}).get("fingerprints") or {}
    for name, fp in expected.items():
        if name in splits and fingerprint(splits[name].uids, splits[name].images) != fp:
            raise UserError(
                f"the '{name}' images of {spec} are not the ones the search used (the data or its "
                f"decoding changed since); stability needs the run's own splits."
            )
    return prepared


def _replicas(
    args: argparse.Namespace, run_dir: str, run_info: dict, best_cfg: dict, card: dict, members: list, prepared: dict
) -> list[dict[str, Any]]:
    """Train the replicas on a Ray of their own (or resume them) and score each; the search's winner first."""
    with ray_session(RayOptions(address=args.address, num_cpus=args.num_cpus, cpus_per_trial=args.cpus_per_trial)):
        grid = _train_replicas(args, run_dir, run_info, best_cfg, members, prepared)
        rows = [
            _row(
                "search",
                members[0][2].seed,
                card["metrics"],
                card["threshold"]["value"],
                trial_id=card.get("trial_id"),
                best_epoch=(card.get("trial") or {}).get("best_epoch"),
                best_metric=(card.get("trial") or {}).get("best_metric"),
            )
        ]
        return rows + _score_replicas(args, grid, card, members, prepared[max(prepared)].splits)


def _train_replicas(args: argparse.Namespace, run_dir: str, run_info: dict, best_cfg: dict, members: list, prepared):
    """Tune's ResultGrid of the replicas: each member's config under each seed, FIFO, every epoch."""
    import ray
    from ray import tune

    space = run_info["space"]
    metric, mode = space["scheduler"]["metric"], space["scheduler"]["mode"]
    cpus = ray.cluster_resources().get("CPU", 1)
    runs = len(args.seeds) * len(members)
    concurrent = max(1, min(runs, args.max_concurrent or int(cpus // args.cpus_per_trial) or 1))
    slot = data_slot()  # as search.run
    runtime = Runtime(
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=0.0,
        data_cpus=0.0,
        data_tasks=1,
        metric=metric,
        mode=mode,
        pos_fraction=float(np.mean(next(iter(prepared.values())).splits["train"].labels)),
        data_slot=slot,
    )
    data = trial_data(prepared, int(run_info["seed"]))
    ray.data.DataContext.get_current().enable_progress_bars = False
    fn = trial_trainable(data, runtime, {"cpu": args.cpus_per_trial})
    tune_dir = R.join(run_dir, "stability", "tune")
    request = {"trial_id": best_cfg.get("trial_id"), "seeds": list(args.seeds)}
    request_loc = R.join(run_dir, "stability", "request.json")
    if R.exists(request_loc) and R.read_json(request_loc) != request:
        raise UserError(
            f"{R.join(run_dir, 'stability')} holds replicas of {R.read_json(request_loc)}; "
            f"repeat that call to finish it, or delete that folder to start another."
        )
    R.write_json(request, request_loc)
    tuner = restored(tune_dir, fn)
    if tuner is None:
        settings = [{k: encode_value(v) for k, v in c.to_dict().items()} for _, _, c in members]
        params: dict[str, Any] = {
            "member": tune.grid_search(list(range(len(members)))),
            "seed": tune.grid_search(list(args.seeds)),
        }
        for key in settings[0]:
            if key != "seed":
                params[key] = tune.sample_from(lambda config, k=key: settings[config["member"]][k])
        tuner = tune.Tuner(
            fn,
            param_space=params,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(storage_path=tune_dir.rsplit("/", 1)[0], name="tune", verbose=0),
        )
    return tuner.fit()


def _score_replicas(args: argparse.Namespace, grid, card: dict, members: list, splits) -> list[dict[str, Any]]:
    """Each replica's threshold (on validation, at the card's target sensitivity) and metrics on every split;
    for an ensemble, a replica is every member retrained under one seed, combined with the winner's weights."""
    from xray_ray.serve.evaluate import summarize
    from xray_ray.ship.ensemble import Ensemble
    from xray_ray.ship.winner import pick_threshold, split_probs

    by_seed: dict[int, dict[int, tuple]] = {}
    for res, rcfg, model in trained_models(grid, lambda c: f"replica with seed {c.get('seed')}"):
        by_seed.setdefault(rcfg.seed, {})[int(res.config.get("member", 0))] = (res, model)
    rows = []
    target = float(card["threshold"].get("target_sensitivity", 0.95))
    for seed, done in sorted(by_seed.items()):
        results = [done[i][0] for i in range(len(members))]
        if len(members) == 1:
            model = done[0][1]
        else:
            model = Ensemble(
                [done[i][1] for i in range(len(members))],
                [w for _, w, _ in members],
                [r.metrics.get("trial_id") for r in results],
            ).eval()
        preds = {s: split_probs(model, splits[s]) for s in SPLITS if s in splits and len(splits[s])}
        threshold, _ = pick_threshold(*preds["val"], target)
        metrics = {
            s: summarize(y, p, threshold, groups=splits[s].patients, n_boot=args.n_boot) for s, (y, p) in preds.items()
        }
        hists = [r.metrics_dataframe for r in results]
        rows.append(
            _row(
                "replica",
                seed,
                metrics,
                threshold,
                trial_id=",".join(str(r.metrics.get("trial_id")) for r in results),
                best_epoch=int(results[0].metrics["best_epoch"]),
                best_metric=float(results[0].metrics["best_metric"]),
                epochs_run=int(max(h["epoch"].max() for h in hists)),
                wall_seconds=float(sum(h["seconds"].sum() for h in hists)),
            )
        )
    return rows


def _write_summary(
    args: argparse.Namespace, run_dir: str, best_cfg: dict, members: list, rows: list[dict[str, Any]], t0: float
) -> dict[str, Any]:
    """stability.parquet (one row per replica and the search's winner) and stability.json (the spreads)."""
    table = pd.DataFrame(rows).sort_values(["source", "seed"], ascending=[False, True], ignore_index=True)
    replicas = table[table["source"] == "replica"]
    summary: dict[str, Any] = {
        "run": run_dir,
        "trial_id": best_cfg.get("trial_id", "ensemble"),
        "config": members[0][2].to_dict() if len(members) == 1 else best_cfg,
        "seeds": list(args.seeds),
        "command": R.command_line(),
        "target_spread_points": TARGET_SPREAD_POINTS,
        "spread_points": {f"test_{m}": spread_points(replicas[f"test_{m}"]) for m in METRICS},
        "spread_points_with_search": {f"test_{m}": spread_points(table[f"test_{m}"]) for m in METRICS},
        "mean": {f"test_{m}": float(replicas[f"test_{m}"].mean()) for m in METRICS},
        "seconds": round(time.time() - t0, 1),
        "versions": R.versions(),
        "git_commit": R.git_commit(),
    }
    spread = summary["spread_points"]["test_accuracy"]
    summary["within_target"] = bool(spread <= TARGET_SPREAD_POINTS) if np.isfinite(spread) else None  # one replica
    R.write_parquet(table, R.join(run_dir, "stability.parquet"), metadata={"xray_ray": json.dumps(summary)})
    R.write_json(summary, R.join(run_dir, "stability.json"))
    return {"table": table, "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xray-ray stability", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="an exported search's results folder, e.g. results/reference")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="trial seeds of the replicas")
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--max-concurrent", type=int, default=None, help="replicas at once (default: what CPUs allow)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--address", default=None, help="join a running Ray cluster instead of starting one")
    ap.add_argument("--cache", default=None, help="pixel cache folder (default: ~/.cache/xray_ray)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the 95%% intervals")
    args = ap.parse_args(argv)
    try:
        if args.cpus_per_trial <= 0 or args.n_boot < 1:
            raise UserError("--cpus-per-trial must be positive and --n-boot at least 1.")
        out = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t, s = out["table"], out["summary"]
    cols = ["source", "seed", "best_epoch", "threshold"] + [f"test_{m}" for m in METRICS] + ["extra_val_accuracy"]
    print(t[[c for c in cols if c in t]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    sp = s["spread_points"]["test_accuracy"]
    if np.isfinite(sp):
        spread = (
            f"test accuracy spread over the {len(s['seeds'])} replicas: {sp:.2f} points "
            f"({'within' if s['within_target'] else 'outside'} the {TARGET_SPREAD_POINTS} target)"
        )
    else:
        with_search = s["spread_points_with_search"]["test_accuracy"]
        spread = f"one replica: a spread needs two seeds (with the search's own model: {with_search:.2f} points)"
    print(f"{spread}; written to {s['run']}/stability.parquet and stability.json")
    return 0
