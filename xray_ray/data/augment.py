"""Per-epoch augmentation as a pure batch function (Ray Data's ``map_batches`` contract).

``augment_batch(batch, strengths=..., seed=..., epoch=...)`` takes ``{"image": uint8 [N,S,S], "idx": int64 [N],
...}`` and returns the same dict with augmented images. Each image's random draws are a hash of
(seed, epoch, idx), so the result does not depend on how Ray Data cuts the data into batches or on which
worker runs it: the same seed and epoch give the same images, anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

STRENGTHS = ("zoom", "rotate", "shift", "hflip", "vflip", "brightness", "contrast", "gamma", "blur", "crop", "erase")
_N_DRAWS = 11
_EXTRA_KEY = 0x5EED  # a second, independent draw stream for crop and erase (the first stays as it was)


def strengths_of(config: Mapping[str, float]) -> dict[str, float]:
    """The augmentation strengths found in a (trial) config."""
    return {k: float(config.get(k, 0.0)) for k in STRENGTHS}


def uniform_draws(seed: int, epoch: int, idx: np.ndarray, k: int = _N_DRAWS) -> np.ndarray:
    """Counter-based uniforms in [0, 1): shape [len(idx), k], a pure function of (seed, epoch, idx, j)."""
    with np.errstate(over="ignore"):
        key = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(epoch) * np.uint64(0xD1B54A32D192ED03)
        x = idx.astype(np.uint64)[:, None] * np.uint64(_N_DRAWS) + np.arange(k, dtype=np.uint64)[None, :]
        x = x ^ key
        # splitmix64 finaliser
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def augment_batch(
    batch: dict[str, np.ndarray], *, strengths: Mapping[str, float], seed: int, epoch: int
) -> dict[str, np.ndarray]:
    """Augment ``batch["image"]`` (uint8 [N,S,S]) in a way fixed by (seed, epoch, batch["idx"])."""
    s = {k: float(strengths.get(k, 0.0)) for k in STRENGTHS}
    images = np.asarray(batch["image"])
    if images.dtype == object:  # Ray may hand a ragged-typed column; our images are all S x S
        images = np.stack(list(images))
    if not any(s.values()) or len(images) == 0:
        return {**batch, "image": images}
    torch.set_num_threads(1)  # the map task owns at most one core's worth of work
    u = torch.from_numpy(uniform_draws(seed, epoch, np.asarray(batch["idx"]))).float()
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)  # [N,1,S,S]
    n = x.shape[0]

    v = (
        torch.from_numpy(uniform_draws(seed ^ _EXTRA_KEY, epoch, np.asarray(batch["idx"]), 9)).float()
        if s["crop"] or s["erase"]
        else None
    )
    if s["zoom"] or s["rotate"] or s["shift"] or s["hflip"] or s["vflip"] or s["crop"]:
        scale = 1.0 + s["zoom"] * (2 * u[:, 0] - 1)
        angle = math.radians(s["rotate"]) * (2 * u[:, 1] - 1)
        tx = 2 * s["shift"] * (2 * u[:, 2] - 1)
        ty = 2 * s["shift"] * (2 * u[:, 3] - 1)
        fx = torch.where(u[:, 4] < s["hflip"], -1.0, 1.0)
        fy = torch.where(u[:, 5] < s["vflip"], -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([scale * cos * fx, -scale * sin * fy, tx], dim=1),
                torch.stack([scale * sin * fx, scale * cos * fy, ty], dim=1),
            ],
            dim=1,
        )  # [N,2,3]: output coords -> input coords
        if s["crop"]:
            theta = _then_crop(theta, s["crop"], v)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if s["blur"]:
        x = _gaussian_blur(x, sigma=s["blur"] * u[:, 6])
    if s["contrast"]:
        c = (1.0 + s["contrast"] * (2 * u[:, 7] - 1)).view(n, 1, 1, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * c + mean
    if s["brightness"]:
        x = x + (s["brightness"] * (2 * u[:, 8] - 1)).view(n, 1, 1, 1) * 0.5
    if s["gamma"]:
        g = torch.exp(s["gamma"] * (2 * u[:, 9] - 1)).view(n, 1, 1, 1)
        x = x.clamp(0, 1).pow(g)
    if s["erase"]:
        x = _erase(x, s["erase"], v)
    out = (x.clamp_(0, 1) * 255.0).round_().to(torch.uint8).squeeze(1).numpy()
    return {**batch, "image": out}


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (0 leaves the image unchanged)."""
    n, _, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    sig = sigma.clamp(min=1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / sig) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # [N, K]; sigma -> 0 gives a delta
    y = x.view(1, n, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(y, k.view(n, 1, -1, 1), groups=n)
    return y.view(n, 1, h, w)


def _then_crop(theta: torch.Tensor, crop: float, v: torch.Tensor) -> torch.Tensor:
    """Compose ``theta`` with a random-resized crop: area in [1 - crop, 1], aspect 3/4..4/3, placed inside."""
    area = 1.0 - crop * v[:, 0]
    ratio = torch.exp(math.log(4 / 3) * (2 * v[:, 1] - 1))
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1 - sx) * (2 * v[:, 2] - 1)
    ty = (1 - sy) * (2 * v[:, 3] - 1)
    lin = torch.stack([sx, sy], dim=1).unsqueeze(2)  # [N,2,1]: diag(sx, sy) applied after theta
    out = theta * lin
    out[:, :, 2] = out[:, :, 2] + torch.stack([tx, ty], dim=1)
    return out


def _erase(x: torch.Tensor, chance: float, v: torch.Tensor) -> torch.Tensor:
    """With probability ``chance`` per image, fill one rectangle (2-25% of the area) with the image mean."""
    n, _, h, w = x.shape
    area = 0.02 + 0.23 * v[:, 4]
    ratio = torch.exp(math.log(3.3) * (2 * v[:, 5] - 1))
    eh = (torch.sqrt(area * ratio) * h).clamp(1, h)
    ew = (torch.sqrt(area / ratio) * w).clamp(1, w)
    top = (h - eh) * v[:, 6]
    left = (w - ew) * v[:, 7]
    rows = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
    )
    on = (v[:, 8] < chance).view(n, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return torch.where((inside & on).unsqueeze(1), mean.expand_as(x), x)
