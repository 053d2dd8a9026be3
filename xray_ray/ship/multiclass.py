"""The winner of a K-class search (K > 2): the arg-max decision, one look at test, export, model card.

Binary models keep :func:`xray_ray.ship.winner.finalize` (a threshold fixed on validation). With K > 2
classes there is no threshold to fix: the decision is the class with the highest probability, the card
states that rule, and its figures are the K-class ones (macro one-vs-rest AUC, balanced accuracy, macro
F1, log-loss, per-class sensitivity and specificity, the confusion matrix), each with its patient
bootstrap interval, plus the normal-vs-rest figures a radiologist reads first when NORMAL is a class.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xray_ray.data.prepare import SplitArrays
from xray_ray.metrics import binary_metrics, multiclass_bootstrap, multiclass_metrics, roc_auc
from xray_ray.model.cnn import CNN
from xray_ray.serve.runtime import load_exported
from xray_ray.ship import export
from xray_ray.ship.winner import (
    VALIDATION_SPLITS,
    evidence_sections,
    export_checked,
    input_contract_of,
    output_section,
    shift_report,
    split_probs,
    trial_facts,
    write_card,
)

DECISION = "argmax"  # the class with the highest probability (the card's decision_rule says so in words)
DECISION_RULE = "the class with the highest probability in probs"


def normal_vs_rest(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float] | None:
    """NORMAL against every other class: the arg-max is not NORMAL (decision) and 1 - P(NORMAL) (AUC);
    None when NORMAL is not a class."""
    if "NORMAL" not in classes:
        return None
    i = list(classes).index("NORMAL")
    abnormal = (np.asarray(y) != i).astype(np.int64)
    called = (np.asarray(probs).argmax(axis=1) != i).astype(np.float64)
    at = binary_metrics(abnormal, called, 0.5)
    return {
        "sensitivity": at["recall"],
        "specificity": at["specificity"],
        "accuracy": at["accuracy"],
        "roc_auc": roc_auc(abnormal, 1.0 - np.asarray(probs)[:, i]),
    }


def split_figures(
    y: np.ndarray, probs: np.ndarray, classes: Sequence[str], patients: Sequence[str], n_boot: int, seed: int
) -> dict[str, Any]:
    """One split's card figures: the K-class metrics, their patient-bootstrap intervals, normal vs rest."""
    out: dict[str, Any] = multiclass_metrics(y, probs, classes)
    out["patients"] = len(set(patients))
    out["ci"] = multiclass_bootstrap(y, probs, classes, groups=np.asarray(patients), n_boot=n_boot, seed=seed)
    nvr = normal_vs_rest(y, probs, classes)
    if nvr is not None:
        out["normal_vs_rest"] = nvr
    return out


def finalize_multiclass(
    best_dir: Path,
    model: CNN,
    splits: dict[str, SplitArrays],
    run_info: dict,
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    battery: Mapping[str, np.ndarray] | None = None,
    ensemble: Mapping[str, Any] | None = None,
    **_binary_only: Any,
) -> dict:
    """Score validation, then test once, export ONNX + TorchScript (output ``probs`` [N, K]), write model.json,
    the pictures and report.html. Takes :func:`winner.finalize`'s arguments; its threshold ones do not apply."""
    t0 = time.perf_counter()
    best_dir = Path(best_dir)
    best_dir.mkdir(parents=True, exist_ok=True)
    if "val" not in splits or not len(splits["val"]):
        raise ValueError("finalize needs a non-empty 'val' split")
    classes = tuple(run_info["data"]["classes"])
    model = model.cpu().eval()
    preds = {s: split_probs(model, splits[s]) for s in (*VALIDATION_SPLITS, "test") if s in splits and len(splits[s])}
    metrics = {s: split_figures(y, p, classes, splits[s].patients, n_boot, seed) for s, (y, p) in preds.items()}
    robustness = shift_report(model, splits["val"], battery)[0] if battery is not None else None
    diff, checked = export_checked(model, best_dir, splits["val"].images[:64], classes)
    card: dict[str, Any] = {
        "contract_version": export.CONTRACT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trial_id": None,
        "classes": list(classes),
        "decision": DECISION,
        "decision_rule": DECISION_RULE,
        "input": input_contract_of(model),
        "output": output_section(classes),
        "threshold": None,
        "model": model.config.to_dict(),
        **({"ensemble": dict(ensemble)} if ensemble else {}),
        **({"robustness": robustness} if robustness is not None else {}),
        "trial": trial_facts(best_dir, run_info, trials, epochs),
        "metrics": metrics,
        **evidence_sections(run_info, splits, classes, (diff, checked), n_boot, seed),
    }
    card["trial_id"] = card["trial"]["id"]
    card = write_card(best_dir, card, model, preds, metrics, splits, trials, epochs, t0)
    load_exported(best_dir)  # read back the way predict and evaluate will
    return card
