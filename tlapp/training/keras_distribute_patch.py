"""Workaround for keras-team/keras#20585: `Model.fit` under tf.distribute strategies.

With Keras 3.15 on TensorFlow 2.21, `fit` under `tf.distribute.MultiWorkerMirroredStrategy`
fails twice over in keras/src/backend/tensorflow/trainer.py (the issue is open; the
TensorFlow twin, tensorflow/tensorflow#72388, was closed with a pointer to Keras):

1. `TensorFlowTrainer._maybe_symbolic_build` peeks at one batch and calls
   `strategy.reduce("MEAN", batch, axis=None)` on the whole (x, y) structure, which the
   collective strategy cannot reduce: `ValueError: Attempt to convert a value
   (PerReplica:{...}) ... to a Tensor`. Under MirroredStrategy the same reduce fails when
   the batch does not split evenly across replicas (validation on 3 images with 2
   replicas): `Inputs to operation AddN of type AddN must have the same size and shape`
   (reported in keras-team/keras#19246). Only shapes and dtypes are needed to build, so
   the replacement takes the first local replica's value and communicates nothing.
2. `reduce_per_replica(..., "mean")` calls `strategy.reduce("MEAN", v, axis=0)` on scalar
   losses and metrics in multi-worker mode: `Invalid reduction dimension 0 for input with
   0 dimensions`. The replacement reduces over replicas with axis=None, as the
   single-worker path does; other strategies keep Keras's code.

The replacement `_maybe_symbolic_build` also returns at once when the model, its compiled
loss and metrics and its optimizer are all built: Keras's `_symbolic_build` then builds
nothing, yet Keras made an iterator and read a batch for it, at the start of every `fit`
and of every validation (every epoch) under any strategy. An iterator of a distributed
dataset costs 30-300 ms to make (docs/benchmarks.md, "tf.distribute on one device").

`apply()` first runs `check()`, which compares the source of the original functions (and of
`Trainer._symbolic_build`, whose tests `built` repeats) with
the Keras 3.15.1 source this was written against and raises if Keras changed them: after a
Keras upgrade, rerun tests/test_distribute.py without the patch (the issues may be fixed)
and update or delete this module, rather than patch code it was not written for.
"""
from __future__ import annotations

import hashlib
import inspect

import keras
from keras.src import tree
from keras.src.backend.tensorflow import trainer as keras_trainer
from keras.src.trainers import trainer as keras_base_trainer

KERAS_VERSION = "3.15.1"  # the version whose source the hashes below are of
# sha256 of inspect.getsource() of the original functions
EXPECTED_SOURCE = {
    "TensorFlowTrainer._maybe_symbolic_build":
        "92a504f5eba9b29f81f1bf26180bdd5bf5186b06b7bda426534b90d2d02bc1c2",
    "reduce_per_replica":
        "2e7d54b1e6edc29a8c6a7e6b66cd4c8be3ba7842412c93753ac3afe169fa7fb8",
    # not replaced, but `built` below repeats its tests of what is left to build
    "Trainer._symbolic_build":
        "96220cc3b88fe768bdafe5f6aabcf874b92940abae365f8f24e5df2a5e6ae49f",
}
ORIGINALS = {
    "TensorFlowTrainer._maybe_symbolic_build":
        keras_trainer.TensorFlowTrainer._maybe_symbolic_build,
    "reduce_per_replica": keras_trainer.reduce_per_replica,
    "Trainer._symbolic_build": keras_base_trainer.Trainer._symbolic_build,
}


def source_hash(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def check() -> None:
    """Raises RuntimeError if the Keras functions this module replaces have changed."""
    changed = [name for name, function in ORIGINALS.items()
               if source_hash(function) != EXPECTED_SOURCE[name]]
    if changed:
        raise RuntimeError(
            f"tlapp's workaround for keras-team/keras#20585 (training on several devices) "
            f"was written for Keras {KERAS_VERSION}, and Keras {keras.__version__} changed "
            f"{', '.join(changed)} in Keras's trainer.py ({keras_trainer.__file__} and "
            f"trainers/trainer.py). Install keras=={KERAS_VERSION} to train with a strategy "
            f"(--strategy mirrored or multi-worker), or use a tlapp release that supports "
            f"this Keras.")


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    import tensorflow as tf

    if self._distribute_strategy is None or built(self):
        return
    if iterator is not None:
        for _, _, batches in iterator:
            batch = next(batches)
            # the first local replica's value, instead of a cross-worker strategy.reduce()
            data_batch = tree.map_structure(
                lambda v: self.distribute_strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def built(model) -> bool:
    """Whether `Trainer._symbolic_build` would build nothing: its own tests, plus the
    optimizer (which it builds without a batch, but then it is not worth skipping)."""
    return all(layer.built for layer in model._flatten_layers()) and all(
        part is None or part.built
        for part in (model._compile_metrics, model._compile_loss, model.optimizer))


def reduce_per_replica(values, strategy, reduction):
    """Keras's function, except "auto"/"mean" in multi-worker mode (scalars: axis=None)."""
    if keras_trainer._collective_all_reduce_multi_worker(strategy) and \
            reduction in ("auto", "mean"):
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return ORIGINALS["reduce_per_replica"](values, strategy, reduction)


def apply() -> None:
    """Installs the workaround (idempotent); call it before `fit`. Without a strategy
    nothing changes: Keras skips the symbolic build, and the reduce is Keras's own."""
    check()
    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    # make_train_function & co. look the name up in the module's globals at call time
    keras_trainer.reduce_per_replica = reduce_per_replica


def remove() -> None:
    """Restores Keras's own functions."""
    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = \
        ORIGINALS["TensorFlowTrainer._maybe_symbolic_build"]
    keras_trainer.reduce_per_replica = ORIGINALS["reduce_per_replica"]


def applied() -> bool:
    return keras_trainer.reduce_per_replica is reduce_per_replica
