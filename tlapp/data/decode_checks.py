"""The scan's decode check of many files: one tf.data pipeline per kind of file.

The scan puts chunks of (index, content hash, path, bytes) of one kind (decoding.file_kind:
"jpeg", "png", ...) into that kind's `Decoder`; its pipeline decodes them on TensorFlow's
threads with `validation.compiled_check` (one straight graph per kind: the full decoder's
switch over formats costs tf.data several times more per file) and drops a file whose
decode fails (`ignore_errors`) instead of stopping. The dropped ones are read and judged
again one by one (`validation.check_image`) to say why. Python sees a chunk per yield and a
batch of results per step, not a call per file.
"""
from __future__ import annotations

import collections
import queue
import threading

import numpy as np
import tensorflow as tf

from tlapp.data import validation

CHUNKS_QUEUED = 2  # chunks waiting for the pipeline (a chunk is at most a window of files)
RESULTS_BATCH = 256  # results per step out of the pipeline


class Decoder:
    """One tf.data pipeline decode-checking the files of one kind, started on first use.

    `put` takes a chunk: a list of (index, content hash, path, bytes). `finished()` yields
    ("ok", [(index, hash, verdict), ...]) as results come, in order, then ("done",) once
    `close()` was called and all are out; ("error", exception) if the pipeline broke.
    """

    def __init__(self, kind: str, max_pixels: int):
        self.kind = kind
        self.max_pixels = max_pixels
        self.inbox: queue.Queue = queue.Queue(maxsize=CHUNKS_QUEUED)
        self.outbox: queue.Queue = queue.Queue()
        self.sent: collections.deque = collections.deque()  # (index, hash, path) yielded
        self.thread: threading.Thread | None = None
        self.closed = False

    def put(self, chunk: list, drain) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._collect, daemon=True)
            self.thread.start()
        while True:
            try:
                self.inbox.put(chunk, timeout=0.05)
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
        """No more chunks: the pipeline ends once those sent are checked."""
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

    def _chunks(self):
        while (chunk := self.inbox.get()) is not None:
            self.sent.extend((i, digest, path) for i, digest, path, _ in chunk)
            yield (np.fromiter((item[0] for item in chunk), np.int64, len(chunk)),
                   [item[3] for item in chunk])

    def _collect(self) -> None:
        check = validation.compiled_check(self.kind, self.max_pixels)
        dataset = (tf.data.Dataset.from_generator(self._chunks, output_signature=(
            tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string)))
            .unbatch()
            .map(lambda i, data: (i,) + check(data), num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()
            .batch(RESULTS_BATCH)
            .prefetch(2))
        try:
            for indices, heights, widths, _ in dataset.as_numpy_iterator():
                done = []
                for index, height, width in zip(indices.tolist(), heights.tolist(),
                                                widths.tolist()):
                    while self.sent[0][0] != index:  # dropped by ignore_errors: it failed
                        done.append(self._explain(*self.sent.popleft()))
                    i, digest, _ = self.sent.popleft()
                    done.append((i, digest, validation.record(None, "", height, width)))
                self.outbox.put(("ok", done))
            self.outbox.put(("ok", [self._explain(*self.sent.popleft())
                                    for _ in range(len(self.sent))]))
        except BaseException as e:  # surfaced in the main thread
            self.outbox.put(("error", e))
        finally:
            self.outbox.put(("done",))

    def _explain(self, i: int, digest: str, path: str) -> tuple[int, str, dict]:
        """Why a file failed the pipeline: read again (its bytes were not kept, so that
        the pipeline holds at most a few chunks of file contents) and checked alone."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return i, digest, validation.record("unreadable", e.strerror or str(e))
        return i, digest, validation.check_image(data, self.max_pixels)
