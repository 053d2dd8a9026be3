"""Controlled ablations: one fixed configuration, each idea switched on or off, several seeds each.

    xray-ray ablation --data ../shared/data/chest_xray --arms ablations/generalisation.yaml \\
        --seeds 1 2 3 --results results --name ablation

A search's leaderboard says which trial won, not which idea helps: trials differ in many settings at once
and a hold-out of train saturates. Here every arm is the file's ``base`` configuration with a few settings
changed, trained with the same seeds on the same patient-grouped splits by the search's own trainable (FIFO,
no early stopping). Each run's kept weights (its best epoch on clean validation AUC, as a search keeps them)
are then scored on clean validation, on the shift battery of validation (``xray_ray.model.robustness``), on the
held-out test split and its shifted copy at the validation-chosen threshold (the clean rule and the shifted
rule), and on the official 16-image val split; the mean of each arm's seeds is scored too, as an ensemble.

Writes <results>/<name>/runs.parquet (one row per arm and seed, plus one ``ensemble`` row per arm),
summary.parquet (mean, min, max and spread per arm and metric) and ablation.json (the arms file, command,
versions). The Tune folder under it lets an interrupted call continue where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from xray_ray import results as R
from xray_ray.config import TrialConfig, encode_value
from xray_ray.errors import UserError
from xray_ray.search.ray_setup import RayOptions, data_slot, ray_session
from xray_ray.search.run_data import trial_data
from xray_ray.search.trial import Runtime
from xray_ray.search.tuner import ProgressPrinter, fit, restored, result_loggers, trial_trainable
from xray_ray.ship.best import trained_models
from xray_ray.studies.selection import arm_metric, epoch_model, kept_epoch, training_arms

TARGET_SENSITIVITY = 0.95
REPORTED = (
    "val_auc",
    "rob_auc_min",
    "rob_auc_mean",
    "rob_loss_mean",
    "test_auc",
    "test_accuracy",
    "test_sensitivity",
    "test_specificity",
    "shifted_test_accuracy",
    "shifted_test_specificity",
    "shifted_test_sensitivity",
    "shiftrule_shifted_test_accuracy",
    "shiftrule_shifted_test_specificity",
    "shiftrule_shifted_test_sensitivity",
    "extra_val_accuracy",
    # K > 2 classes (arg-max): balanced accuracy and macro F1
    "test_balanced_accuracy",
    "test_macro_f1",
    "shifted_test_balanced_accuracy",
)


# scored after training, where cost does not matter: more images than a trial's battery (robustness.MAX_IMAGES)
BATTERY_IMAGES = 192


def load_arms(path: str | Path) -> dict[str, Any]:
    """An arms file: ``name``, ``base`` (a full trial config), ``arms`` (name -> changed settings)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"arms file '{path}' does not exist; pass --arms with a YAML file such as ablations/generalisation.yaml."
        )
    doc = yaml.safe_load(p.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("base"), dict) or not isinstance(doc.get("arms"), dict):
        raise UserError(f"arms file '{path}' needs a 'base' mapping and an 'arms' mapping of name -> settings.")
    base = TrialConfig.from_dict(doc["base"])
    arms = {}
    for name, changes in doc["arms"].items():
        changes = changes or {}
        try:
            arms[str(name)] = TrialConfig.from_dict({**base.to_dict(), **changes}).to_dict()
        except UserError as e:
            raise UserError(f"arm '{name}': {e}") from None
    sizes = {a["image_size"] for a in arms.values()}
    trained, source = training_arms(arms)
    return {
        "name": str(doc.get("name", p.stem)),
        "base": base.to_dict(),
        "arms": arms,
        "trained": trained,  # what trains: arms that differ only in keep_metric share one run
        "source": source,  # each arm -> the trained arm it selects its epoch from
        "sizes": sorted(sizes),
        "data": dict(doc.get("data") or {"val_fraction": 0.1, "test_fraction": 0.1}),
        "split_seed": int(doc.get("split_seed", 0)),
        "doc": doc,
    }


def _binary(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float]:
    from xray_ray.metrics import binary_metrics

    m = binary_metrics(y, p, t)
    return {"accuracy": float(m["accuracy"]), "sensitivity": float(m["recall"]), "specificity": float(m["specificity"])}


def evaluate_probs(preds: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Every reported metric from predictions: ``val``, ``val_shifted`` (pooled battery), ``test``,
    ``test_shifted``, ``extra_val`` -> (labels, P(PNEUMONIA)), plus per-shift val battery entries
    ``battery:<shift>``."""
    from xray_ray.metrics import choose_threshold, roc_auc
    from xray_ray.model.robustness import log_loss, summarize

    out: dict[str, float] = {}
    yv, pv = preds["val"]
    t_clean = float(choose_threshold(yv, pv, TARGET_SENSITIVITY))
    t_shift = float(choose_threshold(*preds["val_shifted"], TARGET_SENSITIVITY))
    out.update({"val_auc": roc_auc(yv, pv), "threshold": t_clean, "threshold_shifted_rule": t_shift})
    per = {k.split(":", 1)[1]: (roc_auc(*v), log_loss(*v)) for k, v in preds.items() if k.startswith("battery:")}
    out.update({k: v for k, v in summarize(per).items() if k != "rob_worst_shift"})
    if "test" in preds:
        out["test_auc"] = roc_auc(*preds["test"])
        out.update({f"test_{k}": v for k, v in _binary(*preds["test"], t_clean).items()})
        out.update({f"shifted_test_{k}": v for k, v in _binary(*preds["test_shifted"], t_clean).items()})
        out.update({f"shiftrule_test_{k}": v for k, v in _binary(*preds["test"], t_shift).items()})
        out.update({f"shiftrule_shifted_test_{k}": v for k, v in _binary(*preds["test_shifted"], t_shift).items()})
    if "extra_val" in preds:
        out["extra_val_accuracy"] = _binary(*preds["extra_val"], t_clean)["accuracy"]
        out["shiftrule_extra_val_accuracy"] = _binary(*preds["extra_val"], t_shift)["accuracy"]
    return out


def evaluate_probs_k(preds: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The reported metrics of K > 2 classes (probabilities [N, K], the arg-max decision): macro one-vs-rest
    AUC where the binary tables have the AUC, accuracy, balanced accuracy and macro F1 where they have the
    figures at a threshold; the battery's composites on the macro AUC and cross-entropy."""
    from xray_ray.metrics import log_loss_of, macro_auc, multiclass_metrics
    from xray_ray.model.robustness import summarize

    def figures(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        m = multiclass_metrics(y, p, range(p.shape[1]))
        return {k: float(m[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")}

    out: dict[str, float] = {"val_auc": macro_auc(*preds["val"])}
    per = {k.split(":", 1)[1]: (macro_auc(*v), log_loss_of(*v)) for k, v in preds.items() if k.startswith("battery:")}
    out.update({k: v for k, v in summarize(per).items() if k != "rob_worst_shift"})
    if "test" in preds:
        test = figures(*preds["test"])
        out["test_auc"] = test.pop("macro_auc")
        out.update({f"test_{k}": v for k, v in test.items()})
        out.update({f"shifted_test_{k}": v for k, v in figures(*preds["test_shifted"]).items() if k != "macro_auc"})
    if "extra_val" in preds:
        out["extra_val_accuracy"] = figures(*preds["extra_val"])["accuracy"]
    return out


def predictions(
    model, splits: Mapping[str, Any], batteries: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A model's predictions on every split and battery that ``evaluate_probs`` reads."""
    from xray_ray.data.streams import rows_for
    from xray_ray.model.train import array_batches, predict_probs
    from xray_ray.ship.winner import split_probs

    def probs(images: np.ndarray) -> np.ndarray:
        return predict_probs(model, array_batches(images, np.zeros(len(images), np.int64), rows_for(images.shape[-1])))[
            1
        ]

    out = {s: split_probs(model, splits[s]) for s in ("val", "test", "extra_val") if s in splits and len(splits[s])}
    for split, bat in batteries.items():
        y = bat["labels"]
        shifted = {name: probs(images) for name, images in bat.items() if name != "labels"}
        if split == "val":
            out.update({f"battery:{name}": (y, p) for name, p in shifted.items()})
        out[f"{split}_shifted"] = (np.tile(y, len(shifted)), np.concatenate(list(shifted.values())))
    return out


def _spread(values: pd.Series) -> dict[str, float]:
    v = values.dropna().astype(float)
    return {
        "mean": float(v.mean()) if len(v) else np.nan,
        "min": float(v.min()) if len(v) else np.nan,
        "max": float(v.max()) if len(v) else np.nan,
        "spread": float(v.max() - v.min()) if len(v) > 1 else np.nan,
    }


def summarize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per arm (seeds only; the ensemble row apart): mean/min/max/spread of every reported metric."""
    rows = []
    for arm, g in runs[runs["kind"] == "seed"].groupby("arm", sort=False):
        row: dict[str, Any] = {"arm": arm, "seeds": int(len(g))}
        for m in REPORTED:
            if m in g:
                for k, v in _spread(g[m]).items():
                    row[f"{m}_{k}"] = v
        ens = runs[(runs["kind"] == "ensemble") & (runs["arm"] == arm)]
        for m in REPORTED:
            if m in ens and len(ens):
                row[f"{m}_ensemble"] = float(ens[m].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(
    summary: pd.DataFrame,
    metrics: Sequence[str] = (
        "val_auc",
        "rob_auc_min",
        "test_auc",
        "test_specificity",
        "shifted_test_accuracy",
        "extra_val_accuracy",
    ),
) -> str:
    """The summary as a Markdown table: mean (min-max) over seeds, and the seeds' ensemble."""
    metrics = [m for m in metrics if f"{m}_mean" in summary]
    head = "| arm | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    lines = []
    for _, r in summary.iterrows():
        cells = []
        for m in metrics:
            cells.append(
                f"{r[f'{m}_mean']:.4f} ({r[f'{m}_min']:.4f}-{r[f'{m}_max']:.4f}); "
                f"ens {r.get(f'{m}_ensemble', np.nan):.4f}"
            )
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train every arm under every seed on the same splits, score each run and each arm's ensemble, write them."""
    from xray_ray.data.prepare import prepare
    from xray_ray.data.sources import load_source
    from xray_ray.data.splits import assign_splits

    t0 = time.time()
    spec = load_arms(args.arms)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UserError(f"--seeds must be distinct non-negative integers, got {args.seeds}.")
    run_dir = str(Path(args.results).resolve() / (args.name or spec["name"]))
    manifest = load_source(args.data, seed=spec["split_seed"], labels=args.labels)
    spec["classes"] = tuple(manifest.info.get("classes", ("NORMAL", "PNEUMONIA")))
    df, split_info = assign_splits(manifest.df, seed=spec["split_seed"], **spec["data"])
    prepared = {s: prepare(df, s, args.cache, classes=spec["classes"]) for s in spec["sizes"]}
    request = {"arms": spec["arms"], "seeds": list(args.seeds), "data": args.data, "split_seed": spec["split_seed"]}
    if args.labels != "folder":
        request["labels"] = args.labels
    request_loc = R.join(run_dir, "request.json")
    if R.exists(request_loc) and R.read_json(request_loc) != json.loads(json.dumps(request)):
        raise UserError(f"{run_dir} holds another ablation; repeat that call to finish it, or choose another --name.")
    R.write_json(request, request_loc)
    grid = _train_arms(args, spec, run_dir, prepared)
    runs = _score_runs(grid, spec, prepared)
    summary = summarize_runs(runs)
    info = {
        "name": spec["name"],
        "arms_file": str(args.arms),
        "arms": spec["doc"],
        "seeds": list(args.seeds),
        "data": {"spec": args.data, "splits": split_info},
        "command": R.command_line(),
        "target_sensitivity": TARGET_SENSITIVITY,
        "seconds": round(time.time() - t0, 1),
        "versions": R.versions(),
        "git_commit": R.git_commit(),
    }
    meta = {"xray_ray": json.dumps(info, default=str)}
    R.write_parquet(runs, R.join(run_dir, "runs.parquet"), metadata=meta)
    R.write_parquet(summary, R.join(run_dir, "summary.parquet"), metadata=meta)
    R.write_json({**info, "table": markdown(summary)}, R.join(run_dir, "ablation.json"))
    return {"runs": runs, "summary": summary, "run_dir": run_dir}


def _train_arms(args: argparse.Namespace, spec: dict[str, Any], run_dir: str, prepared: dict):
    """Tune's ResultGrid of every arm x seed (FIFO, one CPU each) on a local Ray of its own (or the one this
    process runs), or resumed."""
    import ray
    from ray import tune

    with ray_session(RayOptions(address=None, num_cpus=args.num_cpus, cpus_per_trial=1.0)):
        cpus = ray.cluster_resources().get("CPU", 1)
        concurrent = max(1, min(args.max_concurrent or int(cpus), int(cpus)))
        train_labels = next(iter(prepared.values())).splits["train"].labels
        classes = spec.get("classes", ("NORMAL", "PNEUMONIA"))
        runtime = Runtime(
            classes=tuple(classes),
            class_fractions=tuple(float(np.mean(train_labels == c)) for c in range(len(classes))),
            cpus_per_trial=1.0,
            gpus_per_trial=0.0,
            data_cpus=0.0,
            data_tasks=1,
            metric="val_auc",
            mode="max",
            pos_fraction=float(np.mean(train_labels)),
            data_slot=data_slot(),
        )
        data = trial_data(prepared, spec["split_seed"])
        ray.data.DataContext.get_current().enable_progress_bars = False
        fn = trial_trainable(data, runtime, {"cpu": 1.0})
        tuner = restored(R.join(run_dir, "tune"), fn)
        if tuner is None:
            arms = spec["trained"]
            params: dict[str, Any] = {"arm": tune.grid_search(list(arms)), "seed": tune.grid_search(list(args.seeds))}
            for key in spec["base"]:
                if key != "seed":
                    params[key] = tune.sample_from(lambda config, k=key: encode_value(arms[config["arm"]][k]))
            progress = ProgressPrinter("val_auc", "max", len(arms) * len(args.seeds))  # runs that train
            tuner = tune.Tuner(
                fn,
                param_space=params,
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
                run_config=tune.RunConfig(
                    storage_path=run_dir, name="tune", verbose=0, callbacks=[progress, *result_loggers()]
                ),
            )
        print(
            f"[xray_ray] ablation {spec['name']}: {len(spec['arms'])} arms x seeds {args.seeds}, "
            f"{concurrent} at a time",
            flush=True,
        )
        return fit(tuner)


def _score_runs(grid, spec: dict[str, Any], prepared: dict) -> pd.DataFrame:
    """One row per run (its kept weights on val, test and their shift batteries) and one per arm's ensemble."""
    from xray_ray.model.robustness import battery

    batteries = {
        s: {
            split: battery(p.splits[split].images, p.splits[split].labels, seed=spec["split_seed"], most=BATTERY_IMAGES)
            for split in ("val", "test")
            if split in p.splits
        }
        for s, p in prepared.items()
    }
    rows, by_arm = [], {}
    score = evaluate_probs_k if len(spec.get("classes", ())) > 2 else evaluate_probs
    k = len(spec.get("classes", ())) or 2
    for res, cfg, model in trained_models(grid, lambda c: f"run {c.get('arm')} seed {c.get('seed')}"):
        hist = res.metrics_dataframe
        for arm in [a for a, src in spec["source"].items() if src == res.config["arm"]]:
            epoch, net = int(res.metrics["best_epoch"]), model
            if list(spec["source"].values()).count(res.config["arm"]) > 1:  # a shared run: the arm's own epoch
                epoch = kept_epoch(hist, arm_metric(spec["arms"][arm]))
                net = epoch_model(res, epoch, k)
            preds = predictions(net, prepared[cfg.image_size].splits, batteries[cfg.image_size])
            by_arm.setdefault(arm, []).append(preds)
            rows.append(
                {
                    "arm": arm,
                    "kind": "seed",
                    "seed": cfg.seed,
                    "best_epoch": epoch,
                    "seconds": float(hist["seconds"].sum()),
                    "rob_seconds": float(hist["rob_seconds"].sum()),
                    **score(preds),
                }
            )
    for arm, members in by_arm.items():  # the mean of the seeds' probabilities: an ensemble of the arm
        mean = {k: (members[0][k][0], np.mean([m[k][1] for m in members], axis=0)) for k in members[0]}
        rows.append({"arm": arm, "kind": "ensemble", "seed": -1, **score(mean)})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xray-ray ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder (Kaggle layout), .npz, 'synthetic[:N]', or a URI")
    ap.add_argument("--arms", required=True, help="arms YAML file, e.g. ablations/generalisation.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="trial seeds of every arm")
    ap.add_argument(
        "--labels",
        choices=("folder", "subtype"),
        default="folder",
        help="classes from the class folders, or NORMAL/BACTERIA/VIRUS from Kaggle file names",
    )
    ap.add_argument("--results", default="results", help="results root folder")
    ap.add_argument("--name", default=None, help="folder name under --results (default: the arms file's name)")
    ap.add_argument("--max-concurrent", type=int, default=None, help="runs at once (default: one per CPU)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--cache", default=None, help="pixel cache folder (default: ~/.cache/xray_ray)")
    args = ap.parse_args(argv)
    try:
        out = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(out["summary"]))
    print(f"written to {out['run_dir']}/runs.parquet, summary.parquet and ablation.json")
    return 0
