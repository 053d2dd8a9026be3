"""What one trial does per epoch: the torch side of :func:`xray_ray.search.tuner.trainable`.

Build (or restore from Tune's checkpoint) the model and what trains it, then per epoch: train on the
augmented Ray Data stream, evaluate on validation (and the shift battery at ASHA's rungs and the last
epoch), keep the best weights, checkpoint and report to Tune. Imported in trial workers only.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch
from ray import tune
from safetensors.torch import save_file

from xray_ray import metrics as M
from xray_ray.config import TrialConfig, decode_config, model_sizes
from xray_ray.data.augment import strengths_of
from xray_ray.data.streams import Prefetch, epoch_batches, node_code, rows_for
from xray_ray.faults import inject_fault
from xray_ray.model.cnn import build_model
from xray_ray.model.robustness import COMPOSITES
from xray_ray.model.robustness import score as shift_score
from xray_ray.model.train import (
    array_batches,
    make_ema,
    make_loss,
    make_optimizer,
    make_scheduler,
    make_swa,
    predict_probs,
    train_one_epoch,
)
from xray_ray.search.spaces import METRICS
from xray_ray.search.trial import HISTORY_FILE, STATE_FILE, UNSCORED, Runtime, release_freed_memory, trial_seed


@dataclass
class TrialState:
    """The model and what trains it, and the best epoch so far: what a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any
    swa: Any
    swa_from: int  # the first epoch averaged by SWA (past the last epoch when there is no SWA)
    start_epoch: int = 1
    best: float | None = None
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    # every epoch's report so far, also across restarts: a checkpoint carries it (history.json) because Tune's
    # own result files reach storage later than the checkpoint and can be cut short by a kill in between
    history: list[dict[str, Any]] = field(default_factory=list)

    def net(self, epoch: int) -> torch.nn.Module:
        """The weights evaluated after `epoch`: EMA's, SWA's once it averages, else the model's."""
        if self.ema is not None:
            return self.ema.module
        return self.swa.module if self.swa is not None and epoch >= self.swa_from else self.model

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (a restarted trial)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None and "swa" in state:
            self.swa.load_state_dict(state["swa"])
        self.start_epoch, self.best, self.best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        self.best_state = state["best_model"]

    def saved(self, epoch: int) -> dict[str, Any]:
        """The checkpoint's state after `epoch`."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"swa": self.swa.state_dict()} if self.swa is not None else {}),
            "epoch": epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_model": self.best_state,
        }

    def keep_if_better(
        self, current: float, epoch: int, net: torch.nn.Module, better: Callable[[float, float], bool], keep: str
    ) -> None:
        """Keep `net`'s weights when `current` beats the best so far, or every epoch's with keep "last"."""
        best = self.best
        # epochs not scored on the battery have no robustness metric (NaN): a finite value always beats it
        if (
            keep == "last"
            or best is None
            or (math.isfinite(current) and (not math.isfinite(best) or better(current, best)))
        ):
            self.best, self.best_epoch = current, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k != "n_averaged"}


def build_state(cfg: TrialConfig, steps: int, device: torch.device, num_classes: int = 2) -> TrialState:
    """The model, optimizer, schedule and weight averages; restored from Tune's checkpoint when there is one."""
    model = build_model(num_classes=num_classes, **model_sizes(cfg)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    ema = make_ema(model, cfg.ema)
    swa = make_swa(model, cfg.swa)
    swa_from = cfg.epochs - max(1, math.ceil(cfg.swa * cfg.epochs)) + 1 if swa is not None else cfg.epochs + 1
    state = TrialState(model, optimizer, scheduler, ema, swa, swa_from)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a restarted trial continues where its last checkpoint left it
        with ckpt.as_directory() as cdir:
            state.load(torch.load(Path(cdir) / STATE_FILE, map_location=device, weights_only=True))
            if (Path(cdir) / HISTORY_FILE).exists():
                state.history = json.loads((Path(cdir) / HISTORY_FILE).read_text())
    return state


class EpochLoop:
    """One trial's data, losses and reporting: the parts of an epoch around the state it trains."""

    def __init__(self, cfg: TrialConfig, runtime: Runtime, d: dict[str, Any], seed: int, device: torch.device) -> None:
        self.cfg, self.runtime, self.seed, self.device = cfg, runtime, seed, device
        self.train_ds, self.val = d["train"], d["val"]
        self.device_name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
        self.k = len(runtime.classes)
        fractions = runtime.class_fractions if self.k > 2 else ()
        self.loss_fn = make_loss(cfg, runtime.pos_fraction, fractions)
        self.eval_loss = make_loss(cfg.replace(label_smoothing=0.0, class_weighting="none"), runtime.pos_fraction)
        # the metric whose best epoch is kept: the space's, unless the trial names its own (keep_metric)
        self.keep_metric = cfg.keep_metric or runtime.metric
        mode = METRICS[cfg.keep_metric] if cfg.keep_metric else runtime.mode
        self.better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
        self.score_every_epoch = self.keep_metric in COMPOSITES
        self.node_id = ray.get_runtime_context().get_node_id()
        self.codes = {node_code(n["NodeID"]): n["NodeID"] for n in ray.nodes()}
        self.data_nodes: set[str] = set()
        self.strengths = strengths_of(cfg.to_dict())
        self.repeats = d.get("repeats") if cfg.sampler == "balanced" else None
        self.shifted = d.get("shifted")
        self.rows = rows_for(cfg.image_size, device=device.type)

    def stream(self, epoch: int):
        """An epoch's augmented batches, started in the background."""
        cfg, rt = self.cfg, self.runtime

        def make():
            return epoch_batches(
                self.train_ds,
                strengths=self.strengths,
                seed=self.seed,
                epoch=epoch,
                batch_size=cfg.batch_size,
                data_cpus=rt.data_cpus,
                data_tasks=rt.data_tasks,
                data_slot=rt.data_slot,
                repeats=self.repeats,
            )

        return Prefetch(make) if rt.prefetch else make()

    def train(self, state: TrialState, epoch: int, batches) -> dict[str, Any]:
        """One pass over the epoch's batches (and SWA's average once it has started)."""
        seen_nodes: set[int] = set()
        stats = train_one_epoch(
            state.model,
            batches,
            state.optimizer,
            loss_fn=self.loss_fn,
            device=self.device,
            scheduler=state.scheduler,
            ema=state.ema,
            on_batch=lambda b: seen_nodes.update(b["node"].unique().tolist()),
            mixup=self.cfg.mixup,
            generator=torch.Generator().manual_seed(self.seed * 7919 + epoch),
            num_classes=self.k,
        )
        if state.swa is not None and epoch >= state.swa_from:
            state.swa.update_parameters(state.model)
        self.data_nodes.update(self.codes.get(c, str(c)) for c in seen_nodes)
        return stats

    def probs(self, net: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict_probs(net, array_batches(images, labels, self.rows), device=self.device)

    def evaluate(self, net: torch.nn.Module, epoch: int) -> tuple[dict[str, Any], float]:
        """Validation metrics, with the shift battery's at the rungs and the last epoch; and when robustness began."""
        y, p = self.probs(net, self.val.images, self.val.labels)
        if p.ndim == 1:
            with torch.no_grad():
                logit = torch.logit(torch.from_numpy(p).clamp(1e-6, 1 - 1e-6))
                val_loss = float(self.eval_loss(logit, torch.from_numpy(y)))
        else:  # K classes: the cross-entropy of the true class
            val_loss = M.log_loss_of(y, p)
        auc, brier = M.auc_of(y, p), M.brier_of(y, p)
        # K > 2: val_auc is the macro one-vs-rest AUC and val_acc the arg-max accuracy (the columns keep their names)
        val_metrics = {
            "val_auc": auc,
            "val_loss": val_loss,
            "val_acc": float(np.mean(M.predicted_class(p) == y)),
            "val_brier": brier,
            "val_score": auc - brier,
            **M.decision_metrics(y, p, self.k),
        }
        t_rob = time.perf_counter()
        val_metrics.update(UNSCORED)  # every row carries the same columns (Tune's CSV keeps the first row's)
        scored = epoch == self.cfg.epochs or epoch in self.runtime.score_epochs or self.score_every_epoch
        if self.shifted is not None and scored:
            val_metrics.update(
                shift_score(lambda im: self.probs(net, im, np.zeros(len(im), np.int64))[1], self.shifted)
            )
        return val_metrics, t_rob

    def row(
        self,
        state: TrialState,
        epoch: int,
        stats: dict[str, Any],
        val_metrics: dict[str, Any],
        times: tuple[float, float, float, float],
    ) -> dict[str, Any]:
        """The epoch's report: its losses and metrics, timings, where it ran, and the best so far."""
        t0, t1, t_rob, t2 = times
        return {
            "epoch": epoch,
            "train_loss": stats["train_loss"],
            **val_metrics,
            "lr": state.optimizer.param_groups[0]["lr"],
            "seconds": t2 - t0,
            "step_seconds": stats["step_seconds"],
            "eval_seconds": t2 - t1,
            "rob_seconds": t2 - t_rob,
            "images": stats["images"],
            "images_per_s": stats["images_per_s"],
            "node_id": self.node_id,
            "data_nodes": ",".join(sorted(self.data_nodes)),
            "device": self.device_name,
            "best_metric": state.best,
            "best_epoch": state.best_epoch,
            "epochs": self.cfg.epochs,
            "ended_at": time.time(),
        }

    def report(self, state: TrialState, epoch: int, row: dict[str, Any]) -> None:
        """Checkpoint (the training state, the best weights, the config, the epochs so far) and report the epoch."""
        state.history = [*(h for h in state.history if h["epoch"] < epoch), row]
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state.saved(epoch), Path(tmp) / STATE_FILE)
            save_file({k: v.contiguous() for k, v in state.best_state.items()}, str(Path(tmp) / "best.safetensors"))
            (Path(tmp) / "config.json").write_text(json.dumps(self.cfg.to_dict()))
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(state.history))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_trial(config: dict[str, Any], data: dict[int, dict[str, Any]], runtime: Runtime) -> None:
    """One trial: build the CNN from Tune's config, train epoch by epoch, report + checkpoint each epoch."""
    release_freed_memory()  # a reused worker: the previous trial's garbage goes before this one allocates
    cfg = TrialConfig.from_dict(decode_config(config))
    torch.set_num_threads(max(1, int(round(runtime.cpus_per_trial))))
    ray.data.DataContext.get_current().enable_progress_bars = False
    seed = trial_seed(cfg)
    torch.manual_seed(seed)
    device = torch.device("cuda" if runtime.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    d = data[cfg.image_size]
    state = build_state(cfg, max(1, math.ceil(d["n_train"] / cfg.batch_size)), device, len(runtime.classes))
    loop = EpochLoop(cfg, runtime, d, seed, device)
    upcoming = loop.stream(state.start_epoch) if state.start_epoch <= cfg.epochs else None
    for epoch in range(state.start_epoch, cfg.epochs + 1):
        inject_fault(epoch, runtime.fault_dir, runtime.faults)
        t0 = time.perf_counter()
        batches, upcoming = upcoming, None
        stats = loop.train(state, epoch, batches)
        if epoch < cfg.epochs:  # the next epoch's stream starts up while this one validates and reports
            upcoming = loop.stream(epoch + 1)
        t1 = time.perf_counter()
        net = state.net(epoch)
        val_metrics, t_rob = loop.evaluate(net, epoch)
        t2 = time.perf_counter()
        state.keep_if_better(val_metrics.get(loop.keep_metric, float("nan")), epoch, net, loop.better, cfg.keep)
        loop.report(state, epoch, loop.row(state, epoch, stats, val_metrics, (t0, t1, t_rob, t2)))
