"""Prepare once (Parquet cache), stream every epoch through Ray Data on a real local Ray."""

import numpy as np
import pytest

from xray_ray.pipeline import cache_key, epoch_batches, prepare, train_dataset
from xray_ray.sources import load_source
from xray_ray.splits import assign_splits

STRONG = {"zoom": 0.3, "rotate": 10.0, "shift": 0.1, "vflip": 0.5, "brightness": 0.2, "contrast": 0.2}


@pytest.fixture(scope="module")
def manifest_df():
    df, _ = assign_splits(load_source("synthetic:240", seed=3).df, seed=3, val_fraction=0.15, test_fraction=0.15)
    return df


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_prepare_caches_and_reuses(manifest_df, tmp_path):
    first = prepare(manifest_df, 32, tmp_path)
    assert not first.cache_hit and first.cache_path.endswith(".parquet")
    second = prepare(manifest_df, 32, tmp_path)
    assert second.cache_hit
    assert set(first.splits) == {"train", "val", "test"}
    for name, arr in first.splits.items():
        np.testing.assert_array_equal(arr.images, second.splits[name].images)
        assert arr.images.shape[1:] == (32, 32) and arr.images.dtype == np.uint8
        assert len(arr.uids) == len(arr.labels) == len(arr.patients) == len(arr.images)
    assert sum(len(a) for a in first.splits.values()) == len(manifest_df)


def test_cache_key_follows_files_and_size(manifest_df):
    k = cache_key(manifest_df, 32)
    assert k != cache_key(manifest_df, 64)
    changed = manifest_df.copy()
    changed.loc[changed.index[0], "sha1"] = "0" * 40
    assert k != cache_key(changed, 32)
    assert k == cache_key(manifest_df.copy(), 32)


def test_prepared_pixels_match_the_input_contract(manifest_df, tmp_path):
    from xray_ray.sources import read_pixels

    prep = prepare(manifest_df, 32, tmp_path)
    row = manifest_df[manifest_df["split"] == "val"].iloc[2]
    np.testing.assert_array_equal(prep.splits["val"].images[2], read_pixels(row.to_dict(), 32))


def _epoch(ds, seed, epoch, **kw):
    idx, imgs, labels = [], [], []
    for b in epoch_batches(ds, strengths=STRONG, seed=seed, epoch=epoch, batch_size=32, **kw):
        idx.append(b["idx"].numpy())
        imgs.append(b["image"].numpy())
        labels.append(b["label"].numpy())
    idx = np.concatenate(idx)
    order = np.argsort(idx)
    return idx[order], np.concatenate(imgs)[order], np.concatenate(labels)[order]


def test_every_training_image_exactly_once_per_epoch_and_deterministic(local_ray, manifest_df, tmp_path):
    train = prepare(manifest_df, 32, tmp_path).splits["train"]
    ds = train_dataset(train, block_rows=50)
    idx, imgs, labels = _epoch(ds, seed=5, epoch=1)
    np.testing.assert_array_equal(idx, np.arange(len(train)))  # each exactly once
    np.testing.assert_array_equal(labels, train.labels)
    assert (imgs != train.images).mean() > 0.2  # augmented
    idx2, imgs2, _ = _epoch(ds, seed=5, epoch=1)
    np.testing.assert_array_equal(imgs, imgs2)  # same seed + epoch -> same images
    _, imgs3, _ = _epoch(ds, seed=5, epoch=2)
    assert not np.array_equal(imgs, imgs3)


def test_pipeline_is_not_starved_when_trials_hold_every_cpu(local_ray, manifest_df, tmp_path):
    ray = local_ray
    train = prepare(manifest_df, 32, tmp_path).splits["train"]
    ds = train_dataset(train, block_rows=40)

    @ray.remote(num_cpus=1)
    class FakeTrial:  # two of these hold both CPUs of this 2-CPU Ray, like two running trials
        def epoch(self, ds):
            n = 0
            for b in epoch_batches(ds, strengths=STRONG, seed=0, epoch=1, batch_size=16):
                n += len(b["label"])
            return n

    trials = [FakeTrial.remote(), FakeTrial.remote()]
    counts = ray.get([t.epoch.remote(ds) for t in trials], timeout=120)
    assert counts == [len(train), len(train)]


def test_prefetch_starts_in_the_background_and_yields_everything_once():
    import threading

    from xray_ray.pipeline import Prefetch

    started = threading.Event()
    where = []

    def make():
        where.append(threading.current_thread().name)
        started.set()
        return iter(range(5))

    p = Prefetch(make)
    assert started.wait(5)  # the stream started before anyone iterated
    assert where == ["xray_ray-prefetch"]
    assert list(p) == [0, 1, 2, 3, 4]
    assert list(Prefetch(lambda: [])) == []


def test_prefetch_raises_a_background_error_in_the_consumer():
    from xray_ray.pipeline import Prefetch

    def make():
        raise FileNotFoundError("gone")

    p = Prefetch(make)
    with pytest.raises(FileNotFoundError, match="gone"):
        list(p)
