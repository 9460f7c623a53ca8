"""The SavedModel's signatures on tiny models: empty batches, and one trace of each model."""
import keras
import numpy as np
import tensorflow as tf

from tlapp.inference import export, predict


def tiny(size: int) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_an_ensemble_with_ten_crops_answers_an_empty_batch(tmp_path):
    members = [predict.Member(tiny(16), 16), predict.Member(tiny(24), 24)]
    out = export.export_members(members, list("abc"), tmp_path / "sm", tta="10crop",
                                reject_below=0.5)
    served = tf.saved_model.load(str(out)).signatures
    for result in (served["serving_default"](images=tf.constant([], tf.string)),
                   served["serving_pixels"](pixels=tf.zeros([0, 20, 20, 3]))):
        assert result["probabilities"].shape == (0, 3)
        assert result["class_name"].shape == (0,) and result["class_index"].shape == (0,)
    two = served["serving_pixels"](pixels=tf.zeros([2, 20, 20, 3]))["probabilities"]
    np.testing.assert_allclose(two.numpy().sum(axis=1), [1, 1], atol=1e-5)


def test_the_empty_batch_guard_is_traced_once_for_both_signatures(tmp_path):
    """Each tf.cond around the model captures all its variables again: one guard, inside the
    model's shared trace, not one per signature (seconds of a ResNet-50's export)."""
    from tensorflow.core.protobuf import saved_model_pb2

    out = export.export_saved_model(tiny(16), list("abc"), tmp_path / "sm")
    saved = saved_model_pb2.SavedModel.FromString((out / "saved_model.pb").read_bytes())
    library = saved.meta_graphs[0].graph_def.library.function
    conds = [f.signature.name for f in library for node in f.node_def  # the decoder's are
             if node.op in ("If", "StatelessIf") and node.name == "cond"]  # named otherwise
    assert len(conds) == 1, conds
