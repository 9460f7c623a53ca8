"""Classic networks trained from scratch: LeNet-5 (1998) and AlexNet (2012).

Both follow the `keras.applications` calling style (`include_top`, `classes`,
`input_shape`) and name every layer explicitly, so cut points and checkpoints stay stable.
With `include_top=False` they end at the last hidden layer (LeNet-5's F6, AlexNet's fc7);
tlapp adds the softmax layer. They have no pretrained weights.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from tlapp.backbones.spec import BackboneSpec
from tlapp.errors import UserInputError


@keras.saving.register_keras_serializable(package="tlapp")
class LocalResponseNormalization(keras.layers.Layer):
    """AlexNet's local response normalisation across channels (Krizhevsky et al. 2012, 3.3):
    b = a / (k + alpha * sum of a^2 over `size` neighbouring channels) ^ beta."""

    def __init__(self, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75,
                 **kwargs):
        super().__init__(**kwargs)
        self.size, self.k, self.alpha, self.beta = size, k, alpha, beta

    def call(self, x):
        return tf.nn.local_response_normalization(x, depth_radius=self.size // 2, bias=self.k,
                                                  alpha=self.alpha, beta=self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "k": self.k, "alpha": self.alpha,
                "beta": self.beta}


def lenet5(input_shape: tuple[int, int, int] = (32, 32, 3), include_top: bool = False,
           classes: int = 10) -> keras.Model:
    """LeNet-5 (LeCun et al. 1998): conv-pool-conv-pool-fc-fc(-softmax), tanh, average pooling.

    C3 is fully connected to S2 (the paper's sparse connection table is a detail of its
    time). 62,006 parameters at 32x32x3 with 10 classes; 61,706 for grey input.
    Needs at least 32x32 pixels; larger inputs give C5 a spatial map that F6 flattens.
    """
    layers = keras.layers
    inputs = keras.Input(input_shape, name="input")
    x = layers.Conv2D(6, 5, activation="tanh", name="c1_conv")(inputs)  # 28x28x6
    x = layers.AveragePooling2D(2, name="s2_pool")(x)  # 14x14x6
    x = layers.Conv2D(16, 5, activation="tanh", name="c3_conv")(x)  # 10x10x16
    x = layers.AveragePooling2D(2, name="s4_pool")(x)  # 5x5x16
    x = layers.Conv2D(120, 5, activation="tanh", name="c5_conv")(x)  # 1x1x120: fully connected
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(84, activation="tanh", name="f6_dense")(x)
    if include_top:
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name="lenet5")


def alexnet(input_shape: tuple[int, int, int] = (227, 227, 3), include_top: bool = False,
            classes: int = 1000, local_response_normalization: bool = True,
            dropout: float = 0.5) -> keras.Model:
    """AlexNet (Krizhevsky, Sutskever, Hinton 2012): five ReLU convolutions (conv2, conv4 and
    conv5 in two groups, as the paper split them over two GPUs), overlapping max pooling,
    optional local response normalisation after conv1 and conv2, and two 4096-unit fully
    connected layers whose outputs are dropped out in training (fc7's by tlapp's head unless
    `include_top`). 60,965,224 parameters at 227x227 with 1000 classes (the paper's
    "60 million"). Needs at least 67x67 pixels.
    """
    layers = keras.layers
    inputs = keras.Input(input_shape, name="input")
    x = layers.Conv2D(96, 11, strides=4, activation="relu", name="conv1")(inputs)  # 55x55x96
    if local_response_normalization:
        x = LocalResponseNormalization(name="lrn1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)  # 27x27x96
    x = layers.Conv2D(256, 5, padding="same", groups=2, activation="relu", name="conv2")(x)
    if local_response_normalization:
        x = LocalResponseNormalization(name="lrn2")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)  # 13x13x256
    x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(384, 3, padding="same", groups=2, activation="relu", name="conv4")(x)
    x = layers.Conv2D(256, 3, padding="same", groups=2, activation="relu", name="conv5")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)  # 6x6x256
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(4096, activation="relu", name="fc6")(x)
    x = layers.Dropout(dropout, name="fc6_dropout")(x)
    x = layers.Dense(4096, activation="relu", name="fc7")(x)
    if include_top:  # without it, tlapp's head supplies this dropout (--dropout) and softmax
        x = layers.Dropout(dropout, name="fc7_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name="alexnet")


BUILDERS = {"lenet5": lenet5, "alexnet": alexnet}
SPECS = [
    BackboneSpec("lenet5", "classic", "tf", 32, 32, r"(s\d_pool|c5_conv|f6_dense)$"),
    BackboneSpec("alexnet", "classic", "tf", 227, 67, r"(pool\d|conv[34]|fc[67])$"),
]


def build_classic(spec: BackboneSpec, weights: str, image_size: int) -> keras.Model:
    """A classic net without its softmax layer, randomly initialised (seed it first)."""
    if weights != "none":
        raise UserInputError(
            f"{spec.name} has no pretrained weights: it trains from scratch. Pass "
            f"--weights none. Received: weights={weights!r}")
    return BUILDERS[spec.name]((image_size, image_size, 3))
