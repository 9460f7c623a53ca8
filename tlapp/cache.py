"""Feature cache: the frozen stem's activations on disk, one row per distinct image.

Layout: CACHE_DIR/<entry>/manifest.json plus shard-NNNNNN.npy files. An entry is keyed by
everything that changes the activations (backbone, weights identity, cut, image size,
preprocessing, decoder); rows are keyed by the image's content hash, so renaming a file
costs nothing, adding images extracts only the new ones and an edited image is extracted
again. Shards and the manifest are written to a temporary file and renamed, and the
manifest is updated after each shard under a lock, so a killed extraction keeps every
finished shard and resumes from there.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import keras
import numpy as np

from tlapp import data as data_lib

FORMAT_VERSION = 1
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


@contextlib.contextmanager
def _locked(entry: Path):
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / "manifest.json").read_text())
    except FileNotFoundError:
        return None


class FeatureCache:
    """One cache entry: look up rows by content hash, extract the missing ones, read them back."""

    def __init__(self, cache_dir: str | os.PathLike, key: dict):
        self.key = key
        self.dir = entry_dir(Path(cache_dir), key)
        self._index: dict[str, tuple[str, int]] = {}
        self._load_index()

    def _load_index(self) -> None:
        manifest = read_manifest(self.dir) or {"shards": []}
        self._index = {row: (shard["file"], i) for shard in manifest["shards"]
                       for i, row in enumerate(shard["rows"])}

    def missing(self, digests: list[str]) -> list[str]:
        return [d for d in dict.fromkeys(digests) if d not in self._index]

    def extract(self, stem: keras.Model, files: dict[str, Path], image_size: int,
                batch_size: int = 32, verbose: bool = True) -> dict:
        """Runs `stem` on the images whose content hash has no row yet and stores the rows.

        Args:
            stem: pixels (0-255) -> activations.
            files: content hash -> a file with that content.

        Returns:
            {"extracted": rows computed now, "reused": rows already cached}.
        """
        todo = self.missing(list(files))
        reused = len(files) - len(todo)
        if verbose:
            print(f"cache: {reused}/{len(files)} images already extracted"
                  + (f"; extracting {len(todo)} with the {self.key['backbone']} stem"
                     if todo else "") + f" ({self.dir})")
        if not todo:
            self.touch()
            return {"extracted": 0, "reused": reused}
        feature_shape = tuple(stem.output.shape[1:])
        row_bytes = int(np.prod(feature_shape)) * 4
        shard_rows = max(batch_size, SHARD_BYTES // row_bytes // batch_size * batch_size)
        dataset = data_lib.image_dataset([files[d] for d in todo], image_size, batch_size)
        bar = keras.utils.Progbar(len(todo), unit_name="image",
                                  stateful_metrics=["images/s"]) if verbose else None
        start, done = time.perf_counter(), 0
        rows, features = [], []
        for batch in dataset:
            out = np.asarray(stem.predict_on_batch(batch), dtype=np.float32)
            features.append(out)
            rows += todo[done:done + len(out)]
            done += len(out)
            if len(rows) >= shard_rows or done == len(todo):
                self._write_shard(rows, np.concatenate(features), feature_shape)
                rows, features = [], []
            if bar:
                bar.update(done, [("images/s", done / (time.perf_counter() - start))])
        return {"extracted": len(todo), "reused": reused}

    def _write_shard(self, rows: list[str], features: np.ndarray, feature_shape: tuple) -> None:
        name = f"shard-{hashlib.sha256(''.join(rows).encode()).hexdigest()[:16]}.npy"
        self.dir.mkdir(parents=True, exist_ok=True)

        def save(path: Path) -> None:
            with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, features)

        write_atomic(self.dir / name, save)
        checksum = hashlib.sha256((self.dir / name).read_bytes()).hexdigest()
        with _locked(self.dir):
            manifest = read_manifest(self.dir) or {
                "key": self.key, "feature_shape": list(feature_shape), "dtype": "float32",
                "created": time.time(), "shards": []}
            manifest["shards"].append({"file": name, "sha256": checksum, "rows": rows})
            manifest["last_used"] = time.time()
            write_json(self.dir / "manifest.json", manifest)
        self._load_index()

    def touch(self) -> None:
        with _locked(self.dir):
            manifest = read_manifest(self.dir)
            if manifest:
                manifest["last_used"] = time.time()
                write_json(self.dir / "manifest.json", manifest)

    def read(self, digests: list[str]) -> np.ndarray:
        """The cached rows for `digests`, in that order (all must be present)."""
        manifest = read_manifest(self.dir)
        if not digests:
            return np.zeros([0] + (manifest["feature_shape"] if manifest else []), np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, digest in enumerate(digests):
            shard, row = self._index[digest]
            by_shard.setdefault(shard, []).append((position, row))
        out = None
        for shard, pairs in by_shard.items():
            array = np.load(self.dir / shard, mmap_mode="r", allow_pickle=False)
            if out is None:
                out = np.empty((len(digests),) + array.shape[1:], dtype=np.float32)
            positions, rows = zip(*pairs)
            out[list(positions)] = array[list(rows)]
        return out
