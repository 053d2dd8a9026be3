"""The input contract: any image file's bytes -> uint8 grayscale pixels, the same way everywhere.

Training (prepare), predict and evaluate all go through `load_gray`, so a model never sees pixels
that were decoded differently from the ones it was trained on.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"})


class ImageError(ValueError):
    """Why a single file cannot be used, in a few words (e.g. "truncated image")."""


def decode_gray(data: bytes) -> np.ndarray:
    """Decode image bytes to uint8 [H, W] grayscale, upright as its EXIF orientation says.

    16-bit and 32-bit gray images are scaled by the range of their apparent bit depth (the smallest
    of 8, 10, 12, 14 or 16 bits that holds the maximum), so 12-bit radiographs stored in 16-bit PNGs
    are not crushed to black; colour (RGB, CMYK, palette, ...) is converted with PIL's 'L' weights and
    alpha is composited on black. PIL's decompression-bomb limit stays on.
    Raises ImageError for empty, truncated, corrupt, oversized or non-image data.
    """
    with _decoded(data) as im:
        return _to_gray(im)


@contextmanager
def _decoded(data: bytes) -> Iterator[Image.Image]:
    """The fully decoded, upright image of ``data``; every decoding failure becomes an ImageError."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode now, so truncated files fail here and not in training
            # an image without EXIF has no orientation to apply (and parsing none costs per image)
            yield ImageOps.exif_transpose(im) if _has_exif(im) else im
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ImageError("not a readable image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).split(" (")[0] or type(e).__name__
        raise ImageError(f"corrupt or truncated image ({msg})") from None


def _has_exif(im: Image.Image) -> bool:
    return "exif" in im.info or im.format not in ("JPEG", "PNG", "BMP")


def _to_gray(im: Image.Image) -> np.ndarray:
    if im.mode == "L":
        return np.array(im, dtype=np.uint8)
    if im.mode.startswith("I") or im.mode == "F":
        return _scale_high_depth(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        gray = np.asarray(Image.fromarray(rgba[..., :3].astype(np.uint8)).convert("L"), np.float32)
        return np.rint(gray * rgba[..., 3] / 255.0).astype(np.uint8)
    if im.mode not in ("RGB", "1", "P"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV: go through RGB for PIL's standard weights
    return np.array(im.convert("L"), dtype=np.uint8)


def _scale_high_depth(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    if a.ndim == 3:
        a = a[..., 0]
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo < 0 or not np.isfinite(hi) or hi <= 1.0:
        # float or signed data has no natural range: stretch what is there
        span = hi - lo
        a = (a - lo) / span if span > 0 else np.zeros_like(a)
        return np.rint(np.nan_to_num(a) * 255).astype(np.uint8)
    bits = next((b for b in (8, 10, 12, 14, 16) if hi < 2**b), None)
    top = float(2**bits - 1) if bits else hi
    return np.rint(np.clip(a / top, 0, 1) * 255).astype(np.uint8)


def resize_gray(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 [H, W] image to [size, size] with PIL BILINEAR (whole image, no crop)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.shape == (size, size):
        return img.copy()
    out = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def load_gray(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes and resize: uint8 [size, size] (raises ImageError for unusable data).

    The same pixels as ``resize_gray(decode_gray(data), size)``; 8-bit gray and RGB images (nearly all
    radiographs) go from decoder to resize inside PIL, without a round trip through numpy.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    with _decoded(data) as im:
        if im.mode not in ("L", "RGB"):
            return resize_gray(_to_gray(im), size)
        gray = im if im.mode == "L" else im.convert("L")
        if gray.size == (size, size):
            return np.array(gray, dtype=np.uint8)
        return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
