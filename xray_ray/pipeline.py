"""Prepare once, stream every epoch.

``prepare`` decodes and resizes every image of a manifest to S x S grayscale exactly once and caches the
pixels as Parquet, keyed by the source files (uid + content hash) and S; a second run with the same data
and size reads the cache. ``train_dataset`` turns a split into a Ray Dataset that trials augment per epoch
with ``map_batches`` and consume with ``iter_torch_batches``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PREP_VERSION = 1  # bump when the decode/resize contract changes: old caches are then ignored


@dataclass
class SplitArrays:
    """The pixels and labels of one split, in manifest order."""

    images: np.ndarray  # uint8 [N, S, S]
    labels: np.ndarray  # int64 [N]
    uids: list[str]
    patients: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


@dataclass
class Prepared:
    """All splits at one size, plus what the preparation cost."""

    size: int
    splits: dict[str, SplitArrays]
    cache_path: str
    cache_hit: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XRAY_RAY_CACHE", Path.home() / ".cache" / "xray_ray"))


def cache_key(df: pd.DataFrame, size: int) -> str:
    """Key of the pixel cache: every source file (uid and content hash) and the size."""
    h = hashlib.sha1(f"v{PREP_VERSION}|{size}|".encode())
    for uid, sha in zip(df["uid"], df["sha1"]):
        h.update(f"{uid}\0{sha}\n".encode())
    return h.hexdigest()[:20]


def prepare(df: pd.DataFrame, size: int, cache_dir: str | Path | None = None, *, threads: int | None = None) -> Prepared:
    """Decode + grayscale + resize every manifest row to ``size`` once; return arrays per ``split``."""
    from xray_ray.sources import read_pixels

    t0 = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"pixels-{cache_key(df, size)}-{size}px.parquet"
    hit = path.exists()
    uids = df["uid"].tolist()
    if hit:
        table = pq.read_table(path)
        pixels = _fixed_binary_pixels(table.column("image"), table.num_rows, size)  # read-only, no copy
        cached = table.column("uid").to_pylist()
        if cached == uids:
            pos = np.arange(len(uids))
        else:
            order = {u: i for i, u in enumerate(cached)}
            pos = np.fromiter((order[u] for u in uids), dtype=np.int64, count=len(uids))
    else:
        rows = df.to_dict("records")
        threads = threads or os.cpu_count() or 1
        pixels = np.empty((len(rows), size, size), dtype=np.uint8)

        def work(span: range) -> None:  # a span of rows per task: one future per image costs more than it does
            for i in span:
                pixels[i] = read_pixels(rows[i], size)

        step = max(1, min(256, -(-len(rows) // (threads * 8))))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, [range(i, min(i + step, len(rows))) for i in range(0, len(rows), step)]))
        width = size * size
        table = pa.table({
            "uid": pa.array(uids, pa.string()),
            "image": pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows),
                                                          [None, pa.py_buffer(pixels.reshape(-1))]),
        })
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp, compression="lz4")  # pixels decompress several times faster than zstd
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache behind
        pos = np.arange(len(rows))
    splits = {}
    split_col = df["split"] if "split" in df.columns else pd.Series(["train"] * len(df), index=df.index)
    for name in sorted(split_col.unique()):
        mask = (split_col == name).to_numpy()
        sub = df[mask]
        splits[name] = SplitArrays(
            images=pixels[pos[mask]],  # one gather: a writable copy in the order of the manifest
            labels=sub["label"].to_numpy(dtype=np.int64),
            uids=sub["uid"].tolist(),
            patients=sub["patient"].tolist(),
        )
    return Prepared(size=size, splits=splits, cache_path=str(path), cache_hit=hit,
                    seconds=time.perf_counter() - t0, stats={"images": int(len(df))})


def _fixed_binary_pixels(column: pa.ChunkedArray, n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size] straight from a fixed-size-binary column's data buffer (no per-row objects)."""
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # one chunk: no copy
    width = size * size
    if not pa.types.is_fixed_size_binary(chunk.type) or chunk.type.byte_width != width or chunk.null_count:
        raise ValueError(f"pixel cache column is {chunk.type}, not {width}-byte rows")
    data = chunk.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=n * width, offset=chunk.offset * width)
    return flat.reshape(n, size, size)


# --------------------------------------------------------------------------- Ray Data

def train_dataset(arr: SplitArrays, *, block_rows: int = 512):
    """A Ray Dataset of one split: columns image (uint8 S x S tensor), label, idx; several blocks."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(arr)
    tables = []
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        tables.append(pa.table({
            "image": ArrowTensorArray.from_numpy(arr.images[start:stop]),
            "label": pa.array(arr.labels[start:stop], pa.int64()),
            "idx": pa.array(np.arange(start, stop, dtype=np.int64)),
        }))
    return ray.data.from_arrow(tables)


def epoch_batches(ds, *, strengths: Mapping[str, float], seed: int, epoch: int, batch_size: int,
                  shuffle_buffer: int = 1024, data_cpus: float = 0.0, data_tasks: int = 1, device: str = "cpu",
                  map_batch_rows: int = 256) -> Iterator[dict]:
    """One augmented epoch as torch batches ``{"image": uint8 [B,S,S], "label": int64 [B], "idx": ...}``.

    ``data_tasks`` caps the augmentation tasks in flight for this epoch: with ``data_cpus=0`` nothing else
    would (they reserve no CPU), and every extra task is a worker process with torch loaded.
    """
    import ray.data

    aug = ds.map_batches(
        _augment_with_node,
        fn_kwargs={"strengths": dict(strengths), "seed": seed, "epoch": epoch},
        batch_size=map_batch_rows,
        batch_format="numpy",
        num_cpus=data_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, data_tasks)),
        zero_copy_batch=True,
    )
    return aug.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=shuffle_buffer if shuffle_buffer > 0 else None,
        local_shuffle_seed=(seed * 1000003 + epoch) % (2**31) if shuffle_buffer > 0 else None,
        device=device,
        drop_last=False,
    )


class Prefetch:
    """An iterable started in a background thread that holds its first item until iterated.

    Built for the next epoch while the current one validates, so the Ray Data stream's start-up (the
    executor, the first augmentation tasks, the shuffle buffer's first fill: about a second an epoch on 2
    cores) overlaps work the trial does anyway. Iterating waits for that first item, then continues in the
    caller's thread; an error in the background thread is raised there. Iterate it once.
    """

    def __init__(self, make: Callable[[], Iterable]) -> None:
        self._make = make
        self._it: Iterator | None = None
        self._first: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="xray_ray-prefetch", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self._it = iter(self._make())
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as e:  # handed to the consumer's thread
            self._error = e

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first:
            yield self._first.pop()
            yield from self._it


def _augment_with_node(batch: dict[str, np.ndarray], strengths: Mapping[str, float], seed: int, epoch: int) -> dict:
    """augment_batch plus the id of the node that ran it (so a search can show where Data work ran)."""
    import ray

    from xray_ray.augment import augment_batch

    out = augment_batch(batch, strengths=strengths, seed=seed, epoch=epoch)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    out["node"] = np.full(len(out["image"]), node_code(node), dtype=np.int64)
    return out


def node_code(node_id: str) -> int:
    """A stable integer for a node id (tensors cannot carry strings)."""
    return int(hashlib.sha1(node_id.encode()).hexdigest()[:12], 16)
