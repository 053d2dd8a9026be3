"""Prepare once (memory-mapped Arrow cache), stream every epoch through Ray Data on a real local Ray."""

from pathlib import Path

import numpy as np
import pytest

from xray_ray.data.prepare import SplitArrays, cache_key, can_fork, prepare
from xray_ray.data.sources import load_source, read_pixels
from xray_ray.data.splits import assign_splits
from xray_ray.data.streams import epoch_batches, train_dataset
from xray_ray.errors import DataError

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
    assert not first.cache_hit and first.cache_path.endswith(".arrow")
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
    from xray_ray.data.sources import read_pixels

    prep = prepare(manifest_df, 32, tmp_path)
    row = manifest_df[manifest_df["split"] == "val"].iloc[2]
    np.testing.assert_array_equal(prep.splits["val"].images[2], read_pixels(row.to_dict(), 32))


@pytest.mark.parametrize("processes", [True, False])
def test_forked_and_threaded_decoding_give_the_contract_pixels(kaggle_dir, tmp_path, processes):
    df, _ = assign_splits(
        load_source(str(kaggle_dir)).df, seed=0, val_fraction=0.2, test_fraction=0.2, min_val_images=1
    )
    prep = prepare(df, 24, tmp_path, workers=2, processes=processes)
    assert prep.stats["decoded_by"] == f"2 {'processes' if processes else 'threads'}"
    for name, arr in prep.splits.items():
        rows = df[df["split"] == name].to_dict("records")
        expected = np.stack([read_pixels(r, 24) for r in rows])
        np.testing.assert_array_equal(arr.images, expected)
        assert arr.images.flags.writeable and arr.uids == [r["uid"] for r in rows]


@pytest.mark.parametrize("processes", [True, False])
def test_a_file_broken_after_discovery_is_a_data_error_from_any_worker(kaggle_dir, tmp_path, processes):
    df = load_source(str(kaggle_dir)).df
    victim = df["location"].iloc[len(df) // 2]
    Path(victim).write_bytes(b"not an image any more")
    with pytest.raises(DataError, match="changed after discovery"):
        prepare(df, 24, tmp_path, workers=2, processes=processes)
    assert not list(tmp_path.glob("pixels-*"))  # nothing half-written left to be trusted later


def test_an_unreadable_cache_is_prepared_again(manifest_df, tmp_path):
    first = prepare(manifest_df, 16, tmp_path)
    Path(first.cache_path).write_bytes(Path(first.cache_path).read_bytes()[:1000])  # cut short
    with pytest.warns(UserWarning, match="unreadable pixel cache"):
        again = prepare(manifest_df, 16, tmp_path)
    assert not again.cache_hit
    np.testing.assert_array_equal(again.splits["train"].images, first.splits["train"].images)
    assert prepare(manifest_df, 16, tmp_path).cache_hit  # and the rewritten cache is good


def test_decoding_forks_local_files_without_ray(manifest_df):
    rows = manifest_df.to_dict("records")
    assert can_fork(rows)
    assert not can_fork([*rows, {"location": "s3://bucket/x.jpeg"}])  # a remote client is not shared


@pytest.mark.slow  # starts a local Ray
def test_decoding_never_forks_a_process_running_ray(manifest_df, local_ray, tmp_path):
    assert not can_fork(manifest_df.to_dict("records"))  # Ray's threads are not fork-safe
    assert prepare(manifest_df, 16, tmp_path, workers=2).stats["decoded_by"] == "2 threads"


def _epoch(ds, seed, epoch, **kw):
    idx, imgs, labels = [], [], []
    for b in epoch_batches(ds, strengths=STRONG, seed=seed, epoch=epoch, batch_size=32, **kw):
        idx.append(b["idx"].numpy())
        imgs.append(b["image"].numpy())
        labels.append(b["label"].numpy())
    idx = np.concatenate(idx)
    order = np.argsort(idx)
    return idx[order], np.concatenate(imgs)[order], np.concatenate(labels)[order]


@pytest.mark.slow  # starts a local Ray
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


@pytest.mark.slow  # starts a local Ray
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
    try:
        counts = ray.get([t.epoch.remote(ds) for t in trials], timeout=120)
    finally:
        for t in trials:  # give the CPUs back: later tests in this module share this Ray
            ray.kill(t)
    assert counts == [len(train), len(train)]


def test_prefetch_starts_in_the_background_and_yields_everything_once():
    import threading

    from xray_ray.data.streams import Prefetch

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
    from xray_ray.data.streams import Prefetch

    def make():
        raise FileNotFoundError("gone")

    p = Prefetch(make)
    with pytest.raises(FileNotFoundError, match="gone"):
        list(p)


def test_balanced_resampling_evens_the_classes_and_gives_copies_their_own_draws():
    from xray_ray.data.balance import COPY_STRIDE, balanced_repeats, resample

    labels = np.array([0] * 250 + [1] * 750)
    rep = balanced_repeats(labels)
    assert rep == pytest.approx({0: 2.0, 1: 2 / 3})
    batch = {"image": np.zeros((1000, 4, 4), np.uint8), "label": labels, "idx": np.arange(1000, dtype=np.int64)}
    out = resample(batch, rep, seed=0, epoch=1)
    counts = np.bincount(out["label"])
    assert abs(counts[0] - 500) <= 1 and abs(counts[1] - 500) < 60
    assert len(np.unique(out["idx"])) == len(out["idx"])  # every copy has its own augmentation key
    assert (out["idx"] % COPY_STRIDE < 1000).all()
    again = resample(batch, rep, seed=0, epoch=1)
    np.testing.assert_array_equal(again["idx"], out["idx"])
    assert not np.array_equal(resample(batch, rep, seed=0, epoch=2)["idx"], out["idx"])


def test_balanced_resampling_evens_k_classes():
    from xray_ray.data.balance import balanced_repeats, resample

    labels = np.repeat(np.arange(4), [100, 300, 600, 1000])
    rep = balanced_repeats(labels)
    assert rep == pytest.approx({0: 5.0, 1: 5 / 3, 2: 5 / 6, 3: 0.5})  # n / (K * n_label)
    assert sum(rep[c] * n for c, n in zip(range(4), [100, 300, 600, 1000])) == pytest.approx(len(labels))
    batch = {"label": labels, "idx": np.arange(len(labels), dtype=np.int64)}
    counts = np.bincount(resample(batch, rep, seed=1, epoch=0)["label"], minlength=4)
    assert counts[0] == 500 and all(abs(c - 500) < 50 for c in counts), counts  # each about a quarter


def test_prepare_records_the_classes(tmp_path):
    df, _ = assign_splits(load_source("synthetic:60:3", seed=1).df, seed=1, val_fraction=0.2, test_fraction=0.2)
    p = prepare(df, 16, tmp_path, workers=1)
    assert p.classes == ("NORMAL", "PATCHY", "PERIHILAR")  # read from the table's labels and names
    assert sorted(np.unique(np.concatenate([a.labels for a in p.splits.values()]))) == [0, 1, 2]
    assert prepare(df, 16, tmp_path, classes=["NORMAL", "A", "B"]).classes == ("NORMAL", "A", "B")
    binary, _ = assign_splits(load_source("synthetic:40", seed=1).df, seed=1, val_fraction=0.2, test_fraction=0.2)
    assert prepare(binary, 16, tmp_path, workers=1).classes == ("NORMAL", "PNEUMONIA")


@pytest.mark.slow  # starts a local Ray
def test_an_epoch_mixes_the_classes_from_its_first_batches_on(local_ray):
    # a split lists its files class by class; the stream must not feed one class first and the other after
    labels = np.array([0] * 300 + [1] * 900, np.int64)
    arr = SplitArrays(
        np.zeros((1200, 8, 8), np.uint8), labels, [str(i) for i in range(1200)], [str(i) for i in range(1200)]
    )
    ds = train_dataset(arr, block_rows=100)
    # the whole epoch is read: a stream left half-read would still be running when this module's Ray shuts
    # down, which can take the test process with it
    labels_seen = [
        b["label"].numpy() for b in epoch_batches(ds, strengths={}, seed=0, epoch=1, batch_size=50, shuffle_buffer=100)
    ]
    assert sum(map(len, labels_seen)) == 1200
    share = np.concatenate(labels_seen[:4]).mean()
    assert 0.55 < share < 0.95, share  # about the split's 75% PNEUMONIA, not 0% (class-sorted order)
