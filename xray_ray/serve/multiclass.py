"""evaluate's figures for a model of K > 2 classes (numpy only).

The arg-max metrics of `metrics.multiclass_metrics` with patient-bootstrap intervals, the per-class
one-vs-rest figures and the K x K confusion matrix; and, when NORMAL is one of the classes, the
normal-vs-rest figures a radiologist reads first: an image is called abnormal when its arg-max class is
not NORMAL (sensitivity, specificity), and ranked by 1 - P(NORMAL) (ROC and PR AUC).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xray_ray.metrics import binary_metrics, bootstrap_ci, multiclass_bootstrap, multiclass_metrics

NORMAL = "NORMAL"
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss")
PER_CLASS = ("sensitivity", "specificity", "auc")
# normal vs rest: what the arg-max call gives, and what the ranking by 1 - P(NORMAL) gives
CALLED = ("sensitivity", "specificity", "precision", "accuracy", "f1")
RANKED = ("roc_auc", "pr_auc")
COUNTS = ("tp", "fp", "tn", "fn")


def summarize_k(
    y: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Counts and arg-max metrics of K-class probabilities [N, K] with patient-bootstrap intervals ("ci"),
    plus "normal_vs_rest" when the classes include NORMAL."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    classes = [str(c) for c in classes]
    out: dict[str, Any] = {
        "patients": len(set(groups)) if groups is not None else None,
        "counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "decision": "argmax",
        **multiclass_metrics(y, probs, classes),
    }
    ci = multiclass_bootstrap(y, probs, classes, groups=groups, n_boot=n_boot, seed=seed) if len(y) else {}
    if len(y) and "log_loss" not in ci:
        ci["log_loss"] = log_loss_ci(y, probs, groups=groups, n_boot=n_boot, seed=seed)
    out["ci"] = ci
    if NORMAL in classes:
        out["normal_vs_rest"] = normal_vs_rest(y, probs, classes, groups=groups, n_boot=n_boot, seed=seed)
    return out


def log_loss_ci(
    y: np.ndarray,
    probs: np.ndarray,
    *,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean log-loss, whole groups (patients) resampled when given."""
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))  # clipped as multiclass_metrics does
    gid = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    n_groups = int(gid.max()) + 1
    sums, sizes = np.bincount(gid, loss, n_groups), np.bincount(gid, minlength=n_groups)
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_boot, 256):  # 256 resamples at a time bounds the memory for large test sets
        picks = rng.integers(0, n_groups, size=(min(256, n_boot - start), n_groups))
        values.append(sums[picks].sum(axis=1) / sizes[picks].sum(axis=1))
    lo, hi = np.percentile(np.concatenate(values), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def normal_vs_rest(
    y: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Abnormal (any class but NORMAL) against NORMAL: the arg-max call's sensitivity, specificity, precision,
    accuracy, F1 and counts, and the ROC and PR AUC of the score 1 - P(NORMAL), each with its interval."""
    i = list(classes).index(NORMAL)
    abnormal = (np.asarray(y) != i).astype(np.int64)
    called = (np.asarray(probs).argmax(axis=1) != i).astype(np.float64)  # 1 or 0: "at 0.5" is the call itself
    score = np.clip(1.0 - np.asarray(probs, np.float64)[:, i], 0.0, 1.0)  # float error may leave P above 1
    groups_arr = np.asarray(groups) if groups is not None else None
    at_call, ranked = binary_metrics(abnormal, called, 0.5), binary_metrics(abnormal, score, 0.5)
    ci: dict[str, Any] = {}
    if len(abnormal):
        ci_call = bootstrap_ci(abnormal, called, 0.5, groups=groups_arr, n_boot=n_boot, seed=seed)
        ci_rank = bootstrap_ci(abnormal, score, 0.5, groups=groups_arr, n_boot=n_boot, seed=seed)
        ci = {**{k: ci_call[k] for k in CALLED}, **{k: ci_rank[k] for k in RANKED}}
    return {
        "positive": f"not {NORMAL}",
        "rule": f"abnormal when the arg-max class is not {NORMAL}; AUC of 1 - P({NORMAL})",
        "n": int(len(abnormal)),
        "abnormal": int(abnormal.sum()),
        **{k: at_call[k] for k in (*CALLED, *COUNTS)},
        **{k: ranked[k] for k in RANKED},
        "ci": ci,
    }


def fmt(v: Any) -> str:
    """A table cell's value: three decimals, 'n/a' for a missing or undefined one."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def with_ci(value: Any, ci: Any) -> str:
    """'value [lo, hi]', or the value alone when its interval is missing or undefined."""
    if ci is None or any(c is None or (isinstance(c, float) and math.isnan(c)) for c in ci):
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _grid(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_k_table(summary: Mapping[str, Any]) -> str:
    """`summarize_k` as plain text: the headline metrics, each class's figures, the confusion matrix and,
    when present, normal vs rest; every value with its 95% interval where it has one."""
    ci, classes = summary.get("ci") or {}, list(summary["per_class"])
    lines = _grid([["metric", "value [95% CI]"], *([m, with_ci(summary[m], ci.get(m))] for m in HEADLINE)])
    per_class = [["class", "n", *PER_CLASS]]
    for c in classes:
        figures = summary["per_class"][c]
        per_class.append([c, str(figures["n"]), *(with_ci(figures[m], ci.get(f"{m}__{c}")) for m in PER_CLASS)])
    lines += ["", "per class (one vs rest):", *_grid(per_class)]
    confusion = [["true \\ called", *classes]]
    confusion += [[c, *map(str, row)] for c, row in zip(classes, summary["confusion"])]
    lines += ["", "confusion matrix (rows: true class, columns: arg-max class):", *_grid(confusion)]
    nvr = summary.get("normal_vs_rest")
    if nvr is not None:
        rows = [["metric", "value [95% CI]"], *([m, with_ci(nvr[m], nvr["ci"].get(m))] for m in (*CALLED, *RANKED))]
        rows.append([" ".join(COUNTS), " ".join(str(nvr[k]) for k in COUNTS)])
        lines += ["", f"normal vs rest ({nvr['rule']}):", *_grid(rows)]
    return "\n".join(lines)
