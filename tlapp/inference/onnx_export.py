"""ONNX: convert a Keras model with tf2onnx and serve it with ONNX Runtime (extra `onnx`).

tf2onnx's `from_keras` is used: Keras's own `model.export(format="onnx")` (Keras 3.15,
TF 2.21) turns the Normalization layer's constants into graph inputs ONNX Runtime then
asks for, and refuses a loaded model that was never called.
"""
from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from tlapp.errors import UserInputError

INSTALL = 'pip install "tlapp[onnx]"'
OPSET = 15


def require_onnx():
    """(tf2onnx, onnxruntime), or a one-line UserInputError naming the install command."""
    try:
        import onnxruntime
        import tf2onnx
    except ImportError as e:
        raise UserInputError(f"ONNX export needs the optional packages tf2onnx, onnx and "
                             f"onnxruntime (missing: {e.name}): {INSTALL}") from None
    return tf2onnx, onnxruntime


def convert_keras(model: keras.Model) -> bytes:
    """The ONNX model of `model`: input `pixels` float32 [N, S, S, 3] (NHWC, RGB 0-255,
    preprocessing inside), output `probabilities` float32 [N, C]."""
    tf2onnx, _ = require_onnx()
    size = int(model.input.shape[1])
    spec = (tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels"),)
    with onnx_friendly_ops():
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    old = proto.graph.output[0].name
    if old != "probabilities":  # the contract's name, whatever the last layer is called
        for node in proto.graph.node:
            node.output[:] = ["probabilities" if o == old else o for o in node.output]
            node.input[:] = ["probabilities" if i == old else i for i in node.input]
        proto.graph.output[0].name = "probabilities"
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"  # tf2onnx names it unk__N
    return proto.SerializeToString()


class OnnxModel:
    """An ONNX classifier as a function of float pixels [N, S, S, 3] -> probabilities."""

    def __init__(self, onnx_bytes: bytes):
        _, onnxruntime = require_onnx()
        self.session = onnxruntime.InferenceSession(onnx_bytes,
                                                    providers=["CPUExecutionProvider"])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"],
                                {"pixels": np.asarray(pixels, np.float32)})[0]


@contextlib.contextmanager
def onnx_friendly_ops():
    """While tracing for tf2onnx, computes two Keras ops in ways it can convert (same
    numbers): a convolution with groups == channels (ConvNeXt's depthwise conv, which Keras
    runs as an XLA function tf2onnx leaves as StatefulPartitionedCall) as depthwise_conv2d,
    and exact GELU (tf.nn.gelu uses Erfc, which has no ONNX handler) through Erf."""
    try:
        from keras.src.backend.tensorflow import nn as backend_nn
        old_gelu, old_conv = backend_nn.gelu, backend_nn.conv
    except (ImportError, AttributeError):  # another Keras layout: convert unpatched
        yield
        return

    def gelu(x, approximate=True):
        x = tf.convert_to_tensor(x)
        if approximate:
            return old_gelu(x, approximate=True)
        return 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        inputs, kernel = tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel)
        if (data_format in (None, "channels_last") and len(inputs.shape) == 4
                and kernel.shape[-2] == 1 and inputs.shape[-1] == kernel.shape[-1] != 1):
            pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
            return tf.nn.depthwise_conv2d(inputs, tf.transpose(kernel, [0, 1, 3, 2]),
                                          (1, *pair(strides), 1), padding.upper(),
                                          dilations=pair(dilation_rate))
        return old_conv(inputs, kernel, strides, padding, data_format, dilation_rate)

    backend_nn.gelu, backend_nn.conv = gelu, conv
    try:
        yield
    finally:
        backend_nn.gelu, backend_nn.conv = old_gelu, old_conv
