"""The new classifier head, and the three models built around one backbone.

- stem model: pixels -> cached activations (preprocessing, frozen layers up to the cut,
  global average pooling when nothing above the cut is trained);
- training model: cached activations -> probabilities (unfrozen top blocks + head);
- full model: pixels -> probabilities, what `model.keras` holds.
All three share layer objects, so training the second trains the third.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tlapp import backbones


@dataclasses.dataclass
class Models:
    stem: keras.Model
    train: keras.Model
    full: keras.Model
    pooled_features: keras.Model  # cached activations -> pooled vector before the head
    normalization: keras.layers.Normalization
    pooled: bool  # True when the cache holds one pooled vector per image
    from_input: bool = False  # True when the cut is the input: the whole network trains


def build_models(spec: backbones.BackboneSpec, base: keras.Model, cut: str,
                 num_classes: int, dropout: float, image_size: int) -> Models:
    """Freezes `base` up to `cut` and wires the stem, training and full models.

    The head is: global average pooling, standardisation of each pooled feature (a
    Normalization layer; call `adapt_head` before training), dropout, dense softmax.
    Standardising matters: pooled activations share a large common offset (at random
    initialisation especially) that otherwise swamps a linear head's gradients.
    """
    stem, top = backbones.split_backbone(base, cut)
    frozen = cut != backbones.INPUT_CUT
    for layer in base.layers:
        layer.trainable = not frozen
        if layer.name == cut:
            frozen = False

    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    preprocess = backbones.Preprocess(spec.preprocess, name="preprocess")
    head_norm = keras.layers.Normalization(name="head_standardize")
    head_dropout = keras.layers.Dropout(dropout, name="head_dropout")
    head_dense = keras.layers.Dense(num_classes, activation="softmax", name="probabilities",
                                    dtype="float32")

    features = stem(preprocess(pixels))
    if top is None:
        features = _pool(features, "stem_pool")
    stem_model = keras.Model(pixels, features, name="stem_model")

    cached = keras.Input(tuple(features.shape[1:]), name="features")
    x = cached
    if top is not None:
        # BatchNormalization stays in inference mode, as in the Keras transfer-learning guide;
        # classic nets (no BatchNormalization) train from scratch with their Dropout active.
        x = _pool(top(x, training=None if spec.scratch_only else False), "top_pool")
    pooled_model = keras.Model(cached, x, name="pooled_features")
    train_model = keras.Model(cached, head_dense(head_dropout(head_norm(x))), name="train_model")

    x = base(preprocess(pixels), training=False)
    x = _pool(x, "avg_pool")
    full_model = keras.Model(pixels, head_dense(head_dropout(head_norm(x))),
                             name=f"tlapp_{spec.name}")
    return Models(stem_model, train_model, full_model, pooled_model, head_norm,
                  pooled=top is None, from_input=cut == backbones.INPUT_CUT)


def _pool(x, name: str):
    """Global average pooling for feature maps; vectors (classic nets' fc layers) pass as is."""
    if len(x.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name=name)(x)
    return x if len(x.shape) == 2 else keras.layers.Flatten(name=name)(x)


def adapt_head(models: Models, train_features: np.ndarray, batch_size: int = 64,
               random_init: bool = False) -> None:
    """Sets the head's standardisation from the pooled training features.

    Each feature's variance is floored at 1% of the mean variance: a feature that is
    nearly constant on the training images must not turn into a huge input on new ones.
    When the whole network trains from random initialisation (cut at the input and
    `random_init`), its features' scale changes as it learns, so statistics of the initial
    features would mislead (AlexNet's loss explodes): the layer is then the identity.
    """
    if models.from_input and random_init:
        width = models.pooled_features.output.shape[-1]
        pooled, variance, floor = np.zeros((2, width)), np.ones(width), 1.0
    else:
        pooled = train_features if models.pooled else models.pooled_features.predict(
            train_features, batch_size=batch_size, verbose=0)
        pooled = np.asarray(pooled, dtype=np.float64)
        variance = pooled.var(axis=0)
        floor = 0.01 * variance.mean() if variance.mean() > 0 else 1.0
    layer = models.normalization
    layer.adapt(pooled[:2].astype(np.float32))  # builds the layer's state variables
    layer.adapt_mean.assign(pooled.mean(axis=0).astype(np.float32))
    layer.adapt_variance.assign(np.maximum(variance, floor).astype(np.float32))
    layer.finalize_state()
