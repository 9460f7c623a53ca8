"""ONNX and full-integer TFLite exports: they agree with the Keras model, record their test
accuracy, carry their labels, and say how to install what they need."""
import json
import sys
import zipfile

import keras
import numpy as np
import pytest

from conftest import run_cli
from tlapp.data import decoding
from tlapp.errors import UserInputError
from tlapp.inference import export, lite, onnx_export, tflite_labels

ONNX_TOLERANCE = 1e-5  # largest |probability difference| ONNX Runtime vs Keras (also in README)
INT8_MAX_DROP = 0.1  # largest test-accuracy drop of --quantize int8 (also in README)
INT8_TOLERANCE = 0.1  # largest |probability difference| of int8 (uint8 output: steps of 1/256)


def fixture_pixels(run) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the run's data folder (train, val and test), decoded at its size."""
    files = sorted((run.path.parent / "data").rglob("*.png")) + sorted(
        (run.path.parent / "data").rglob("*.jpg"))
    pixels = np.stack([decoding.decode_file_bytes(f.read_bytes(), run.image_size)
                       for f in files])
    labels = np.array([run.labels.index(f.parent.name) for f in files])
    return pixels, labels


@pytest.fixture(scope="module")
def tiny_tflite() -> tuple[bytes, keras.Model]:
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(
        keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, outputs)
    return lite.convert_keras(model), model


def test_labels_travel_inside_the_tflite_file(tiny_tflite, tmp_path):
    flatbuffer, model = tiny_tflite
    labels = ["cat", "dög", "red fox"]
    path = tmp_path / "model.tflite"
    path.write_bytes(tflite_labels.embed_labels(
        tflite_labels.embed_labels(flatbuffer, ["old", "labels", "!"]), labels))
    assert tflite_labels.read_tflite_labels(path) == labels  # replaced, not added
    assert zipfile.ZipFile(path).read("labels.txt").decode().splitlines() == labels
    assert len(zipfile.ZipFile(path).namelist()) == 1
    assert tflite_labels.read_tflite_labels(flatbuffer) is None
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    served = lite.LiteModel(path.read_bytes())  # the model and its signature still work
    np.testing.assert_allclose(served(pixels), model.predict(pixels, verbose=0), atol=1e-6)
    runner = lite.LiteModel(path.read_bytes()).interpreter.get_signature_runner()
    np.testing.assert_allclose(runner(pixels=pixels[:1])["probabilities"], served(pixels[:1]))


def test_missing_onnx_extra_is_one_line_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # `import tf2onnx` now fails
    with pytest.raises(UserInputError) as raised:
        export.export_onnx(None, ["a", "b"], tmp_path / "onnx")
    message = str(raised.value)
    assert 'pip install "tlapp[onnx]"' in message and "\n" not in message
    assert not (tmp_path / "onnx").exists()


def test_missing_onnx_extra_from_the_cli(trained_run, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, err = run_cli(capsys, "export", trained_run.path, "--format", "onnx",
                             "--out", tmp_path / "onnx")
    assert code == 2 and 'pip install "tlapp[onnx]"' in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("options, message", [
    (["--format", "onnx", "--quantize", "int8"], "Quantisation applies to TFLite only"),
    (["--format", "onnx", "--tta", "flip"], "ONNX export takes one run without TTA"),
    (["--format", "tflite", "--calibration-images", "5"], "apply to --quantize int8 only"),
    (["--format", "tflite", "--int8-input", "int8"], "apply to --quantize int8 only"),
    (["--format", "tflite", "--quantize", "int8", "--calibration-images", "0"],
     "Received: calibration_images=0"),
])
def test_export_format_option_errors(trained_run, tmp_path, capsys, options, message):
    code, _, err = run_cli(capsys, "export", trained_run.path, *options, "--out", tmp_path / "x")
    assert code == 2 and message in err, err
    assert not (tmp_path / "x").exists()


def test_onnx_runtime_serves_the_keras_probabilities(trained_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    code, printed, err = run_cli(capsys, "export", trained_run.path, "--format", "onnx",
                                 "--out", out)
    assert code == 0, err
    assert f"exported ONNX model to {out / 'model.onnx'}" in printed
    assert "test accuracy (" in printed and "ONNX 1.0000" in printed
    assert (out / "labels.txt").read_text().splitlines() == trained_run.labels
    description = json.loads((out / "export.json").read_text())
    assert description["input"] == {"name": "pixels", "dtype": "float32", "layout": "NHWC",
                                    "shape": [-1, 32, 32, 3], "range": [0, 255]}
    assert description["test"]["agreement"] == 1.0
    assert description["test"]["max_probability_difference"] <= ONNX_TOLERANCE

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    assert session.get_inputs()[0].shape == ["batch", 32, 32, 3]
    pixels, _ = fixture_pixels(trained_run)
    probabilities = session.run(["probabilities"], {"pixels": pixels})[0]
    expected = trained_run.model.predict(pixels, verbose=0)
    assert np.abs(probabilities - expected).max() <= ONNX_TOLERANCE
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_int8_tflite_keeps_the_accuracy_and_carries_its_labels(trained_run, tmp_path,
                                                                 capsys):
    out = tmp_path / "int8"
    code, printed, err = run_cli(capsys, "export", trained_run.path, "--format", "tflite",
                                 "--quantize", "int8", "--calibration-images", "12",
                                 "--out", out)
    assert code == 0, err
    assert "TFLite int8" in printed and "test accuracy (" in printed
    description = json.loads((out / "export.json").read_text())
    assert description["calibration_images"] == 12 and description["int8_input"] == "uint8"
    assert description["input"]["dtype"] == "uint8" and description["output"]["dtype"] == \
        "uint8"
    test = description["test"]
    assert test["keras_accuracy"] >= 0.9 and test["accuracy_drop"] <= INT8_MAX_DROP
    assert test["images"] == 4 and test["max_probability_difference"] <= INT8_TOLERANCE
    assert tflite_labels.read_tflite_labels(out / "model.tflite") == trained_run.labels
    assert zipfile.ZipFile(out / "model.tflite").read("labels.txt").decode().split() == \
        trained_run.labels

    # on every image of the fixture, not only the 4 of its test split
    pixels, labels = fixture_pixels(trained_run)
    keras_probabilities = trained_run.model.predict(pixels, verbose=0)
    int8_probabilities = lite.LiteModel((out / "model.tflite").read_bytes())(pixels)
    keras_accuracy = np.mean(keras_probabilities.argmax(1) == labels)
    int8_accuracy = np.mean(int8_probabilities.argmax(1) == labels)
    assert keras_accuracy >= 0.9  # the float model is accurate, so a drop would show
    assert keras_accuracy - int8_accuracy <= INT8_MAX_DROP
    assert np.abs(int8_probabilities - keras_probabilities).max() <= INT8_TOLERANCE


def test_onnx_conversion_handles_grouped_convolution_and_exact_gelu():
    pytest.importorskip("onnxruntime")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", groups=6)(x)  # as ConvNeXt's depthwise conv
    x = keras.layers.Activation(lambda t: keras.activations.gelu(t, approximate=False))(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    data = onnx_export.convert_keras(model)
    import onnx

    operations = {node.op_type for node in onnx.load_from_string(data).graph.node}
    assert "StatefulPartitionedCall" not in operations
    pixels = np.random.default_rng(1).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(onnx_export.OnnxModel(data)(pixels),
                               model.predict(pixels, verbose=0), atol=ONNX_TOLERANCE)


@pytest.mark.parametrize("int8_input", ["int8", "float32"])
def test_int8_input_types(tiny_tflite, int8_input):
    _, model = tiny_tflite
    rng = np.random.default_rng(2)
    pixels = rng.uniform(0, 255, (6, 4, 4, 3)).astype(np.float32)
    data = lite.convert_keras(model, "int8", lambda: ([p[None]] for p in pixels), int8_input)
    served = lite.LiteModel(data)
    assert served.describe()["input"]["dtype"] == int8_input
    assert np.abs(served(pixels) - model.predict(pixels, verbose=0)).max() <= INT8_TOLERANCE
