"""The winner of a search: threshold on validation, one look at test, export, model card, pictures.

The search picked the winner on validation only. Here the operating threshold is fixed on validation
too, and only then is the test split scored, once. The model card (model.json) is what predict and
evaluate read back: the input contract, the threshold and the evidence behind both.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch

from xray_ray import CLASSES
from xray_ray.common import json_safe, write_text
from xray_ray.data.prepare import SplitArrays
from xray_ray.data.streams import rows_for
from xray_ray.metrics import choose_threshold, roc_auc
from xray_ray.model.cnn import CNN
from xray_ray.model.train import array_batches, predict_probs
from xray_ray.results import versions
from xray_ray.serve.evaluate import fingerprint, summarize
from xray_ray.serve.runtime import VAL_SCORES_FILE, load_exported, sha256_file
from xray_ray.ship import export, report

AGREEMENT_TOLERANCE = 1e-4
VALIDATION_SPLITS = ("val", "extra_val")


def split_probs(model: CNN, arr: SplitArrays, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, P(PNEUMONIA)) for one split: eval mode, no grad, batched (default: ``rows_for`` its size)."""
    # Cached pixels and pandas-3 label columns can be read-only; torch.from_numpy warns about those.
    images, labels = (a if a.flags.writeable else a.copy() for a in (arr.images, np.asarray(arr.labels)))
    return predict_probs(model, array_batches(images, labels, batch_size or rows_for(arr.size)), device="cpu")


def pick_threshold(y: np.ndarray, p: np.ndarray, target_sensitivity: float) -> tuple[float, str]:
    """The validation threshold and, in words, how it was found."""
    if 0 < int(np.sum(y)) < len(y):
        t = float(choose_threshold(y, p, target_sensitivity))
        if math.isfinite(t):
            return t, f"highest threshold whose validation sensitivity is at least {target_sensitivity:g}"
    # With one class in validation no sensitivity/specificity trade-off can be measured.
    return 0.5, "0.5: validation holds one class only, so no threshold could be tuned"


def _agreement(best_dir: Path, images: np.ndarray) -> tuple[float, int]:
    """Max |TorchScript - ONNX| over real images plus random ones (fresh onnxruntime session)."""
    x = (images.astype(np.float32) / 255.0)[:, None]
    session = ort.InferenceSession(str(best_dir / export.ONNX_NAME), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run([session.get_outputs()[0].name], {export.INPUT_NAME: x})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(best_dir / export.TORCHSCRIPT_NAME), map_location="cpu")
    with torch.inference_mode():
        from_script = scripted(torch.from_numpy(x)).numpy()
    real = float(np.max(np.abs(from_onnx - from_script))) if len(x) else 0.0
    noise = export.check_agreement(best_dir, n=8)
    return max(real, noise), len(x) + 8


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write strict JSON (NaN/inf as null) atomically."""
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def _counts(arr: SplitArrays, classes: Sequence[str] = CLASSES) -> dict[str, int]:
    labels = np.asarray(arr.labels)
    return {
        "n": len(labels),
        **{name: int(np.sum(labels == i)) for i, name in enumerate(classes)},
        "patients": len(set(arr.patients)),
    }


def trial_facts(
    best_dir: Path, run_info: Mapping[str, Any], trials: pd.DataFrame, epochs: pd.DataFrame
) -> dict[str, Any]:
    """The card's trial section: which trial (or ensemble) won, on what, its config and training time."""
    config_path = best_dir / export.CONFIG_NAME
    config = export.load_config(config_path) if config_path.exists() else {}
    chosen = dict(run_info.get("winner") or {})
    trial_id = chosen.get("trial_id") or config.get("trial_id")
    if trial_id is None and trials is not None and len(trials):
        trial_id = report.top_trials(trials, 1)[0]
    row: dict[str, Any] = {}
    if trials is not None and len(trials) and trial_id is not None:
        match = trials[trials["trial_id"].astype(str) == str(trial_id)]
        row = match.iloc[0].to_dict() if len(match) else {}
    seconds = row.get("wall_seconds")
    if (seconds is None or pd.isna(seconds)) and epochs is not None and len(epochs) and trial_id is not None:
        seconds = float(epochs.loc[epochs["trial_id"].astype(str) == str(trial_id), "seconds"].sum())
    return {
        "id": None if trial_id is None else str(trial_id),
        "config": {k: v for k, v in config.items() if k not in ("trial_id", "best_epoch")},
        "best_epoch": chosen.get("best_epoch", config.get("best_epoch", row.get("best_epoch"))),
        "epochs_run": row.get("epochs_run"),
        "status": row.get("status"),
        "selection_metric": chosen.get("selection_metric", "val_auc"),
        "selection_value": chosen.get("selection_value", row.get("best_metric")),
        "training_seconds": seconds,
    }


def data_summary(
    run_info: Mapping[str, Any], splits: Mapping[str, SplitArrays], classes: Sequence[str] = CLASSES
) -> dict[str, Any]:
    """The card's data section: source, splits, per-split counts by class, fingerprints."""
    data = dict(run_info.get("data") or {})
    split_info = dict(data.pop("splits", {}) or {})
    return {
        "spec": data.get("spec"),
        "source": data.get("source"),
        "skipped_files": data.get("skipped"),
        "seed": run_info.get("seed", split_info.get("seed")),
        "split_method": split_info.get("method"),
        "split": split_info,
        "counts": {name: _counts(arr, classes) for name, arr in splits.items()},
        "fingerprints": {name: fingerprint(arr.uids, arr.images) for name, arr in splits.items()},
    }


def input_contract_of(model: CNN) -> dict[str, Any]:
    """The card's input section: what a caller feeds the exported graph."""
    s = model.config.image_size
    return {
        "name": export.INPUT_NAME,
        "size": s,
        "channels": model.config.in_channels,
        "shape": ["N", model.config.in_channels, s, s],
        "dtype": "float32",
        "layout": "NCHW",
        "scaling": "divide 8-bit grayscale by 255",
        "resize": f"whole image to {s}x{s}, bilinear, no crop",
        "decode": "xray_ray.data.images.load_gray: EXIF orientation applied, colour to 8-bit grayscale (PIL 'L'), "
        "alpha on black, high bit depth scaled by its range",
        "normalization": model.input_contract().get("normalization"),
    }


def shift_report(
    model: CNN, val: SplitArrays, battery: Mapping[str, np.ndarray]
) -> tuple[dict, np.ndarray, np.ndarray]:
    """The model's scores on the shift battery of validation, and its pooled (labels, probabilities)."""
    from xray_ray.metrics import log_loss_of, macro_auc
    from xray_ray.model.robustness import SHIFTS, log_loss, summarize
    from xray_ray.ship.ensemble import candidate_preds

    preds = candidate_preds(model, val.images, battery)
    y = battery["labels"]
    per = {
        name: (roc_auc(y, p), log_loss(y, p)) if p.ndim == 1 else (macro_auc(y, p), log_loss_of(y, p))
        for name, p in preds.items()
        if name != "val"
    }
    report_ = {
        "images": int(len(y)),
        "shifts": {name: {"what": SHIFTS[name], "auc": auc, "log_loss": loss} for name, (auc, loss) in per.items()},
        **summarize(per),
    }
    shifted = [p for name, p in preds.items() if name != "val"]
    return report_, np.tile(y, len(shifted)), np.concatenate(shifted)


def finalize(
    best_dir: Path,
    model: CNN,
    splits: dict[str, SplitArrays],
    run_info: dict,
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    *,
    target_sensitivity: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    battery: Mapping[str, np.ndarray] | None = None,
    threshold_rule: str = "clean",
    ensemble: Mapping[str, Any] | None = None,
) -> dict:
    """Threshold on val, score test once, export ONNX + TorchScript, write model.json, pictures, report.html.

    ``battery`` (the shift battery of val, ``xray_ray.model.robustness``) adds the card's robustness section;
    ``threshold_rule`` "shifted" meets the target sensitivity on clean and shifted validation scores
    pooled, so that the threshold still holds when images look different ("clean": on clean val only).
    """
    t0 = time.perf_counter()
    best_dir = Path(best_dir)
    best_dir.mkdir(parents=True, exist_ok=True)
    if "val" not in splits or not len(splits["val"]):
        raise ValueError("finalize needs a non-empty 'val' split to choose the threshold on")
    model = model.cpu().eval()

    classes = tuple((run_info.get("data") or {}).get("classes") or CLASSES)
    preds = {s: split_probs(model, splits[s]) for s in VALIDATION_SPLITS if s in splits and len(splits[s])}
    threshold, method, robustness = _fix_threshold(
        model, splits["val"], preds["val"], battery, threshold_rule, target_sensitivity
    )
    metrics = _score_test(model, splits, preds, threshold, n_boot, seed)
    at_val = metrics["val"]["at_threshold"]
    diff, checked = export_checked(model, best_dir, splits["val"].images[:64], classes)

    trial = trial_facts(best_dir, run_info, trials, epochs)
    card: dict[str, Any] = {
        "contract_version": export.CONTRACT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trial_id": trial["id"],
        "classes": list(classes),
        **({"positive_class": classes[1]} if classes != CLASSES else {}),
        "input": input_contract_of(model),
        "output": output_section(classes),
        "threshold": _threshold_section(threshold, method, threshold_rule, target_sensitivity, at_val, classes),
        "model": model.config.to_dict(),
        **({"ensemble": dict(ensemble)} if ensemble else {}),
        **({"robustness": robustness} if robustness is not None else {}),
        "trial": trial,
        "metrics": metrics,
        **evidence_sections(run_info, splits, classes, (diff, checked), n_boot, seed),
    }
    card = write_card(best_dir, card, model, preds, metrics, splits, trials, epochs, t0)
    # read back the way predict and evaluate will: card fields, graph contract, model.onnx's sha256
    load_exported(best_dir)
    return card


def evidence_sections(
    run_info: Mapping[str, Any],
    splits: Mapping[str, SplitArrays],
    classes: Sequence[str],
    agreement: tuple[float, int],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """The card's closing sections, whatever the decision: bootstrap settings, data, export check, versions."""
    return {
        "bootstrap": {"n_boot": n_boot, "unit": "patient", "alpha": 0.05, "seed": seed},
        "data": data_summary(run_info, splits, classes),
        "export": export_section(*agreement),
        "versions": {k: v for k, v in versions().items() if k != "platform"},
        "git_commit": run_info.get("git_commit"),
    }


def _score_test(
    model: CNN, splits: dict[str, SplitArrays], preds: dict, threshold: float, n_boot: int, seed: int
) -> dict[str, Any]:
    """Score test (into `preds`) and summarize every scored split at the fixed threshold."""
    # Test is scored here, once, after the threshold is fixed: nothing below feeds back into a choice.
    if "test" in splits and len(splits["test"]):
        preds["test"] = split_probs(model, splits["test"])
    return {
        s: summarize(y, p, threshold, groups=splits[s].patients, n_boot=n_boot, seed=seed)
        for s, (y, p) in preds.items()
    }


def output_section(classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """The model card's description of the model's output: [N] for two classes, [N, K] for K > 2."""
    name, meaning = export.output_of(classes)
    return {
        "name": name,
        "shape": ["N"] if len(classes) == 2 else ["N", len(classes)],
        "dtype": "float32",
        "meaning": meaning,
    }


def export_section(diff: float, checked: int) -> dict[str, Any]:
    """The model card's export files and how closely ONNX and TorchScript agreed on `checked` images."""
    return {
        "onnx": export.ONNX_NAME,
        "torchscript": export.TORCHSCRIPT_NAME,
        "weights": export.WEIGHTS_NAME,
        "max_abs_diff": diff,
        "tolerance": AGREEMENT_TOLERANCE,
        "images": checked,
    }


def _fix_threshold(
    model: CNN,
    val: SplitArrays,
    val_preds: tuple[np.ndarray, np.ndarray],
    battery: Mapping[str, np.ndarray] | None,
    threshold_rule: str,
    target_sensitivity: float,
) -> tuple[float, str, dict | None]:
    """(threshold, how it was chosen, the robustness section or None), from validation only."""
    robustness = None
    threshold, method = pick_threshold(*val_preds, target_sensitivity)
    if battery is not None:
        robustness, y_shift, p_shift = shift_report(model, val, battery)
        if threshold_rule == "shifted":
            y_val, p_val = val_preds
            threshold, method = pick_threshold(
                np.concatenate([y_val, y_shift]), np.concatenate([p_val, p_shift]), target_sensitivity
            )
            method += " on clean and shifted validation images pooled (the shift battery)"
    elif threshold_rule == "shifted":
        raise ValueError("the shifted threshold rule needs the shift battery")
    return threshold, method, robustness


def export_checked(
    model: CNN, best_dir: Path, images: np.ndarray, classes: Sequence[str] = CLASSES
) -> tuple[float, int]:
    """Weights (unless there), TorchScript and ONNX into best_dir; (their largest difference, images compared)."""
    if not (best_dir / export.WEIGHTS_NAME).exists():
        export.save_weights(model, best_dir / export.WEIGHTS_NAME, classes)
    export.export_torchscript(model, best_dir / export.TORCHSCRIPT_NAME, classes)
    export.export_onnx(model, best_dir / export.ONNX_NAME, classes=classes)
    diff, checked = _agreement(best_dir, images)
    if not diff < AGREEMENT_TOLERANCE:
        raise RuntimeError(
            f"ONNX and TorchScript disagree by {diff:.2e} (> {AGREEMENT_TOLERANCE:g}); the export is not trustworthy"
        )
    return diff, checked


def _threshold_section(
    threshold: float,
    method: str,
    threshold_rule: str,
    target_sensitivity: float,
    at_val: Mapping[str, Any],
    classes: Sequence[str] = CLASSES,
) -> dict:
    """The card's threshold: its value, rule and how it was chosen, and what it gives on validation."""
    return {
        "value": threshold,
        "rule": f"{classes[1]} when {export.output_of(classes)[0]} >= value, else {classes[0]}",
        "method": method,
        "split": "val",
        "rule_name": threshold_rule,
        "target_sensitivity": target_sensitivity,
        "val_sensitivity": at_val["recall"],
        "val_specificity": at_val["specificity"],
        "default": 0.5,
    }


def write_card(
    best_dir: Path,
    card: dict,
    model: CNN,
    preds: dict,
    metrics: dict,
    splits: dict[str, SplitArrays],
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    t0: float,
) -> dict:
    """Add the files' hashes and the pictures to the card; write model.json, the pictures and report.html.

    A K-class card (K > 2) has no threshold: its pictures and report show the arg-max decision."""
    y_val, p_val = preds["val"]
    k_classes = len(card["classes"]) > 2
    # validation's labels and scores, what a site check (xray-ray adapt) compares a new site's scores with
    scores = {
        "labels": np.asarray(y_val).astype(int).tolist(),
        ("probs" if k_classes else "prob_pneumonia"): np.asarray(p_val, float).tolist(),
    }
    write_text(best_dir / VAL_SCORES_FILE, json.dumps(scores))
    names = (export.ONNX_NAME, export.TORCHSCRIPT_NAME, export.WEIGHTS_NAME, VAL_SCORES_FILE)
    card["files"] = {name: sha256_file(best_dir / name) for name in names}
    auc = {s: m["macro_auc"] if k_classes else m["at_threshold"]["roc_auc"] for s, m in metrics.items()}
    test_images = splits["test"].images if "test" in preds else None
    card["pictures"] = report.write_pictures(
        best_dir,
        model=getattr(model, "primary", model),
        preds=preds,
        auc=auc,
        threshold=None if k_classes else card["threshold"]["value"],
        test_images=test_images,
        trials=trials,
        epochs=epochs,
        winner=card["trial"]["id"],
        classes=tuple(card["classes"]),
    )
    card["report"] = "report.html"
    card["finalize_seconds"] = round(time.perf_counter() - t0, 2)
    card = json_safe(card)
    write_json_atomic(card, best_dir / "model.json")
    report.write_html(best_dir, card, trials, card["pictures"])
    return card
