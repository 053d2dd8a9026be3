"""A fixed, seeded battery of acquisition shifts, and the scores of a model under it.

A hold-out of the training set saturates: every decent model scores 0.99+ validation AUC there, while
images from another hospital or scanner separate them. The battery re-creates, on the validation images,
the ways another site's images differ: exposure and gamma, contrast, blur and sharpening, noise, lost
resolution, JPEG re-compression, zoom, an off-centre crop, rotation, a black border, a horizontal flip
and histogram equalisation. Strengths are fixed and several lie beyond what training augments with (or
are shifts training never applies), so the score cannot be won by copying the augmentation into it.

Pure numpy and PIL: the driver builds the battery once per image size without importing torch; trials
score it with their own model (``score``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# name -> what it does, in words (the model card and docs quote these)
SHIFTS: dict[str, str] = {
    "gamma_0.6": "gamma 0.6 (brighter mid-tones)",
    "gamma_1.6": "gamma 1.6 (darker mid-tones)",
    "exposure_+0.15": "every pixel + 0.15 (over-exposed)",
    "exposure_-0.15": "every pixel - 0.15 (under-exposed)",
    "contrast_0.6": "contrast x 0.6 about the image mean",
    "contrast_1.5": "contrast x 1.5 about the image mean",
    "blur_1.5": "Gaussian blur, sigma 1.5 px at 64 px (scaled with the size)",
    "sharpen": "unsharp mask, radius 2 px, 150%",
    "noise_0.06": "Gaussian noise, sigma 0.06 (seeded)",
    "lowres_0.5": "down to half the size and back (bilinear)",
    "jpeg_15": "JPEG re-compression at quality 15",
    "zoom_in_1.25": "zoom in 1.25x about the centre",
    "zoom_out_0.8": "zoom out to 0.8x, black surround",
    "crop_offcentre_0.12": "crop 88% of the side from the top-left, resized back",
    "rotate_10": "rotation by 10 degrees, black corners",
    "border_0.08": "a black frame covering 8% of each side",
    "hflip": "horizontal flip",
    "equalize": "histogram equalisation",
}

# composites a search space may name in scheduler.metric, and their direction
COMPOSITES = {"rob_auc_min": "max", "rob_auc_mean": "max", "rob_loss_mean": "min"}
MAX_IMAGES = 128  # larger validation sets are scored on a fixed, stratified subset of this many (cost: docs/results.md)


def _pil_each(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im)), dtype=np.uint8) for im in images])


def _affine(
    images: np.ndarray, scale: float, angle: float = 0.0, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Zoom by ``scale`` (> 1 zooms in) and rotate by ``angle`` degrees about the centre; black outside."""
    s = images.shape[-1]

    def one(im: Image.Image) -> Image.Image:
        a = math.radians(angle)
        c, d = math.cos(a) / scale, math.sin(a) / scale
        cx = cy = s / 2.0
        # output (x, y) -> input: centre, rotate/scale, shift back (PIL takes the inverse map)
        ox, oy = offset[0] * s, offset[1] * s
        coeffs = (c, d, cx - c * cx - d * cy + ox, -d, c, cy + d * cx - c * cy + oy)
        return im.transform((s, s), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0)

    return _pil_each(images, one)


def _crop(images: np.ndarray, keep: float) -> np.ndarray:
    s = images.shape[-1]
    k = max(2, int(round(s * keep)))
    return _pil_each(images, lambda im: im.crop((0, 0, k, k)).resize((s, s), Image.Resampling.BILINEAR))


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


def _point(images: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return (np.clip(fn(x), 0, 1) * 255.0).round().astype(np.uint8)


def _contrast(x: np.ndarray, factor: float) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * factor + mean


def _border(images: np.ndarray, frac: float) -> np.ndarray:
    out = images.copy()
    b = max(1, int(round(images.shape[-1] * frac)))
    out[:, :b, :] = 0
    out[:, -b:, :] = 0
    out[:, :, :b] = 0
    out[:, :, -b:] = 0
    return out


def apply_shift(name: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``images`` (uint8 [N,S,S]) under the named shift; deterministic for a seed."""
    s = images.shape[-1]
    if name.startswith("gamma_"):
        g = float(name.split("_")[1])
        return _point(images, lambda x: x**g)
    if name.startswith("exposure_"):
        d = float(name.split("_")[1])
        return _point(images, lambda x: x + d)
    if name.startswith("contrast_"):
        f = float(name.split("_")[1])
        return _point(images, lambda x: _contrast(x, f))
    if name.startswith("blur_"):
        sigma = float(name.split("_")[1]) * s / 64.0
        return _pil_each(images, lambda im: im.filter(ImageFilter.GaussianBlur(sigma)))
    if name == "sharpen":
        return _pil_each(images, lambda im: im.filter(ImageFilter.UnsharpMask(radius=2, percent=150, threshold=0)))
    if name.startswith("noise_"):
        sigma = float(name.split("_")[1])
        rng = np.random.default_rng(seed)
        noise = rng.normal(0.0, sigma, images.shape).astype(np.float32)
        return _point(images, lambda x: x + noise)
    if name.startswith("lowres_"):
        k = max(2, int(round(s * float(name.split("_")[1]))))
        return _pil_each(
            images, lambda im: im.resize((k, k), Image.Resampling.BILINEAR).resize((s, s), Image.Resampling.BILINEAR)
        )
    if name.startswith("jpeg_"):
        q = int(name.split("_")[1])
        return _pil_each(images, lambda im: _jpeg(im, q))
    if name.startswith("zoom_in_") or name.startswith("zoom_out_"):
        return _affine(images, float(name.rsplit("_", 1)[1]))
    if name.startswith("crop_offcentre_"):
        return _crop(images, 1.0 - float(name.rsplit("_", 1)[1]))
    if name.startswith("rotate_"):
        return _affine(images, 1.0, angle=float(name.split("_")[1]))
    if name.startswith("border_"):
        return _border(images, float(name.split("_")[1]))
    if name == "hflip":
        return images[:, :, ::-1].copy()
    if name == "equalize":
        return _pil_each(images, ImageOps.equalize)
    raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")


def subset(labels: np.ndarray, most: int = MAX_IMAGES, seed: int = 0) -> np.ndarray:
    """Indices of a fixed, class-stratified subset of at most ``most`` rows (all rows when fewer)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n <= most:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        k = max(1, int(round(most * len(idx) / n)))
        keep.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def battery(
    images: np.ndarray, labels: np.ndarray, seed: int = 0, shifts: Mapping[str, str] = SHIFTS, most: int = MAX_IMAGES
) -> dict[str, np.ndarray]:
    """The battery on (a fixed subset of) validation: ``{"labels": [M], "<shift>": uint8 [M,S,S], ...}``."""
    idx = subset(labels, most, seed)
    base = np.ascontiguousarray(np.asarray(images)[idx])
    out = {"labels": np.asarray(labels)[idx].astype(np.int64)}
    for i, name in enumerate(shifts):
        out[name] = apply_shift(name, base, seed=seed * 1000 + i)
    return out


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def summarize(per_shift: Mapping[str, tuple[float, float]]) -> dict[str, float | str]:
    """Composites of ``{shift: (auc, log_loss)}``: worst and mean AUC, mean log-loss, the worst shift."""
    names = list(per_shift)
    aucs = np.array([per_shift[n][0] for n in names], dtype=float)
    losses = np.array([per_shift[n][1] for n in names], dtype=float)
    finite = np.isfinite(aucs)
    worst = names[int(np.nanargmin(np.where(finite, aucs, np.inf)))] if finite.any() else ""
    return {
        "rob_auc_min": float(np.nanmin(aucs)) if finite.any() else float("nan"),
        "rob_auc_mean": float(np.nanmean(aucs)) if finite.any() else float("nan"),
        "rob_loss_mean": float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"),
        "rob_worst_shift": worst,
    }


def score(predict: Callable[[np.ndarray], np.ndarray], shifted: Mapping[str, np.ndarray]) -> dict[str, float | str]:
    """AUC and log-loss of ``predict`` (uint8 [M,S,S] -> P(PNEUMONIA) [M], or class probabilities [M, K] for
    K > 2 classes: macro one-vs-rest AUC and cross-entropy) under every shift of a battery.

    Returns ``shift_auc__<name>``, ``shift_loss__<name>`` per shift and the composites of ``summarize``.
    """
    from xray_ray.metrics import log_loss_of, macro_auc, roc_auc

    y = shifted["labels"]
    per: dict[str, tuple[float, float]] = {}
    for name, images in shifted.items():
        if name == "labels":
            continue
        p = predict(images)
        per[name] = (roc_auc(y, p), log_loss(y, p)) if p.ndim == 1 else (macro_auc(y, p), log_loss_of(y, p))
    out: dict[str, float | str] = {}
    for name, (auc, loss) in per.items():
        out[f"shift_auc__{name}"] = auc
        out[f"shift_loss__{name}"] = loss
    return {**out, **summarize(per)}
