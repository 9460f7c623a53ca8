"""TFLite (LiteRT): convert a Keras model (float, dynamic, float16 or full-integer int8) and
run a .tflite file on float pixels with the maintained interpreter."""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
INT8_INPUTS = ("uint8", "int8", "float32")  # --int8-input: the full-integer model's I/O type


def convert_keras(model: keras.Model, quantize: str = "none",
                  representative: Callable[[], Iterable[list[np.ndarray]]] | None = None,
                  int8_input: str = "uint8") -> bytes:
    """The .tflite flatbuffer of `model` (float32 pixels [N, S, S, 3] in, probabilities out).

    With quantize="int8" every operation runs in int8, calibrated on `representative`
    (yielding [pixels [1, S, S, 3] float32 0-255]); input and output are `int8_input`
    (uint8 pixels 0-255 map exactly to the quantised input when the calibration saw the
    full range; float32 keeps float I/O with (de)quantisation inside the model).
    """
    size = int(model.input.shape[1])
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", lambda pixels: {"probabilities": model(pixels, training=False)},
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    # Keras 3 variables are only frozen into the flatbuffer via a SavedModel (as
    # keras.src.export.litert does); from_concrete_functions leaves them uninitialised.
    with tempfile.TemporaryDirectory() as saved:
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io_type = tf.as_dtype(int8_input)
            converter.inference_input_type = converter.inference_output_type = io_type
        return converter.convert()


def _interpreter_class():
    try:  # the maintained interpreter; tf.lite.Interpreter is deprecated
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    return Interpreter


class LiteModel:
    """A .tflite classifier as a function of float pixels: `model(pixels)` takes float32
    RGB 0-255 [N, S, S, 3] and returns float probabilities [N, C], quantising the input
    and dequantising the output where the model's I/O is integer."""

    def __init__(self, tflite: bytes):
        with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
            warnings.simplefilter("ignore")
            self.interpreter = _interpreter_class()(model_content=tflite,
                                                    num_threads=os.cpu_count() or 1)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.interpreter.resize_tensor_input(self.input["index"], [1, *self.input["shape"][1:]])
        self.interpreter.allocate_tensors()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        # One image per invoke, as on a device: dynamic-range quantisation takes its
        # activation ranges from the whole batch, so a batch would change the numbers.
        return np.concatenate([self._invoke(image[None]) for image in
                               np.asarray(pixels, np.float32)])

    def _invoke(self, pixels: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], _quantise(pixels, self.input))
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self.output["index"])
        if raw.dtype == np.float32:
            return raw.copy()
        scale, zero_point = self.output["quantization"]
        return (raw.astype(np.float32) - zero_point) * scale

    def describe(self) -> dict:
        """The input and output tensors: name, dtype, shape and quantisation (scale,
        zero_point: real = scale * (q - zero_point)), as export.json records them."""
        def tensor(detail):
            scale, zero_point = detail["quantization"]
            return {"dtype": np.dtype(detail["dtype"]).name,
                    "shape": [int(d) for d in detail["shape_signature"]]} | (
                {"scale": float(scale), "zero_point": int(zero_point)} if scale else {})

        return {"input": {"name": "pixels"} | tensor(self.input),
                "output": {"name": "probabilities"} | tensor(self.output)}


def _quantise(pixels: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return pixels
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(pixels / scale + zero_point), info.min, info.max).astype(dtype)
