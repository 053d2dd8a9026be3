"""The input contract: every image kind the real world sends decodes to the same upright uint8 gray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import png_with_size
from xray_ray.data.images import IMAGE_EXTENSIONS, ImageError, decode_gray, load_gray, resize_gray


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(h: int = 24, w: int = 32) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 3, np.arange(w) * 5) % 256).astype(np.uint8)


def test_gray_png_round_trips_exactly():
    a = gradient()
    out = decode_gray(encode(Image.fromarray(a), "PNG"))
    assert out.dtype == np.uint8 and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


def test_rgb_jpeg_becomes_gray_with_pil_weights():
    rgb = np.stack([gradient(), gradient()[::-1], np.full((24, 32), 90, np.uint8)], -1)
    data = encode(Image.fromarray(rgb), "PNG")
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(decode_gray(data), expected)
    jpeg = decode_gray(encode(Image.fromarray(rgb), "JPEG", quality=95))
    assert jpeg.shape == (24, 32) and np.abs(jpeg.astype(int) - expected).mean() < 6


def test_16_bit_png_is_scaled_by_its_bit_depth():
    a = gradient()
    full = decode_gray(encode(Image.fromarray(a.astype(np.uint16) * 257), "PNG"))
    np.testing.assert_array_equal(full, a)  # full 16-bit range: exactly the 8-bit image back
    twelve = (np.linspace(0, 4095, 24 * 32).reshape(24, 32)).astype(np.uint16)
    out = decode_gray(encode(Image.fromarray(twelve), "PNG"))
    assert out.max() == 255 and out.min() == 0  # a 12-bit radiograph is not crushed to black
    assert abs(int(out[12, 16]) - round(int(twelve[12, 16]) / 4095 * 255)) <= 1


def test_cmyk_jpeg_decodes_like_its_rgb_source():
    rgb = np.stack([gradient()] * 3, -1)
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_gray(data)
    assert out.shape == (24, 32)
    assert np.abs(out.astype(int) - gradient()).mean() < 8


def test_alpha_is_composited_on_black():
    g = np.full((8, 8), 200, np.uint8)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, 4:] = 255
    rgba = np.stack([g, g, g, alpha], -1)
    out = decode_gray(encode(Image.fromarray(rgba), "PNG"))
    assert (out[:, :4] == 0).all() and (out[:, 4:] == 200).all()
    la = decode_gray(encode(Image.fromarray(np.stack([g, alpha], -1)), "PNG"))
    np.testing.assert_array_equal(la, out)


def test_palette_png_with_and_without_transparency():
    a = gradient()
    pal = Image.fromarray(a).convert("P")
    out = decode_gray(encode(pal, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(pal.convert("L")))
    idx = int(np.asarray(pal)[0, 0])
    transparent = decode_gray(encode(pal, "PNG", transparency=idx))
    assert transparent[0, 0] == 0 and transparent.shape == a.shape


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 40), np.uint8)  # wide as stored, with a bright mark top-left
    stored[:4, :4] = 255
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_gray(encode(im, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20)  # upright: tall
    assert out[:4, -4:].mean() > 200 and out[:4, :4].mean() < 50  # the mark moved to the top-right


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(4000), "not a readable image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 50, "not a readable image"),  # JPEG magic, nothing else
    ],
)
def test_broken_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_gray(data)


def test_truncated_jpeg_and_png_raise_image_error():
    noise = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    for fmt in ("JPEG", "PNG"):
        data = encode(Image.fromarray(noise), fmt)
        for cut in (len(data) // 2, 100):  # pixel data cut short; only the header left
            with pytest.raises(ImageError, match="truncated"):
                decode_gray(data[:cut])


def test_decompression_bomb_is_refused_and_the_limit_stays_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0
    with pytest.raises(ImageError, match="too large"):
        decode_gray(png_with_size(100_000, 100_000))


def test_lowered_pixel_limit_is_honoured(monkeypatch):
    data = encode(Image.fromarray(gradient(64, 64)), "PNG")
    assert decode_gray(data).shape == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        decode_gray(data)


def test_resize_keeps_the_whole_image_without_cropping():
    a = np.zeros((30, 90), np.uint8)
    a[:, :10] = 255  # a stripe at the far left survives only if nothing is cropped
    out = resize_gray(a, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert out[:, 0].min() > 200 and out[:, -1].max() == 0
    expected = np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected)


def test_resize_same_size_is_a_copy_and_bad_size_fails():
    a = gradient(16, 16)
    out = resize_gray(a, 16)
    np.testing.assert_array_equal(out, a)
    assert out is not a
    with pytest.raises(ValueError):
        resize_gray(a, 0)


def test_load_gray_is_decode_then_resize():
    data = encode(Image.fromarray(gradient(50, 70)), "PNG")
    np.testing.assert_array_equal(load_gray(data, 20), resize_gray(decode_gray(data), 20))
    assert load_gray(data, 20).shape == (20, 20)


def test_image_extensions_are_lower_case_and_cover_the_usual_kinds():
    assert {".jpeg", ".jpg", ".png"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
