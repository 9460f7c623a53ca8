"""--strategy mirrored with one replica (one GPU; here the CPU): it trains exactly as without
a strategy, and an epoch does no more input work than without one (issue 15). Keras 3.15
made 2-3 MultiDeviceIterators (30-300 ms each) and read a batch for a symbolic build that
builds nothing at every validation, every epoch; see docs/benchmarks.md."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops

from tlapp import config as config_lib
from tlapp.training import checkpoint, distribute, fit, keras_distribute_patch, sharding

EPOCHS = 3


def count_multi_device_iterators(monkeypatch) -> list:
    made = []
    cls = multi_device_iterator_ops.OwnedMultiDeviceIterator
    real_init = cls.__init__

    def init(self, *args, **kwargs):
        made.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", init)
    return made


def train(tmp_path, layout, class_weight) -> tuple[list[dict], list[np.ndarray], int]:
    """fit_stage on 20 feature rows (batches 8, 8, 4) with 6 validation rows; returns the
    history, the weights and how many times the validation data was read from the start."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(26, 5)).astype("float32")
    labels = np.arange(26) % 3
    val_reads = []

    def validation():  # from_generator: called once per read of the whole dataset
        val_reads.append(1)
        yield from zip(features[20:], np.eye(3, dtype="float32")[labels[20:]])

    val = tf.data.Dataset.from_generator(validation, output_signature=(
        tf.TensorSpec((5,), tf.float32), tf.TensorSpec((3,), tf.float32))).batch(4)

    def load(i, epoch=None):
        return tf.gather(features, i), tf.one_hot(tf.gather(labels, i), 3)

    keras.utils.set_random_seed(1)
    with layout.strategy.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    settings = fit.Settings(epochs=EPOCHS, batch_size=8, lr=0.05, seed=0,
                            class_weight=class_weight)
    rows = fit.fit_stage("head", model, settings, 20, load, val,
                         checkpoint.Checkpoint(tmp_path / layout.name, model))
    return rows, [np.asarray(w) for w in model.get_weights()], len(val_reads)


@pytest.mark.slow
def test_one_replica_mirrored_trains_like_one_device_without_extra_input_work(
        tmp_path, monkeypatch):
    """With class weights, the harder case: Keras cannot add them to a distributed dataset,
    so tlapp adds them as sample weights (`sharding.add_class_weights`)."""
    class_weight = {0: 2.0, 1: 0.5, 2: 1.0}
    one = train(tmp_path, distribute.one_device(8), class_weight)
    made = count_multi_device_iterators(monkeypatch)
    layout = distribute.make_layout(config_lib.Config(data="x", strategy="mirrored",
                                                      batch_size=8))
    try:
        assert (layout.name, layout.replicas) == ("mirrored", 1)
        assert keras_distribute_patch.applied()
        assert sharding.is_one_replica_mirrored(layout.strategy)
        mirrored = train(tmp_path, layout, class_weight)
    finally:
        keras_distribute_patch.remove()
    # the same training: class weights became sample weights, nothing else changed
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    assert len(one[0]) == len(mirrored[0]) == EPOCHS
    for a, b in zip(one[0], mirrored[0]):
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], atol=1e-6)
    for a, b in zip(one[1], mirrored[1]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # the input work of one device: one read of the validation data per epoch (Keras 3.15
    # also read a batch for its symbolic build), and no MultiDeviceIterator at all
    assert one[2] == EPOCHS and mirrored[2] == EPOCHS
    assert made == []


def test_one_replica_mirrored_is_distributed_by_tlapp_and_several_replicas_by_keras():
    """Under one replica of MirroredStrategy the validation data is distributed once with
    per-replica input on the host; without a strategy, or with several replicas (Keras
    splits each batch across them), it is left as it is."""
    dataset = tf.data.Dataset.range(5).batch(2)
    assert sharding.validation_batches(tf.distribute.get_strategy(), dataset) is dataset
    assert sharding.validation_batches(tf.distribute.get_strategy(), None) is None

    class TwoReplicas(tf.distribute.MirroredStrategy):
        num_replicas_in_sync = 2

        def __init__(self):  # no devices needed: only the replica count is asked
            pass

    assert sharding.validation_batches(TwoReplicas(), dataset) is dataset
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    distributed = sharding.validation_batches(strategy, dataset)
    assert isinstance(distributed, tf.distribute.DistributedDataset)
    assert [np.asarray(batch).tolist() for batch in distributed] == [[0, 1], [2, 3], [4]]
