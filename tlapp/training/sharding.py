"""Input pipelines and predictions under a tf.distribute strategy (see distribute.py).

With more than one replica, each input pipeline (one per worker) cuts every global batch
of an epoch's shuffled order into its own part before it loads anything, so each worker
decodes (or reads from the feature cache) only its images, and the replicas of a step
together see exactly the global batch one device would (the notes on `training_batches`).
With one replica, everything here is what it was without a strategy; under a
MirroredStrategy of one replica the datasets are distributed here (`one_replica`), so that
starting an epoch or a validation costs what it costs without a strategy.
"""
from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tlapp.data import datasets
from tlapp.errors import UserInputError


def steps_per_epoch(strategy: tf.distribute.Strategy, n: int, batch_size: int) -> int:
    """Training steps of one epoch of n examples: the last one partial on one replica; only
    whole global batches on several (each replica must get its full share)."""
    if strategy.num_replicas_in_sync == 1:
        return math.ceil(n / batch_size)
    if n < batch_size:
        raise UserInputError(
            f"With {strategy.num_replicas_in_sync} replicas each training step needs a whole "
            f"global batch, and there are fewer training images than --batch-size. Lower "
            f"--batch-size. Received: batch_size={batch_size} with {n} training images")
    return n // batch_size


def training_batches(strategy: tf.distribute.Strategy, n: int, batch_size: int, seed: int,
                     first_epoch: int, epochs: int, load: Callable, parallel: bool,
                     class_weight: dict | None, epoch: tf.Variable | None = None) -> tuple:
    """`datasets.shuffled_batches` for `strategy`, and the class_weight to give `fit`.

    On one replica it is that dataset itself. On several, a distributed dataset whose
    pipelines shard the order before loading (`shard_order`), and whose class weights are
    sample weights (Keras cannot map a distributed dataset to add them).

    With `epoch` (no strategy only: `is_default`), the dataset holds one epoch, the one
    `epoch` holds when Keras iterates it (set it at each epoch's start), so that Keras can
    run several steps per call of its train function (steps_per_execution) and never run
    one across the end of an epoch.
    """
    replicas = strategy.num_replicas_in_sync
    if epoch is not None:
        if not is_default(strategy):
            raise ValueError("one epoch per iteration is for training without a strategy")
        options = tf.data.Options()
        options.experimental_warm_start = False  # `epoch` is read by the first batch, after
        # the callback set it (Keras makes the next epoch's iterator before that)
        dataset = datasets.shuffled_batches(n, batch_size, seed, epoch, None, load, parallel)
        return dataset.apply(tf.data.experimental.assert_cardinality(steps_per_epoch(
            strategy, n, batch_size))).with_options(options), class_weight
    if replicas == 1:
        dataset = datasets.shuffled_batches(n, batch_size, seed, first_epoch, epochs, load,
                                            parallel)
        if not is_one_replica_mirrored(strategy):
            return dataset, class_weight
        return one_replica(strategy, add_class_weights(dataset, class_weight)), None
    steps = steps_per_epoch(strategy, n, batch_size)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        dataset = datasets.shuffled_batches(
            n, batch_size // replicas, seed, first_epoch, epochs, load, parallel,
            shard=lambda order: shard_order(order, steps, batch_size,
                                            context.num_input_pipelines,
                                            context.input_pipeline_id))
        return add_class_weights(dataset, class_weight)

    return strategy.distribute_datasets_from_function(dataset_fn), None


def add_class_weights(dataset: tf.data.Dataset, class_weight: dict | None) -> tf.data.Dataset:
    """(x, y) batches -> (x, y, sample weights) with each example's class weight (Keras
    cannot map a distributed dataset to add them itself)."""
    if class_weight is None:
        return dataset
    weights = tf.constant([class_weight.get(i, 1.0) for i in range(max(class_weight) + 1)],
                          tf.float32)
    return dataset.map(lambda x, y: (x, y, tf.gather(weights, tf.argmax(y, axis=-1))))


def is_default(strategy: tf.distribute.Strategy) -> bool:
    """No tf.distribute strategy (the "one" layout): Keras iterates datasets as they are."""
    return strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy()


def is_one_replica_mirrored(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MirroredStrategy) and \
        strategy.num_replicas_in_sync == 1


# One input pipeline per replica, on the host: with one replica this is what Keras does
# without a strategy (iterate the dataset itself), while Keras's own distribution
# (`experimental_distribute_dataset`) builds a MultiDeviceIterator, which traces several
# functions each time an iterator is made: 30-300 ms here, and Keras 3.15 makes 2-3 per
# validation, every epoch (docs/benchmarks.md, "tf.distribute on one device").
ONE_REPLICA_INPUT = tf.distribute.InputOptions(
    experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA,
    experimental_fetch_to_device=False)


def one_replica(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    """`dataset`, distributed for a MirroredStrategy of one replica so that making an
    iterator of it costs what it costs without a strategy (ONE_REPLICA_INPUT)."""
    return strategy.distribute_datasets_from_function(lambda context: dataset,
                                                      options=ONE_REPLICA_INPUT)


def validation_batches(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset | None):
    """The validation data to give `fit`: `dataset`, distributed once here under a
    MirroredStrategy of one replica (`one_replica`); with several replicas Keras splits
    each batch across them itself."""
    if dataset is None or not is_one_replica_mirrored(strategy):
        return dataset
    return one_replica(strategy, dataset)


def shard_order(order: tf.Tensor, steps: int, batch_size: int, pipelines: int,
                pipeline: int) -> tf.Tensor:
    """The indices input pipeline `pipeline` of `pipelines` reads from an epoch's order: of
    each of the `steps` global batches (order[g * batch_size:(g + 1) * batch_size]) its
    contiguous part, which its replicas then take one per-replica batch each, in order."""
    parts = tf.reshape(order[:steps * batch_size], [steps, pipelines, -1])
    return tf.reshape(parts[:, pipeline], [-1])


def predict_batch(model: keras.Model, x) -> np.ndarray:
    """`model.predict_on_batch(x)` with one row per row of x: under a strategy with several
    replicas predict_on_batch returns one copy of the batch per replica."""
    if model.distribute_strategy.num_replicas_in_sync == 1:
        return model.predict_on_batch(x)
    return keras.ops.convert_to_numpy(model(x, training=False))
