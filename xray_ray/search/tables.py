"""How results are collected: Tune's ResultGrid as the trials and epochs tables, the leaderboard, the
search's overhead, and whether every trial failed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from xray_ray.config import TrialConfig, decode_config, encode_value
from xray_ray.model.robustness import COMPOSITES, SHIFTS
from xray_ray.search.spaces import SearchSpace
from xray_ray.search.trial import HISTORY_FILE

TRIAL_COLUMNS = [
    "trial_id",
    "status",
    "error",
    "epochs_run",
    "epochs",
    "best_epoch",
    "best_metric",
    "best_val_auc",
    "best_val_loss",
    "best_val_acc",
    "best_val_balanced_acc",
    "best_val_macro_f1",
    "last_val_auc",
    "wall_seconds",
    "images_per_s",
    "node_id",
    "data_nodes",
    "device",
    "checkpoint_path",  # device: cpu or cuda:<card>
    # robustness of the best epoch when it was scored, else of the last scored epoch (rob_epoch)
    "rob_epoch",
    *COMPOSITES,
    "rob_worst_shift",
    *[f"shift_{m}__{name}" for name in SHIFTS for m in ("auc", "loss")],
]
EPOCH_COLUMNS = [
    "trial_id",
    "epoch",
    "train_loss",
    "val_loss",
    "val_auc",
    "val_acc",
    "val_brier",
    "val_score",
    "val_balanced_acc",
    "val_macro_f1",
    "lr",
    "seconds",
    "step_seconds",
    "eval_seconds",
    "images",
    "images_per_s",
    "node_id",
    "ended_at",  # ended_at: unix seconds of the report, orders epochs across trials
    # robustness on the shift battery (NaN on epochs not scored): composites, then each shift
    "rob_seconds",
    "rob_auc_min",
    "rob_auc_mean",
    "rob_loss_mean",
    "rob_worst_shift",
    *[f"shift_{m}__{name}" for name in SHIFTS for m in ("auc", "loss")],
]


def every_trial_failed(trials: pd.DataFrame) -> str | None:
    """One sentence when no trial has a finite best metric and every trial errored (the first one's error);
    else None."""
    if not len(trials) or not (trials["status"] == "errored").all():
        return None
    if pd.to_numeric(trials["best_metric"], errors="coerce").map(math.isfinite).any():
        return None
    first = trials.sort_values("trial_id").iloc[0]
    why = " ".join(str(first["error"] or "no error message").split()).rstrip(".")
    return (
        f"every trial failed ({len(trials)} of {len(trials)}), so there is no model; the first "
        f"({first['trial_id']}) with: {why}."
    )


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
    return {
        "inside_steps_seconds": inside,
        "slot_seconds": slots,
        "share_outside": max(0.0, 1 - inside / slots),
        "idle_tail_slot_seconds": idle_tail,
        "share_outside_busy": max(0.0, 1 - inside / busy_slots),
    }


def collect(grid, space: SearchSpace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """trials (one row per trial) and epochs (one row per trial and epoch) from Tune's ResultGrid."""
    searched = [p.name for p in space.params]
    statuses = _trial_statuses(grid)
    trows, erows = [], []
    for res in grid:
        cfg = decode_config(res.config or {})
        # a trial that never reported has no metrics: its id is in its folder name, trainable_<id>_<n>_...
        trial_id = (res.metrics or {}).get("trial_id") or "_".join(Path(res.path).name.split("_")[1:3])
        hist = _with_checkpointed_epochs(res.metrics_dataframe, res)
        for _, h in hist.iterrows():
            erows.append({"trial_id": trial_id, **{c: h.get(c) for c in EPOCH_COLUMNS if c != "trial_id"}})
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
        trows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "error": (str(res.error).strip().splitlines() or [""])[-1][:500] if res.error is not None else None,
                "epochs_run": epochs_run,
                "epochs": epochs_planned,
                "best_epoch": int(best_row["epoch"]) if len(best_row) else None,
                "best_metric": float(best_row[space.metric]) if len(best_row) else None,
                "best_val_auc": float(best_row["val_auc"]) if len(best_row) else None,
                "best_val_loss": float(best_row["val_loss"]) if len(best_row) else None,
                "best_val_acc": float(best_row["val_acc"]) if len(best_row) else None,
                "best_val_balanced_acc": _float_or_none(best_row, "val_balanced_acc"),
                "best_val_macro_f1": _float_or_none(best_row, "val_macro_f1"),
                "last_val_auc": float(last["val_auc"]) if len(hist) else None,
                "wall_seconds": float(hist["seconds"].sum()) if len(hist) else 0.0,
                "images_per_s": float(hist["images_per_s"].median()) if len(hist) else None,
                "node_id": last.get("node_id") if len(hist) else None,
                "data_nodes": last.get("data_nodes") if len(hist) else None,
                "device": last.get("device") if len(hist) else None,
                "checkpoint_path": _checkpoint_uri(res.checkpoint),
                **_robustness_of(hist, best_row),
                **{f"p_{k}": encode_value(cfg.get(k)) for k in searched},
            }
        )
    trials = pd.DataFrame(trows)
    if len(trials):
        trials = trials.sort_values("best_metric", ascending=space.mode == "min", na_position="last")
        trials = trials.reset_index(drop=True)
    epochs = pd.DataFrame(erows, columns=EPOCH_COLUMNS)
    return trials, epochs


def _with_checkpointed_epochs(reported: pd.DataFrame | None, res) -> pd.DataFrame:
    """A trial's epochs as Tune's result files hold them, with any they lost taken from its newest checkpoint.

    Each checkpoint carries the trial's epoch reports so far (``history.json``), and reaches storage before
    Tune's driver writes the epoch to ``result.json``, which it copies to storage with the experiment state
    every few seconds. A kill during that copy can leave a state that marks the trial finished beside a
    result file cut short (which Tune then cannot read at all) or one a few epochs behind; resumed, Tune does
    not rewrite a finished trial's files, so without this its epochs would be lost from the tables.
    """
    hist = reported if reported is not None and "epoch" in reported else pd.DataFrame()
    saved = pd.DataFrame(_checkpointed_history(res))
    if len(saved) and "epoch" in saved:
        known = set(hist["epoch"].dropna().astype(int)) if len(hist) else set()
        missing = saved[~saved["epoch"].astype(int).isin(known)]
        if len(missing):
            hist = pd.concat([hist, missing], ignore_index=True) if len(hist) else missing
    if len(hist):
        hist = hist.dropna(subset=["epoch"]).drop_duplicates(subset=["epoch"], keep="last").sort_values("epoch")
    return hist.reset_index(drop=True)


def _checkpointed_history(res) -> list[dict[str, Any]]:
    """The epoch reports in the trial's newest checkpoint that has them (by its last epoch's end); [] if none."""
    fs, folder = res.filesystem, res.path
    try:
        found = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:  # pragma: no cover - storage unreachable: Tune's own files are all there is
        return []
    best: list[dict[str, Any]] = []
    for info in found:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{HISTORY_FILE}") as f:
                rows = json.loads(f.read())
        except (OSError, ValueError):  # a checkpoint of an older version, or one being written
            continue
        if rows and (not best or rows[-1].get("ended_at", 0) > best[-1].get("ended_at", 0)):
            best = rows
    return best


_ROB_COLUMNS = [c for c in TRIAL_COLUMNS if c.startswith(("rob_", "shift_")) and c != "rob_epoch"]


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
    scheme = getattr(checkpoint.filesystem, "type_name", "local").removeprefix("py::")  # R.PatientStorage's
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


def _float_or_none(row: Any, column: str) -> float | None:
    """A column of an epoch row as a float; None when the row is empty or older than the column."""
    value = row.get(column) if len(row) else None
    return None if value is None or pd.isna(value) else float(value)


def _best_row(hist: pd.DataFrame, space: SearchSpace) -> pd.Series:
    col = hist[space.metric].astype(float)
    if col.notna().sum() == 0:
        return hist.iloc[-1]
    return hist.loc[col.idxmax() if space.mode == "max" else col.idxmin()]


def print_leaderboard(trials: pd.DataFrame, space: SearchSpace, top: int = 10) -> None:
    if trials.empty:
        print("[xray_ray] no trials ran", flush=True)
        return
    cols = ["trial_id", "status", "epochs_run", "best_epoch", "best_val_auc", "best_val_loss"] + [
        c for c in trials.columns if c.startswith("p_")
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format):
        print(f"\nLeaderboard (by best {space.metric}, {space.mode}):")
        print(trials[cols].head(top).to_string(index=False), flush=True)
