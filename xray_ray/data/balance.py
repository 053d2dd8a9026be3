"""Balanced sampling: how many copies of each row an epoch draws so that every class weighs the same
(``balanced_repeats``), and the resampling of a batch by those repeats (``resample``), each copy with its
own ``idx`` and so its own augmentation draws. xray_ray.data.prepare applies it before augmenting an epoch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def balanced_repeats(labels: np.ndarray) -> dict[int, float]:
    """Expected copies of each row per label so that an epoch of the same length holds each class present
    (any number of them) equally: n / (K * n_label)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): len(labels) / (len(classes) * int(k)) for c, k in zip(classes, counts)}


COPY_STRIDE = 1 << 32  # a repeated row's k-th copy gets idx + k * COPY_STRIDE: its own augmentation draws


def resample(
    batch: dict[str, np.ndarray], repeats: Mapping[int, float], seed: int, epoch: int
) -> dict[str, np.ndarray]:
    """Each row repeated floor(r) or ceil(r) times (r = repeats[label]), fixed by (seed, epoch, idx)."""
    from xray_ray.data.augment import uniform_draws

    idx = np.asarray(batch["idx"], dtype=np.int64)
    r = np.array([repeats.get(int(y), 1.0) for y in np.asarray(batch["label"])], dtype=np.float64)
    u = uniform_draws(seed ^ 0xBA1A, epoch, idx, 1)[:, 0]
    k = (np.floor(r) + (u < r - np.floor(r))).astype(np.int64)
    rows = np.repeat(np.arange(len(idx)), k)
    copy = np.concatenate([np.arange(n) for n in k]) if len(k) else np.zeros(0, np.int64)
    out = {name: np.asarray(col)[rows] for name, col in batch.items()}
    out["idx"] = idx[rows] + copy.astype(np.int64) * COPY_STRIDE
    return out
