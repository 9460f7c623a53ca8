"""The new classifier head, the models built around one backbone, and what trains.

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

from tlapp.backbones.cuts import split_backbone
from tlapp.backbones.spec import BackboneSpec, Preprocess


@dataclasses.dataclass
class Models:
    stem: keras.Model | None  # None when training from scratch
    train: keras.Model  # cached activations -> probabilities (the full model from scratch)
    full: keras.Model
    pooled_features: keras.Model  # train model's input -> pooled vector before the head
    pooled_pixels: keras.Model  # pixels -> pooled vector before the head
    normalization: keras.layers.Normalization
    pooled: bool  # True when the cache holds one pooled vector per image


def set_trainable(base: keras.Model, cut: str | None, bn_trainable: bool) -> None:
    """Freezes `base` up to and including `cut` (nothing when cut is None) and unfreezes
    the rest. BatchNormalization layers above the cut train only if `bn_trainable`; a
    frozen BatchNormalization layer runs in inference mode (Keras 3 semantics), so its
    moving statistics stay as they are.
    """
    frozen = cut is not None
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = not frozen and bn_trainable
        else:
            layer.trainable = not frozen
        if isinstance(layer, keras.layers.Dropout):
            freeze_dropout(layer, frozen)
        if layer.name == cut:
            frozen = False


def freeze_dropout(layer: keras.layers.Dropout, frozen: bool) -> None:
    """Makes a frozen Dropout layer pass its input through in training mode too.

    Keras's Dropout ignores `trainable`: EfficientNet's drop-connect layers inside a frozen
    stem would still drop in training mode (live training, fine-tuning), so the frozen stem
    would differ from the features it cached. Its rate comes back when it is unfrozen.
    """
    rate = layer.__dict__.setdefault("_tlapp_rate", layer.rate)
    layer.rate = 0.0 if frozen else rate


def build_models(spec: BackboneSpec, base: keras.Model, cut: str | None,
                 num_classes: int, dropout: float, image_size: int,
                 bn_trainable: bool = False, multi_label: bool = False) -> Models:
    """Freezes `base` up to `cut` and wires the stem, training and full models.

    With cut=None (training from scratch) nothing is frozen, there is no stem, and the
    training model is the full model.

    The head is: global average pooling, standardisation of each pooled feature (a
    Normalization layer; call `adapt_head` before training), dropout, dense softmax (sigmoid,
    one independent probability per label, with multi_label).
    Standardising matters: pooled activations share a large common offset (at random
    initialisation especially) that otherwise swamps a linear head's gradients.
    """
    set_trainable(base, cut, bn_trainable)
    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    preprocess = Preprocess(spec.preprocess, name="preprocess")
    # float32 under mixed precision too: its statistics must not be computed in float16
    head_norm = keras.layers.Normalization(name="head_standardize", dtype="float32")
    head_dropout = keras.layers.Dropout(dropout, name="head_dropout")
    head_dense = keras.layers.Dense(num_classes, name="probabilities", dtype="float32",
                                    activation="sigmoid" if multi_label else "softmax")

    x = _pool(base(preprocess(pixels)), "avg_pool")
    full_model = keras.Model(pixels, head_dense(head_dropout(head_norm(x))),
                             name=f"tlapp_{spec.name}")
    pooled_pixels = keras.Model(pixels, x, name="pooled_pixels")
    if cut is None:
        return Models(None, full_model, full_model, pooled_pixels, pooled_pixels, head_norm,
                      pooled=False)

    stem, top = split_backbone(base, cut)
    features = stem(preprocess(pixels))
    if top is None:
        features = _pool(features, "stem_pool")
    stem_model = keras.Model(pixels, features, name="stem_model")

    cached = keras.Input(tuple(features.shape[1:]), name="features")
    x = cached
    if top is not None:
        x = _pool(top(x), "top_pool")
    pooled_model = keras.Model(cached, x, name="pooled_features")
    train_model = keras.Model(cached, head_dense(head_dropout(head_norm(x))), name="train_model")
    return Models(stem_model, train_model, full_model, pooled_model, pooled_pixels, head_norm,
                  pooled=top is None)


def _pool(x, name: str):
    """Global average pooling for feature maps; vectors (classic nets' fc layers) pass as is."""
    if len(x.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name=name)(x)
    return x if len(x.shape) == 2 else keras.layers.Flatten(name=name)(x)


def adapt_head(models: Models, pooled_batches) -> None:
    """Sets the head's standardisation from pooled training features: batches (arrays or a
    tf.data dataset), or None for identity (training from scratch: the features are still
    to be learned).

    Each feature's variance is floored at 1% of the mean variance: a feature that is
    nearly constant on the training images must not turn into a huge input on new ones.
    """
    layer = models.normalization
    width = int(models.pooled_features.output.shape[-1])
    layer.adapt(np.zeros((2, width), np.float32) if pooled_batches is None else pooled_batches)
    variance = keras.ops.convert_to_numpy(layer.adapt_variance)
    floor = 0.01 * variance.mean() if variance.mean() > 0 else 1.0
    layer.adapt_variance.assign(np.maximum(variance, floor).astype(np.float32))
    layer.finalize_state()
