"""What is shipped and where: the run's folder checks (name, not a foreign folder, best/ ours), clean-up
after a killed run, and the winner (or an ensemble) exported into best/, swapped in whole.

This module imports no torch itself; loading a trial's weights and exporting the winner do, when called.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from xray_ray import results as R
from xray_ray.common import is_temp_name, json_safe, replace_dir, restore_dir, write_text
from xray_ray.config import SearchSpace, TrialConfig
from xray_ray.errors import UserError
from xray_ray.trial import decode_config, model_sizes

RUN_NAME = r"[A-Za-z0-9._-]{1,200}"
# what the export writes into best/ (report.PICTURES are the pictures; a test keeps the two lists equal)
EXPORT_FILES = frozenset(
    {
        "weights.safetensors",
        "config.json",
        "model.onnx",
        "model.pt",
        "model.json",
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


def check_run_name(name: str, source: str) -> str:
    """`name` if it is one plain path component (letters, digits, '-', '_', '.'; not '.' or '..')."""
    if not isinstance(name, str) or not re.fullmatch(RUN_NAME, name) or name in (".", ".."):
        fix = "choose another --name" if source == "--name" else "change its name: or pass --name"
        raise UserError(
            f"the run name {name!r} (from {source}) must be one plain folder name of letters, digits, "
            f"'-', '_' and '.' (not '.' or '..'), at most 200 characters; {fix}."
        )
    return name


def _names_in(location: str) -> list[str] | None:
    """Names directly inside a folder (local or URI); None when there is no such folder."""
    fs, path = R.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        return [""]  # a file where the folder should be: probe_writable says so in its own words
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))]


def check_not_foreign(run_dir: str) -> None:
    """Refuse a non-empty folder without run.json: it is not a run of this project, and nothing in it is ours."""
    names = _names_in(run_dir)
    if names is None or names == [""]:
        return
    foreign = sorted(n for n in names if n != ".write-probe" and not is_temp_name(n))
    if foreign:
        raise UserError(
            f"{run_dir} is not empty and holds no run of xray_ray (no run.json; it has "
            f"{', '.join(map(repr, foreign[:3]))}{', ...' if len(foreign) > 3 else ''}); choose "
            "another --name or --results."
        )


def _ours_in_best(name: str) -> bool:
    # the export's files, and temporary files of this and older versions (.model.onnx.abc123, .x.tmp-...)
    return name in EXPORT_FILES or is_temp_name(name) or any(name.startswith(f".{f}.") for f in EXPORT_FILES)


def check_best_is_ours(best: Path) -> None:
    """Refuse a best/ that holds anything the export did not write: replacing it would delete that."""
    if not os.path.lexists(best):
        return
    if best.is_symlink() or not best.is_dir():
        raise UserError(f"{best} is not a folder the export wrote; move it away, or choose another --name.")
    foreign = sorted(p.name for p in best.iterdir() if not _ours_in_best(p.name) or not p.is_file() or p.is_symlink())
    if foreign:
        raise UserError(
            f"{best} holds files the export did not write ({', '.join(map(repr, foreign[:3]))}"
            f"{', ...' if len(foreign) > 3 else ''}); move them out, since a new export replaces "
            "best/, or choose another --name."
        )


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
    removed = restore_dir(run_dir / "best", _whole_model)
    for folder, ours in (
        (run_dir, is_temp_name),
        (run_dir / "best", lambda n: n not in EXPORT_FILES and _ours_in_best(n)),
    ):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                if ours(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def install_best(new: Path, best: Path) -> None:
    """Swap the finished export `new` in as `best` (whole at every moment; see common.replace_dir)."""
    check_best_is_ours(best)
    replace_dir(new, best)


@dataclass
class RunFolder:
    """Where a run's results go, the run it holds already, and whether an interrupted run can be resumed."""

    name: str
    path: str
    previous: dict[str, Any] | None
    started: bool  # run.json is written: an interrupted run can be resumed


def open_run(
    results: str, name: str, *, data: str, space: SearchSpace, resume: bool, export_only: bool, export: bool
) -> RunFolder:
    """The run `name`'s folder under `results`, checked: a new run's is not foreign, a resumed one is the same
    run (data, space, seed); best/ is ours when the run exports; leftovers of a killed run cleaned; writable."""
    run_dir = R.join(str(results), name) if R.is_uri(results) else str(Path(results).resolve() / name)
    run_json = R.join(run_dir, "run.json")
    previous = R.read_json(run_json) if R.exists(run_json) else None
    if previous is None:
        check_not_foreign(run_dir)
    check_resumable(run_dir, previous, data=data, space=space, resume=resume, export_only=export_only)
    if export and not R.is_uri(run_dir):
        check_best_is_ours(Path(run_dir) / "best")
    if resume and not R.is_uri(run_dir):
        try:
            clean_leftovers(Path(run_dir))
        except OSError as e:
            raise UserError(
                f"cannot clean up the results folder {run_dir} ({e.__class__.__name__}: {e}); "
                f"choose a writable --results."
            ) from None
    try:
        R.probe_writable(run_dir)
    except OSError as e:
        raise UserError(
            f"cannot write to the results folder {run_dir} ({e.__class__.__name__}: {e}); choose a writable --results."
        ) from None
    return RunFolder(name=name, path=run_dir, previous=previous, started=previous is not None)


def check_resumable(
    run_dir: str, previous: dict[str, Any] | None, *, data: str, space: SearchSpace, resume: bool, export_only: bool
) -> None:
    """Refuse a new run over an old one, a resume of another run, and --resume or --export-only with no run."""
    if previous is not None and not resume:
        raise UserError(
            f"the results folder {run_dir} already holds a run; pass --resume to continue it, "
            f"or choose another --name or --results."
        )
    if previous is not None and (
        previous.get("data", {}).get("spec") != data
        or previous.get("space") != json_safe(space.to_dict())
        or previous.get("seed") != space.seed
    ):
        raise UserError(
            f"the results folder {run_dir} holds a different run (data, space or seed differ); "
            f"resume it with the same --data, --space and --seed, or choose another --name."
        )
    if export_only and not resume:
        raise UserError("--export-only works on an existing run; add --resume.")
    if resume and previous is None:
        raise UserError(f"there is no run to resume in {run_dir}; start it without --resume.")


ENSEMBLE_CANDIDATES = 8  # an ensemble is chosen among this many of the best completed trials (each one is scored)


def trial_model(result) -> tuple[TrialConfig, Any]:
    """A finished trial's config and its kept (best-epoch) weights, from its Tune result's checkpoint."""
    from xray_ray.export import load_weights
    from xray_ray.models import build_model

    cfg = TrialConfig.from_dict(decode_config(result.config))
    with result.checkpoint.as_directory() as cdir:
        return cfg, load_weights(build_model(**model_sizes(cfg)), Path(cdir) / "best.safetensors")


def trained_models(grid, describe: Callable[[dict[str, Any]], str]) -> Iterator[tuple[Any, TrialConfig, Any]]:
    """Each result of a Tune ResultGrid with its config and kept weights, loaded in turn; a result without
    weights raises RuntimeError ("<describe(its config)> failed: <its error>")."""
    for res in grid:
        if res.error is not None or res.checkpoint is None:
            raise RuntimeError(f"{describe(res.config)} failed: {res.error}")
        cfg, model = trial_model(res)
        yield res, cfg, model


def winner_model(
    grid, trials: pd.DataFrame, space: SearchSpace, prepared: dict, batteries: dict[int, dict] | None, ensemble: int
):
    """The model to ship: the best trial's kept weights, or a greedy ensemble over the best trials' weights
    (``ensemble`` selection rounds, on the space's metric over validation and, for ``rob_*``, its battery).

    Returns (model, config dict for best/config.json, the winner facts for the card, ensemble facts or None).
    """
    from xray_ray.ensemble import select

    ranked = trials.dropna(subset=["best_metric", "checkpoint_path"])
    winner = ranked.iloc[0]
    by_id = {(r.metrics or {}).get("trial_id"): r for r in grid}
    facts = {
        "trial_id": winner["trial_id"],
        "best_epoch": int(winner["best_epoch"]),
        "selection_metric": space.metric,
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
    chosen, info = select(members, val, batteries, space.metric, space.mode, ensemble)
    print(
        f"[xray_ray] ensemble: {info['picked']} of {len(members)} candidates, {space.metric} "
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
    space: SearchSpace,
    batteries: dict[int, dict] | None = None,
    ensemble: int = 1,
    threshold_rule: str = "clean",
) -> dict:
    """Write the model to ship (the winner, or an ensemble) into best/, then evaluate and export it there."""
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
        card = finalize(
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
