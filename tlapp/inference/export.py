"""Exports: SavedModel (encoded files in; one run or an ensemble; optional TTA), TFLite
(float or quantised, labels inside) and ONNX."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import tensorflow as tf

from tlapp.data.decoding import decode_image
from tlapp.errors import UserInputError
from tlapp.files import check_folder_target, disk_full, is_disk_full, write_folder
from tlapp.inference import (calibration, export_checks, lite, onnx_export,
                             predict as predict_lib, tflite_labels)
from tlapp.inference.runs import Run, check_multi_label, resolve_reject

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZE_MODES = lite.QUANTIZE_MODES


def export_saved_model(model: keras.Model, labels: list[str], out_dir: str | Path,
                       tta: str = "none", overwrite: bool = False,
                       thresholds: list[float] | None = None,
                       reject_below: float | None = None) -> Path:
    """Writes a SavedModel of one model (RGB pixels at its input size in); see `export_members`."""
    member = predict_lib.Member(model, int(model.input.shape[1]))
    return export_members([member], labels, out_dir, tta=tta, overwrite=overwrite,
                          thresholds=thresholds, reject_below=reject_below)


def is_old_saved_model_export(folder: Path) -> bool:
    """A SavedModel folder written by tlapp before export folders carried a marker."""
    return all((folder / name).is_file() for name in
               ("saved_model.pb", "assets/labels.txt", "assets/export.json"))


def is_old_tflite_export(folder: Path) -> bool:
    return {p.name for p in folder.iterdir()} <= {"model.tflite", "labels.txt", "export.json"} \
        and (folder / "model.tflite").is_file()


def export_members(members: list[predict_lib.Member], labels: list[str], out_dir: str | Path,
                   tta: str = "none", overwrite: bool = False,
                   thresholds: list[float] | None = None,
                   reject_below: float | None = None) -> Path:
    """Writes a SavedModel that averages the probabilities of `members` (and TTA views).

    `serving_default` takes `images`, a string tensor of encoded files (JPEG, PNG, GIF,
    BMP, WebP), decodes and resizes them exactly as training did (each member at its own
    size); `serving_pixels` takes `pixels`, float RGB in [0, 255] of any size. Both return
    `probabilities` [N, C], `class_index` [N] and `class_name` [N]; a multi-label model
    (`thresholds` given: one per label) returns `probabilities` [N, C], `predicted` [N, C]
    (bool: at or above the label's threshold) and `predicted_labels` [N, C] (the label's
    name where predicted, else ""). With `reject_below` P, an image whose top probability
    is below P gets class_index -1 and class_name "unknown" (probabilities unchanged). The
    backbones' preprocessing is inside. assets/labels.txt holds the labels and assets/export.json the
    TTA mode and members. The folder is written beside `out_dir` and renamed into place;
    an existing `out_dir` is replaced only if it is a tlapp SavedModel export and `overwrite`.
    """
    out_dir = Path(out_dir)
    sizes = predict_lib.decode_sizes(members, tta)
    names = tf.constant(labels)
    models = [m.model for m in members]
    members = [dataclasses.replace(m, model=TracedOnce(m.model, m.image_size)) for m in members]

    def outputs(decode):
        decoded = tuple(decode(size) for size in sizes)
        probabilities = predict_lib.average_probabilities(members, decoded, tta)
        if thresholds is not None:
            chosen = probabilities >= tf.constant(thresholds, tf.float32)
            return {"probabilities": probabilities, "predicted": chosen,
                    "predicted_labels": tf.where(chosen, names, tf.constant(""))}
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        name = tf.gather(names, index)
        if reject_below is not None:
            unknown = tf.reduce_max(probabilities, axis=-1) < reject_below
            index = tf.where(unknown, -1, index)
            name = tf.where(unknown, tf.constant(calibration.UNKNOWN), name)
        return {"probabilities": probabilities, "class_index": index, "class_name": name}

    def from_files(images):
        return outputs(lambda size: tf.map_fn(
            lambda b: decode_image(b, size), images,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)))

    def from_pixels(pixels):
        return outputs(lambda size: tf.image.resize(
            pixels, [size, size], antialias=True))

    signatures = {
        "serving_default": (from_files, tf.TensorSpec([None], tf.string, name="images")),
        "serving_pixels": (from_pixels, tf.TensorSpec([None, None, None, 3], tf.float32,
                                                      name="pixels"))}
    description = {"tta": tta, "members": [{"name": m.name, "image_size": m.image_size}
                                           for m in members]} | (
        {"multi_label": True, "thresholds": thresholds} if thresholds is not None else {}) | (
        {"reject_below": reject_below} if reject_below is not None else {})

    def write(temp: Path) -> None:
        save_signatures(temp, signatures, models)
        (temp / "assets").mkdir(exist_ok=True)
        (temp / "assets" / "labels.txt").write_text("\n".join(labels) + "\n")
        (temp / "assets" / "export.json").write_text(json.dumps(description, indent=1) + "\n")

    return _write_export(out_dir, write, "SavedModel export", overwrite,
                         is_old_saved_model_export)


class TracedOnce:
    """A model called as one `tf.function` over pixel batches at its size: the signatures
    that call it (files, pixels) share one trace of the model instead of tracing it each,
    which halves the export's tracing and the SavedModel's graph (a ResNet-50 traced twice
    cost `tlapp train` seconds). An empty batch gets empty probabilities (a convolution on
    zero images fails in oneDNN); that guard is inside the shared trace too, because each
    `tf.cond` around the model captures every variable again (0.5 s of a ResNet-50's
    export when each signature had its own)."""

    def __init__(self, model: keras.Model, image_size: int):
        empty = tf.zeros([0, int(model.output.shape[-1])])

        def probabilities(pixels):
            return tf.cond(tf.shape(pixels)[0] > 0, lambda: model(pixels, training=False),
                           lambda: empty)

        self.function = tf.function(probabilities, autograph=False, input_signature=[
            tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])

    def __call__(self, pixels: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.function(pixels)


def _write_export(out_dir: Path, write, kind: str, overwrite: bool, owned) -> Path:
    try:
        return write_folder(out_dir, write, kind, overwrite, owned)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(out_dir.parent, f"the {kind}") from None
        raise


def save_signatures(path: Path, signatures: dict, models: list[keras.Model]) -> None:
    """Writes a SavedModel with these signatures (name -> (function, input spec)), each
    traced once, holding the models' variables and nothing else of them: half the bytes
    and time of keras.export.ExportArchive, which walks and stores the Keras objects too."""
    root = tf.Module()
    root.weights = [v.value for model in models for v in model.variables]
    tf.saved_model.save(root, str(path), signatures={
        name: tf.function(function, input_signature=[spec], autograph=False)
        .get_concrete_function() for name, (function, spec) in signatures.items()})


def export_tflite(model: keras.Model, labels: list[str], out_dir: str | Path,
                  quantize: str = "none", overwrite: bool = False, run: Run | None = None,
                  calibration_images: int | None = None, int8_input: str | None = None
                  ) -> Path:
    """Writes out_dir/model.tflite, out_dir/labels.txt and out_dir/export.json.

    The model's signature `serving_default` takes `pixels`, RGB of shape [N, S, S, 3] at the
    run's image size S (resize before calling): float32 0-255, or with quantize="int8" the
    `int8_input` type quantised by the input's scale and zero point (uint8: the pixel
    values themselves when the calibration images span 0-255); it returns `probabilities`
    [N, C] (int8: of that type, to dequantise). The backbone's preprocessing is inside. The
    labels are inside too (`tlapp.inference.tflite_labels`). export.json records the tensors
    and, given the `run`, the test accuracy of the file against the Keras model's.

    Args:
        quantize: "none" (float32), "dynamic" (int8 weights, dynamic-range quantisation),
            "float16" (float16 weights) or "int8" (full-integer; needs `run`, calibrated on
            `calibration_images` of its training images, default CALIBRATION_IMAGES).
        int8_input: "uint8" (default), "int8" or "float32": the int8 model's input and
            output type.
    """
    int8_input = check_quantize_options(quantize, calibration_images, int8_input)
    out_dir = Path(out_dir)
    check_folder_target(out_dir, "TFLite export", overwrite, is_old_tflite_export)
    description = {"format": "tflite", "quantize": quantize}
    representative = None
    if quantize == "int8":
        if run is None:
            raise UserInputError("Full-integer quantisation calibrates on a run's training "
                                 "images: export the run (tlapp export RUN --quantize int8).")
        representative, used = export_checks.representative_images(
            run, export_checks.CALIBRATION_IMAGES if calibration_images is None
            else calibration_images)
        description |= {"calibration_images": used, "int8_input": int8_input}
    flatbuffer = tflite_labels.embed_labels(
        lite.convert_keras(model, quantize, representative, int8_input), labels)
    served = lite.LiteModel(flatbuffer)
    description |= served.describe() | {"labels": LABELS_INSIDE}
    return _write_single_file(out_dir, "TFLite export", "model.tflite", flatbuffer, labels,
                              description, overwrite, run, served, is_old_tflite_export)


def check_quantize_options(quantize: str, calibration_images: int | None,
                           int8_input: str | None) -> str:
    """Refuses unknown or inapplicable TFLite options; returns the int8 input type."""
    if quantize not in lite.QUANTIZE_MODES:
        raise UserInputError(f"Unknown quantisation. Received: quantize={quantize!r}. "
                             f"Use one of: {', '.join(lite.QUANTIZE_MODES)}.")
    if quantize != "int8" and (calibration_images is not None or int8_input is not None):
        raise UserInputError(f"Calibration images and the int8 input type apply to --quantize "
                             f"int8 only. Received: quantize={quantize!r}, calibration_images="
                             f"{calibration_images!r}, int8_input={int8_input!r}.")
    if int8_input not in (None, *lite.INT8_INPUTS):
        raise UserInputError(f"Unknown int8 input type. Received: int8_input={int8_input!r}. "
                             f"Use one of: {', '.join(lite.INT8_INPUTS)}.")
    if calibration_images is not None and (isinstance(calibration_images, bool) or not
                                           isinstance(calibration_images, int)
                                           or calibration_images < 1):
        raise UserInputError(f"The number of calibration images must be a whole number of at "
                             f"least 1. Received: calibration_images={calibration_images!r}")
    return int8_input or "uint8"


LABELS_INSIDE = ("labels.txt beside the file; inside it: metadata 'labels' and the "
                 "associated file labels.txt")


def export_onnx(model: keras.Model, labels: list[str], out_dir: str | Path,
                overwrite: bool = False, run: Run | None = None) -> Path:
    """Writes out_dir/model.onnx, out_dir/labels.txt and out_dir/export.json.

    ONNX Runtime serves it: input `pixels` float32 [N, S, S, 3] (NHWC, RGB 0-255, at the
    run's image size; the backbone's preprocessing is inside), output `probabilities`
    float32 [N, C] (calibrated where the run is: the temperature is in the last layer).
    Needs the `onnx` extra.
    """
    onnx_export.require_onnx()
    out_dir = Path(out_dir)
    check_folder_target(out_dir, "ONNX export", overwrite)
    data = onnx_export.convert_keras(model)
    size, classes = int(model.input.shape[1]), int(model.output.shape[-1])
    description = {"format": "onnx", "opset": onnx_export.OPSET,
                   "input": {"name": "pixels", "dtype": "float32", "shape": [-1, size, size, 3],
                             "layout": "NHWC", "range": [0, 255]},
                   "output": {"name": "probabilities", "dtype": "float32",
                              "shape": [-1, classes]}}
    return _write_single_file(out_dir, "ONNX export", "model.onnx", data, labels, description,
                              overwrite, run, onnx_export.OnnxModel(data) if run else None)


def _write_single_file(out_dir: Path, kind: str, name: str, data: bytes, labels: list[str],
                       description: dict, overwrite: bool, run: Run | None, served,
                       owned=None) -> Path:
    """Writes the model file, labels.txt and export.json (with the test comparison of
    `served` against the run's Keras model) as one tlapp folder; returns the file's path."""
    if run is not None:
        description["temperature"] = (run.metrics.get("calibration") or {}).get("temperature")
        description["test"] = export_checks.compare_on_test_split(run, served)

    def write(temp: Path) -> None:
        (temp / name).write_bytes(data)
        (temp / "labels.txt").write_text("\n".join(labels) + "\n")
        (temp / "export.json").write_text(json.dumps(description, indent=1) + "\n")

    return _write_export(out_dir, write, kind, overwrite, owned) / name


def export_runs(runs: list, out: str | Path | None = None, format: str = "saved_model",
                tta: str = "none", quantize: str = "none", overwrite: bool = False,
                reject_below: float | str | None = None, calibration_images: int | None = None,
                int8_input: str | None = None) -> Path:
    """`tlapp export`: one run, or several as an ensemble, to a SavedModel, TFLite or ONNX.

    Args:
        runs: tlapp.inference.runs.Run objects (several: an ensemble; labels must match).
        out: destination folder. Default for one run: RUN/saved_model (RUN/saved_model_TTA
            with TTA), RUN/tflite or RUN/onnx; an ensemble needs it.
        calibration_images, int8_input: for quantize="int8"; see `export_tflite`.

    Returns:
        The SavedModel folder, or the .tflite / .onnx file (export.json beside it).

    Raises:
        UserInputError: unknown format, options the format does not support, no --out for an
            ensemble, runs whose labels differ, or an --out tlapp may not replace (a file, a
            folder tlapp did not write, or a previous export without `overwrite`).
    """
    if format not in FORMATS:
        raise UserInputError(f"Unknown export format. Received: format={format!r}. "
                             f"Use one of: {', '.join(FORMATS)}.")
    predict_lib.check_tta(tta)
    labels = predict_lib.check_same_labels([(str(r.path), r.labels) for r in runs])
    check_multi_label(runs)
    if len(runs) > 1 and out is None:
        raise UserInputError("An ensemble export needs a destination: add --out DIR.")
    if format == "onnx":
        onnx_export.require_onnx()  # before loading any model
    if format in ("tflite", "onnx"):
        kind = "TFLite" if format == "tflite" else "ONNX"
        if len(runs) > 1 or tta != "none":
            raise UserInputError(f"{kind} export takes one run without TTA. Received: "
                                 f"{len(runs)} runs, tta={tta!r}. Use --format saved_model "
                                 f"for ensembles and TTA.")
        if reject_below is not None:
            raise UserInputError(f"A {kind} model returns probabilities only; apply the reject "
                                 f"threshold in the app (the run's is in its reject.json). "
                                 f"Received: reject_below={reject_below!r} with "
                                 f"format={format!r}.")
    if format == "tflite":
        check_quantize_options(quantize, calibration_images, int8_input)  # before loading
        return export_tflite(runs[0].model, labels, out or runs[0].path / "tflite", quantize,
                             overwrite,
                             runs[0], calibration_images, int8_input)
    if quantize != "none" or calibration_images is not None or int8_input is not None:
        raise UserInputError(f"Quantisation applies to TFLite only. Received: "
                             f"quantize={quantize!r} with format={format!r}. Add "
                             f"--format tflite.")
    if format == "onnx":
        return export_onnx(runs[0].model, labels, out or runs[0].path / "onnx", overwrite,
                           runs[0])
    out = Path(out or runs[0].path / ("saved_model" if tta == "none" else f"saved_model_{tta}"))
    check_folder_target(out, "SavedModel export", overwrite, is_old_saved_model_export)
    members = [predict_lib.Member(r.model, r.image_size, str(r.path)) for r in runs]
    return export_members(members, labels, out, tta=tta, overwrite=overwrite,
                          thresholds=runs[0].thresholds,
                          reject_below=resolve_reject(runs, reject_below))
