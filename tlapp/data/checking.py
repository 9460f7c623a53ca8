"""Checking every file of a folder scan: streaming, bounded in memory, one decode pipeline.

The main thread walks the list a window at a time: a file unchanged since an earlier scan
(path, size, mtime in the store) is settled without being read; the others are read and
hashed on a few threads, and a content already judged is settled by its hash. What is
left goes to one tf.data pipeline (`Decoder`) that decodes on TensorFlow's threads and
drops a file whose decode fails (`ignore_errors`) instead of stopping; the dropped ones are
judged again one by one (validation.check_image) to say why. Results go to the store as
they come (check_store.py), a few thousand rows per transaction.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import queue
import threading
import time
from typing import Sequence

import tensorflow as tf

from tlapp.constants import DEFAULT_MAX_PIXELS
from tlapp.data import validation
from tlapp.data.check_store import open_store, unchanged
from tlapp.progress import Progress

WINDOW = 256  # files stat-ed, looked up and read per step of the main loop
READERS = 8  # threads reading and hashing (I/O and hashlib release the GIL)
DECODE_QUEUE = 64  # files waiting for the decode pipeline


@dataclasses.dataclass
class Checks:
    """The outcome for each file: its content hash (None if unreadable) and, for a file that
    cannot be used, (reason, detail)."""

    digests: list
    problems: dict[int, tuple[str, str]]
    checked: int = 0  # contents checked now (the others were known from earlier scans)


def check_files(root: str, relative: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                cache_dir: str | os.PathLike | None = None) -> Checks:
    """Hashes and decode-checks `root`/`relative[i]` for every i, reusing the store under
    `cache_dir` (when given)."""
    checks = Checks([None] * len(relative), {})
    store = open_store(cache_dir)
    started = time.time_ns()
    progress = Progress(len(relative), "file", "scan")
    decoder = Decoder(max_pixels)
    settled = 0

    def settle(i: int, digest: str | None, result: dict) -> None:
        nonlocal settled
        checks.digests[i] = digest
        if result["reason"]:
            checks.problems[i] = (result["reason"], result["detail"])
        settled += 1

    def judged(i: int, digest: str, result: dict) -> None:
        checks.checked += 1
        if store:
            store.add_result(digest, result)
        settle(i, digest, validation.verdict(result, max_pixels))

    def drain(block: bool = False) -> bool:
        """Settles what the decoder finished; False once it has finished everything."""
        for message in decoder.finished(block):
            if message[0] == "done":
                return False
            if message[0] == "error":
                raise message[1]
            judged(*message[1:])
        return True

    base = os.path.join(os.path.abspath(root), "")
    try:
        with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
            for start in range(0, len(relative), WINDOW):
                to_read, window = [], []
                for i in range(start, min(start + WINDOW, len(relative))):
                    # the absolute path (the store's key) without os.path.abspath per file
                    name = relative[i]
                    path = os.path.normpath(name if name.startswith("/") else base + name)
                    try:
                        window.append((i, path, os.stat(path)))
                    except OSError as e:
                        settle(i, None, validation.record("unreadable", e.strerror or str(e)))
                rows = store.rows_of([path for _, path, _ in window]) if store else {}
                for i, path, stat in window:
                    known = unchanged(rows.get(path), stat)
                    result = known and known[1] and validation.verdict(known[1], max_pixels)
                    if result:
                        settle(i, known[0], result)
                    else:
                        to_read.append((i, path, stat))
                for (i, path, stat), got in zip(to_read, pool.map(_read, [p for _, p, _ in
                                                                          to_read])):
                    if isinstance(got, OSError):
                        settle(i, None, validation.record("unreadable", got.strerror or
                                                          str(got)))
                        continue
                    data, digest = got
                    if store:
                        store.add_file(path, stat, digest, started)
                    stored = store.result(digest) if store else None
                    result = stored and validation.verdict(stored, max_pixels)
                    if result:
                        settle(i, digest, result)
                    elif (early := validation.precheck(data)) is not None:
                        judged(i, digest, early)
                    else:
                        decoder.put((i, digest, data), drain)
                drain()
                progress.update(settled)
        decoder.close()
        while drain(block=True):
            progress.update(settled)
        progress.update(settled)
        if store:
            store.flush()
    finally:
        decoder.close()
        if store:
            store.db.close()
    return checks


def _read(path: str) -> tuple[bytes, str] | OSError:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return e
    return data, hashlib.sha256(data).hexdigest()


class Decoder:
    """One tf.data pipeline decode-checking the files put into it, started on first use.

    Items are (index, content hash, bytes). `finished()` yields ("ok", index, hash,
    verdict) for each, in order, then ("done",) once `close()` was called and all are out.
    """

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.inbox: queue.Queue = queue.Queue(maxsize=DECODE_QUEUE)
        self.outbox: queue.Queue = queue.Queue()
        self.sent: collections.deque = collections.deque()  # yielded, not yet out
        self.thread: threading.Thread | None = None
        self.closed = False

    def put(self, item: tuple, drain) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._collect, daemon=True)
            self.thread.start()
        while True:
            try:
                self.inbox.put(item, timeout=0.05)
                return
            except queue.Full:
                drain()  # settle finished files meanwhile, so the pipeline never stalls

    def finished(self, block: bool = False):
        """The messages available now (with block=True, waits for one first)."""
        if self.thread is None:
            if self.closed:
                yield ("done",)
            return
        try:
            yield self.outbox.get(block=block)
            while True:
                yield self.outbox.get_nowait()
        except queue.Empty:
            return

    def close(self) -> None:
        """No more items: the pipeline ends once those sent are checked."""
        if self.closed:
            return
        self.closed = True
        if self.thread is not None:
            while True:  # the generator must see the end even if the caller stopped early
                try:
                    self.inbox.put(None, timeout=0.05)
                    return
                except queue.Full:
                    try:
                        self.inbox.get_nowait()
                    except queue.Empty:
                        pass

    def _items(self):
        while (item := self.inbox.get()) is not None:
            self.sent.append(item)
            yield item[0], item[2]

    def _collect(self) -> None:
        max_pixels = self.max_pixels
        dataset = (tf.data.Dataset.from_generator(self._items, output_signature=(
            tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)))
            .map(lambda i, data: (i,) + validation.graph_check(data, max_pixels),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()
            .prefetch(DECODE_QUEUE))
        try:
            for index, height, width, _ in dataset.as_numpy_iterator():
                while self.sent[0][0] != index:  # dropped by ignore_errors: it failed
                    self._explain(self.sent.popleft())
                i, digest, _ = self.sent.popleft()
                self.outbox.put(("ok", i, digest, validation.record(None, "", int(height),
                                                                    int(width))))
            while self.sent:
                self._explain(self.sent.popleft())
        except BaseException as e:  # surfaced in the main thread
            self.outbox.put(("error", e))
        finally:
            self.outbox.put(("done",))

    def _explain(self, item: tuple) -> None:
        i, digest, data = item
        self.outbox.put(("ok", i, digest, validation.check_image(data, self.max_pixels)))
