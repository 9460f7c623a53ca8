"""Cost of a model per image: multiply-accumulates (MACs) counted from layer configs and shapes.

Only the layers that dominate a CNN's arithmetic are counted: Conv1D/2D/3D (with groups),
DepthwiseConv2D, SeparableConv2D and Dense. Pooling, normalisation, activations and
additions are ignored (each costs about one operation per output value, a few percent of the
convolutions). No forward pass runs: a model built at a fixed input size knows every shape.
"""
from __future__ import annotations

import math

import keras


def layer_macs(layer: keras.layers.Layer) -> int:
    """MACs for one image through `layer` (0 for layers that are not counted).

    A convolution costs, per output position, kernel area x input channels per group x
    filters; a depthwise convolution kernel area x channels x depth multiplier; a separable
    one that plus the 1x1 pointwise convolution; a Dense layer input units x units per
    position of its input (once for a flat vector).
    """
    if isinstance(layer, keras.Model):
        return sum(layer_macs(inner) for inner in layer.layers)
    if not isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                              keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                              keras.layers.Dense)):
        return 0
    in_shape, out_shape = tuple(layer.input.shape[1:]), tuple(layer.output.shape[1:])
    if isinstance(layer, keras.layers.Dense):
        return math.prod(in_shape[:-1]) * in_shape[-1] * layer.units
    channels_first = layer.data_format == "channels_first"
    channels_in = in_shape[0] if channels_first else in_shape[-1]
    positions = math.prod(out_shape[1:] if channels_first else out_shape[:-1])
    kernel = math.prod(layer.kernel_size)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return positions * kernel * channels_in * layer.depth_multiplier
    if isinstance(layer, keras.layers.SeparableConv2D):
        depthwise = channels_in * layer.depth_multiplier
        return positions * (kernel * depthwise + depthwise * layer.filters)
    return positions * kernel * (channels_in // layer.groups) * layer.filters


def model_macs(model: keras.Model) -> int:
    """Total MACs for one image through `model` (nested models included)."""
    return sum(layer_macs(layer) for layer in model.layers)


def cumulative_macs(model: keras.Model) -> dict[str, int]:
    """Layer name -> MACs of that layer and every layer before it: at a cut point, the cost
    of the stem that ends there (every path to the output passes through a cut point, so
    the layers before it in the model's order are exactly its ancestors)."""
    total, out = 0, {}
    for layer in model.layers:
        total += layer_macs(layer)
        out[layer.name] = total
    return out


def format_count(value: int) -> str:
    """1234567 -> '1.23 M': three significant digits with a k/M/G/T suffix."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {suffix}"
    return str(value)
