"""SavedModel export: encoded image files in, probabilities and class names out."""
from __future__ import annotations

import shutil
from pathlib import Path

import keras
import tensorflow as tf

from tlapp import data as data_lib


def export_saved_model(model: keras.Model, labels: list[str], out_dir: str | Path,
                       verbose: bool = False) -> Path:
    """Writes a SavedModel with two signatures.

    `serving_default` takes `images`, a string tensor of encoded files (JPEG, PNG, GIF,
    BMP, WebP), decodes and resizes them exactly as training did; `serving_pixels` takes
    `pixels`, float RGB in [0, 255] of any size. Both return `probabilities` [N, C],
    `class_index` [N] and `class_name` [N]. The backbone's preprocessing is inside the model.
    The folder is written beside `out_dir` and renamed into place when complete.
    """
    out_dir = Path(out_dir)
    image_size = int(model.input.shape[1])
    names = tf.constant(labels)

    def outputs(pixels):
        probabilities = model(pixels, training=False)
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "class_index": index,
                "class_name": tf.gather(names, index)}

    def from_files(images):
        pixels = tf.map_fn(lambda b: data_lib.decode_image(b, image_size), images,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                                             tf.float32))
        return outputs(pixels)

    def from_pixels(pixels):
        pixels = tf.image.resize(pixels, [image_size, image_size], antialias=True)
        return outputs(pixels)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", from_files,
                         input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    archive.add_endpoint("serving_pixels", from_pixels,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                        name="pixels")])
    temp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    archive.write_out(str(temp), verbose=verbose)
    (temp / "assets").mkdir(exist_ok=True)
    (temp / "assets" / "labels.txt").write_text("\n".join(labels) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    temp.rename(out_dir)
    return out_dir
