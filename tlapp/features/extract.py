"""Extraction: run the frozen stem once per missing (image, view) and store the rows."""
from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlapp.augment import ops as augment_ops
from tlapp.data.decoding import decode_image
from tlapp.features.cache import FeatureCache, row_key
from tlapp.progress import Progress

log = logging.getLogger(__name__)


def extract_features(cache: FeatureCache, stem: keras.Model, files: dict[str, Path],
                     image_size: int, batch_size: int = 32, pca=None) -> dict:
    """Runs `stem` on every (image, view) of `files` that has no row in `cache` yet and
    stores the rows, a shard at a time (a killed extraction keeps its finished shards).

    Args:
        stem: pixels (0-255) -> activations.
        files: content hash -> a file with that content.
        pca: colour PCA for an augmentation spec with `pca`.

    Returns:
        {"extracted": rows computed now, "reused": rows already cached,
         "repaired": rows dropped from damaged shards (and extracted again)}.
    """
    todo = cache.missing(list(files))
    total = len(files) * cache.views
    reused = total - len(todo)
    stats = {"extracted": len(todo), "reused": reused, "repaired": cache.repaired}
    views = f" x {cache.views} views" if cache.views > 1 else ""
    log.info("cache: %d/%d images%s already extracted%s (%s)", reused, total, views,
             f"; extracting {len(todo)} with the {cache.key['backbone']} stem" if todo else "",
             cache.dir)
    if not todo:
        cache.touch()
        return stats
    feature_shape = tuple(stem.output.shape[1:])
    row_bytes = int(np.prod(feature_shape)) * cache.dtype.itemsize
    shard_rows = max(batch_size, cache.shard_bytes // row_bytes // batch_size * batch_size)
    progress = Progress(len(todo), "image", "cache")
    done, features = 0, []
    for batch in views_dataset(cache, todo, files, image_size, batch_size, pca):
        features.append(np.asarray(stem.predict_on_batch(batch), dtype=cache.dtype))
        done += len(features[-1])
        pending = sum(len(f) for f in features)
        if pending >= shard_rows or done == len(todo):
            rows = [row_key(d, v) for d, v in todo[done - pending:done]]
            cache.write_shard(rows, np.concatenate(features))
            features = []
        progress.update(done)
    return stats


def views_dataset(cache: FeatureCache, todo: list[tuple[str, int]], files: dict[str, Path],
                  image_size: int, batch_size: int, pca) -> tf.data.Dataset:
    """Decoded pixels for each (digest, view); view v > 0 is augmented with a seed made
    from the image content and v, so a row is the same whichever run extracts it."""
    paths = tf.constant([str(files[d]) for d, _ in todo])
    views = tf.constant([v for _, v in todo], tf.int64)
    indices = tf.constant([int(d[:15], 16) for d, _ in todo], tf.int64)
    spec, seed = cache.key.get("augment"), int(cache.key.get("augment_seed", 0))

    def load(i):
        image = decode_image(tf.io.read_file(paths[i]), image_size)
        if cache.views > 1:
            augmented = augment_ops.augment_image(
                image, spec, augment_ops.image_seed(seed, indices[i], views[i]), pca)
            image = tf.where(views[i] > 0, augmented, image)
        return image

    return (tf.data.Dataset.range(len(todo))
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))
