"""Prepare once: every image of a manifest decoded and resized to S x S grayscale exactly once.

``prepare`` caches the pixels as an Arrow IPC file, keyed by the source files (uid + content hash) and S;
a second run with the same data and size memory-maps the cache.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from xray_ray import CLASSES
from xray_ray.common import atomic_file
from xray_ray.data.manifest import classes_of

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
    """All splits at one size, plus what the preparation cost; `classes` names the labels 0..K-1."""

    size: int
    splits: dict[str, SplitArrays]
    cache_path: str
    cache_hit: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = CLASSES


def default_cache_dir() -> Path:
    return Path(os.environ.get("XRAY_RAY_CACHE", Path.home() / ".cache" / "xray_ray"))


def cache_key(df: pd.DataFrame, size: int) -> str:
    """Key of the pixel cache: every source file (uid and content hash) and the size."""
    h = hashlib.sha1(f"v{PREP_VERSION}|{size}|".encode(), usedforsecurity=False)
    h.update("".join(f"{uid}\0{sha}\n" for uid, sha in zip(df["uid"], df["sha1"])).encode())  # one update: faster
    return h.hexdigest()[:20]


def prepare(
    df: pd.DataFrame,
    size: int,
    cache_dir: str | Path | None = None,
    *,
    workers: int | None = None,
    processes: bool | None = None,
    classes: tuple[str, ...] | list[str] | None = None,
) -> Prepared:
    """Decode + grayscale + resize every manifest row to ``size`` once; return arrays per ``split``.

    ``classes`` (label order; pass the manifest's ``info["classes"]``) is recorded on the result;
    None reads them from the table's label and class_name columns.

    ``workers`` decode in parallel (default: every core): forked processes where that is safe (see
    ``can_fork``; ``processes`` forces the choice), threads otherwise. A cache that cannot be read is
    prepared again, not trusted.
    """
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"pixels-{cache_key(df, size)}-{size}px.arrow"
    uids = df["uid"].tolist()
    split_col = df["split"] if "split" in df.columns else pd.Series(["train"] * len(df), index=df.index)
    masks = {name: (split_col == name).to_numpy() for name in sorted(split_col.unique())}
    images = _read_cache(path, uids, size, masks) if path.exists() else None
    hit, how = images is not None, "cache"
    if images is None:
        rows = df.to_dict("records")
        workers = max(1, workers or os.cpu_count() or 1)
        forked = (processes if processes is not None else can_fork(rows)) and workers > 1 and len(rows) > 1
        pixels = decode_all(rows, size, workers, forked)
        how = f"{workers} {'processes' if forked else 'threads'}"
        _write_cache(path, uids, pixels)
        images = {name: pixels[mask] for name, mask in masks.items()}  # one gather each: writable copies
    splits = {}
    for name, mask in masks.items():
        sub = df[mask]
        splits[name] = SplitArrays(
            images=images[name],
            labels=sub["label"].to_numpy(dtype=np.int64),
            uids=sub["uid"].tolist(),
            patients=sub["patient"].tolist(),
        )
    return Prepared(
        size=size,
        splits=splits,
        cache_path=str(path),
        cache_hit=hit,
        seconds=time.perf_counter() - t0,
        stats={"images": int(len(df)), "decoded_by": how},
        classes=tuple(classes) if classes is not None else classes_of(df),
    )


def _read_cache(path: Path, uids: list[str], size: int, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Each split's pixels from the cache file, memory-mapped (no decode, one gather each); None if unusable."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
            pixels = _fixed_binary_pixels(table.column("image"), table.num_rows, size)
            if table.column("uid").to_pylist() != uids:  # the key hashes them in order: only a collision
                raise ValueError("its files differ from this manifest's")
            return {name: pixels[mask] for name, mask in masks.items()}  # copies: the map can close
    except (pa.ArrowException, OSError, ValueError) as e:
        # a cache cut short (disk full, killed writer of an old version) or from elsewhere: prepare again
        warnings.warn(
            f"ignoring the unreadable pixel cache {path} ({type(e).__name__}: {e}); preparing again", stacklevel=3
        )
        return None


def _write_cache(path: Path, uids: list[str], pixels: np.ndarray) -> None:
    """An Arrow IPC file, uncompressed: a later run memory-maps it in about a millisecond (Parquet: 15-70 ms)."""
    n, width = len(uids), pixels.shape[1] * pixels.shape[2]
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "image": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), n, [None, pa.py_buffer(pixels.reshape(-1))]
            ),
        }
    )
    with atomic_file(path) as f:  # a crash never leaves a half-written cache behind
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)


def can_fork(rows: list[Mapping]) -> bool:
    """Whether decoding may fork worker processes here.

    Threads share one interpreter: PIL releases the GIL while it decodes and resizes, but its JPEG header
    parsing and the per-image Python around it do not, so threads scale poorly with the cores
    (docs/performance.md). Forked processes scale with them. Fork only where it is safe: on Linux (macOS
    frameworks are not fork-safe), with no Ray running in this process (its gRPC threads are not), and
    for local files or generated pixels (a remote filesystem's client is not to be shared across a fork).
    """
    if not sys.platform.startswith("linux"):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return False
    return all("://" not in str(r["location"]) for r in rows)


def decode_all(rows: list[Mapping], size: int, workers: int, forked: bool) -> np.ndarray:
    """uint8 [len(rows), size, size]: ``read_pixels`` of every row, spread over ``workers``."""
    n = len(rows)
    # spans of rows, a few per worker: one task per image costs more than it does
    step = max(1, min(256, -(-n // (workers * 8))))
    spans = [(i, min(i + step, n)) for i in range(0, n, step)]
    if not forked:
        pixels = np.empty((n, size, size), dtype=np.uint8)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda span: _decode_rows(rows, size, pixels, span), spans))
        return pixels
    global _FORK_JOB
    shared = mmap.mmap(-1, max(1, n * size * size))  # anonymous and shared: the children write into it
    pixels = np.frombuffer(shared, dtype=np.uint8, count=n * size * size).reshape(n, size, size)
    _FORK_JOB = (rows, size, pixels)  # the children inherit it: nothing about the rows is pickled
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=signal.signal,
        initargs=(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        list(pool.map(_decode_span, spans))
    except BrokenProcessPool:  # a worker died (killed, out of memory): finish with threads instead
        pool.shutdown(wait=True, cancel_futures=True)
        return decode_all(rows, size, workers, forked=False)
    except BaseException:  # a data error or Ctrl-C: stop now, not after every queued span
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        _FORK_JOB = None
    pool.shutdown(wait=True)
    return pixels


_FORK_JOB: tuple[list[Mapping], int, np.ndarray] | None = None


def _decode_span(span: tuple[int, int]) -> None:
    """In a forked worker: decode rows[start:stop] into the shared array."""
    _decode_rows(*_FORK_JOB, span)


def _decode_rows(rows: list[Mapping], size: int, pixels: np.ndarray, span: tuple[int, int]) -> None:
    from xray_ray.data.sources import read_pixels

    for i in range(*span):
        pixels[i] = read_pixels(rows[i], size)


def _fixed_binary_pixels(column: pa.ChunkedArray, n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size] straight from a fixed-size-binary column's data buffer (no per-row objects)."""
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # one chunk: no copy
    width = size * size
    if not pa.types.is_fixed_size_binary(chunk.type) or chunk.type.byte_width != width or chunk.null_count:
        raise ValueError(f"pixel cache column is {chunk.type}, not {width}-byte rows")
    data = chunk.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=n * width, offset=chunk.offset * width)
    return flat.reshape(n, size, size)
