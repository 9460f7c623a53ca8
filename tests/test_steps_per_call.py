"""Several training steps per call of Keras's train function (steps_per_execution): the same
training as one step per call, also when an epoch's steps are not a multiple of it."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tlapp.training import checkpoint, fit, sharding

ROWS, BATCH, EPOCHS = 300, 4, 3  # 75 steps per epoch: calls of 32, 32 and 11 steps
rng = np.random.default_rng(0)
FEATURES = rng.normal(size=(ROWS, 5)).astype("float32")
LABELS = np.arange(ROWS) % 3


def load(i, epoch=None):
    return tf.gather(FEATURES, i), tf.one_hot(tf.gather(LABELS, i), 3)


def model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dropout(0.3),
                             keras.layers.Dense(3, activation="softmax")])


def train(tmp_path, name: str, parallel: bool = False, **settings
          ) -> tuple[keras.Model, list[dict]]:
    net = model()
    settings = fit.Settings(**{"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.05, "seed": 0,
                               **settings})
    rows = fit.fit_stage("head", net, settings, ROWS, load, None,
                         checkpoint.Checkpoint(tmp_path / name, net), parallel=parallel)
    return net, rows


def assert_same(a: keras.Model, b: keras.Model) -> None:
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_several_steps_per_call_train_exactly_as_one(tmp_path, monkeypatch):
    many, many_rows = train(tmp_path, "many")
    assert many.steps_per_execution == fit.STEPS_PER_CALL == 32
    monkeypatch.setattr(fit, "STEPS_PER_CALL", 1)
    one, one_rows = train(tmp_path, "one")
    assert one.steps_per_execution == 1
    assert_same(many, one)
    assert [r["loss"] for r in many_rows] == pytest.approx([r["loss"] for r in one_rows],
                                                           abs=1e-6)
    assert int(many.optimizer.iterations) == EPOCHS * ROWS // BATCH

    # Why each epoch is a dataset of its own: Keras runs whole calls of 32 steps, so over
    # one dataset of all epochs its "epochs" would take batches of the next one.
    net = model()
    net.compile(keras.optimizers.Adam(0.05), "categorical_crossentropy",
                steps_per_execution=32)
    batches, _ = sharding.training_batches(tf.distribute.get_strategy(), ROWS, BATCH, 0, 0,
                                           EPOCHS, load, False, None)
    net.fit(batches, epochs=EPOCHS, steps_per_epoch=ROWS // BATCH, verbose=0,
            callbacks=[fit.Reseed(0)])
    with pytest.raises(AssertionError):
        assert_same(net, one)


def test_images_the_warmup_callback_and_strategies_keep_one_step_per_call(tmp_path):
    net, _ = train(tmp_path, "warmup", epochs=1, lr_schedule="plateau", warmup_epochs=1)
    assert net.steps_per_execution == 1
    net, _ = train(tmp_path, "images", epochs=1, parallel=True)  # a loader per example
    assert net.steps_per_execution == 1
    assert sharding.is_default(tf.distribute.get_strategy())
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert not sharding.is_default(strategy)
    with strategy.scope():
        assert not sharding.is_default(strategy)
        with pytest.raises(ValueError, match="without a strategy"):
            sharding.training_batches(strategy, ROWS, BATCH, 0, 0, 1, load, False, None,
                                      tf.Variable(0, dtype=tf.int64))
