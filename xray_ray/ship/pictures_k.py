"""The pictures of a winner with K > 2 classes, and the pieces every picture is drawn with.

A K-class winner calls the arg-max class, so its ROC and precision-recall pictures hold one one-vs-rest curve
per class, each marked where the arg-max rule operates for that class. The curves, the Agg canvas save and the
note on an empty plot live here, below :mod:`xray_ray.ship.pictures`, because the two-class pictures use them
too and pictures hands its K-class plots to this module (the two never import each other).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xray_ray.common import atomic_file
from xray_ray.metrics import macro_auc, roc_auc

PICTURES_K = {
    "confusion.png": "Confusion matrices of the arg-max rule (rows: true class, columns: predicted; count and share "
    "of the row).",
    "roc.png": "One-vs-rest ROC curve of each class per split, its AUC in the legend; the dot is where the arg-max "
    "rule operates for that class.",
    "pr.png": "One-vs-rest precision-recall curve of each class per split, with the same operating points.",
    "calibration.png": "Reliability of the top class: how often the most probable class is the true one, against "
    "its probability (the confidence), and the spread of confidences.",
    "learning_curves.png": "Learning curves of the best trials (validation AUC: the macro one-vs-rest AUC).",
    "search_history.png": "Validation macro AUC of every trial by epoch; crosses mark trials that ASHA stopped early.",
    "saliency.png": "Grad-CAM of the last conv block on test images, correct and wrong (red: evidence for the "
    "predicted class).",
}


def save_figure(fig: Figure, path: Path) -> None:
    """Draw `fig` on an Agg canvas (no display, no pyplot state) into a PNG at `path`, atomically."""
    FigureCanvasAgg(fig)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=110, bbox_inches="tight", format="png")


def note(ax: Any, text: str) -> None:
    """A grey note in the middle of an axes that has nothing to show."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.3", wrap=True)


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last index of each run of tied scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    pos, neg = max(int(y.sum()), 1), max(len(y) - int(y.sum()), 1)
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]


def pr_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, starting at recall 0, precision 1."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    return np.r_[0.0, tps / max(int(y.sum()), 1)], np.r_[1.0, precision]


def one_vs_rest(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class: its one-vs-rest labels and scores, ROC AUC (nan unless the split holds it and another class) and
    where the arg-max rule operates (false positive rate, sensitivity, precision; nan where undefined)."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64).reshape(len(y), len(classes))
    pred = probs.argmax(axis=1)
    out = {}
    for i, name in enumerate(classes):
        truth, called = (y == i).astype(int), pred == i
        out[name] = {
            "y": truth,
            "p": probs[:, i],
            "auc": roc_auc(truth, probs[:, i]) if 0 < truth.sum() < len(truth) else math.nan,
            "fpr": float(called[truth == 0].mean()) if (truth == 0).any() else math.nan,
            "sensitivity": float(called[truth == 1].mean()) if truth.any() else math.nan,
            "precision": float(truth[called].mean()) if called.any() else math.nan,
        }
    return out


def top_class(preds: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (1 where the arg-max class is the true one, the arg-max class's probability)}."""
    return {s: ((np.argmax(p, axis=1) == y).astype(int), np.max(p, axis=1)) for s, (y, p) in preds.items()}


def saliency_caption(y: int, p: np.ndarray, correct: bool, threshold: float | None, classes: Sequence[str]) -> str:
    """The true class and the probability; with K classes also the called class, which may be any other."""
    head = f"{'ok' if correct else 'WRONG'} true {classes[y]}"
    if threshold is not None:
        return f"{head}\np={p:.3f}"
    called = int(np.argmax(p))
    return f"{head}\ncalled {classes[called]} p={p[called]:.3f}"


def _grid(n: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    """A figure of n panels, two to a row, so that each panel keeps a readable size in the report."""
    cols = min(max(n, 1), 2)
    rows = max(math.ceil(n / cols), 1)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(max(n, 1))]


def _style(ax: Any, xlabel: str, ylabel: str, title: str, drawn: bool, loc: str) -> None:
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend(fontsize=8, loc=loc)
    else:
        note(ax, "undefined: the split holds one class only")


def plot_roc_pr_k(
    roc_path: Path, pr_path: Path, preds: Mapping[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str]
) -> None:
    """One panel per split with one one-vs-rest ROC (and precision-recall) curve per class, the arg-max rule's
    operating point marked on each; a class the split does not hold (or holds alone) is named, not drawn."""
    names = list(preds)
    roc_fig, raxes = _grid(len(names), 4.6, 4.2)
    pr_fig, paxes = _grid(len(names), 4.6, 4.2)
    for name, rax, pax in zip(names, raxes, paxes):
        y, probs = preds[name]
        rax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
        drawn = 0
        for i, (cls, c) in enumerate(one_vs_rest(y, probs, classes).items()):
            color = f"C{i % 10}"
            if math.isnan(c["auc"]):
                rax.plot([], [], color=color, lw=1.5, ls="--", label=f"{cls}: AUC undefined")
                continue
            drawn += 1
            rax.plot(*roc_curve(c["y"], c["p"]), color=color, lw=1.5, label=f"{cls} AUC {c['auc']:.3f}")
            rax.plot([c["fpr"]], [c["sensitivity"]], "o", color=color, ms=6)
            pax.step(
                *pr_curve(c["y"], c["p"]),
                where="pre",
                color=color,
                lw=1.5,
                label=f"{cls} (prevalence {c['y'].mean():.2f})",
            )
            if not math.isnan(c["precision"]):
                pax.plot([c["sensitivity"]], [c["precision"]], "o", color=color, ms=6)
        macro = macro_auc(y, probs) if len(y) else math.nan
        title = f"{name} (n={len(y)}, macro AUC {'n/a' if math.isnan(macro) else f'{macro:.3f}'})"
        _style(rax, "1 - specificity", "sensitivity", f"ROC, one class vs the rest: {title}", drawn > 0, "lower right")
        _style(
            pax,
            "recall (sensitivity)",
            "precision",
            f"Precision-recall, one class vs the rest: {name}",
            drawn > 0,
            "lower left",
        )
    save_figure(roc_fig, roc_path)
    save_figure(pr_fig, pr_path)
