"""tf.data readers: decoded image batches, and reproducible shuffled or ordered batches of
any per-example or per-batch loader (images, or rows of the feature cache)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from tlapp.data.decoding import decode_image


def image_dataset(paths: list, image_size: int, batch_size: int,
                  max_pixels: int | None = None) -> tf.data.Dataset:
    """Batches of decoded, resized pixels, read and decoded in parallel and prefetched.

    `max_pixels` is None by default: the files come from a scan that already applied it.
    """
    return (
        tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
        .map(lambda p: decode_image(tf.io.read_file(p), image_size, max_pixels),
             num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def image_loader(paths: list, labels: np.ndarray, image_size: int, num_classes: int,
                 transform: Callable | None = None) -> Callable:
    """A per-example loader for `shuffled_batches(parallel=True)` and `ordered_batches`:
    `load(index, epoch=None)` -> (pixels, one-hot label). `transform(image, index, epoch)`
    (e.g. augmentation) is applied while training, when an epoch is given."""
    paths = tf.constant([str(p) for p in paths])
    labels = tf.constant(labels)

    def load(i, epoch=None):
        image = decode_image(tf.io.read_file(paths[i]), image_size)
        if transform is not None and epoch is not None:
            image = transform(image, i, epoch)
        return image, tf.one_hot(labels[i], num_classes)

    return load


def shuffled_batches(n: int, batch_size: int, seed: int, first_epoch: int, epochs: int,
                     load: Callable, parallel: bool = False,
                     shard: Callable | None = None) -> tf.data.Dataset:
    """Batches for epochs [first_epoch, epochs): each epoch a permutation drawn from (seed, epoch).

    `load(index, epoch)` -> (x, label) for one example (parallel=True maps it on many
    threads, for decoding and augmentation); otherwise `load(indices, epoch)` is called on
    a whole batch of indices. `shard(order)` -> the part of an epoch's order this input
    pipeline reads (distributed training: it runs before anything is loaded).
    """
    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
        if shard is not None:
            order = shard(order)
        dataset = tf.data.Dataset.from_tensor_slices(order)
        if parallel:  # deterministic order keeps runs reproducible; work stays parallel
            return dataset.map(lambda i: load(i, e),
                               num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
        return dataset.batch(batch_size).map(lambda i: load(i, e))

    return (tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch)
            .prefetch(tf.data.AUTOTUNE))


def ordered_batches(load: Callable, n: int, batch_size: int,
                    parallel: bool = False) -> tf.data.Dataset:
    """Batches of examples 0..n-1 in order, never augmented (validation, test, statistics)."""
    dataset = tf.data.Dataset.range(n)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size) \
        if parallel else dataset.batch(batch_size).map(load)
    return dataset.prefetch(tf.data.AUTOTUNE)
