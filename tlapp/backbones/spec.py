"""The record the registry keeps per backbone, and its input preprocessing as a layer."""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

FAMILIES = ("applications", "classic", "custom")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and use it as a feature extractor.

    Attributes:
        name: registry name (lower case, as typed on the command line).
        family: "applications" (keras.applications, ImageNet weights), "classic" (trained
            from scratch, no pretrained weights) or "custom" (a user's .keras file).
        preprocess: mode of its `preprocess_input`: caffe, tf, torch or none.
        default_size: image size it was trained on (square).
        min_size: smallest image size its builder accepts.
        block_pattern: regex matching the layer that ends each block; block ends are
            the cut points whose names match it, plus the final layer.
        factory: applications: the `keras.applications` attribute that builds it.
        weight_file: applications: the ImageNet "notop" file Keras downloads into
            $KERAS_HOME/models.
        module: applications: the `keras.applications` submodule holding its
            `preprocess_input`.
        path: custom: the model file's absolute path.
        collapses_at_random_init: its pooled features at random initialisation
            (`--weights none`) are the same for every image (measured at the minimum size:
            standard deviation across images below 1e-5, e.g. 3e-13 for MobileNetV2; the
            head's standardisation has an epsilon of 1e-7), so a frozen random stem carries
            nothing: such a backbone needs pretrained weights, or training every layer
            (`--trainable-blocks all`).
    """

    name: str
    family: str
    preprocess: str
    default_size: int
    min_size: int
    block_pattern: str
    factory: str | None = None
    weight_file: str | None = None
    module: str | None = None
    path: str | None = None
    collapses_at_random_init: bool = False

    @property
    def scratch_only(self) -> bool:
        """True for classic nets: no pretrained weights, everything trains by default."""
        return self.family == "classic"


@keras.saving.register_keras_serializable(package="tlapp")
class Preprocess(keras.layers.Layer):
    """A backbone's `preprocess_input` as a layer, so saved models take plain pixels (0-255, RGB).

    Modes follow `keras.applications.imagenet_utils.preprocess_input`: caffe (RGB->BGR,
    subtract the ImageNet mean), tf (scale to [-1, 1]), torch (scale to [0, 1], normalise
    by ImageNet mean and std) and none (the model rescales by itself, as EfficientNet does).
    """

    MODES = ("caffe", "tf", "torch", "none")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Unknown preprocessing mode. Received: mode={mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = np.array([0.485, 0.456, 0.406]) * 255.0
            std = np.array([0.229, 0.224, 0.225]) * 255.0
            return (x - ops.cast(mean, x.dtype)) / ops.cast(std, x.dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.cast([103.939, 116.779, 123.68], x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
