"""Synthetic chest-radiograph phantoms: a stand-in data set that needs no download.

Each image is a frontal chest film in caricature: soft-tissue body, two dark lung fields, ribs, spine,
heart shadow, film noise, and a random pose, size and exposure per image. PNEUMONIA adds patchy
opacities of random size and place inside the lungs. Pose and exposure vary more than any single pixel
changes with the label, so a model has to look at the lungs as a whole rather than at one pixel.

For tests of more than two classes, labels 2 to 5 each add an opacity of their own shape and place
(:data:`PHANTOM_CLASSES`): perihilar haze in both lungs, a basal effusion with a level upper border,
ring shadows at an apex, one dense segment low in one lung. Labels 0 and 1 render as they always have.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

NATIVE_SIZE = 128  # the phantoms' "original" resolution; sources resize from here like any image
# the class of each label, named so that xray_ray.data.manifest.order_classes keeps this order
PHANTOM_CLASSES = ("NORMAL", "PATCHY", "PERIHILAR", "PLEURAL", "RING", "SEGMENTAL")


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return c[:, None], c[None, :]  # y down the rows, x across the columns, both in [-1, 1]


@lru_cache(maxsize=16)
def _upsampler(k: int, size: int) -> np.ndarray:
    """[size, k] bilinear interpolation matrix: smooth noise = U @ coarse @ U.T."""
    pos = np.clip((np.arange(size) + 0.5) / size * k - 0.5, 0, k - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, k - 1)
    w = (pos - lo).astype(np.float32)
    u = np.zeros((size, k), np.float32)
    u[np.arange(size), lo] += 1 - w
    u[np.arange(size), hi] += w
    return u


def _smooth_noise(rng: np.random.Generator, k: int, size: int) -> np.ndarray:
    u = _upsampler(k, size)
    return u @ rng.standard_normal((k, k)).astype(np.float32) @ u.T


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float | np.ndarray, cy: float, ax: float, ay: float, edge: float = 0.08
) -> np.ndarray:
    """Soft mask: 1 inside, 0 outside, a smooth edge about `edge` of the radius wide."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return np.clip((1 - r) / edge + 0.5, 0, 1)


def render(seed: int, index: int, label: int, size: int = NATIVE_SIZE) -> np.ndarray:
    """One phantom as uint8 [size, size]; deterministic in (seed, index, label).

    The anatomy, pose and noise depend only on (seed, index), so the versions of an index differ only by
    the opacities: none for label 0, patchy (PNEUMONIA) for 1, PHANTOM_CLASSES' patterns for 2 to 5.
    """
    if label not in range(len(PHANTOM_CLASSES)):
        raise ValueError(f"label must be 0 to {len(PHANTOM_CLASSES) - 1}, got {label}")
    rng = np.random.default_rng([seed, index])

    def u(lo: float, hi: float) -> float:  # Python floats keep the arrays float32 (NEP 50)
        return float(rng.uniform(lo, hi))

    yy, xx = _grid(size)
    cx, cy, ang = float(rng.normal(0, 0.07)), float(rng.normal(0, 0.07)), float(rng.normal(0, 0.05))
    scale = u(0.8, 1.08)
    ca, sa = math.cos(ang), math.sin(ang)
    x = ((xx - cx) * ca + (yy - cy) * sa) / scale
    y = (-(xx - cx) * sa + (yy - cy) * ca) / scale

    body = _ellipse(x, y, 0, 0.2, u(0.88, 0.97), u(1.1, 1.25), edge=0.04)
    lung_ax, lung_ay, lung_x, lung_y = u(0.25, 0.3), u(0.52, 0.62), u(0.36, 0.42), u(-0.12, -0.02)
    # lungs narrow towards the apex: widen the ellipse with depth
    taper = 0.8 + 0.2 * np.clip((y - lung_y) / lung_ay + 1, 0, 2)
    lungs = [_ellipse(x / taper, y, side * lung_x / taper, lung_y, lung_ax, lung_ay, edge=0.2) for side in (-1, 1)]
    lung = np.maximum(*lungs)
    heart = _ellipse(x, y, u(0.1, 0.17), lung_y + lung_ay * 0.55, u(0.28, 0.34), u(0.22, 0.28), edge=0.4)
    spine_w = u(0.07, 0.09)
    q = np.minimum((x / spine_w) ** 2, 10.0)  # capped: exp underflow is slow
    spine = np.exp(-q * q) * body * (0.85 + 0.15 * np.cos(2 * np.pi * u(7, 9) * y))
    rib_phase = 2 * np.pi * (y * u(4.5, 6.0) + 1.5 * x * x) + u(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.cos(rib_phase)
    ribs = ribs * ribs * ribs * body * (np.abs(x) < 0.85) * (0.4 + 0.6 * lung)

    air = u(0.3, 0.36) * lung * (1 - 0.8 * heart)
    if label >= 1:
        # consolidation replaces air with fluid: the lung turns towards soft-tissue brightness. Its own
        # generator, so the anatomy's draws (and labels 0 and 1's pixels) never depend on it.
        opacity = _consolidation if label == 1 else _PATTERNS[label]
        air = air * (
            1
            - opacity(
                np.random.default_rng([seed, index, label]), x, y, lungs, (lung_x, lung_y, lung_ax, lung_ay), size
            )
        )
    img = 0.05 + 0.5 * body - air + 0.04 * heart * body + 0.12 * spine + u(0.06, 0.1) * ribs
    img += 0.03 * _smooth_noise(rng, 12, size) * body  # vessel markings / soft-tissue texture

    # exposure: gain, offset, gamma, film noise; these dwarf what pneumonia does to any one pixel
    img = u(0.65, 1.35) * img + float(rng.normal(0, 0.15))
    img += 0.04 * _smooth_noise(rng, 4, size)
    img += u(0.015, 0.04) * rng.standard_normal((size, size), dtype=np.float32)
    img = np.clip(img, 0, 1) ** u(0.8, 1.25)
    return np.rint(img * 255).astype(np.uint8)


def _consolidation(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    lungs: list[np.ndarray],
    geom: tuple[float, float, float, float],
    size: int,
) -> np.ndarray:
    """Patchy consolidation in [0, 0.9]: textured blobs of random size and place inside the lungs."""
    lung_x, lung_y, ax, ay = geom
    out = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(2, 6))):
        side = 1 if rng.random() < 0.5 else -1
        r, t = float(np.sqrt(rng.uniform(0, 0.7))), float(rng.uniform(0, 2 * np.pi))
        px, py = side * lung_x + r * ax * math.cos(t), lung_y + r * ay * math.sin(t)
        rad = float(rng.uniform(0.08, 0.22))
        blob = np.exp(-np.minimum(((x - px) ** 2 + (y - py) ** 2) / (2 * rad**2), 30.0))
        texture = np.clip(0.7 + 0.5 * _smooth_noise(rng, 16, size), 0, 1.2)
        out += float(rng.uniform(0.6, 1.1)) * blob * texture * lungs[0 if side < 0 else 1]
    return np.clip(out, 0, 0.9)


def _perihilar(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: list[np.ndarray], geom: tuple[float, ...], size: int
) -> np.ndarray:
    """Bat-wing haze: densest at both hila, fading towards the periphery of both lungs."""
    lung_x, lung_y, ax, ay = geom
    out = np.zeros((size, size), np.float32)
    for i, side in enumerate((-1, 1)):
        px, py = side * (lung_x - ax * float(rng.uniform(0.35, 0.5))), lung_y + ay * float(rng.uniform(-0.1, 0.2))
        rx, ry = ax * float(rng.uniform(0.6, 0.8)), ay * float(rng.uniform(0.45, 0.6))
        out += (
            float(rng.uniform(0.75, 0.95))
            * np.exp(-np.minimum(((x - px) / rx) ** 2 + ((y - py) / ry) ** 2, 30.0))
            * lungs[i]
        )
    return np.clip(out * np.clip(0.85 + 0.3 * _smooth_noise(rng, 10, size), 0, 1.2), 0, 0.9)


def _pleural(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: list[np.ndarray], geom: tuple[float, ...], size: int
) -> np.ndarray:
    """Effusion: the base of one lung filled up to a level, the border rising at the lateral wall (meniscus)."""
    lung_x, lung_y, ax, ay = geom
    i = int(rng.integers(2))
    side = 1 if i else -1
    level = lung_y + ay * float(rng.uniform(0.05, 0.4)) - 0.25 * ay * np.clip(side * x - lung_x, 0, None) / ax
    fluid = 1 / (1 + np.exp(-np.clip((y - level) / 0.03, -30, 30)))
    return np.clip(float(rng.uniform(0.75, 0.9)) * fluid * lungs[i], 0, 0.9)


def _ring(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: list[np.ndarray], geom: tuple[float, ...], size: int
) -> np.ndarray:
    """Ring shadows: one to three thick-walled cavities in the upper zone of one lung."""
    lung_x, lung_y, ax, ay = geom
    i = int(rng.integers(2))
    side = 1 if i else -1
    out = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        px = side * lung_x + ax * float(rng.uniform(-0.4, 0.4))
        py = lung_y - ay * float(rng.uniform(0.3, 0.6))
        rad, wall = float(rng.uniform(0.07, 0.11)), float(rng.uniform(0.025, 0.04))
        r = np.sqrt((x - px) ** 2 + (y - py) ** 2)
        out += float(rng.uniform(0.7, 1.0)) * np.exp(-np.minimum(((r - rad) / wall) ** 2, 30.0))
    return np.clip(out * lungs[i], 0, 0.9)


def _segmental(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: list[np.ndarray], geom: tuple[float, ...], size: int
) -> np.ndarray:
    """One dense, nearly homogeneous consolidation filling the lower zone of one lung."""
    lung_x, lung_y, ax, ay = geom
    i = int(rng.integers(2))
    side = 1 if i else -1
    px, py = side * lung_x + ax * float(rng.uniform(-0.2, 0.2)), lung_y + ay * float(rng.uniform(0.35, 0.55))
    rx, ry = ax * float(rng.uniform(0.75, 0.95)), ay * float(rng.uniform(0.3, 0.4))
    blob = np.clip((1 - np.sqrt(((x - px) / rx) ** 2 + ((y - py) / ry) ** 2)) / 0.25, 0, 1)
    texture = np.clip(0.9 + 0.15 * _smooth_noise(rng, 12, size), 0, 1.1)
    return np.clip(float(rng.uniform(0.8, 0.95)) * blob * texture * lungs[i], 0, 0.9)


_PATTERNS = {2: _perihilar, 3: _pleural, 4: _ring, 5: _segmental}
