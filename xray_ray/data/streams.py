"""Stream every epoch: a prepared split as a Ray Dataset, augmented per epoch and batched for torch.

``train_dataset`` turns a split into a Ray Dataset that trials augment per epoch with ``map_batches``
(``epoch_batches``) and consume with ``iter_torch_batches``; ``rows_for`` sizes evaluation batches.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from xray_ray.data.balance import resample
from xray_ray.data.prepare import SplitArrays

BATCH_PIXELS = 256 * 64 * 64  # evaluation batches on a GPU: about a million pixels each
CPU_BATCH_PIXELS = 64 * 64 * 64  # on CPU: a batch's activations stay in cache (bench/eval_batch.py)


def rows_for(size: int, most: int = 256, device: str = "cpu") -> int:
    """Rows of an evaluation batch at ``size`` px: a fixed pixel budget, at least 16 rows and at most ``most``.

    On a GPU about a million pixels (256 rows at 64 px, 64 at 128 px); on CPU a quarter of that (64 rows at
    64 px, 16 at 128 px), which predicts 1.5-1.6x faster with one thread because a batch's activations stay
    in cache (bench/eval_batch.py; docs/performance.md) and lowers a trial's peak memory. Augmentation keeps its
    256 rows a task: its intermediates are a few inputs' worth, and the map's batch size shapes the local
    shuffle, so changing it would change every search's training order.
    """
    budget = BATCH_PIXELS if str(device).startswith("cuda") else CPU_BATCH_PIXELS
    return max(16, min(most, budget // (size * size)))


def train_dataset(arr: SplitArrays, *, block_rows: int = 512, seed: int = 0):
    """A Ray Dataset of one split: columns image (uint8 S x S tensor), label, idx; several blocks.

    The rows go into blocks in a seeded random order, not the split's own: a split lists its files class by
    class, and a stream shuffled only within a local buffer would otherwise feed the first part of every
    epoch from one class and the rest from the other. ``idx`` stays the row's index in ``arr``.
    """
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(arr)
    order = np.random.default_rng(seed).permutation(n)
    tables = []
    for start in range(0, n, block_rows):
        rows = order[start : start + block_rows]
        tables.append(
            pa.table(
                {
                    "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(arr.images[rows])),
                    "label": pa.array(np.asarray(arr.labels)[rows], pa.int64()),
                    "idx": pa.array(rows.astype(np.int64)),
                }
            )
        )
    return ray.data.from_arrow(tables)


def epoch_batches(
    ds,
    *,
    strengths: Mapping[str, float],
    seed: int,
    epoch: int,
    batch_size: int,
    shuffle_buffer: int = 1024,
    data_cpus: float = 0.0,
    data_tasks: int = 1,
    device: str = "cpu",
    map_batch_rows: int = 256,
    data_slot: str | None = None,
    repeats: Mapping[int, float] | None = None,
) -> Iterator[dict]:
    """One augmented epoch as torch batches ``{"image": uint8 [B,S,S], "label": int64 [B], "idx": ...}``.

    ``data_tasks`` caps the augmentation tasks in flight for this epoch: with ``data_cpus=0`` nothing else
    would (they reserve no CPU), and every extra task is a worker process with torch loaded. ``data_slot``
    names a custom Ray resource each task holds one unit of, so that all trials together run no more
    augmentation tasks (and keep no more worker processes) than the node has of it. ``repeats`` (label ->
    expected copies of each row, see ``balanced_repeats``) resamples the epoch before augmenting it.
    """
    import ray.data

    # each epoch visits the blocks in its own order; the local buffer then shuffles rows across blocks
    aug = ds.randomize_block_order(seed=(seed * 1000003 + epoch) % (2**31)).map_batches(
        _augment_with_node,
        fn_kwargs={
            "strengths": dict(strengths),
            "seed": seed,
            "epoch": epoch,
            "repeats": dict(repeats) if repeats else None,
        },
        batch_size=map_batch_rows,
        batch_format="numpy",
        num_cpus=data_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, data_tasks)),
        zero_copy_batch=True,
        **({"resources": {data_slot: 1}} if data_slot else {}),
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


def _augment_with_node(
    batch: dict[str, np.ndarray],
    strengths: Mapping[str, float],
    seed: int,
    epoch: int,
    repeats: Mapping[int, float] | None = None,
) -> dict:
    """augment_batch plus the id of the node that ran it (so a search can show where Data work ran)."""
    import ray

    from xray_ray.data.augment import augment_batch

    if repeats:
        batch = resample(batch, repeats, seed, epoch)
    out = augment_batch(batch, strengths=strengths, seed=seed, epoch=epoch)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    out["node"] = np.full(len(out["image"]), node_code(node), dtype=np.int64)
    return out


def node_code(node_id: str) -> int:
    """A stable integer for a node id (tensors cannot carry strings)."""
    return int(hashlib.sha1(node_id.encode(), usedforsecurity=False).hexdigest()[:12], 16)
