"""Exports: SavedModel (encoded files in; one run or an ensemble; optional TTA) and TFLite."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from tlapp.data.decoding import decode_image
from tlapp.errors import UserInputError
from tlapp.files import write_atomic
from tlapp.inference import predict as predict_lib

FORMATS = ("saved_model", "tflite")
QUANTIZE_MODES = ("none", "dynamic", "float16")


def export_saved_model(model: keras.Model, labels: list[str], out_dir: str | Path,
                       tta: str = "none") -> Path:
    """Writes a SavedModel of one model (RGB pixels at its input size in); see `export_members`."""
    member = predict_lib.Member(model, int(model.input.shape[1]))
    return export_members([member], labels, out_dir, tta=tta)


def export_members(members: list[predict_lib.Member], labels: list[str], out_dir: str | Path,
                   tta: str = "none") -> Path:
    """Writes a SavedModel that averages the probabilities of `members` (and TTA views).

    `serving_default` takes `images`, a string tensor of encoded files (JPEG, PNG, GIF,
    BMP, WebP), decodes and resizes them exactly as training did (each member at its own
    size); `serving_pixels` takes `pixels`, float RGB in [0, 255] of any size. Both return
    `probabilities` [N, C], `class_index` [N] and `class_name` [N]. The backbones'
    preprocessing is inside. assets/labels.txt holds the labels and assets/export.json the
    TTA mode and members. The folder is written beside `out_dir` and renamed into place.
    """
    out_dir = Path(out_dir)
    sizes = predict_lib.decode_sizes(members, tta)
    names = tf.constant(labels)

    def outputs(decoded):
        probabilities = predict_lib.average_probabilities(members, tuple(decoded), tta)
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "class_index": index,
                "class_name": tf.gather(names, index)}

    def from_files(images):
        return outputs(tf.map_fn(lambda b: decode_image(b, size), images,
                                 fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
                       for size in sizes)

    def from_pixels(pixels):
        return outputs(tf.image.resize(pixels, [size, size], antialias=True) for size in sizes)

    signatures = {
        "serving_default": (from_files, tf.TensorSpec([None], tf.string, name="images")),
        "serving_pixels": (from_pixels, tf.TensorSpec([None, None, None, 3], tf.float32,
                                                      name="pixels"))}
    temp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    save_signatures(temp, signatures, [m.model for m in members])
    (temp / "assets").mkdir(exist_ok=True)
    (temp / "assets" / "labels.txt").write_text("\n".join(labels) + "\n")
    description = {"tta": tta, "members": [{"name": m.name, "image_size": m.image_size}
                                           for m in members]}
    (temp / "assets" / "export.json").write_text(json.dumps(description, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    temp.rename(out_dir)
    return out_dir


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
                  quantize: str = "none") -> Path:
    """Writes out_dir/model.tflite and out_dir/labels.txt.

    The model's signature `serving_default` takes `pixels`, float32 RGB in [0, 255] of
    shape [N, S, S, 3] at the run's image size S (resize before calling), and returns
    `probabilities` [N, C]; the backbone's preprocessing is inside.

    Args:
        quantize: "none" (float32), "dynamic" (int8 weights, dynamic-range quantisation)
            or "float16" (float16 weights).
    """
    if quantize not in QUANTIZE_MODES:
        raise UserInputError(f"Unknown quantisation. Received: quantize={quantize!r}. "
                             f"Use one of: {', '.join(QUANTIZE_MODES)}.")
    out_dir = Path(out_dir)
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
        flatbuffer = converter.convert()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "model.tflite", lambda p: p.write_bytes(flatbuffer))
    write_atomic(out_dir / "labels.txt",
                           lambda p: p.write_text("\n".join(labels) + "\n"))
    return out_dir / "model.tflite"


def export_runs(runs: list, out: str | Path | None = None, format: str = "saved_model",
                tta: str = "none", quantize: str = "none") -> Path:
    """`tlapp export`: one run, or several as an ensemble, to a SavedModel or TFLite file.

    Args:
        runs: tlapp.inference.runs.Run objects (several: an ensemble; labels must match).
        out: destination folder. Default for one run: RUN/saved_model (RUN/saved_model_TTA
            with TTA) or RUN/tflite; an ensemble needs it.

    Raises:
        UserInputError: unknown format, options the format does not support, no --out for an
            ensemble, or runs whose labels differ.
    """
    if format not in FORMATS:
        raise UserInputError(f"Unknown export format. Received: format={format!r}. "
                             f"Use one of: {', '.join(FORMATS)}.")
    predict_lib.check_tta(tta)
    labels = predict_lib.check_same_labels([(str(r.path), r.labels) for r in runs])
    if len(runs) > 1 and out is None:
        raise UserInputError("An ensemble export needs a destination: add --out DIR.")
    if format == "tflite":
        if len(runs) > 1 or tta != "none":
            raise UserInputError(f"TFLite export takes one run without TTA. Received: "
                                 f"{len(runs)} runs, tta={tta!r}. Use --format saved_model "
                                 f"for ensembles and TTA.")
        return export_tflite(runs[0].model, labels, out or runs[0].path / "tflite", quantize)
    if quantize != "none":
        raise UserInputError(f"Quantisation applies to TFLite only. Received: "
                             f"quantize={quantize!r} with format='saved_model'. Add "
                             f"--format tflite.")
    default = runs[0].path / ("saved_model" if tta == "none" else f"saved_model_{tta}")
    members = [predict_lib.Member(r.model, r.image_size, str(r.path)) for r in runs]
    return export_members(members, labels, out or default, tta=tta)
