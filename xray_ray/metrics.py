"""Classification metrics, bootstrap intervals and threshold choice, in numpy only.

Every metric is computed from per-image weights: all ones for the point estimate, bootstrap counts
(how often each image, or each patient's images, was drawn) for a whole matrix of resamples at once.
One implementation therefore serves both, and 1000 resamples of a test set cost a few matrix products.
Binary labels: 0 = NORMAL, 1 = PNEUMONIA; scores are P(PNEUMONIA). K classes (K > 2): labels 0..K-1, probabilities
[N, K], the decision the arg-max. Undefined ratios are nan, never errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xray_ray.errors import UserError

ECE_BINS = 15
CI_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "f1",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)
_CHUNK_CELLS = 2_000_000  # resamples x images per matrix: bounds memory to ~16 MB per array


def _check(y: Any, p: Any, *, probabilities: bool) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got shapes {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    if not np.isfinite(p).all():
        raise ValueError("scores must be finite (no nan or inf)")
    if probabilities and ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return y.astype(np.int64), p


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _rank_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision for each row of weights w [B, n]."""
    if y.size == 0:
        return np.full(len(w), np.nan), np.full(len(w), np.nan)
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one column per distinct score
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)  # weight of positives at each score, ascending
    neg = np.add.reduceat(ws * (1 - ys), starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    # Mann-Whitney: each positive beats the negatives below it and ties with those at its score (1/2).
    below = np.cumsum(neg, axis=1) - neg
    auc = _ratio((pos * (below + 0.5 * neg)).sum(axis=1), n_pos * n_neg)
    # Average precision: sum over thresholds, high to low, of (recall step) x precision.
    tps, fps = np.cumsum(pos[:, ::-1], axis=1), np.cumsum(neg[:, ::-1], axis=1)
    precision = np.nan_to_num(_ratio(tps, tps + fps))  # 0/0 only where the recall step is 0 too
    ap = _ratio((pos[:, ::-1] * precision).sum(axis=1), n_pos)
    return auc, ap


def _weighted_metrics(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics for each row of per-image weights w [B, n] (integer counts or ones)."""
    pred = p >= threshold
    tp, fp = w @ (pred & (y == 1)), w @ (pred & (y == 0))
    fn, tn = w @ (~pred & (y == 1)), w @ (~pred & (y == 0))
    n = tp + fp + fn + tn
    bins = np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    onehot = np.zeros((y.size, ECE_BINS))
    onehot[np.arange(y.size), bins] = 1.0
    # Per bin, (count/n) * |mean p - mean y| is |sum p - sum y| / n.
    gap = np.abs(w @ (onehot * p[:, None]) - w @ (onehot * y[:, None])).sum(axis=1)
    auc, ap = _rank_metrics(y, p, w)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": auc,
        "pr_auc": ap,
        "brier": _ratio(w @ (p - y) ** 2, n),
        "ece": _ratio(gap, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
        "prevalence": _ratio(tp + fn, n),
    }


def roc_auc(y: Any, p: Any) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count 1/2); nan unless both classes are present."""
    y, p = _check(y, p, probabilities=False)
    return float(_rank_metrics(y, p, np.ones((1, y.size)))[0][0])


def pr_auc(y: Any, p: Any) -> float:
    """Average precision (area under the precision-recall step curve); nan without positives."""
    y, p = _check(y, p, probabilities=False)
    return float(_rank_metrics(y, p, np.ones((1, y.size)))[1][0])


def binary_metrics(y: Any, p: Any, threshold: float = 0.5) -> dict[str, float | int]:
    """Metrics of calling PNEUMONIA when p >= threshold, plus threshold-free ROC/PR AUC, Brier and ECE."""
    y, p = _check(y, p, probabilities=True)
    row = {k: v[0] for k, v in _weighted_metrics(y, p, float(threshold), np.ones((1, y.size))).items()}
    out: dict[str, float | int] = {
        k: (int(v) if k in ("tp", "fp", "tn", "fn", "n") else float(v)) for k, v in row.items()
    }
    out["threshold"] = float(threshold)
    return out


def bootstrap_ci(
    y: Any, p: Any, threshold: float, groups: Any = None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (1 - alpha) intervals of the CI_METRICS.

    Resamples whole groups (patients) with replacement when `groups` is given, else images; resamples
    where a metric is undefined (e.g. no positives drawn) are left out of that metric's interval."""
    y, p = _check(y, p, probabilities=True)
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    if groups is None:
        gid = np.arange(y.size)
    else:
        groups = np.asarray(groups)
        if groups.shape != y.shape:
            raise ValueError(f"groups must have one entry per image, got {groups.shape} for {y.size} images")
        gid = np.unique(groups, return_inverse=True)[1].ravel()
    n_groups = int(gid.max()) + 1 if y.size else 0
    if n_groups == 0:
        return {k: (float("nan"), float("nan")) for k in CI_METRICS}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in CI_METRICS}
    chunk = max(1, _CHUNK_CELLS // max(y.size, n_groups))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        picks = rng.integers(0, n_groups, size=(b, n_groups)) + n_groups * np.arange(b)[:, None]
        counts = np.bincount(picks.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        metrics = _weighted_metrics(y, p, float(threshold), counts[:, gid].astype(np.float64))
        for k in CI_METRICS:
            draws[k].append(metrics[k])
    out = {}
    for k in CI_METRICS:
        values = np.concatenate(draws[k])
        values = values[~np.isnan(values)]
        if values.size == 0:
            out[k] = (float("nan"), float("nan"))
        else:
            lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[k] = (float(lo), float(hi))
    return out


def choose_threshold(y: Any, p: Any, target_sensitivity: float = 0.95) -> float:
    """Highest threshold t such that calling PNEUMONIA when p >= t reaches the target sensitivity."""
    y, p = _check(y, p, probabilities=False)
    if not 0 < target_sensitivity <= 1:
        raise UserError(f"target sensitivity must be in (0, 1], got {target_sensitivity}.")
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise UserError("cannot choose a threshold: the validation split has no PNEUMONIA images.")
    # Sensitivity with the k highest positives called is k/P; computed as in binary_metrics (tp / P) so
    # the chosen threshold passes that exact check. Ties at the k-th score only add sensitivity.
    k = int(np.argmax(np.arange(1, positives.size + 1) / positives.size >= target_sensitivity))
    return float(positives[k])


# ---- K classes (K > 2): probabilities [N, K], decision = arg-max -------------------------------------------


def _check_k(y: Any, probs: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or probs.shape != (y.size, k):
        raise ValueError(f"labels must be [N] and probabilities [N, {k}], got shapes {y.shape} and {probs.shape}")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must lie in 0..{k - 1}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite (no nan or inf)")
    return y.astype(np.int64), probs


def macro_auc(y: Any, probs: Any) -> float:
    """Mean one-vs-rest ROC AUC over the classes present in `y` (nan when fewer than two are present)."""
    y, probs = _check_k(y, probs, np.asarray(probs).shape[-1])
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    return float(np.mean([roc_auc(y == c, probs[:, c]) for c in present]))


def _k_weighted(y: np.ndarray, pred: np.ndarray, probs: np.ndarray, k: int, w: np.ndarray) -> dict[str, np.ndarray]:
    """Arg-max metrics for each row of weights w [B, n]: confusion [B, K, K] and what follows from it."""
    cells = y * k + pred
    conf = np.stack([w[:, cells == i].sum(axis=1) for i in range(k * k)], axis=1).reshape(len(w), k, k)
    n = conf.sum(axis=(1, 2))
    tp = np.diagonal(conf, axis1=1, axis2=2)
    true_n, pred_n = conf.sum(axis=2), conf.sum(axis=1)
    sens = _ratio(tp, true_n)
    spec = _ratio(n[:, None] - true_n - pred_n + tp, n[:, None] - true_n)
    prec = _ratio(tp, pred_n)
    f1 = _ratio(2 * tp, true_n + pred_n)
    out = {"accuracy": _ratio(tp.sum(axis=1), n), "confusion": conf, "sens": sens, "spec": spec, "prec": prec}
    with np.errstate(invalid="ignore"):
        out["balanced_accuracy"] = np.nanmean(np.where(true_n > 0, sens, np.nan), axis=1)
        out["macro_f1"] = np.nanmean(np.where(true_n > 0, f1, np.nan), axis=1)
    out["f1"] = f1
    picked = np.clip(probs[np.arange(y.size), y], 1e-12, 1.0)
    out["log_loss"] = _ratio(w @ -np.log(picked), n)
    aucs = np.stack([_rank_metrics((y == c).astype(np.int64), probs[:, c], w)[0] for c in range(k)], axis=1)
    out["auc"] = aucs
    with np.errstate(invalid="ignore"):
        out["macro_auc"] = np.nanmean(np.where(true_n > 0, aucs, np.nan), axis=1)
    return out


def multiclass_metrics(y: Any, probs: Any, classes: Any) -> dict[str, Any]:
    """Arg-max metrics of K-class probabilities: accuracy, balanced accuracy, macro F1, macro one-vs-rest AUC,
    log-loss, the K x K confusion matrix (rows true, columns predicted) and each class's one-vs-rest figures."""
    classes = [str(c) for c in classes]
    k = len(classes)
    y, probs = _check_k(y, probs, k)
    m = _k_weighted(y, probs.argmax(axis=1), probs, k, np.ones((1, y.size)))
    with np.errstate(all="ignore"):  # a class absent from y has nan figures, never a warning
        per_class = {
            name: {
                "n": int((y == i).sum()),
                "sensitivity": float(m["sens"][0, i]),
                "specificity": float(m["spec"][0, i]),
                "precision": float(m["prec"][0, i]),
                "f1": float(m["f1"][0, i]),
                "auc": float(m["auc"][0, i]),
            }
            for i, name in enumerate(classes)
        }
    return {
        "n": int(y.size),
        "accuracy": float(m["accuracy"][0]),
        "balanced_accuracy": float(m["balanced_accuracy"][0]),
        "macro_f1": float(m["macro_f1"][0]),
        "macro_auc": float(m["macro_auc"][0]),
        "log_loss": float(m["log_loss"][0]),
        "confusion": m["confusion"][0].astype(np.int64).tolist(),
        "per_class": per_class,
    }


def multiclass_bootstrap(
    y: Any, probs: Any, classes: Any, groups: Any = None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of accuracy, balanced_accuracy, macro_f1, macro_auc and, per class,
    ``sensitivity__NAME``, ``specificity__NAME`` and ``auc__NAME``; whole groups (patients) resampled when given."""
    classes = [str(c) for c in classes]
    k = len(classes)
    y, probs = _check_k(y, probs, k)
    pred = probs.argmax(axis=1)
    gid = np.arange(y.size) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    n_groups = int(gid.max()) + 1 if y.size else 0
    names = ["accuracy", "balanced_accuracy", "macro_f1", "macro_auc"]
    names += [f"{m}__{c}" for c in classes for m in ("sensitivity", "specificity", "auc")]
    if n_groups == 0:
        return {k_: (float("nan"), float("nan")) for k_ in names}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {k_: [] for k_ in names}
    chunk = max(1, _CHUNK_CELLS // max(y.size, n_groups) // max(1, k))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        picks = rng.integers(0, n_groups, size=(b, n_groups)) + n_groups * np.arange(b)[:, None]
        counts = np.bincount(picks.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        with np.errstate(all="ignore"):
            m = _k_weighted(y, pred, probs, k, counts[:, gid].astype(np.float64))
        for key in names[:4]:
            draws[key].append(m[key])
        for i, c in enumerate(classes):
            for short, key in (("sens", "sensitivity"), ("spec", "specificity"), ("auc", "auc")):
                draws[f"{key}__{c}"].append(m[short][:, i])
    out = {}
    for key in names:
        values = np.concatenate(draws[key])
        values = values[~np.isnan(values)]
        lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if values.size else (np.nan,) * 2
        out[key] = (float(lo), float(hi))
    return out


# ---- either kind of scores: P(second class) [N] for two classes, probabilities [N, K] for K > 2 ------------


def auc_of(y: Any, p: Any) -> float:
    """ROC AUC of two-class scores, the macro one-vs-rest AUC of K-class probabilities."""
    return macro_auc(y, p) if np.ndim(p) == 2 else roc_auc(y, p)


def log_loss_of(y: Any, p: Any, eps: float = 1e-7) -> float:
    """Mean cross-entropy of the true class (nan for no images)."""
    y, p = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64)
    if not y.size:
        return float("nan")
    picked = p[np.arange(y.size), y] if p.ndim == 2 else np.where(y == 1, p, 1 - p)
    return float(-np.mean(np.log(np.clip(picked, eps, 1.0))))


def brier_of(y: Any, p: Any) -> float:
    """Brier score: mean squared error of the probabilities; for K classes half the squared distance to the
    one-hot label, so that two classes give the same figure either way."""
    y, p = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64)
    if p.ndim == 2:
        return float(np.mean(np.sum((p - np.eye(p.shape[1])[y]) ** 2, axis=1)) / 2)
    return float(np.mean((p - y) ** 2))


def predicted_class(p: Any) -> np.ndarray:
    """The decision without a chosen threshold: p >= 0.5 for two classes, the arg-max for K."""
    p = np.asarray(p)
    return p.argmax(axis=1) if p.ndim == 2 else (p >= 0.5).astype(np.int64)


def decision_metrics(y: Any, p: Any, k: int = 2) -> dict[str, float]:
    """Balanced accuracy and macro F1 of the decision without a chosen threshold (:func:`predicted_class`):
    ``val_balanced_acc`` and ``val_macro_f1`` of an epoch's report."""
    y = np.asarray(y, dtype=np.int64)
    if not y.size:
        return {"val_balanced_acc": float("nan"), "val_macro_f1": float("nan")}
    pred = predicted_class(p)
    probs = np.asarray(p, dtype=np.float64) if np.ndim(p) == 2 else np.stack([1 - np.asarray(p), np.asarray(p)], 1)
    m = _k_weighted(y, pred, probs, k, np.ones((1, y.size)))
    return {"val_balanced_acc": float(m["balanced_accuracy"][0]), "val_macro_f1": float(m["macro_f1"][0])}
