"""Arms of an ablation that differ only in which epoch they keep (``keep_metric``) share one training.

Selection changes no training step (``keep_metric`` never enters the trial's seed), so such arms would
train the very same weights once per arm. Here each group of them trains once, with the battery scored
every epoch when any arm of the group keeps by a robustness composite, and every epoch's checkpoint kept;
each arm then takes the epoch its own metric picks from that one history, and the weights of that epoch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from xray_ray.config import TrialConfig, decode_config, model_sizes
from xray_ray.model.robustness import COMPOSITES
from xray_ray.search.spaces import METRICS
from xray_ray.search.trial import STATE_FILE

DEFAULT_KEEP = "val_auc"  # what an ablation run keeps by when its arm names no keep_metric


def _training_key(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "keep_metric"}, sort_keys=True, default=str)


def _shareable(config: Mapping[str, Any]) -> bool:
    # the weights a checkpoint holds as "model" are the ones evaluated at that epoch only without averaging
    return config.get("keep", "best") == "best" and not config.get("ema") and not config.get("swa")


def training_arms(arms: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, dict], dict[str, str]]:
    """(the arms to train: name -> config, each arm -> the trained arm whose history it selects from).

    Arms that differ only in ``keep_metric`` (and keep the best epoch without weight averaging) train once,
    under the first one's name; a robustness composite among them has the battery scored every epoch."""
    groups: dict[str, list[str]] = {}
    for name, cfg in arms.items():
        key = _training_key(cfg) if _shareable(cfg) else f"alone:{name}"
        groups.setdefault(key, []).append(name)
    train, source = {}, {}
    for names in groups.values():
        first = names[0]
        cfg = dict(arms[first])
        if len(names) > 1:
            robust = [arms[n]["keep_metric"] for n in names if arms[n].get("keep_metric") in COMPOSITES]
            cfg["keep_metric"] = robust[0] if robust else DEFAULT_KEEP
        train[first] = cfg
        source.update({n: first for n in names})
    return train, source


def kept_epoch(history: pd.DataFrame, metric: str) -> int:
    """The epoch whose `metric` is best in a run's history (the first of ties, as a trial keeps it)."""
    col = pd.to_numeric(history[metric], errors="coerce")
    if col.notna().sum() == 0:
        raise ValueError(f"the run's history has no {metric}; was the battery scored every epoch?")
    best = col.idxmax() if METRICS[metric] == "max" else col.idxmin()
    return int(history.loc[best, "epoch"])


def epoch_model(result, epoch: int, num_classes: int) -> torch.nn.Module:
    """The weights a run had after `epoch` (its checkpoint of that epoch), as an eval-mode CNN."""
    from xray_ray.model.cnn import build_model

    for ckpt, metrics in result.best_checkpoints:
        if int(metrics.get("epoch", -1)) == epoch:
            cfg = TrialConfig.from_dict(decode_config(result.config))
            with ckpt.as_directory() as cdir:
                state = torch.load(Path(cdir) / STATE_FILE, map_location="cpu", weights_only=True)
            model = build_model(num_classes=num_classes, **model_sizes(cfg))
            model.load_state_dict(state["model"])
            return model.eval()
    raise ValueError(f"no checkpoint of epoch {epoch} was kept for run {result.config.get('arm')}")


def arm_metric(config: Mapping[str, Any]) -> str:
    """The metric an arm keeps its epoch by."""
    return config.get("keep_metric") or DEFAULT_KEEP
