"""Checking every file of a folder scan: streaming, bounded in memory, in batches.

The main thread walks the list a window at a time: a file unchanged since an earlier scan
(path, size, mtime in the store) is settled without being read, with one store query per
window; the others are read and hashed on a few threads (a chunk of files per task), and a
content already judged is settled by its hash (one query per window). What is left goes, a
chunk per kind of file, to the tf.data pipelines of decode_checks.py. Results go to the
store as they come (check_store.py), a few thousand rows per transaction.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import time
from typing import Sequence

from tlapp.constants import DEFAULT_MAX_PIXELS
from tlapp.data import validation
from tlapp.data.check_store import open_store, unchanged
from tlapp.data.decode_checks import Decoder
from tlapp.data.decoding import file_kind
from tlapp.progress import Progress

WINDOW = 512  # files stat-ed, looked up and read per step of the main loop
READERS = 4  # threads reading and hashing (I/O and hashlib release the GIL)
READ_BYTES = 64 << 20  # contents read at once, at most (one file may be larger)


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
    decoders: dict[str, Decoder] = {}
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

    def drain(decoder: Decoder, block: bool = False) -> bool:
        """Settles what `decoder` finished; False once it has finished everything."""
        for message in decoder.finished(block):
            if message[0] == "done":
                return False
            if message[0] == "error":
                raise message[1]
            for item in message[1]:
                judged(*item)
        return True

    def drain_all() -> None:
        for decoder in decoders.values():
            drain(decoder)

    def check_read(batch: list, got: list) -> None:
        """Settles the files of `batch` (index, path, stat) known by content; sends the
        others to the decoder of their kind."""
        if store:
            for (_, path, stat), read in zip(batch, got):
                if not isinstance(read, OSError):
                    store.add_file(path, stat, read[1], started)
        known = store.results_of([read[1] for read in got if not isinstance(read, OSError)]
                                 ) if store else {}
        chunks: dict[str, list] = {}
        for (i, path, _), read in zip(batch, got):
            if isinstance(read, OSError):
                settle(i, None, validation.record("unreadable", read.strerror or str(read)))
                continue
            data, digest = read
            stored = known.get(digest)
            result = stored and validation.verdict(stored, max_pixels)
            if result:
                settle(i, digest, result)
            elif (early := validation.precheck(data)) is not None:
                judged(i, digest, early)
            else:
                chunks.setdefault(file_kind(data), []).append((i, digest, path, data))
        for kind, chunk in chunks.items():
            if kind not in decoders:
                decoders[kind] = Decoder(kind, max_pixels)
            decoders[kind].put(chunk, drain_all)

    base = os.path.join(os.path.abspath(root), "")
    try:
        with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
            for start in range(0, len(relative), WINDOW):
                window = []
                for i in range(start, min(start + WINDOW, len(relative))):
                    # the absolute path (the store's key) without os.path.abspath per file
                    name = relative[i]
                    path = os.path.normpath(name if name.startswith("/") else base + name)
                    try:
                        window.append((i, path, os.stat(path)))
                    except OSError as e:
                        settle(i, None, validation.record("unreadable", e.strerror or str(e)))
                rows = store.rows_of([path for _, path, _ in window]) if store else {}
                to_read = []
                for item in window:
                    known = unchanged(rows.get(item[1]), item[2])
                    result = known and known[1] and validation.verdict(known[1], max_pixels)
                    if result:
                        settle(item[0], known[0], result)
                    else:
                        to_read.append(item)
                for batch in _read_batches(to_read):
                    parts = [batch[k::READERS] for k in range(READERS)]
                    got = [None] * len(batch)
                    for k, results in enumerate(pool.map(_read_many, parts)):
                        got[k::READERS] = results
                    check_read(batch, got)
                drain_all()
                progress.update(settled)
        for decoder in decoders.values():
            decoder.close()
            while drain(decoder, block=True):
                progress.update(settled)
        progress.update(settled)
        if store:
            store.flush()
    finally:
        for decoder in decoders.values():
            decoder.close()
        if store:
            store.db.close()
    return checks


def _read_batches(items: list):
    """`items` (index, path, stat) in runs of at most READ_BYTES of content (one file at
    least), so that a window of large photos is not held in memory at once."""
    batch, size = [], 0
    for item in items:
        if batch and size + item[2].st_size > READ_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[2].st_size
    if batch:
        yield batch


def _read_many(items: list) -> list:
    """(bytes, sha256 hex) or the OSError, for each (index, path, stat) of `items`."""
    return [_read(path) for _, path, _ in items]


def _read(path: str) -> tuple[bytes, str] | OSError:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return e
    return data, hashlib.sha256(data).hexdigest()
