"""Augmentation: deterministic per (seed, epoch, image), independent of batching, each strength does something."""

import numpy as np
import pytest

from xray_ray.data.augment import STRENGTHS, augment_batch, uniform_draws

ALL = {
    "zoom": 0.3,
    "rotate": 10.0,
    "shift": 0.1,
    "hflip": 0.5,
    "vflip": 0.5,
    "brightness": 0.2,
    "contrast": 0.2,
    "gamma": 0.2,
    "blur": 1.0,
    "crop": 0.5,
    "erase": 0.5,
}


def _batch(n=16, s=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, s, s), dtype=np.uint8),
        "idx": np.arange(n, dtype=np.int64) + 100,
        "label": rng.integers(0, 2, n),
    }


def test_same_seed_and_epoch_give_the_same_batch():
    b = _batch()
    a1 = augment_batch(b, strengths=ALL, seed=7, epoch=3)["image"]
    a2 = augment_batch(b, strengths=ALL, seed=7, epoch=3)["image"]
    assert a1.dtype == np.uint8 and a1.shape == b["image"].shape
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, augment_batch(b, strengths=ALL, seed=7, epoch=4)["image"])
    assert not np.array_equal(a1, augment_batch(b, strengths=ALL, seed=8, epoch=3)["image"])


def test_result_does_not_depend_on_how_the_data_is_batched():
    b = _batch(n=20)
    whole = augment_batch(b, strengths=ALL, seed=1, epoch=1)["image"]
    parts = [
        augment_batch({k: v[i : i + 7] for k, v in b.items()}, strengths=ALL, seed=1, epoch=1)["image"]
        for i in range(0, 20, 7)
    ]
    # per-image ops only: up to float rounding of a batched kernel
    assert np.abs(whole.astype(int) - np.concatenate(parts).astype(int)).max() <= 1


def test_zero_strengths_are_identity_and_labels_untouched():
    b = _batch()
    out = augment_batch(b, strengths={k: 0.0 for k in STRENGTHS}, seed=0, epoch=0)
    np.testing.assert_array_equal(out["image"], b["image"])
    np.testing.assert_array_equal(out["label"], b["label"])


@pytest.mark.parametrize("name", STRENGTHS)
def test_each_strength_changes_images(name):
    b = _batch(n=32)
    out = augment_batch(b, strengths={name: ALL[name] if name not in ("hflip", "vflip") else 1.0}, seed=0, epoch=0)
    assert (out["image"] != b["image"]).mean() > 0.05


def test_vflip_of_one_flips_exactly():
    b = _batch(n=4)
    out = augment_batch(b, strengths={"vflip": 1.0}, seed=0, epoch=0)["image"]
    np.testing.assert_array_equal(out, b["image"][:, ::-1, :])


def test_uniform_draws_are_uniform_and_keyed():
    u = uniform_draws(0, 0, np.arange(20000))
    assert u.shape == (20000, 11) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(uniform_draws(0, 0, np.array([5]))[0], u[5])


def test_crop_and_erase_leave_the_first_draw_stream_alone():
    # crop and erase draw from a second stream: switching them on keeps every other draw as it was, so
    # configurations without them augment exactly as before they existed
    b = _batch(n=16)
    base = {"zoom": 0.2, "rotate": 5.0}
    with_erase = augment_batch(b, strengths={**base, "erase": 1.0}, seed=3, epoch=2)["image"]
    without = augment_batch(b, strengths=base, seed=3, epoch=2)["image"]
    changed = (with_erase != without).reshape(len(b["image"]), -1).mean(axis=1)
    assert (changed > 0).all() and (changed < 0.4).all()  # one rectangle of at most a quarter (+ rounding)


def test_erase_fills_one_rectangle_with_the_image_mean():
    b = {"image": np.full((8, 32, 32), 10, np.uint8), "idx": np.arange(8, dtype=np.int64), "label": np.zeros(8)}
    b["image"][:, :16, :] = 250  # mean 130
    out = augment_batch(b, strengths={"erase": 1.0}, seed=0, epoch=0)["image"]
    for before, after in zip(b["image"], out):
        diff = before != after
        rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
        assert diff.sum() > 0
        # the changed pixels lie in one axis-aligned rectangle and all hold the mean
        assert set(np.unique(after[diff])) == {130}
        block = after[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (block == 130).all()


def test_crop_only_zooms_in_and_keeps_a_filled_frame():
    # a random-resized crop never looks outside the image: no border-padding streaks at the edges
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 64, 64), dtype=np.uint8).repeat(32, axis=0)
    b = {"image": img, "idx": np.arange(32, dtype=np.int64), "label": np.zeros(32)}
    out = augment_batch(b, strengths={"crop": 0.6}, seed=1, epoch=0)["image"]
    assert (out != img).mean() > 0.5
    # border padding would repeat the edge row; a crop inside the image keeps rows distinct
    edge_repeats = np.mean([np.array_equal(o[0], o[1]) and np.array_equal(o[1], o[2]) for o in out])
    assert edge_repeats < 0.2
