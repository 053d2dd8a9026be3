"""The winner's pictures: confusion, ROC/PR, calibration, learning curves, search history and Grad-CAM.

Drawn on matplotlib's Agg canvas without pyplot (no display, no global state); a split of one class only
gives an undefined AUC, not a crash. K > 2 classes (arg-max, no threshold) get the same pictures for K
classes, the one-vs-rest ROC and PR curves from :mod:`xray_ray.ship.pictures_k`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from xray_ray import CLASSES
from xray_ray.ship.pictures_k import note, plot_roc_pr_k, pr_curve, roc_curve, save_figure, top_class
from xray_ray.ship.saliency import plot_saliency

SPLIT_COLORS = {"val": "tab:blue", "test": "tab:red", "extra_val": "tab:green"}
STATUS_STYLE = {"completed": ("o", "tab:green"), "stopped": ("x", "tab:orange"), "errored": ("s", "tab:red")}
PICTURES = {
    "confusion.png": "Confusion matrices at the chosen threshold (rows: true class, columns: predicted).",
    "roc.png": "ROC curves; the filled marker is the chosen operating point, the hollow one is 0.5.",
    "pr.png": "Precision-recall curves with the same operating points.",
    "calibration.png": "Reliability: observed PNEUMONIA fraction against predicted probability, and the spread "
    "of predictions.",
    "learning_curves.png": "Learning curves of the best trials (by best validation AUC).",
    "search_history.png": "Validation AUC of every trial by epoch; crosses mark trials that ASHA stopped early.",
    "saliency.png": "Grad-CAM of the last conv block on test images, correct and wrong (red: evidence for the "
    "predicted class).",
}


def _has_both(y: np.ndarray) -> bool:
    return bool(len(y)) and 0 < int(np.sum(y)) < len(y)


def _operating_point(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float, float]:
    """(false positive rate, sensitivity, precision) when calling PNEUMONIA at p >= t."""
    pred = p >= t
    pos, neg = y == 1, y == 0
    tpr = pred[pos].mean() if pos.any() else math.nan
    fpr = pred[neg].mean() if neg.any() else math.nan
    precision = y[pred].mean() if pred.any() else math.nan
    return float(fpr), float(tpr), float(precision)


def plot_confusion(
    path: Path,
    preds: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold: float | None,
    classes: Sequence[str] = CLASSES,
) -> None:
    """One confusion matrix per split: at the chosen threshold, or of the arg-max class when threshold is None
    (K classes, probabilities [N, K])."""
    names, k = list(preds), len(classes)
    if k == 2:
        fig = Figure(figsize=(3.6 * max(len(names), 1), 3.4))
    else:  # level class names beside each matrix need the room a constrained layout makes
        fig = Figure(figsize=((1.8 + 0.8 * k) * max(len(names), 1), 1.2 + 0.8 * k), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        y, p = preds[name]
        pred = (p >= threshold).astype(int) if threshold is not None else np.argmax(p, axis=1)
        cm = np.array([[np.sum((y == t) & (pred == q)) for q in range(k)] for t in range(k)])
        rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
        # K classes are shaded by the share of their row, so that a rare class's recall reads as clearly
        shade, top = (cm, max(int(cm.max()), 1)) if k == 2 else (cm / rows, 1.0)
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=top)
        for (r, c), v in np.ndenumerate(cm):
            ax.text(
                c,
                r,
                f"{v}\n{v / rows[r, 0]:.0%}",
                ha="center",
                va="center",
                color="white" if shade[r, c] > (cm.max() if k == 2 else top) / 2 else "black",
                fontsize=9,
            )
        ax.set_xticks(range(k), classes, fontsize=8, rotation=0 if k <= 4 else 45)
        # two names fit beside the matrix turned upright; more read better level
        ax.set_yticks(range(k), classes, fontsize=8, rotation=90 if k == 2 else 0, va="center")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        rule = f"t={threshold:.3f}" if threshold is not None else "arg-max"
        ax.set_title(f"{name} (n={len(y)}, {rule})", fontsize=9)
    save_figure(fig, path)


def plot_roc_pr(
    roc_path: Path,
    pr_path: Path,
    preds: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold: float,
    auc: Mapping[str, float],
) -> None:
    """ROC and precision-recall curves per split, chosen threshold and 0.5 marked."""
    roc_fig, pr_fig = Figure(figsize=(4.6, 4.2)), Figure(figsize=(4.6, 4.2))
    rax, pax = roc_fig.add_subplot(), pr_fig.add_subplot()
    rax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
    drawn = 0
    for name, (y, p) in preds.items():
        color = SPLIT_COLORS.get(name, "tab:purple")
        if not _has_both(y):
            continue
        drawn += 1
        fpr, tpr = roc_curve(y, p)
        rax.plot(fpr, tpr, color=color, lw=1.5, label=f"{name} AUC {auc.get(name, math.nan):.3f}")
        rec, prec = pr_curve(y, p)
        pax.step(rec, prec, where="pre", color=color, lw=1.5, label=f"{name} (prevalence {y.mean():.2f})")
        for t, face in ((threshold, color), (0.5, "none")):
            f, s, pr = _operating_point(y, p, t)
            rax.plot([f], [s], "o", mfc=face, mec=color, ms=7)
            if not math.isnan(pr):
                pax.plot([s], [pr], "o", mfc=face, mec=color, ms=7)
    for ax, xl, yl, title in (
        (rax, "1 - specificity", "sensitivity", "ROC"),
        (pax, "recall (sensitivity)", "precision", "Precision-recall"),
    ):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(f"{title} (filled: t={threshold:.3f}, hollow: 0.5)", fontsize=9)
        if drawn:
            ax.legend(fontsize=8, loc="lower right" if ax is rax else "lower left")
        else:
            note(ax, "undefined: every split holds one class only")
    save_figure(roc_fig, roc_path)
    save_figure(pr_fig, pr_path)


def plot_calibration(
    path: Path,
    preds: Mapping[str, tuple[np.ndarray, np.ndarray]],
    bins: int = 10,
    labels: tuple[str, str, str] = (
        f"observed {CLASSES[1]} fraction",
        f"predicted probability of {CLASSES[1]}",
        "Calibration",
    ),
) -> None:
    """Reliability diagram (equal-width bins) above a histogram of the predicted probabilities.

    preds are {split: (outcome 0/1, probability)}; labels name the observed fraction, the probability and the plot.
    """
    fig = Figure(figsize=(4.8, 5.6))
    ax, hx = fig.add_subplot(3, 1, (1, 2)), fig.add_subplot(3, 1, 3)
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for name, (y, p) in preds.items():
        if not len(y):
            continue
        color = SPLIT_COLORS.get(name, "tab:purple")
        idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        full = [b for b in range(bins) if np.any(idx == b)]
        ax.plot(
            [p[idx == b].mean() for b in full], [y[idx == b].mean() for b in full], "o-", color=color, ms=4, label=name
        )
        hx.hist(p, bins=edges, histtype="step", color=color, lw=1.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(labels[0])
    ax.set_title(labels[2], fontsize=9)
    ax.legend(fontsize=8)
    hx.set_xlim(0, 1)
    hx.set_xlabel(labels[1])
    hx.set_ylabel("images")
    save_figure(fig, path)


def top_trials(trials: pd.DataFrame, k: int) -> list[str]:
    """Ids of the k trials with the best validation AUC (NaN last)."""
    if trials is None or trials.empty or "trial_id" not in trials:
        return []
    order = trials.sort_values("best_val_auc", ascending=False, na_position="last", kind="stable")
    return [str(t) for t in order["trial_id"].head(k)]


def plot_learning_curves(
    path: Path, epochs: pd.DataFrame, trials: pd.DataFrame, k: int = 5, winner: str | None = None
) -> None:
    """Losses and validation AUC per epoch of the top-k trials."""
    fig = Figure(figsize=(9.5, 3.8))
    lax, aax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ids = top_trials(trials, k)
    if epochs is not None and not epochs.empty and not ids:
        ids = [str(t) for t in epochs["trial_id"].unique()[:k]]
    shown = 0
    for i, tid in enumerate(ids):
        rows = epochs[epochs["trial_id"].astype(str) == tid].sort_values("epoch") if epochs is not None else []
        if not len(rows):
            continue
        shown += 1
        color = f"C{i % 10}"
        lw = 2.5 if tid == winner else 1.2
        label = f"{tid}{' (winner)' if tid == winner else ''}"
        lax.plot(rows["epoch"], rows["train_loss"], "x--", color=color, lw=lw, ms=4)
        lax.plot(rows["epoch"], rows["val_loss"], "o-", color=color, lw=lw, ms=3, label=label)
        aax.plot(rows["epoch"], rows["val_auc"], "o-", color=color, lw=lw, ms=3, label=label)
    lax.set_title("loss (dashed: train, solid: val)", fontsize=9)
    aax.set_title("validation AUC", fontsize=9)
    for ax in (lax, aax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if shown:
            ax.legend(fontsize=7)
        else:
            note(ax, "no epochs recorded")
    save_figure(fig, path)


def plot_search_history(path: Path, epochs: pd.DataFrame, trials: pd.DataFrame, winner: str | None = None) -> None:
    """Every trial's val AUC by epoch, ended by a marker for its status; and each trial's best AUC."""
    fig = Figure(figsize=(10, 4))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    status = {}
    if trials is not None and not trials.empty:
        status = dict(zip(trials["trial_id"].astype(str), trials["status"].astype(str)))
    if epochs is not None and not epochs.empty:
        for tid, rows in epochs.groupby(epochs["trial_id"].astype(str), sort=False):
            rows = rows.sort_values("epoch")
            marker, color = STATUS_STYLE.get(status.get(tid, "completed"), ("o", "0.4"))
            winning = tid == winner
            ax.plot(
                rows["epoch"],
                rows["val_auc"],
                "-",
                color="black" if winning else "0.55",
                lw=2 if winning else 0.8,
                alpha=1 if winning else 0.7,
                zorder=3 if winning else 2,
            )
            ax.plot(rows["epoch"].iloc[-1:], rows["val_auc"].iloc[-1:], marker, color=color, ms=6, zorder=4)
    else:
        note(ax, "no epochs recorded")
    for st, (marker, color) in STATUS_STYLE.items():
        ax.plot([], [], marker, color=color, label=st)
    ax.plot([], [], "-", color="black", lw=2, label="winner")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation AUC")
    ax.set_title("search history (ASHA stops weak trials early)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if trials is not None and not trials.empty:
        xs = np.arange(len(trials))
        colors = [STATUS_STYLE.get(str(s), ("o", "0.4"))[1] for s in trials["status"]]
        auc = pd.to_numeric(trials["best_val_auc"], errors="coerce").to_numpy(dtype=float)
        finite = auc[np.isfinite(auc)]
        lo = max(0.0, float(finite.min()) - 0.05) if finite.size else 0.0
        top = np.where(np.isfinite(auc), auc, lo)
        bx.bar(xs, top - lo, bottom=lo, color=colors)
        runs = trials["epochs_run"] if "epochs_run" in trials else pd.Series([None] * len(trials))
        for x, a, n in zip(xs, top, runs):
            if n is not None and not pd.isna(n):
                bx.text(x, a, f"{int(n)}", ha="center", va="bottom", fontsize=6, clip_on=True)
        bx.set_xticks(xs, [str(t)[-8:] for t in trials["trial_id"]], rotation=90, fontsize=6)
        bx.set_ylim(lo, min(1.0, float(finite.max()) + 0.05) if finite.size else 1.0)
    else:
        note(bx, "no trials recorded")
    bx.set_title("best validation AUC by trial (number: epochs run)", fontsize=9)
    save_figure(fig, path)


def write_pictures(
    out_dir: Path,
    *,
    model: nn.Module,
    preds: Mapping[str, tuple[np.ndarray, np.ndarray]],
    auc: Mapping[str, float],
    threshold: float | None,
    test_images: np.ndarray | None,
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    winner: str | None,
    classes: Sequence[str] = CLASSES,
) -> list[str]:
    """Draw every picture into out_dir; return the file names in report order.

    Two classes: preds are {split: (y, probability of classes[1])} and threshold is the decision threshold.
    K > 2 classes: preds are {split: (y, probabilities [N, K])}, threshold is None (the arg-max class is called),
    each class's one-vs-rest AUC is computed from preds (`auc` is not read) and `model` returns logits [N, K].
    """
    classes = tuple(classes)
    if (len(classes) > 2) != (threshold is None):
        raise ValueError(f"{len(classes)} classes take {'no' if len(classes) > 2 else 'a'} threshold")
    plot_confusion(out_dir / "confusion.png", preds, threshold, classes)
    if threshold is None:
        plot_roc_pr_k(out_dir / "roc.png", out_dir / "pr.png", preds, classes)
        labels = ("how often the top class is the true one", "probability of the top class", "Calibration, top class")
        plot_calibration(out_dir / "calibration.png", top_class(preds), labels=labels)
    else:
        plot_roc_pr(out_dir / "roc.png", out_dir / "pr.png", preds, threshold, auc)
        labels = (f"observed {classes[1]} fraction", f"predicted probability of {classes[1]}", "Calibration")
        plot_calibration(out_dir / "calibration.png", preds, labels=labels)
    plot_learning_curves(out_dir / "learning_curves.png", epochs, trials, winner=winner)
    plot_search_history(out_dir / "search_history.png", epochs, trials, winner=winner)
    if test_images is not None and "test" in preds:
        y, p = preds["test"]
        plot_saliency(out_dir / "saliency.png", model, test_images, y, p, threshold, classes=classes)
    return [n for n in PICTURES if (out_dir / n).exists()]
