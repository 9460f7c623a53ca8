"""Row records: which rows each shard of a cache entry holds, written once, with the shard.

Layout 3 of an entry folder (its name and key are those of layout 2):

    shard-<16 hex>.npy    the rows, a plain .npy array [rows, *feature_shape]
    shard-<16 hex>.rows   its record: an uncompressed .npz (CRC-checked by zipfile) with
                          the row keys in row order and a JSON description (checksum, size,
                          mtime of the shard, the entry key, feature shape, dtype)
    index.npz             a snapshot of the union of the records (a cache: index.py)
    last_used             empty; its mtime is the entry's last use
    manifest.json         layout 2 only; turned into records on first open (index.py)

A row key is 34 bytes: the image's sha256 and its view (2 bytes, big-endian). A shard's
name is the first 16 hex digits of the sha256 of its keys, so the name commits to which
rows the shard holds and in which order. Every file is written under a temporary name
unique to the host, process and call, then renamed: several processes, on several machines
sharing the folder, add shards to one entry without a lock.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

LAYOUT = 3
KEY_DTYPE = np.dtype("S34")
RECORD_SUFFIX = ".rows"
TEMP_MARK = ".tmp-"
_HEX_VALUES = np.full(256, 255, np.uint8)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX_VALUES[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


class RecordError(ValueError):
    """A record or snapshot that cannot be trusted; the message says why."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard as its record describes it."""

    name: str  # file name, shard-<16 hex>.npy
    rows: int
    bytes: int
    mtime_ns: int
    sha256: str
    rows_sha256: str  # sha256 of the shard's keys
    legacy: bool = False  # migrated from a layout-2 manifest (named by the old rule)
    finite: bool = False  # its rows were checked for non-finite values (when written, or
    # once by the first run that read them: records written before this field say nothing)


def digest_bytes(digests: Sequence[str]) -> np.ndarray:
    """Hex sha256 strings -> [n, 32] uint8, vectorised (no Python loop per digest).

    Raises:
        ValueError: a string that is not 64 hex digits.
    """
    text = np.asarray(digests, dtype="S64") if len(digests) else np.zeros(0, "S64")
    codes = np.frombuffer(text.tobytes(), np.uint8).reshape(-1, 64)
    values = _HEX_VALUES[codes]
    if (values > 15).any():  # shorter strings were padded with NUL, which is no hex digit
        raise ValueError("a content hash is not 64 hex digits")
    return (values[:, 0::2] << 4) | values[:, 1::2]


def make_keys(digests: np.ndarray, views: np.ndarray | int) -> np.ndarray:
    """Row keys (KEY_DTYPE) of [n, 32] digests and their views."""
    raw = np.empty((len(digests), 34), np.uint8)
    raw[:, :32] = digests
    views = np.broadcast_to(np.asarray(views, np.int64), (len(digests),))
    raw[:, 32], raw[:, 33] = views >> 8, views & 255
    return raw.view(KEY_DTYPE).reshape(-1)


def keys_of_strings(rows: Sequence[str]) -> np.ndarray:
    """Row keys of layout-2 row strings: a hex digest, with "#view" for views > 0."""
    digests = [row.split("#")[0] for row in rows]
    views = np.array([int(row.split("#")[1]) if "#" in row else 0 for row in rows], np.int64)
    return make_keys(digest_bytes(digests), views)


def key_strings(keys: np.ndarray) -> list[str]:
    """The layout-2 strings of row keys (for tools and small entries: one str per row)."""
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, 34)
    views = raw[:, 32].astype(np.int64) << 8 | raw[:, 33]
    return [row[:32].tobytes().hex() + (f"#{v}" if v else "") for row, v in zip(raw, views)]


def rows_sha256(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys, KEY_DTYPE).tobytes()).hexdigest()


def shard_name(keys: np.ndarray) -> str:
    return f"shard-{rows_sha256(keys)[:16]}.npy"


def record_path(entry: Path, shard: str) -> Path:
    return entry / (shard[:-len(".npy")] + RECORD_SUFFIX)


def publish(path: Path, write: Callable[[Path], None]) -> None:
    """write(temp) then rename onto `path`; the temporary name is unique to this host,
    process and call, so concurrent writers (on a shared file system too) never mix."""
    temp = path.with_name(f".{path.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-"
                          f"{secrets.token_hex(4)}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def save_arrays(arrays: dict[str, np.ndarray]) -> Callable[[Path], None]:
    """A writer for `publish`: an uncompressed .npz, flushed to the disk."""
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
    return write


def json_array(value) -> np.ndarray:
    return np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)


def write_record(entry: Path, shard: ShardInfo, keys: np.ndarray, entry_meta: dict) -> None:
    """Writes the record of `shard` (after the shard itself: a record means complete)."""
    meta = {"layout": LAYOUT, **entry_meta, **dataclasses.asdict(shard)}
    publish(record_path(entry, shard.name), save_arrays({"keys": keys, "meta": json_array(meta)}))


def read_record(path: Path) -> tuple[ShardInfo, np.ndarray, dict]:
    """(shard, keys, entry meta: key, feature_shape, dtype) of one record.

    Raises:
        RecordError: unreadable, damaged (zip CRC), inconsistent with itself, or with the
            name of its shard (the name commits to the keys).
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(stored["meta"].tobytes())
            keys = stored["keys"]
        fields = {f.name: meta[f.name] for f in dataclasses.fields(ShardInfo)
                  if f.name in meta or f.name not in ("legacy", "finite")}
        shard = ShardInfo(**fields)
    except Exception as e:  # zipfile, zlib, numpy, json and key errors alike
        raise RecordError(f"unreadable record ({type(e).__name__}: {e})") from None
    problem = key_problem(shard, keys)
    if problem:
        raise RecordError(problem)
    return shard, keys, {k: meta[k] for k in ("key", "feature_shape", "dtype") if k in meta}


def key_problem(shard: ShardInfo, keys: np.ndarray) -> str | None:
    """Why these keys are not the rows `shard` holds, or None."""
    if keys.dtype != KEY_DTYPE or keys.ndim != 1 or len(keys) != shard.rows:
        return f"its row list is malformed ({keys.dtype} {keys.shape}, {shard.rows} rows)"
    digest = rows_sha256(keys)
    if digest != shard.rows_sha256 or (not shard.legacy and
                                       shard.name != f"shard-{digest[:16]}.npy"):
        return "its row list does not match the shard (rows attributed to other images)"
    return None


def snapshot_arrays(shards: list[ShardInfo], keys: np.ndarray, entry_meta: dict) -> dict:
    """The arrays of index.npz: one entry per shard, and every key in shard order."""
    def column(name, dtype):
        return np.array([getattr(s, name) for s in shards], dtype)
    return {"name": column("name", "S32"), "rows": column("rows", np.int64),
            "bytes": column("bytes", np.int64), "mtime_ns": column("mtime_ns", np.int64),
            "sha256": column("sha256", "S64"), "rows_sha256": column("rows_sha256", "S64"),
            "legacy": column("legacy", bool), "finite": column("finite", bool), "keys": keys,
            "meta": json_array({"layout": LAYOUT, **entry_meta})}


def read_snapshot(path: Path) -> tuple[list[ShardInfo], np.ndarray, dict]:
    """(shards, keys, entry meta) of index.npz; every shard's slice of keys is checked
    against its name (or its recorded row hash, for migrated shards).

    Raises:
        RecordError: missing, unreadable, damaged or inconsistent.
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        meta = json.loads(arrays["meta"].tobytes())
        finite = arrays.get("finite", np.zeros(len(arrays["name"]), bool))  # older snapshots
        shards = [ShardInfo(name.decode(), int(rows), int(size), int(mtime), sha.decode(),
                            rows_sha.decode(), bool(legacy), bool(checked))
                  for name, rows, size, mtime, sha, rows_sha, legacy, checked in zip(
                      arrays["name"], arrays["rows"], arrays["bytes"], arrays["mtime_ns"],
                      arrays["sha256"], arrays["rows_sha256"], arrays["legacy"], finite,
                      strict=True)]
        keys = arrays["keys"]
    except FileNotFoundError:
        raise RecordError("missing") from None
    except Exception as e:
        raise RecordError(f"unreadable ({type(e).__name__}: {e})") from None
    if keys.dtype != KEY_DTYPE or sum(s.rows for s in shards) != len(keys):
        raise RecordError("its row lists are malformed")
    start = 0
    for shard in shards:
        problem = key_problem(shard, keys[start:start + shard.rows])
        if problem:
            raise RecordError(f"{shard.name}: {problem}")
        start += shard.rows
    return shards, keys, meta
