"""Exports: SavedModel (encoded files in; one run or an ensemble; optional TTA) and TFLite."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from tlapp.data.decoding import decode_image
from tlapp.errors import UserInputError
from tlapp.files import check_folder_target, disk_full, is_disk_full, write_folder
from tlapp.inference import calibration, predict as predict_lib
from tlapp.inference.runs import check_multi_label, resolve_reject

FORMATS = ("saved_model", "tflite")
QUANTIZE_MODES = ("none", "dynamic", "float16")


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

    def outputs(count, decode):
        def compute():
            decoded = tuple(decode(size) for size in sizes)
            return predict_lib.average_probabilities(members, decoded, tta)

        # An empty batch gets empty outputs (a convolution on zero images fails in oneDNN).
        probabilities = tf.cond(count > 0, compute, lambda: tf.zeros([0, len(labels)]))
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
        return outputs(tf.size(images), lambda size: tf.map_fn(
            lambda b: decode_image(b, size), images,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)))

    def from_pixels(pixels):
        return outputs(tf.shape(pixels)[0], lambda size: tf.image.resize(
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
        save_signatures(temp, signatures, [m.model for m in members])
        (temp / "assets").mkdir(exist_ok=True)
        (temp / "assets" / "labels.txt").write_text("\n".join(labels) + "\n")
        (temp / "assets" / "export.json").write_text(json.dumps(description, indent=1) + "\n")

    return _write_export(out_dir, write, "SavedModel export", overwrite,
                         is_old_saved_model_export)


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
                  quantize: str = "none", overwrite: bool = False) -> Path:
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
    check_folder_target(out_dir, "TFLite export", overwrite, is_old_tflite_export)
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

    def write(temp: Path) -> None:
        (temp / "model.tflite").write_bytes(flatbuffer)
        (temp / "labels.txt").write_text("\n".join(labels) + "\n")

    return _write_export(out_dir, write, "TFLite export", overwrite,
                         is_old_tflite_export) / "model.tflite"


def export_runs(runs: list, out: str | Path | None = None, format: str = "saved_model",
                tta: str = "none", quantize: str = "none", overwrite: bool = False,
                reject_below: float | str | None = None) -> Path:
    """`tlapp export`: one run, or several as an ensemble, to a SavedModel or TFLite file.

    Args:
        runs: tlapp.inference.runs.Run objects (several: an ensemble; labels must match).
        out: destination folder. Default for one run: RUN/saved_model (RUN/saved_model_TTA
            with TTA) or RUN/tflite; an ensemble needs it.

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
    if format == "tflite":
        if len(runs) > 1 or tta != "none":
            raise UserInputError(f"TFLite export takes one run without TTA. Received: "
                                 f"{len(runs)} runs, tta={tta!r}. Use --format saved_model "
                                 f"for ensembles and TTA.")
        if reject_below is not None:
            raise UserInputError(f"A TFLite model returns probabilities only; apply the reject "
                                 f"threshold in the app (the run's is in its reject.json). "
                                 f"Received: reject_below={reject_below!r} with format='tflite'.")
        return export_tflite(runs[0].model, labels, out or runs[0].path / "tflite", quantize,
                             overwrite)
    if quantize != "none":
        raise UserInputError(f"Quantisation applies to TFLite only. Received: "
                             f"quantize={quantize!r} with format='saved_model'. Add "
                             f"--format tflite.")
    out = Path(out or runs[0].path / ("saved_model" if tta == "none" else f"saved_model_{tta}"))
    check_folder_target(out, "SavedModel export", overwrite, is_old_saved_model_export)
    members = [predict_lib.Member(r.model, r.image_size, str(r.path)) for r in runs]
    return export_members(members, labels, out, tta=tta, overwrite=overwrite,
                          thresholds=runs[0].thresholds,
                          reject_below=resolve_reject(runs, reject_below))
