"""One epoch of training and one pass of evaluation. Knows only "an iterable of batches".

A batch is ``{"image": uint8 tensor [B,S,S], "label": int tensor [B]}``: Ray Data in a search, a list of
tensors in unit tests. Pixels become model input here and only here: float32 [B,1,S,S] in [0, 1].
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from xray_ray.config import TrialConfig


def to_input(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B,S,S] -> float32 [B,1,S,S] in [0, 1] on ``device`` (channels_last on CUDA)."""
    x = images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Plain in-memory batches in order (evaluation, tests, the baseline loop)."""
    for i in range(0, len(labels), batch_size):
        # as_tensor copies read-only arrays (pandas 3 hands out read-only columns) rather than warn
        yield {
            "image": torch.as_tensor(np.array(images[i : i + batch_size])),
            "label": torch.as_tensor(np.array(labels[i : i + batch_size])),
        }


def make_loss(
    cfg: TrialConfig, pos_fraction: float, class_fractions: Sequence[float] = ()
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Binary cross-entropy on one logit (two classes, ``pos_fraction`` the second's share of train), or
    softmax cross-entropy on K logits when ``class_fractions`` names K > 2 shares; with optional class
    balancing and label smoothing. Targets are labels, or soft targets (mixup): [B] for two classes, [B, K]."""
    if len(class_fractions) > 2:
        return _softmax_loss(cfg, class_fractions)
    pos_weight = None
    if cfg.class_weighting == "balanced" and 0 < pos_fraction < 1:
        pos_weight = torch.tensor((1 - pos_fraction) / pos_fraction)
    ls = cfg.label_smoothing

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = labels.float()
        if ls:
            y = y * (1 - ls) + 0.5 * ls
        pw = pos_weight.to(logits.device) if pos_weight is not None else None
        return F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pw)

    return loss_fn


def _softmax_loss(cfg: TrialConfig, fractions: Sequence[float]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """K-class cross-entropy; "balanced" weighting gives each class the weight 1 / (K * its share of train)."""
    weight = None
    if cfg.class_weighting == "balanced":
        shares = torch.tensor([max(float(f), 1e-6) for f in fractions])
        weight = 1.0 / (len(fractions) * shares)
    ls = cfg.label_smoothing

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels if labels.is_floating_point() else labels.long()
        w = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=ls)

    return loss_fn


def make_optimizer(model: nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# one cycle (Smith and Topin 2019), by OneCycleLR's defaults: pct_start, div_factor, final_div_factor
ONE_CYCLE_RISE, ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV = 0.3, 25.0, 1e4


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over the trial's own epochs: linear warm-up, then cosine to 0 or constant; or one cycle."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch
    rise = max(1.0, ONE_CYCLE_RISE * total - 1)  # OneCycleLR's phase ends: the peak, then the last step

    def factor(step: int) -> float:
        if cfg.schedule == "onecycle":  # as torch.optim.lr_scheduler.OneCycleLR with its defaults
            start, end = 1 / ONE_CYCLE_DIV, 1 / (ONE_CYCLE_DIV * ONE_CYCLE_FINAL_DIV)
            if step <= rise:
                return 1 + (start - 1) * 0.5 * (1 + math.cos(math.pi * step / rise))
            progress = min(1.0, (step - rise) / max(1.0, total - 1 - rise))
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Exponential moving average of the weights (and BatchNorm buffers), or None when off."""
    if not decay:
        return None
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
    )


def make_swa(model: nn.Module, share: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Equal-weight average of the weights (and BatchNorm buffers) at the end of the last epochs, or None."""
    if not share:
        return None
    return torch.optim.swa_utils.AveragedModel(model, use_buffers=True)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable,
    device: torch.device | str = "cpu",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    on_batch: Callable[[dict], None] | None = None,
    mixup: float = 0.0,
    generator: torch.Generator | None = None,
    num_classes: int = 2,
) -> dict[str, float]:
    """Train over ``batches`` once. Returns mean loss, images, seconds inside steps, images per second.

    ``mixup`` > 0 blends each batch with a shuffled copy of itself, images and labels alike, by a weight
    drawn from Beta(mixup, mixup) (Zhang et al., ICLR 2018); ``generator`` makes those draws repeatable.
    With ``num_classes`` > 2 the blended labels are soft targets [B, K].
    """
    model.train()
    device = torch.device(device)
    amp = device.type == "cuda"
    total_loss, n, step_seconds = 0.0, 0, 0.0
    t_epoch = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        x = to_input(batch["image"], device)
        y = batch["label"].to(device, non_blocking=True)
        if mixup > 0 and len(y) > 1:
            x, y = mix(x, y, mixup, generator, num_classes)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (NaN or inf); lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        b = int(y.shape[0])
        total_loss += float(loss.detach()) * b
        n += b
        if amp:
            torch.cuda.synchronize()
        step_seconds += time.perf_counter() - t0
        if on_batch is not None:
            on_batch(batch)
    wall = time.perf_counter() - t_epoch
    return {
        "train_loss": total_loss / max(n, 1),
        "images": n,
        "step_seconds": step_seconds,
        "wall_seconds": wall,
        "images_per_s": n / wall if wall > 0 else float("nan"),
    }


def mix(
    x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None, num_classes: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup of a batch with a permutation of itself; labels become the same blend (cross-entropy is linear
    in its target, so this equals blending the two losses): a float [B] for two classes, one-hot rows
    blended into [B, K] for K > 2."""
    lam = (
        float(torch.distributions.Beta(alpha, alpha).sample().item())
        if generator is None
        else float(
            np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator))).beta(alpha, alpha)
        )
    )
    perm = torch.randperm(len(y), generator=generator).to(x.device)
    yf = y.float() if num_classes == 2 else F.one_hot(y.long(), num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * yf + (1 - lam) * yf[perm]


@torch.no_grad()
def predict_probs(
    model: nn.Module, batches: Iterable[dict[str, Any]], *, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over ``batches``, model in eval mode: P(second class) [N] from a one-logit
    model (two classes), softmax rows [N, K] from a K-logit one."""
    model.eval()
    device = torch.device(device)
    ys, ps = [], []
    for batch in batches:
        x = to_input(batch["image"], device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        logits = logits.float()
        ps.append((torch.softmax(logits, dim=1) if logits.ndim == 2 else torch.sigmoid(logits)).cpu().numpy())
        ys.append(batch["label"].cpu().numpy())
    if not ps:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(ys).astype(np.int64), np.concatenate(ps).astype(np.float32)
