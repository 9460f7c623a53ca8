"""tf.data readers: decoded image batches, and reproducible shuffled or ordered batches of
any per-example or per-batch loader (images, or rows of the feature cache)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from tlapp.data.decoding import decode_image

# read calls of a per-batch loader (rows of the feature cache) run at once: a call's copies
# of random rows wait on memory and release the GIL, so a second call overlaps them
CALLS_IN_FLIGHT = 2


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
    `load(index, epoch=None)` -> (pixels, target: one-hot, or multi-hot for labels [N, C]). `transform(image, index, epoch)`
    (e.g. augmentation) is applied while training, when an epoch is given."""
    paths = tf.constant([str(p) for p in paths])
    labels = tf.constant(labels)

    def load(i, epoch=None):
        image = decode_image(tf.io.read_file(paths[i]), image_size)
        if transform is not None and epoch is not None:
            image = transform(image, i, epoch)
        return image, targets(labels, i, num_classes)

    return load


def targets(labels: tf.Tensor, index, num_classes: int) -> tf.Tensor:
    """The training targets of examples `index`: one-hot of class indices, or the rows of
    multi-hot labels ([N, classes], multi-label) as they are."""
    if len(labels.shape) == 2:
        return tf.gather(labels, index)
    return tf.one_hot(tf.gather(labels, index), num_classes)


def shuffled_batches(n: int, batch_size: int, seed: int, first_epoch, epochs: int | None,
                     load: Callable, parallel: bool = False,
                     shard: Callable | None = None) -> tf.data.Dataset:
    """Batches for epochs [first_epoch, epochs): each epoch a permutation drawn from (seed, epoch).

    With `epochs` None, the batches of one epoch: the one `first_epoch` (a tf.Variable)
    holds each time the dataset is iterated.

    `load(index, epoch)` -> (x, label) for one example (parallel=True maps it on many
    threads, for decoding and augmentation); otherwise `load(indices, epoch)` is called on
    the indices of `batches_per_call(load, batch_size)` batches at once. `shard(order)` ->
    the part of an epoch's order this input pipeline reads (distributed training: it runs
    before anything is loaded).
    """
    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
        if shard is not None:
            order = shard(order)
        if parallel:  # deterministic order keeps runs reproducible; work stays parallel
            return tf.data.Dataset.from_tensor_slices(order).map(
                lambda i: load(i, e), num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
        return _batched_calls(tf.size(order, tf.int64), lambda a, b: order[a:b], batch_size,
                              lambda i: load(i, e), load)

    epochs = tf.data.Dataset.range(first_epoch, epochs) if epochs is not None else \
        tf.data.Dataset.range(1).map(lambda _: tf.cast(first_epoch, tf.int64))
    dataset = epochs.flat_map(epoch).prefetch(tf.data.AUTOTUNE)
    return dataset if parallel else _untuned(dataset)


def ordered_batches(load: Callable, n: int, batch_size: int,
                    parallel: bool = False) -> tf.data.Dataset:
    """Batches of examples 0..n-1 in order, never augmented (validation, test, statistics)."""
    dataset = tf.data.Dataset.range(n).map(load, num_parallel_calls=tf.data.AUTOTUNE) \
        .batch(batch_size) if parallel else \
        _batched_calls(n, lambda a, b: tf.range(a, tf.minimum(b, n)), batch_size, load, load)
    # rebatch() loses the count; Keras then reads until the end and warns "Your input ran
    # out of data" at every evaluation.
    batches = -(-n // batch_size)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches)) \
        .prefetch(tf.data.AUTOTUNE)
    return dataset if parallel else _untuned(dataset)


def batches_per_call(load: Callable, batch_size: int) -> int:
    """How many batches a per-batch loader reads in one call: its `read_rows` (rows it reads
    best at once, e.g. a few MB of cached features) over the batch size, else 1."""
    return max(1, int(getattr(load, "read_rows", 0)) // batch_size)


def _batched_calls(n, indices: Callable, batch_size: int, call: Callable,
                   load: Callable) -> tf.data.Dataset:
    """`call` on several batches of the `n` examples `indices(start, stop)` at once, split
    back into the same batches (the same examples in the same order as one call per batch:
    only the calls are fewer). One tf.data element per call, not one per example: those
    cost more than the reads themselves. CALLS_IN_FLIGHT calls run at once, their results
    taken in order."""
    calls = batches_per_call(load, batch_size)
    size = batch_size * calls
    dataset = tf.data.Dataset.range(0, n, size).map(
        lambda start: call(indices(start, start + size)),
        num_parallel_calls=CALLS_IN_FLIGHT, deterministic=True)
    return dataset if calls == 1 else dataset.rebatch(batch_size)


def _untuned(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's autotuning model. A per-batch loader's pipeline has
    nothing it tunes (a fixed number of calls in flight), and with it the reads of cached
    rows were at times paced at one call per 10 ms: in a third of runs, 194,000 rows/s
    against 290,000 (docs/benchmarks.md)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
