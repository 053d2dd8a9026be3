"""What is shipped into a run's best/: the winner (or an ensemble) evaluated, exported and swapped in whole.

This module imports no torch itself; loading a trial's weights and exporting the winner do, when called.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from xray_ray import CLASSES
from xray_ray import results as R
from xray_ray.common import is_temp_name, replace_dir, write_text
from xray_ray.config import TrialConfig, decode_config, model_sizes
from xray_ray.errors import UserError

# what the export writes into best/ (report.PICTURES are the pictures; a test keeps the two lists equal)
EXPORT_FILES = frozenset(
    {
        "weights.safetensors",
        "config.json",
        "model.onnx",
        "model.pt",
        "model.json",
        "val_scores.json",
        "report.html",
        "confusion.png",
        "roc.png",
        "pr.png",
        "calibration.png",
        "learning_curves.png",
        "search_history.png",
        "saliency.png",
    }
)


def ours_in_best(name: str) -> bool:
    # the export's files, and temporary files of this and older versions (.model.onnx.abc123, .x.tmp-...)
    return name in EXPORT_FILES or is_temp_name(name) or any(name.startswith(f".{f}.") for f in EXPORT_FILES)


def check_best_is_ours(best: Path) -> None:
    """Refuse a best/ that holds anything the export did not write: replacing it would delete that."""
    if not os.path.lexists(best):
        return
    if best.is_symlink() or not best.is_dir():
        raise UserError(f"{best} is not a folder the export wrote; move it away, or choose another --name.")
    foreign = sorted(p.name for p in best.iterdir() if not ours_in_best(p.name) or not p.is_file() or p.is_symlink())
    if foreign:
        raise UserError(
            f"{best} holds files the export did not write ({', '.join(map(repr, foreign[:3]))}"
            f"{', ...' if len(foreign) > 3 else ''}); move them out, since a new export replaces "
            "best/, or choose another --name."
        )


def install_best(new: Path, best: Path) -> None:
    """Swap the finished export `new` in as `best` (whole at every moment; see common.replace_dir)."""
    check_best_is_ours(best)
    replace_dir(new, best)


ENSEMBLE_CANDIDATES = 8  # an ensemble is chosen among this many of the best completed trials (each one is scored)


def trial_model(result) -> tuple[TrialConfig, Any]:
    """A finished trial's config and its kept (best-epoch) weights, from its Tune result's checkpoint."""
    from xray_ray.model.cnn import build_model
    from xray_ray.ship.export import load_weights

    cfg = TrialConfig.from_dict(decode_config(result.config))
    with result.checkpoint.as_directory() as cdir:
        weights = Path(cdir) / "best.safetensors"
        model = build_model(num_classes=classes_in_weights(weights), **model_sizes(cfg))
        return cfg, load_weights(model, weights)


def classes_in_weights(path: Path) -> int:
    """How many classes a CNN's safetensors weights tell apart: its last layer's outputs (one logit: two)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        last = max((k for k in f.keys() if k.startswith("classifier.") and k.endswith(".weight")), key=_layer_index)
        outputs = int(f.get_slice(last).get_shape()[0])
    return 2 if outputs == 1 else outputs


def _layer_index(key: str) -> int:
    return int(key.split(".")[1])


def trained_models(grid, describe: Callable[[dict[str, Any]], str]) -> Iterator[tuple[Any, TrialConfig, Any]]:
    """Each result of a Tune ResultGrid with its config and kept weights, loaded in turn; a result without
    weights raises RuntimeError ("<describe(its config)> failed: <its error>")."""
    for res in grid:
        if res.error is not None or res.checkpoint is None:
            raise RuntimeError(f"{describe(res.config)} failed: {res.error}")
        cfg, model = trial_model(res)
        yield res, cfg, model


def winner_model(
    grid, trials: pd.DataFrame, metric: str, mode: str, prepared: dict, batteries: dict[int, dict] | None, ensemble: int
):
    """The model to ship: the best trial's kept weights, or a greedy ensemble over the best trials' weights
    (``ensemble`` selection rounds, on the space's metric over validation and, for ``rob_*``, its battery).

    Returns (model, config dict for best/config.json, the winner facts for the card, ensemble facts or None).
    """
    from xray_ray.ship.ensemble import select

    ranked = trials.dropna(subset=["best_metric", "checkpoint_path"])
    winner = ranked.iloc[0]
    by_id = {(r.metrics or {}).get("trial_id"): r for r in grid}
    facts = {
        "trial_id": winner["trial_id"],
        "best_epoch": int(winner["best_epoch"]),
        "selection_metric": metric,
        "selection_value": float(winner["best_metric"]),
    }

    cfg, model = trial_model(by_id[winner["trial_id"]])
    config = {**cfg.to_dict(), "trial_id": winner["trial_id"], "best_epoch": int(winner["best_epoch"])}
    # the other candidates: trials that trained all their epochs; ASHA stopped the rest for being worse on
    # this very metric at a rung, and a noisy validation score must not bring such a model back in
    others = ranked.iloc[1:]
    others = others[others["status"] == "completed"]["trial_id"].iloc[: ENSEMBLE_CANDIDATES - 1]
    if ensemble <= 1 or others.empty:
        return model, config, facts, None
    members, settings = {winner["trial_id"]: model}, {winner["trial_id"]: cfg}
    for tid in others:
        settings[tid], members[tid] = trial_model(by_id[tid])
    val = {s: (p.splits["val"].images, p.splits["val"].labels) for s, p in prepared.items()}
    chosen, info = select(members, val, batteries, metric, mode, ensemble)
    print(
        f"[xray_ray] ensemble: {info['picked']} of {len(members)} candidates, {metric} "
        f"{info['score']:.4f} (best single {info['best_single_score']:.4f})",
        flush=True,
    )
    if chosen is model:
        return model, config, facts, info
    config = chosen.config.to_dict()
    for m in config["members"]:  # each member's training settings too, so that stability can retrain it
        m["trial_config"] = settings[m["trial_id"]].to_dict()
    return chosen, config, {**facts, "trial_id": "ensemble"}, info


def export_best(
    grid,
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    prepared: dict,
    run_info: dict,
    run_dir: str,
    metric: str,
    mode: str,
    batteries: dict[int, dict] | None = None,
    ensemble: int = 1,
    threshold_rule: str = "clean",
) -> dict:
    """Write the model to ship (the winner, or an ensemble) into best/, then evaluate and export it there."""
    from xray_ray.ship.export import save_weights
    from xray_ray.ship.multiclass import finalize_multiclass
    from xray_ray.ship.winner import finalize

    remote = R.is_uri(run_dir)
    if not remote:
        check_best_is_ours(Path(run_dir) / "best")  # before any work: it is never replaced if not ours
    model, config, facts, ens = winner_model(grid, trials, metric, mode, prepared, batteries, ensemble)
    # built beside the old best/ (or in a local scratch folder for remote storage) and swapped in whole
    scratch = Path(tempfile.mkdtemp(prefix="xray_best_")) if remote else None
    best_dir = scratch / "best" if remote else Path(run_dir) / f"best.new-{secrets.token_hex(4)}"
    best_dir.mkdir(parents=True)
    try:
        classes = tuple((run_info.get("data") or {}).get("classes") or CLASSES)
        if len(classes) > 2:  # the model's head: a CNN's config.json says it (an ensemble's says it itself)
            config = {**config, "num_classes": len(classes)} if config.get("kind") != "ensemble" else config
        save_weights(model, best_dir / "weights.safetensors", classes)
        write_text(best_dir / "config.json", json.dumps(config, indent=2))
        size = model.config.image_size
        card = (finalize_multiclass if len(classes) > 2 else finalize)(
            best_dir,
            model,
            prepared[size].splits,
            {**run_info, "winner": facts},
            trials,
            epochs,
            battery=(batteries or {}).get(size),
            threshold_rule=threshold_rule,
            ensemble=ens,
        )
        if remote:  # object stores have no folder rename: each file is overwritten whole, nothing deleted
            fs, path = R.resolve(R.join(run_dir, "best"))
            pafs.copy_files(str(best_dir), path, destination_filesystem=fs)
        else:
            install_best(best_dir, Path(run_dir) / "best")
    finally:
        shutil.rmtree(scratch or best_dir, ignore_errors=True)  # gone already once swapped in
    return card
