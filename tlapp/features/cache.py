"""The feature cache on disk: entries keyed by what changes activations, shards of rows
keyed by image content, and their integrity.

An entry is a folder `BACKBONE-CUT-SIZEpx-DIGEST/` holding `.npy` shards (one row per image
and view), each with its record of which rows it holds (records.py); the entry's index is
the union of the records (index.py). Extraction is in extract.py, streaming reads in
loader.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from tlapp.data.decoding import DECODER_VERSION
from tlapp.errors import UserInputError
from tlapp.features import index as index_lib, records
from tlapp.features.entries import (clear_entries, list_entries, read_manifest,  # noqa: F401
                                    verify_entry)
from tlapp.features.records import KEY_DTYPE, ShardInfo
from tlapp.files import disk_full, file_sha256, is_disk_full

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # of the key (the activations): the entry's name depends on it
SHARD_BYTES = 64 * 2**20


def weights_identity(model: keras.Model) -> str:
    """sha256 of the model's weights: the same activations come from the same digest."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def entry_key(**fields) -> dict:
    return {"format": FORMAT_VERSION, "decoder": DECODER_VERSION, **fields}


def cache_key(backbone: str, stem: keras.Model, cut: str, pooled: bool, image_size: int,
              preprocess: str, views: int = 1, dtype: str = "auto",
              augment: str | None = None, augment_seed: int = 0) -> dict:
    """The key of the entry holding `stem`'s activations: everything that changes them.

    Args:
        stem: pixels -> activations; its weights are hashed (the weights identity).
        pooled: the stem ends in global average pooling (one vector per image).
        dtype: storage type; "auto" is float32 for pooled vectors, float16 for feature maps.
        augment, augment_seed: the spec and seed of views 1..K-1 (used when views > 1).
    """
    if dtype == "auto":
        dtype = "float32" if pooled else "float16"
    return entry_key(
        backbone=backbone, weights=weights_identity(stem), cut=cut, pooled=pooled,
        image_size=image_size, preprocess=preprocess,
        precision=keras.mixed_precision.global_policy().name, views=views, dtype=dtype,
        **({"augment": augment, "augment_seed": augment_seed} if views > 1 else {}))


def entry_dir(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['backbone']}-{key['cut']}-{key['image_size']}px-{digest}"


def row_key(digest: str, view: int) -> str:
    """A row's key: the image's content hash, and its view when augmented."""
    return digest if view == 0 else f"{digest}#{view}"


class DamagedCacheError(UserInputError):
    """Rows read from the cache are not what was written (found while reading them)."""


class FeatureCache:
    """One cache entry: which rows it holds and where, and adding shards of new rows.

    Opening it loads the union of its shards' records, checks every shard (size, and the
    checksum of those changed since written), removes damaged ones (their rows count as
    `repaired` and are extracted again) and converts a layout-2 entry.

    Args:
        cache_dir: the cache folder.
        key: `cache_key(...)`; must hold "dtype" (float16 or float32) and "views"
            (1, or K augmented views per image with "augment" and "augment_seed").
    """

    def __init__(self, cache_dir: str | os.PathLike, key: dict, shard_bytes: int = SHARD_BYTES):
        self.key = key
        self.dir = entry_dir(Path(cache_dir), key)
        self.views = int(key.get("views", 1))
        self.dtype = np.dtype(key.get("dtype", "float32"))
        self.shard_bytes = shard_bytes
        loaded = index_lib.load_index(self.dir, repair=True)
        self.repaired = loaded.dropped_rows
        self.feature_shape = tuple(loaded.meta.get("feature_shape", ()))
        self.shards: list[ShardInfo] = []
        self._position: dict[str, int] = {}
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # keys, shard, row
        self._lookup: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._add(loaded.shards, loaded.keys)

    def _add(self, shards: list[ShardInfo], keys: np.ndarray) -> None:
        new = [s for s in shards if s.name not in self._position]
        if len(new) < len(shards):  # a shard another writer stored under the same name
            keep = np.repeat([s.name not in self._position for s in shards],
                             [s.rows for s in shards])
            keys = keys[keep]
        for shard in new:
            self._position[shard.name] = len(self.shards)
            self.shards.append(shard)
        counts = [s.rows for s in new]
        self._parts.append((keys, np.repeat(np.arange(len(self.shards) - len(new),
                                                      len(self.shards), dtype=np.int32), counts),
                            np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
                            if new else np.zeros(0, np.int32)))
        self._lookup = None

    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys sorted (each once: the first shard that holds it), their shard and row."""
        if self._lookup is None:
            keys, shard, row = (np.concatenate(column) for column in zip(*self._parts))
            order = np.argsort(keys, kind="stable")
            keys, shard, row = keys[order], shard[order], row[order]
            first = np.ones(len(keys), bool)
            first[1:] = keys[1:] != keys[:-1]
            self._lookup = keys[first], shard[first], row[first]
            self._parts = [self._lookup]
        return self._lookup

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, position in the sorted table) of each key."""
        table = self._table()[0]
        position = np.searchsorted(table, keys)
        found = position < len(table)
        found[found] = table[position[found]] == keys[found]
        return found, position

    @property
    def rows(self) -> int:
        return len(self._table()[0])

    @property
    def shard_names(self) -> list[str]:
        return [s.name for s in self.shards]

    def missing_rows(self, digests: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows with no entry yet: (positions in `digests`, views, row keys), the first
        of each duplicated digest only, image by image and view by view."""
        if not len(digests):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, KEY_DTYPE)
        hashes = records.digest_bytes(digests)
        _, first = np.unique(np.ascontiguousarray(hashes).view("S32").reshape(-1),
                             return_index=True)
        first.sort()
        positions = np.repeat(first, self.views)
        views = np.tile(np.arange(self.views), len(first))
        keys = records.make_keys(hashes[positions], views)
        found, _ = self._find(keys)
        return positions[~found], views[~found], keys[~found]

    def missing(self, digests: Sequence[str]) -> list[tuple[str, int]]:
        """(digest, view) pairs with no row yet, digests deduplicated."""
        positions, views, _ = self.missing_rows(digests)
        return [(digests[p], int(v)) for p, v in zip(positions, views)]

    def locate(self, digests: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into `shards`, row in the shard), each [len(digests), views].

        Raises:
            KeyError: a row is not in the entry.
        """
        hashes = records.digest_bytes(digests)
        keys = records.make_keys(np.repeat(hashes, self.views, axis=0),
                                 np.tile(np.arange(self.views), len(digests)))
        found, position = self._find(keys)
        if not found.all():
            raise KeyError(f"{(~found).sum()} rows are not in the cache entry {self.dir}")
        _, shard, row = self._table()
        shape = (len(digests), self.views)
        return shard[position].reshape(shape), row[position].reshape(shape)

    def write_shard(self, rows: Sequence[str] | np.ndarray, features: np.ndarray,
                    bytes_left: int = 0) -> None:
        """Stores one shard of rows and its record (each written whole, then renamed).

        Args:
            rows: row keys (records.make_keys) or their strings (`row_key`).
            bytes_left: what the rest of the extraction will need (for a full disk's message).

        Raises:
            UserInputError: non-finite activations (never stored), or a full disk.
        """
        keys = rows if isinstance(rows, np.ndarray) else records.keys_of_strings(rows)
        features = np.ascontiguousarray(features, self.dtype)
        bad = ~np.isfinite(features.reshape(len(features), -1)).all(axis=1)
        if bad.any():
            raise UserInputError(
                f"The stem produced non-finite activations (inf or NaN) for {bad.sum()} of "
                f"{len(bad)} images{' in float16' if self.dtype == np.float16 else ''}; they "
                f"are not cached. " + ("Values above 65504 overflow float16: pass "
                                       "--cache-dtype float32." if self.dtype == np.float16
                                       else "Check the backbone's weights."))
        name = records.shard_name(keys)
        path = self.dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            records.publish(path, _npy_writer(features))
            stat = path.stat()
            shard = ShardInfo(name, len(keys), stat.st_size, stat.st_mtime_ns,
                              file_sha256(path), records.rows_sha256(keys), finite=True)
            records.write_record(self.dir, shard, keys, {
                "key": self.key, "feature_shape": list(features.shape[1:]),
                "dtype": self.dtype.name})
        except OSError as e:
            if is_disk_full(e):
                needed = features.nbytes + bytes_left
                raise disk_full(self.dir, "the feature cache", (
                    f"About {needed / 2**30:,.2f} GiB more are needed for the rows left to "
                    f"extract. Finished shards are kept and a rerun resumes from them; free "
                    f"some space or pass --cache-dir on another disk ('tlapp cache list' "
                    f"shows what the cache holds, 'tlapp cache clear' frees it).")) from None
            raise
        self.feature_shape = tuple(features.shape[1:])
        self._add([shard], keys)

    def drop_shards(self, names: list[str], reason: str) -> int:
        """Removes damaged shards (their rows are extracted again); returns the rows lost."""
        lost = 0
        for name in names:
            rows = self.shards[self._position[name]].rows if name in self._position else 0
            lost += rows
            log.warning("cache: shard %s of %s is damaged (%s); it was removed and its %d "
                        "rows will be extracted again", name, self.dir.name, reason, rows)
            (self.dir / name).unlink(missing_ok=True)
            records.record_path(self.dir, name).unlink(missing_ok=True)
        return lost

    def unchecked_shards(self) -> set[int]:
        """Indices (into `shards`) of the shards whose rows were never checked for
        non-finite values (written before records said so, or migrated from layout 2)."""
        return {i for i, shard in enumerate(self.shards) if not shard.finite}

    def mark_finite(self, indices: set[int]) -> None:
        """Records that the rows of these shards were all read and found finite."""
        chosen = sorted(indices)
        marked = index_lib.mark_finite(self.dir, [self.shards[i] for i in chosen], {
            "key": self.key, "feature_shape": list(self.feature_shape),
            "dtype": self.dtype.name})
        for i, shard in zip(chosen, marked):
            self.shards[i] = shard

    def touch(self) -> None:
        """Marks the entry used (the mtime of an empty file; nothing is rewritten)."""
        if self.dir.is_dir():
            index_lib.touch(self.dir)


def _npy_writer(features: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, features)
            f.flush()
            os.fsync(f.fileno())
    return write


shard_problem = index_lib.shard_problem
