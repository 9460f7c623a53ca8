"""Streaming reads of cached rows for training: only the rows asked for are in memory.

A call reads many rows at once (several batches: `read_rows`), sorted by shard and row and
gathered shard by shard from memory maps, so the cost per row is a copy, not a Python call
and a system call. Every row read is checked for non-finite values: the stem's rows are
always finite (extraction refuses others), so such a row means the shard was changed after
it was written, even if its mtime was restored. Before training, `check_rows` reads the
rows of shards whose record does not yet say "finite" (written before records said so),
once per shard for the entry's life, not on every run.
"""
from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from tlapp.data.datasets import targets
from tlapp.features.cache import DamagedCacheError, FeatureCache
from tlapp.progress import Progress

READ_BYTES = 4 * 2**20  # rows per call: about this many bytes (at least one batch),
MAX_READ_BYTES = 32 * 2**20  # or more when the rows are spread over many shards:
ROWS_PER_SHARD = 32  # about this many rows of each shard per call (a call costs per shard)
MAX_READ_ROWS = 4096
# memory maps kept open: every shard of an entry up to MAX_OPEN_SHARDS (a call reads rows
# of all of them: fewer, and each call would open most shards again), at least OPEN_SHARDS
OPEN_SHARDS = 128
MAX_OPEN_SHARDS = 8192  # each holds a file descriptor and a memory map (Linux: 65,530 maps)
SPARE_DESCRIPTORS = 512  # left for the rest of the process
ALIGN = 64  # tf.numpy_function takes an output this aligned as it is, others it copies


class ShardReader:
    """Reads rows of .npy shards through memory maps, at most `open_limit` open at once.

    Args:
        names: shard file names; rows are addressed by (index into names, row).
        on_damaged: called with the names of shards found damaged while reading, before
            DamagedCacheError is raised.
    """

    def __init__(self, entry: Path, dtype: np.dtype, names: list[str], shape: tuple,
                 on_damaged: Callable[[list[str], str], object] | None = None):
        self.entry = entry
        self.dtype = np.dtype(dtype)
        self.names = names
        self.shape = tuple(shape)
        self.on_damaged = on_damaged
        self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.open_limit = open_limit(len(names))
        self._lock = threading.RLock()  # tf.data reads on several threads
        self._dropped: set[str] = set()
        self.closed = False
        self.bytes_read = 0
        self.damage: DamagedCacheError | None = None

    def _shard(self, index: int) -> np.ndarray:
        with self._lock:
            if self.closed:  # a prefetch thread of a finished dataset must not reopen files
                raise ValueError(f"the reader of {self.entry} is closed")
            if index in self._open:
                self._open.move_to_end(index)
                return self._open[index]
            try:
                rows = np.load(self.entry / self.names[index], mmap_mode="r",
                               allow_pickle=False)
            except (OSError, ValueError) as e:  # missing, or shorter than its header says
                self._fail([self.names[index]], f"unreadable: {e}")
            if rows.dtype != self.dtype or rows.shape[1:] != self.shape:
                self._fail([self.names[index]], f"holds {rows.dtype} {rows.shape[1:]} rows, "
                                                f"expected {self.dtype} {self.shape}")
            # a plain view: numpy's memmap class costs per indexing; the view keeps the map
            rows = rows.view(np.ndarray)  # open as long as it lives
            self._open[index] = rows
            if len(self._open) > self.open_limit:
                self._open.popitem(last=False)  # the map and its descriptor go with it
            return rows

    def read(self, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The rows at (shards[i], rows[i]), in the order asked."""
        out = aligned_empty((len(shards),) + self.shape, self.dtype)
        order = np.lexsort((rows, shards))
        sorted_shards = shards[order]
        starts = np.flatnonzero(np.r_[True, sorted_shards[1:] != sorted_shards[:-1]])
        # the max and min of each shard's rows carry any NaN or inf: taken while the rows
        # are in the CPU's cache, not in two passes over the whole call's rows afterwards
        extremes = np.empty((len(starts), 2), self.dtype)
        for k, (start, end) in enumerate(zip(starts.tolist(),
                                             np.r_[starts[1:], len(order)].tolist())):
            chosen = order[start:end]
            wanted = rows[chosen]
            index = int(sorted_shards[start])
            source = self._shard(index)
            first, last = int(wanted[0]), int(wanted[-1])  # sorted: the least and the most
            if first < 0 or last >= len(source):  # shorter than its record: replaced since
                self._fail([self.names[index]], f"holds {len(source)} rows, its record more "
                                                f"(row {last} was asked for)")
            # a run of consecutive rows is one slice
            part = source[first:last + 1] if last - first + 1 == len(wanted) else source[wanted]
            extremes[k] = part.max(), part.min()
            out[chosen] = part
        with self._lock:  # tf.data runs several calls at once
            self.bytes_read += out.nbytes
        damaged = ~np.isfinite(extremes).all(axis=1)
        if damaged.any():
            self._fail([self.names[int(sorted_shards[i])] for i in starts[damaged]],
                       "non-finite values (inf or NaN) in rows read for training: the file "
                       "was changed after it was written")
        return out

    def _fail(self, names: list[str], reason: str):
        with self._lock:  # two calls at once may find the same shard damaged: dropped once
            if self.on_damaged is not None and set(names) - self._dropped:
                self.on_damaged(sorted(set(names) - self._dropped), reason)
            self._dropped.update(names)
            self.damage = DamagedCacheError(
                f"The feature cache entry {self.entry} had damaged shard(s) "
                f"{', '.join(names)} ({reason}). They were removed; their rows are extracted "
                f"again by the next run: run the same command again.")
            raise self.damage

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._open.clear()


def open_limit(shards: int) -> int:
    """How many shards a reader keeps open: all `shards`, within MAX_OPEN_SHARDS and the
    process's limit of open files, whose soft value is raised toward the hard one to fit
    them (a soft limit of 1,024 is common; each open shard holds a descriptor)."""
    wanted = min(shards, MAX_OPEN_SHARDS)
    try:
        import resource
    except ImportError:  # Windows
        return OPEN_SHARDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    room = wanted if soft == resource.RLIM_INFINITY else soft - SPARE_DESCRIPTORS
    return max(OPEN_SHARDS, min(wanted, room))


def aligned_empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """np.empty(shape, dtype) starting at a multiple of ALIGN bytes (numpy's own arrays
    start at 16: TensorFlow would copy each read call's rows once more)."""
    size = int(np.prod(shape)) * dtype.itemsize
    buffer = np.empty(size + ALIGN, np.uint8)
    start = -buffer.ctypes.data % ALIGN
    return buffer[start:start + size].view(dtype).reshape(shape)


def read_rows(row_bytes: int, shards: int) -> int:
    """Rows a read call should ask for: about READ_BYTES (cache-sized buffers copy
    fastest), or ROWS_PER_SHARD per shard used when that is more (random rows of many
    shards: the cost per shard of a call is then amortised), within MAX_READ_BYTES."""
    row_bytes = max(1, row_bytes)
    wanted = max(READ_BYTES // row_bytes, ROWS_PER_SHARD * shards)
    return int(np.clip(min(wanted, MAX_READ_BYTES // row_bytes), 1, MAX_READ_ROWS))


class FeatureLoader:
    """A batch loader over cached rows for `datasets.shuffled_batches` / `ordered_batches`.

    `loader(indices, epoch)` reads only those rows, of view (offset(index) + epoch) mod views
    while training and view 0 without an epoch. `read_rows` tells the datasets how many rows
    a call should ask for. Close it (or use `with`) to release the shard files.
    """

    def __init__(self, cache: FeatureCache, digests: list[str], labels: np.ndarray,
                 num_classes: int):
        self.cache = cache
        self.shards, self.rows = cache.locate(digests) if len(digests) else (
            np.zeros((0, cache.views), np.int32), np.zeros((0, cache.views), np.int32))
        self.shape, self.dtype, self.views = cache.feature_shape, cache.dtype, cache.views
        self.reader = ShardReader(cache.dir, cache.dtype, cache.shard_names, self.shape,
                                  cache.drop_shards)
        self.read_rows = read_rows(int(np.prod(self.shape)) * self.dtype.itemsize,
                                   int(np.count_nonzero(np.bincount(self.shards.ravel()))))
        self.labels = tf.constant(labels)
        self.num_classes = num_classes

    def gather(self, idx: np.ndarray, view: np.ndarray | None = None) -> np.ndarray:
        """Rows of examples `idx` (view 0 unless given), as stored."""
        view = np.zeros_like(idx) if view is None else view
        return self.reader.read(self.shards[idx, view], self.rows[idx, view])

    def __call__(self, idx, epoch=None):
        view = tf.zeros_like(idx) if epoch is None or self.views == 1 else \
            (idx * 2654435761 % 4294967296 + tf.cast(epoch, tf.int64)) % self.views
        rows = tf.numpy_function(self.gather, [idx, view], tf.as_dtype(self.dtype),
                                 stateful=False)
        rows = tf.cast(tf.ensure_shape(rows, (None,) + self.shape), tf.float32)
        return rows, targets(self.labels, idx, self.num_classes)

    def check_rows(self) -> int:
        """The non-finite check of rows that never had it: reads whole, in storage order,
        each shard this loader uses whose record does not say "finite" yet, then records
        it as checked. Shards written by this version were checked when written and are
        not read. Returns the rows read.

        Raises:
            DamagedCacheError: a damaged shard (already removed from the entry).
        """
        unchecked = self.cache.unchecked_shards() & {int(i) for i in np.unique(self.shards)}
        if not unchecked:
            return 0
        chosen = sorted(unchecked)
        counts = [self.cache.shards[i].rows for i in chosen]
        shards = np.repeat(np.array(chosen, np.int64), counts)
        rows = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        step = self.read_rows * 8  # in storage order: long runs, read as slices
        progress = Progress(len(rows), "row", "cache check")
        for start in range(0, len(rows), step):
            self.reader.read(shards[start:start + step], rows[start:start + step])
            progress.update(min(start + step, len(rows)))
        self.cache.mark_finite(unchecked)
        return len(rows)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "FeatureLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
