"""grain pipelines that give every JAX process its share of each global batch, deterministically.

  MapDataset.source(file index) -> seed -> shuffle -> repeat (reshuffled every epoch)
    -> random_map(decode + augment)          seeded by the element's *global* position
    -> this process's block of every global batch (rows p*b .. p*b+b-1 of batch k)
    -> filter(unusable images) -> to_iter_dataset(threads) -> batch(per-process, drop_remainder)

Because augmentation is keyed by the global position and each process takes a contiguous block,
the global batch (the processes' batches concatenated in process order, which is what
`jax.make_array_from_process_local_data` builds) is the same for any process count. The iterator
state goes into the orbax checkpoint (grain.checkpoint.CheckpointSave) for an exact resume.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import grain
import numpy as np

from defusion_jax.data import augment as aug
from defusion_jax.data.sources import SKIPPED


class BatchBlockShard(grain.MapDataset):
    """Element n of process p = element (n // b) * B + p * b + n % b of the parent (b = B / P)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
        super().__init__(parent)
        if global_batch % count:
            raise ValueError(f"global batch {global_batch} does not split over {count} processes")
        self._global, self._local = global_batch, global_batch // count
        self._index, self._count = index, count
        self._length = (len(parent) // global_batch) * self._local

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, n: int) -> int:
        k, i = divmod(n, self._local)
        return k * self._global + self._index * self._local + i

    def __getitem__(self, n):
        if isinstance(n, slice):
            return self.slice(n)
        return self._parents[0][self._parent_index(n)]

    def __str__(self) -> str:
        return f"BatchBlockShard(process {self._index}/{self._count}, batch {self._global})"


def _transform(record, rng: np.random.Generator, *, source, size, scale, ratio, jitter, flip):
    images = source.load(record)
    if images is None:
        return None
    return aug.augment(images, rng, size, scale, ratio, jitter=jitter, flip=flip)


def make_stream(source, *, global_batch: int, process_index: int, process_count: int, seed: int,
                image_size=(224, 224), scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), jitter: bool = True,
                flip: bool = True, num_threads: int = 4, prefetch: int = 8,
                transform: Callable | None = None) -> grain.IterDataset:
    """Endless per-process batches (dicts of float32 NHWC arrays) from a source with `.load()`."""
    fn = transform or functools.partial(_transform, source=source, size=tuple(image_size), scale=tuple(scale),
                                        ratio=tuple(ratio), jitter=jitter, flip=flip)
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    ds = ds.random_map(fn)
    ds = BatchBlockShard(ds, global_batch, process_index, process_count)
    ds = ds.filter(lambda x: x is not None)
    opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return ds.to_iter_dataset(opts).batch(global_batch // process_count, drop_remainder=True)


def mix_streams(streams: Mapping[str, grain.IterDataset], weights: Mapping[str, float]) -> grain.IterDataset:
    """Interleave whole batches of several streams in fixed proportions (grain's deterministic mix)."""
    live = {k: v for k, v in streams.items() if weights.get(k, 0) > 0}
    if len(live) == 1:
        return next(iter(live.values()))
    return grain.IterDataset.mix(live, {k: float(weights[k]) for k in live})


def skipped_files() -> int:
    """How many unusable images this process has skipped so far (each occurrence counted)."""
    return SKIPPED.total()


def describe(batch: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in batch.items())
