"""Feature cache: the frozen stem's activations on disk, one row per distinct image and view.

Layout: CACHE_DIR/<entry>/manifest.json plus shard-*.npy files. An entry is keyed by
everything that changes the activations (backbone, weights identity, cut, image size,
preprocessing, decoder, precision, storage dtype, augmentation views); rows are keyed by
the image's content hash (and view), so renaming a file costs nothing, adding images
extracts only the new ones and an edited image is extracted again. Shards and the manifest
are written to a temporary file and renamed, and the manifest is updated after each shard
under a lock, so a killed extraction keeps every finished shard and resumes from there, and
two processes extracting into one entry do not corrupt it. Each shard's sha256 is in the
manifest; a damaged shard is dropped on open and its rows are extracted again.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlapp import data as data_lib
from tlapp.config import UserInputError

FORMAT_VERSION = 2
SHARD_BYTES = 64 * 2**20


def weights_identity(model: keras.Model) -> str:
    """sha256 of the model's weights: the same activations come from the same digest."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def entry_key(**fields) -> dict:
    return {"format": FORMAT_VERSION, "decoder": data_lib.DECODER_VERSION, **fields}


def entry_dir(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['backbone']}-{key['cut']}-{key['image_size']}px-{digest}"


def write_atomic(path: Path, write) -> None:
    """Calls write(temp_path), then renames the temp file onto `path`."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json(path: Path, value) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(value, indent=1) + "\n"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(entry: Path):
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / "manifest.json").read_text())
    except FileNotFoundError:
        return None


def shard_problem(entry: Path, shard: dict, full: bool = True) -> str | None:
    """Why a shard cannot be trusted (missing, truncated, checksum), or None.

    full=False checks the checksum only when the file changed since it was written
    (size or mtime), which catches truncation and edits without reading every byte.
    """
    path = entry / shard["file"]
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if stat.st_size != shard["bytes"]:
        return f"truncated or extended ({stat.st_size} bytes, expected {shard['bytes']})"
    if (full or stat.st_mtime_ns != shard.get("mtime_ns")) and file_sha256(path) != shard["sha256"]:
        return "checksum mismatch"
    return None


class ShardReader:
    """Reads single rows of .npy shards with pread: only the rows asked for are in memory."""

    def __init__(self, entry: Path, dtype: np.dtype):
        self.entry = entry
        self.dtype = np.dtype(dtype)
        self._open: dict[str, tuple[int, int, int]] = {}  # file -> (fd, data offset, row bytes)
        self.bytes_read = 0

    def _shard(self, name: str) -> tuple[int, int, int]:
        if name not in self._open:
            with open(self.entry / name, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(f)
                offset = f.tell()
            row = int(np.prod(shape[1:])) * self.dtype.itemsize
            self._open[name] = (os.open(self.entry / name, os.O_RDONLY), offset, row)
        return self._open[name]

    def rows(self, locations: list[tuple[str, int]], shape: tuple) -> np.ndarray:
        out = np.empty((len(locations),) + tuple(shape), self.dtype)
        for i, (name, row) in enumerate(locations):
            fd, offset, size = self._shard(name)
            out[i] = np.frombuffer(os.pread(fd, size, offset + row * size),
                                   self.dtype).reshape(shape)
            self.bytes_read += size
        return out

    def close(self) -> None:
        for fd, _, _ in self._open.values():
            os.close(fd)
        self._open.clear()


class FeatureCache:
    """One cache entry: look up rows, extract the missing ones, stream them back.

    Args:
        cache_dir: the cache folder.
        key: `entry_key(...)`; must hold "dtype" (float16 or float32) and "views"
            (1, or K augmented views per image with "augment" and "augment_seed").
    """

    def __init__(self, cache_dir: str | os.PathLike, key: dict, shard_bytes: int = SHARD_BYTES,
                 verbose: bool = True):
        self.key = key
        self.dir = entry_dir(Path(cache_dir), key)
        self.views = int(key.get("views", 1))
        self.dtype = np.dtype(key.get("dtype", "float32"))
        self.shard_bytes = shard_bytes
        self.repaired = self._drop_damaged(verbose)
        self._index: dict[str, tuple[str, int]] = {}
        self._load_index()

    def _drop_damaged(self, verbose: bool) -> int:
        """Removes shards that fail their checks from the manifest; returns rows dropped."""
        manifest = read_manifest(self.dir)
        if not manifest:
            return 0
        damaged = [(s, p) for s in manifest["shards"] if (p := shard_problem(self.dir, s, False))]
        if not damaged:
            return 0
        with locked(self.dir):
            manifest = read_manifest(self.dir)
            bad = {s["file"] for s, _ in damaged}
            manifest["shards"] = [s for s in manifest["shards"] if s["file"] not in bad]
            write_json(self.dir / "manifest.json", manifest)
            for name in bad:
                (self.dir / name).unlink(missing_ok=True)
        rows = sum(len(s["rows"]) for s, _ in damaged)
        if verbose:
            for shard, problem in damaged:
                print(f"cache: shard {shard['file']} is damaged ({problem}); "
                      f"its {len(shard['rows'])} rows will be extracted again")
        return rows

    def _load_index(self) -> None:
        manifest = read_manifest(self.dir) or {"shards": []}
        self._index = {row: (shard["file"], i) for shard in manifest["shards"]
                       for i, row in enumerate(shard["rows"])}
        self.feature_shape = tuple(manifest.get("feature_shape", ()))

    @staticmethod
    def row_key(digest: str, view: int) -> str:
        return digest if view == 0 else f"{digest}#{view}"

    def missing(self, digests: list[str]) -> list[tuple[str, int]]:
        """(digest, view) pairs with no row yet, digests deduplicated."""
        return [(d, v) for d in dict.fromkeys(digests) for v in range(self.views)
                if self.row_key(d, v) not in self._index]

    def extract(self, stem: keras.Model, files: dict[str, Path], image_size: int,
                batch_size: int = 32, verbose: bool = True, pca=None) -> dict:
        """Runs `stem` on every (image, view) without a row and stores the rows.

        Args:
            stem: pixels (0-255) -> activations.
            files: content hash -> a file with that content.
            pca: colour PCA for an augmentation spec with `pca`.

        Returns:
            {"extracted": rows computed now, "reused": rows already cached,
             "repaired": rows dropped from damaged shards (and extracted again)}.
        """
        todo = self.missing(list(files))
        total = len(files) * self.views
        reused = total - len(todo)
        stats = {"extracted": len(todo), "reused": reused, "repaired": self.repaired}
        if verbose:
            views = f" x {self.views} views" if self.views > 1 else ""
            print(f"cache: {reused}/{total} images{views} already extracted"
                  + (f"; extracting {len(todo)} with the {self.key['backbone']} stem"
                     if todo else "") + f" ({self.dir})")
        if not todo:
            self.touch()
            return stats
        feature_shape = tuple(stem.output.shape[1:])
        row_bytes = int(np.prod(feature_shape)) * self.dtype.itemsize
        shard_rows = max(batch_size, self.shard_bytes // row_bytes // batch_size * batch_size)
        dataset = self._views_dataset(todo, files, image_size, batch_size, pca)
        bar = keras.utils.Progbar(len(todo), unit_name="image",
                                  stateful_metrics=["images/s"]) if verbose else None
        start, done, features = time.perf_counter(), 0, []
        for batch in dataset:
            features.append(np.asarray(stem.predict_on_batch(batch), dtype=self.dtype))
            done += len(features[-1])
            pending = sum(len(f) for f in features)
            if pending >= shard_rows or done == len(todo):
                rows = [self.row_key(d, v) for d, v in todo[done - pending:done]]
                self._write_shard(rows, np.concatenate(features), feature_shape)
                features = []
            if bar:
                bar.update(done, [("images/s", done / (time.perf_counter() - start))])
        return stats

    def _views_dataset(self, todo, files, image_size, batch_size, pca) -> tf.data.Dataset:
        """Decoded pixels for each (digest, view); view v > 0 is augmented with a seed made
        from the image content and v, so a row is the same whichever run extracts it."""
        paths = tf.constant([str(files[d]) for d, _ in todo])
        views = tf.constant([v for _, v in todo], tf.int64)
        indices = tf.constant([int(d[:15], 16) for d, _ in todo], tf.int64)
        spec, seed = self.key.get("augment"), int(self.key.get("augment_seed", 0))

        def load(i):
            image = data_lib.decode_image(tf.io.read_file(paths[i]), image_size)
            if self.views > 1:
                from tlapp import augment as augment_lib

                augmented = augment_lib.augment_image(
                    image, spec, augment_lib.image_seed(seed, indices[i], views[i]), pca)
                image = tf.where(views[i] > 0, augmented, image)
            return image

        return (tf.data.Dataset.range(len(todo))
                .map(load, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size).prefetch(tf.data.AUTOTUNE))

    def _write_shard(self, rows: list[str], features: np.ndarray, feature_shape: tuple) -> None:
        name = f"shard-{hashlib.sha256(''.join(rows).encode()).hexdigest()[:16]}.npy"
        self.dir.mkdir(parents=True, exist_ok=True)

        def save(path: Path) -> None:
            with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, features)
                f.flush()
                os.fsync(f.fileno())

        try:
            write_atomic(self.dir / name, save)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserInputError(
                    f"The disk holding the feature cache is full ({self.dir}). Finished shards "
                    f"are kept and a rerun resumes from them; free some space or pass "
                    f"--cache-dir on another disk ('tlapp cache list' shows what the cache "
                    f"holds, 'tlapp cache clear' frees it).") from None
            raise
        stat = (self.dir / name).stat()
        shard = {"file": name, "sha256": file_sha256(self.dir / name), "bytes": stat.st_size,
                 "mtime_ns": stat.st_mtime_ns, "rows": rows}
        with locked(self.dir):
            manifest = read_manifest(self.dir) or {
                "key": self.key, "feature_shape": list(feature_shape), "dtype": self.dtype.name,
                "created": time.time(), "shards": []}
            manifest["shards"].append(shard)
            manifest["last_used"] = time.time()
            write_json(self.dir / "manifest.json", manifest)
        self._load_index()

    def touch(self) -> None:
        with locked(self.dir):
            manifest = read_manifest(self.dir)
            if manifest:
                manifest["last_used"] = time.time()
                write_json(self.dir / "manifest.json", manifest)

    def loader(self, digests: list[str], labels: np.ndarray, num_classes: int):
        """A batch loader for `training.shuffled_batches`/`evaluation_batches` that streams
        rows from the shards: `load(indices, epoch)` reads only those rows, of view
        (offset(index) + epoch) mod views while training and view 0 without an epoch."""
        locations = np.array([[self._index[self.row_key(d, v)] for v in range(self.views)]
                              for d in digests], dtype=object)
        reader = ShardReader(self.dir, self.dtype)
        shape, dtype, views = self.feature_shape, self.dtype, self.views
        labels = tf.constant(labels)

        def gather(idx, view):
            return reader.rows([tuple(locations[i, v]) for i, v in zip(idx, view)], shape)

        def load(idx, epoch=None):
            view = tf.zeros_like(idx) if epoch is None or views == 1 else \
                (idx * 2654435761 % 4294967296 + tf.cast(epoch, tf.int64)) % views
            rows = tf.numpy_function(gather, [idx, view], tf.as_dtype(dtype), stateful=False)
            rows = tf.cast(tf.ensure_shape(rows, (None,) + shape), tf.float32)
            return rows, tf.one_hot(tf.gather(labels, idx), num_classes)

        load.reader = reader
        return load


def list_entries(cache_dir: Path) -> list[dict]:
    """One dict per entry: name, key fields, rows, bytes, last used."""
    entries = []
    for manifest_file in sorted(Path(cache_dir).glob("*/manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        entries.append({"entry": manifest_file.parent.name, "key": manifest["key"],
                        "rows": sum(len(s["rows"]) for s in manifest["shards"]),
                        "bytes": sum(s["bytes"] for s in manifest["shards"]),
                        "last_used": manifest.get("last_used", manifest.get("created", 0))})
    return entries


def verify_entry(entry: Path) -> list[tuple[str, str]]:
    """(shard file, problem) for every damaged shard of an entry (full checksums)."""
    manifest = read_manifest(entry) or {"shards": []}
    return [(s["file"], p) for s in manifest["shards"] if (p := shard_problem(entry, s))]


def clear_entries(cache_dir: Path, names: list[str] | None = None,
                  older_than_days: float | None = None) -> list[str]:
    """Deletes the named entries, or those unused for `older_than_days`, or all (neither)."""
    removed = []
    for entry in list_entries(cache_dir):
        age_days = (time.time() - entry["last_used"]) / 86400
        if (names is None or entry["entry"] in names) and \
                (older_than_days is None or age_days > older_than_days):
            shutil.rmtree(Path(cache_dir) / entry["entry"])
            removed.append(entry["entry"])
    return removed
