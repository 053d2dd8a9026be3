"""Grad-CAM of the winner on test images, correct and wrong: which regions drove its decision.

Two classes: the evidence for the class called at the threshold; K > 2: for the arg-max class (or a given one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from xray_ray import CLASSES
from xray_ray.ship.pictures_k import note, saliency_caption, save_figure


def _last_activation(model: nn.Module) -> nn.Module:
    # The last ReLU of the last conv block keeps twice the resolution of the block's pooled output.
    block = model.features[-1] if hasattr(model, "features") and len(model.features) else model
    relus = [m for m in block.modules() if isinstance(m, nn.ReLU)]
    return relus[-1] if relus else block


def grad_cam(
    model: nn.Module, x: torch.Tensor, threshold: float | None = 0.5, target: np.ndarray | None = None
) -> np.ndarray:
    """Grad-CAM maps [N, S, S] in [0, 1] for the predicted class, from the last conv block.

    One logit per image: the class called at `threshold`. Logits [N, K]: the class in `target` (one index per
    image, so that the map explains the class a caption names), else the arg-max of the logits.
    """
    model.eval()
    layer = _last_activation(model)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            if logits.ndim == 2 and logits.shape[1] > 1:
                idx = logits.argmax(dim=1) if target is None else torch.as_tensor(target, dtype=torch.long)
                score = logits.gather(1, idx.reshape(-1, 1)).sum()
            else:
                # Explain the predicted class: the PNEUMONIA logit, or its negative for NORMAL.
                called = torch.sigmoid(logits) >= threshold
                score = torch.where(called, logits, -logits).sum()
            (grads,) = torch.autograd.grad(score, captured[-1])
    finally:
        hook.remove()
    acts = captured[-1].detach()
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).numpy()


def pick_examples(y: np.ndarray, p: np.ndarray, threshold: float | None, k: int = 4) -> list[tuple[int, bool]]:
    """Up to k confident correct and k confidently wrong images, mixing classes: (index, correct).

    threshold None: p are K-class probabilities [N, K], the arg-max class is called and its probability is the
    confidence.
    """
    if threshold is None:
        pred, confidence, order = np.argmax(p, axis=1), np.max(p, axis=1), range(p.shape[1])
    else:
        pred, confidence, order = (p >= threshold).astype(int), np.abs(p - threshold), (1, 0)
    out: list[tuple[int, bool]] = []
    for correct in (True, False):
        groups = [np.flatnonzero(((pred == y) == correct) & (y == c)) for c in order]
        groups = [g[np.argsort(-confidence[g], kind="stable")] for g in groups]
        chosen: list[int] = []
        while len(chosen) < k and any(len(g) for g in groups):
            for g in groups:
                if len(g) and len(chosen) < k:
                    chosen.append(int(g[0]))
            groups = [g[1:] for g in groups]
        out += [(i, correct) for i in chosen]
    return out


def plot_saliency(
    path: Path,
    model: nn.Module,
    images: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    threshold: float | None,
    k: int = 4,
    classes: Sequence[str] = CLASSES,
) -> None:
    """Grad-CAM overlays for a few correct and wrong test images (threshold None: K classes, arg-max)."""
    picks = pick_examples(y, p, threshold, k)
    cols = max(k, 1)
    fig = Figure(figsize=(2.2 * cols, 4.8))
    if not picks:
        note(fig.add_subplot(), "no test images")
        save_figure(fig, path)
        return
    idx = [i for i, _ in picks]
    x = torch.from_numpy(images[idx]).float().div(255).unsqueeze(1)
    cams = grad_cam(model, x, threshold, target=None if threshold is not None else np.argmax(p[idx], axis=1))
    slots = {True: 0, False: 0}
    for (i, correct), cam in zip(picks, cams):
        row = 0 if correct else 1
        ax = fig.add_subplot(2, cols, row * cols + slots[correct] + 1)
        slots[correct] += 1
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(
            saliency_caption(int(y[i]), p[i], correct, threshold, classes),
            fontsize=7,
            color="black" if correct else "tab:red",
        )
        ax.axis("off")
    save_figure(fig, path)
