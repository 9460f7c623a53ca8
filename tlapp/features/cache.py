"""The feature cache on disk: entries keyed by what changes activations, shards of rows
keyed by image content, the manifest, and integrity checks.

An entry is a folder `BACKBONE-CUT-SIZEpx-DIGEST/` holding `.npy` shards (one row per image
and view) and `manifest.json` (key, feature shape, shards with their rows and checksums).
Extraction is in extract.py, streaming reads in loader.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from tlapp.data.decoding import DECODER_VERSION
from tlapp.files import disk_full, file_sha256, is_disk_full, locked, write_atomic, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
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


class FeatureCache:
    """One cache entry: which rows it holds and where, and adding shards of new rows.

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
        self.repaired = self._drop_damaged()
        self.index: dict[str, tuple[str, int]] = {}
        self.feature_shape: tuple = ()
        self._load_index()

    def _drop_damaged(self) -> int:
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
        for shard, problem in damaged:
            log.warning("cache: shard %s is damaged (%s); its %d rows will be extracted again",
                        shard["file"], problem, len(shard["rows"]))
        return sum(len(s["rows"]) for s, _ in damaged)

    def _load_index(self) -> None:
        manifest = read_manifest(self.dir) or {"shards": []}
        self.index = {row: (shard["file"], i) for shard in manifest["shards"]
                      for i, row in enumerate(shard["rows"])}
        self.feature_shape = tuple(manifest.get("feature_shape", ()))

    def missing(self, digests: list[str]) -> list[tuple[str, int]]:
        """(digest, view) pairs with no row yet, digests deduplicated."""
        return [(d, v) for d in dict.fromkeys(digests) for v in range(self.views)
                if row_key(d, v) not in self.index]

    def write_shard(self, rows: list[str], features: np.ndarray) -> None:
        """Stores one shard of rows (atomically) and lists it in the manifest."""
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
            if is_disk_full(e):
                raise disk_full(self.dir, "the feature cache", (
                    "Finished shards are kept and a rerun resumes from them; free some space "
                    "or pass --cache-dir on another disk ('tlapp cache list' shows what the "
                    "cache holds, 'tlapp cache clear' frees it).")) from None
            raise
        stat = (self.dir / name).stat()
        shard = {"file": name, "sha256": file_sha256(self.dir / name), "bytes": stat.st_size,
                 "mtime_ns": stat.st_mtime_ns, "rows": rows}
        with locked(self.dir):
            manifest = read_manifest(self.dir) or {
                "key": self.key, "feature_shape": list(features.shape[1:]),
                "dtype": self.dtype.name, "created": time.time(), "shards": []}
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
