"""Ensembles of a search's trials: greedy selection with replacement, one model under the export contract.

Caruana et al., "Ensemble selection from libraries of models", ICML 2004: start from the best single
model, then repeatedly add (with replacement) the candidate whose addition scores best on validation,
so a member may count several times and its weight is its count. The result is an ``Ensemble`` module
that behaves as one CNN: it takes the same input (float32 [N,1,S,S] in [0,1], members at other sizes
resize inside the graph), and returns the logit of the members' weighted mean probability, so the export,
threshold, report and every reader of a model folder treat it like a single model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xray_ray.model.cnn import CNN, CNNConfig

Preds = Mapping[str, np.ndarray]  # name (clean "val", or a shift) -> P(PNEUMONIA) on that set's images


@dataclass(frozen=True)
class EnsembleConfig:
    """What an ensemble is made of: member configs (each a CNNConfig dict), weights, trial ids."""

    members: tuple[dict, ...]
    weights: tuple[float, ...]
    trial_ids: tuple[str, ...]
    image_size: int
    in_channels: int = 1
    num_classes: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "ensemble",
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            **({"num_classes": self.num_classes} if self.num_classes != 2 else {}),
            "members": [
                {"trial_id": t, "weight": w, "config": dict(m)}
                for t, w, m in zip(self.trial_ids, self.weights, self.members)
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnsembleConfig:
        members = d["members"]
        return cls(
            members=tuple(dict(m["config"]) for m in members),
            weights=tuple(float(m["weight"]) for m in members),
            trial_ids=tuple(str(m["trial_id"]) for m in members),
            image_size=int(d["image_size"]),
            in_channels=int(d.get("in_channels", 1)),
            num_classes=int(d.get("num_classes", 2)),
        )


class Ensemble(nn.Module):
    """Weighted mean of member CNNs' probabilities; forward returns its logit (so sigmoid gives the mean), or
    for K > 2 classes its log (so softmax gives the mean)."""

    __jit_ignored_attributes__ = ["config"]
    __jit_unused_properties__ = ["primary"]

    def __init__(self, members: Sequence[CNN], weights: Sequence[float], trial_ids: Sequence[str]) -> None:
        super().__init__()
        if not members or len(members) != len(weights) or len(members) != len(trial_ids):
            raise ValueError("an ensemble needs one weight and one trial id per member, and at least one member")
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
        w = w / w.sum()
        size = max(m.config.image_size for m in members)
        self.num_classes = int(members[0].num_classes)
        self.outputs = int(members[0].outputs)
        self.config = EnsembleConfig(
            members=tuple(m.config.to_dict() for m in members),
            weights=tuple(float(x) for x in w),
            trial_ids=tuple(map(str, trial_ids)),
            image_size=size,
            in_channels=members[0].config.in_channels,
            num_classes=self.num_classes,
        )
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", w)
        self.sizes: list[int] = [int(m.config.image_size) for m in members]
        self.size = int(size)

    @property
    def primary(self) -> CNN:
        """The member with the largest weight among those at the ensemble's own input size (Grad-CAM in the
        report explains this one, on the ensemble's input)."""
        at_size = [i for i, s in enumerate(self.sizes) if s == self.size]
        return self.members[max(at_size, key=lambda i: float(self.weights[i]))]

    def forward(self, x: Tensor) -> Tensor:
        """x float32 [N, C, S, S] in [0, 1] -> logit of the weighted mean probability [N]; for K > 2 classes
        the log of the weighted mean of the members' softmax [N, K]."""
        if self.outputs > 1:
            q = torch.zeros(x.shape[0], self.outputs, dtype=x.dtype, device=x.device)
            for i, member in enumerate(self.members):
                s = self.sizes[i]
                xi = x if s == self.size else F.interpolate(x, size=[s, s], mode="bilinear", align_corners=False)
                q = q + self.weights[i] * torch.softmax(member(xi), dim=1)
            return torch.log(q.clamp_min(1e-7))
        p = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i, member in enumerate(self.members):
            s = self.sizes[i]
            xi = x if s == self.size else F.interpolate(x, size=[s, s], mode="bilinear", align_corners=False)
            p = p + self.weights[i] * torch.sigmoid(member(xi))
        p = p.clamp(1e-7, 1.0 - 1e-7)
        return torch.log(p) - torch.log(1.0 - p)

    def input_contract(self) -> dict[str, Any]:
        contract = dict(self.primary.input_contract())
        contract["size"] = self.size
        contract["resize"] = f"whole image to {self.size}x{self.size}, bilinear, no crop"
        contract["normalization"] = "inside each member (see its config); members at other sizes resize inside"
        return contract


def from_config(d: Mapping[str, Any]) -> Ensemble:
    """An Ensemble with fresh weights from ``EnsembleConfig.to_dict()`` (load its safetensors next)."""
    cfg = EnsembleConfig.from_dict(d)
    return Ensemble([CNN(CNNConfig(**m), cfg.num_classes) for m in cfg.members], cfg.weights, cfg.trial_ids)


def greedy_select(
    candidates: Mapping[str, Preds], score: Callable[[Preds], float], rounds: int, mode: str = "max"
) -> Counter:
    """Caruana's greedy selection with replacement: ``rounds`` picks, each the candidate whose addition
    gives the best ``score`` of the averaged predictions; returns trial id -> times picked.

    Ties go to the candidate listed first (pass them best-first). Stops early once every addition makes
    the score worse.
    """
    if not candidates or rounds < 1:
        raise ValueError("greedy_select needs candidates and at least one round")
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    names = list(candidates)
    keys = list(candidates[names[0]])
    chosen: Counter = Counter()
    total = {k: np.zeros_like(np.asarray(candidates[names[0]][k], dtype=np.float64)) for k in keys}
    current = None
    for _ in range(rounds):
        best_name, best_score = None, None
        n = sum(chosen.values()) + 1
        for name in names:
            trial = {k: (total[k] + candidates[name][k]) / n for k in keys}
            s = score(trial)
            if np.isfinite(s) and (best_score is None or better(s, best_score)):
                best_name, best_score = name, s
        if best_name is None or (current is not None and better(current, best_score)):
            break
        chosen[best_name] += 1
        current = best_score
        for k in keys:
            total[k] = total[k] + candidates[best_name][k]
    return chosen


def metric_fn(metric: str, y: np.ndarray, y_shifted: np.ndarray | None = None) -> Callable[[Preds], float]:
    """The search's selection metric computed on (averaged) predictions: clean ``val`` and the shifts
    (P(second class) [N] for two classes, probabilities [N, K] for K > 2)."""
    from xray_ray.metrics import auc_of, brier_of, decision_metrics, log_loss_of, predicted_class
    from xray_ray.model.robustness import log_loss, summarize

    def loss(labels: np.ndarray, v: np.ndarray) -> float:
        return log_loss(labels, v) if v.ndim == 1 else log_loss_of(labels, v)

    def clean(p: Preds) -> float:
        v = p["val"]
        auc, brier = auc_of(y, v), brier_of(y, v)
        values = {
            "val_auc": auc,
            "val_loss": loss(y, v),
            "val_acc": float(np.mean(predicted_class(v) == y)),
            "val_brier": brier,
            "val_score": auc - brier,
        }
        if metric not in values:  # only the decision metrics are left
            values.update(decision_metrics(y, v, v.shape[1] if v.ndim == 2 else 2))
        return values[metric]

    def shifted(p: Preds) -> float:
        per = {k: (auc_of(y_shifted, v), loss(y_shifted, v)) for k, v in p.items() if k != "val"}
        return float(summarize(per)[metric])

    return shifted if metric.startswith("rob_") else clean


def candidate_preds(model: nn.Module, val_images: np.ndarray, shifted: Mapping[str, np.ndarray] | None) -> dict:
    """A model's P(PNEUMONIA) on clean validation (``val``) and, when given, on every shift of the battery."""
    from xray_ray.data.streams import rows_for
    from xray_ray.model.train import array_batches, predict_probs

    def probs(images: np.ndarray) -> np.ndarray:
        images = images if images.flags.writeable else images.copy()
        return predict_probs(model, array_batches(images, np.zeros(len(images), np.int64), rows_for(images.shape[-1])))[
            1
        ].astype(np.float64)

    out = {"val": probs(val_images)}
    for name, images in (shifted or {}).items():
        if name != "labels":
            out[name] = probs(images)
    return out


def select(
    members: Mapping[str, CNN],
    val: Mapping[int, tuple[np.ndarray, np.ndarray]],
    batteries: Mapping[int, Mapping[str, np.ndarray]] | None,
    metric: str,
    mode: str,
    rounds: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """Greedy ensemble selection over ``members`` (trial id -> CNN, best first) on validation.

    ``val``: image size -> (images, labels); ``batteries``: image size -> shift battery (needed for the
    ``rob_*`` metrics). Returns the chosen model (a single CNN when one member is picked) and what was done.
    """
    robust = metric.startswith("rob_")
    if robust and not batteries:
        raise ValueError(f"metric {metric} needs the shift battery")
    preds = {}
    for tid, model in members.items():
        s = model.config.image_size
        preds[tid] = candidate_preds(model.eval(), val[s][0], batteries[s] if robust else None)
    y = next(iter(val.values()))[1]
    y_shifted = next(iter(batteries.values()))["labels"] if robust else None
    chosen = greedy_select(preds, metric_fn(metric, y, y_shifted), rounds, mode)
    ids = [t for t in members if t in chosen]
    single_score = metric_fn(metric, y, y_shifted)(preds[next(iter(members))])
    info = {
        "method": "greedy selection with replacement (Caruana et al., ICML 2004)",
        "metric": metric,
        "rounds": rounds,
        "candidates": list(members),
        "picked": {t: int(chosen[t]) for t in ids},
        "score": metric_fn(metric, y, y_shifted)(
            {
                k: np.mean([preds[t][k] * chosen[t] for t in ids], axis=0) * len(ids) / sum(chosen.values())
                for k in preds[ids[0]]
            }
        ),
        "best_single_score": single_score,
    }
    if len(ids) == 1:
        return members[ids[0]], info
    return Ensemble([members[t] for t in ids], [chosen[t] for t in ids], ids).eval(), info
