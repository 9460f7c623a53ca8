"""Streaming reads of cached rows for training: only the rows of the batch are in memory."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

from tlapp.features.cache import FeatureCache, row_key


class ShardReader:
    """Reads single rows of .npy shards with pread: only the rows asked for are in memory."""

    def __init__(self, entry: Path, dtype: np.dtype):
        self.entry = entry
        self.dtype = np.dtype(dtype)
        self._open: dict[str, tuple[int, int, int]] = {}  # file -> (fd, data offset, row bytes)
        self._lock = threading.Lock()  # tf.data may read on several threads
        self.closed = False
        self.bytes_read = 0

    def _shard(self, name: str) -> tuple[int, int, int]:
        with self._lock:
            if self.closed:  # a prefetch thread of a finished dataset must not reopen files
                raise ValueError(f"the reader of {self.entry} is closed")
            if name not in self._open:
                self._open[name] = self._open_shard(name)
            return self._open[name]

    def _open_shard(self, name: str) -> tuple[int, int, int]:
        with open(self.entry / name, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
            offset = f.tell()
        row = int(np.prod(shape[1:])) * self.dtype.itemsize
        return os.open(self.entry / name, os.O_RDONLY), offset, row

    def rows(self, locations: list[tuple[str, int]], shape: tuple) -> np.ndarray:
        out = np.empty((len(locations),) + tuple(shape), self.dtype)
        for i, (name, row) in enumerate(locations):
            fd, offset, size = self._shard(name)
            out[i] = np.frombuffer(os.pread(fd, size, offset + row * size),
                                   self.dtype).reshape(shape)
            self.bytes_read += size
        return out

    def close(self) -> None:
        with self._lock:
            self.closed = True
            for fd, _, _ in self._open.values():
                os.close(fd)
            self._open.clear()


class FeatureLoader:
    """A batch loader over cached rows for `datasets.shuffled_batches` / `ordered_batches`.

    `loader(indices, epoch)` reads only those rows, of view (offset(index) + epoch) mod views
    while training and view 0 without an epoch. Close it (or use `with`) to release the
    shard files.
    """

    def __init__(self, cache: FeatureCache, digests: list[str], labels: np.ndarray,
                 num_classes: int):
        self.locations = np.array([[cache.index[row_key(d, v)] for v in range(cache.views)]
                                   for d in digests], dtype=object)
        self.reader = ShardReader(cache.dir, cache.dtype)
        self.shape, self.dtype, self.views = cache.feature_shape, cache.dtype, cache.views
        self.labels = tf.constant(labels)
        self.num_classes = num_classes

    def _gather(self, idx, view):
        return self.reader.rows([tuple(self.locations[i, v]) for i, v in zip(idx, view)],
                                self.shape)

    def __call__(self, idx, epoch=None):
        view = tf.zeros_like(idx) if epoch is None or self.views == 1 else \
            (idx * 2654435761 % 4294967296 + tf.cast(epoch, tf.int64)) % self.views
        rows = tf.numpy_function(self._gather, [idx, view], tf.as_dtype(self.dtype),
                                 stateful=False)
        rows = tf.cast(tf.ensure_shape(rows, (None,) + self.shape), tf.float32)
        return rows, tf.one_hot(tf.gather(self.labels, idx), self.num_classes)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "FeatureLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
