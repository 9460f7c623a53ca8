"""Extraction: run the frozen stem once per missing (image, view) and store the rows."""
from __future__ import annotations

import logging
import os
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf

from tlapp.augment import ops as augment_ops
from tlapp.data.decoding import decode_image
from tlapp.data.scan import ScannedData
from tlapp.features.cache import FeatureCache
from tlapp.progress import Progress

log = logging.getLogger(__name__)


def extract_features(cache: FeatureCache, stem: keras.Model,
                     files: Mapping[str, str | os.PathLike] | ScannedData, image_size: int,
                     batch_size: int = 32, pca=None) -> dict:
    """Runs `stem` on every (image, view) of `files` that has no row in `cache` yet and
    stores the rows, a shard at a time (a killed extraction keeps its finished shards).

    Args:
        stem: pixels (0-255) -> activations.
        files: content hash -> a file with that content, or a scanned folder (its samples:
            no dict of every file is built).
        pca: colour PCA for an augmentation spec with `pca`.

    Returns:
        {"extracted": rows computed now, "reused": rows already cached,
         "repaired": rows dropped from damaged shards (and extracted again)}.
    """
    if isinstance(files, ScannedData):
        root, samples = str(files.root), files.samples
        digests = [s.sha256 for s in samples]

        def path(p: int) -> str:
            return os.path.join(root, samples[p].path)
    else:
        digests = list(files)

        def path(p: int) -> str:
            return os.fspath(files[digests[p]])
    positions, views, keys = cache.missing_rows(digests)
    total = len(digests) * cache.views
    reused = total - len(positions)
    stats = {"extracted": len(positions), "reused": reused, "repaired": cache.repaired}
    shown = f" x {cache.views} views" if cache.views > 1 else ""
    log.info("cache: %s/%s images%s already extracted%s (%s)", f"{reused:,}", f"{total:,}",
             shown, f"; extracting {len(positions):,} with the {cache.key['backbone']} stem"
             if len(positions) else "", cache.dir)
    if len(positions):
        _extract(cache, stem, [path(p) for p in positions], keys,
                 views, image_size, batch_size, pca)
    cache.touch()
    return stats


def _extract(cache: FeatureCache, stem: keras.Model, paths: list[str], keys: np.ndarray,
             views: np.ndarray, image_size: int, batch_size: int, pca) -> None:
    feature_shape = tuple(stem.output.shape[1:])
    row_bytes = int(np.prod(feature_shape)) * cache.dtype.itemsize
    shard_rows = max(batch_size, cache.shard_bytes // row_bytes // batch_size * batch_size)
    progress = Progress(len(keys), "image", "cache")
    done, features = 0, []
    for batch in views_dataset(cache, paths, keys, views, image_size, batch_size, pca):
        features.append(np.asarray(stem.predict_on_batch(batch), dtype=cache.dtype))
        done += len(features[-1])
        pending = sum(len(f) for f in features)
        if pending >= shard_rows or done == len(keys):
            cache.write_shard(keys[done - pending:done], np.concatenate(features),
                              bytes_left=(len(keys) - done) * row_bytes)
            features = []
        progress.update(done)


def views_dataset(cache: FeatureCache, paths: list[str], keys: np.ndarray, views: np.ndarray,
                  image_size: int, batch_size: int, pca) -> tf.data.Dataset:
    """Decoded pixels for each row; view v > 0 is augmented with a seed made from the image
    content and v, so a row is the same whichever run extracts it."""
    spec, seed = cache.key.get("augment"), int(cache.key.get("augment_seed", 0))
    # The first 15 hex digits of the content hash, as an integer: the augmentation's seed.
    head = np.ascontiguousarray(np.ascontiguousarray(keys).view(np.uint8).reshape(-1, 34)[:, :8])
    indices = (head.view(">u8").reshape(-1) >> 4).astype(np.int64)
    table = tf.constant(paths)
    view_table = tf.constant(views, tf.int64)
    index_table = tf.constant(indices, tf.int64)

    def load(i):
        image = decode_image(tf.io.read_file(table[i]), image_size)
        if cache.views > 1:
            augmented = augment_ops.augment_image(
                image, spec, augment_ops.image_seed(seed, index_table[i], view_table[i]), pca)
            image = tf.where(view_table[i] > 0, augmented, image)
        return image

    return (tf.data.Dataset.range(len(paths))
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))
