"""TFDS source: an image-classification dataset from TensorFlow Datasets, written once as
PNG files in train/val/test class folders, so it is scanned, split and cached like any folder."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import tensorflow as tf

from tlapp.constants import SPLITS
from tlapp.errors import UserInputError

log = logging.getLogger(__name__)


def materialize_tfds(name: str, root: Path) -> Path:
    """Writes a TFDS image-classification dataset once as PNG files in train/val/test folders.

    The folder is then scanned, split and cached like any user folder, so every other step
    has one code path. Written to a temporary folder and renamed when complete.
    """
    import tensorflow_datasets as tfds  # imported here: slow, and only needed for tfds:

    folder = root / name.replace("/", "_").replace(":", "_")
    if folder.is_dir():
        return folder
    try:
        builder = tfds.builder(name)
        builder.download_and_prepare()
    except Exception as e:  # TFDS raises many types for an unknown name or no network
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(
            f"Could not load TFDS dataset '{name}': {reason}. Check the name "
            f"(tfds.list_builders()) and the network; offline, run it once where TFDS can "
            f"download and copy its data folder (~/tensorflow_datasets), or use a local "
            f"image folder.") from None
    image_key, label_key = supervised_keys(builder.info, name)
    classes = builder.info.features[label_key].names
    width = len(str(len(classes) - 1))
    class_names = [f"{i:0{width}d}_{c}".replace("/", "_") for i, c in enumerate(classes)]
    temp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")  # one per process
    shutil.rmtree(temp, ignore_errors=True)
    written = 0
    for split in list(builder.info.splits) or ["train", "validation", "test"]:
        target = {"validation": "val"}.get(split, split)
        if target not in SPLITS:
            continue
        try:
            dataset = builder.as_dataset(split=split)
        except (ValueError, KeyError):  # the dataset has no such split
            continue
        for name_ in class_names:
            (temp / target / name_).mkdir(parents=True, exist_ok=True)
        log.info("tfds: writing %s %s as PNG files under %s", name, split, folder)
        for i, example in enumerate(dataset):
            png = tf.io.encode_png(example[image_key]).numpy()
            label = int(example[label_key])
            (temp / target / class_names[label] / f"{i:07d}.png").write_bytes(png)
            written += 1
    if not (temp / "train").is_dir() or not written:
        raise UserInputError(f"TFDS dataset '{name}' has no 'train' split with images.")
    try:
        temp.rename(folder)
    except OSError:  # another process wrote the same dataset meanwhile: keep the first
        if not folder.is_dir():
            raise
        shutil.rmtree(temp, ignore_errors=True)
    return folder


def supervised_keys(info, name: str) -> tuple[str, str]:
    """The (image, class label) feature names: the dataset's own `supervised_keys` when they
    name an Image and a ClassLabel feature, else its only such features.

    Raises:
        UserInputError: the dataset is not image classification.
    """
    import tensorflow_datasets as tfds

    features = info.features
    kinds = {key: type(feature) for key, feature in features.items()}
    images = [k for k, kind in kinds.items() if issubclass(kind, tfds.features.Image)]
    labels = [k for k, kind in kinds.items() if issubclass(kind, tfds.features.ClassLabel)]
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and keys[0] in images and keys[1] in labels:
        return keys[0], keys[1]
    if len(images) == 1 and len(labels) == 1:
        return images[0], labels[0]
    if "image" in images and "label" in labels:
        return "image", "label"
    raise UserInputError(
        f"TFDS dataset '{name}' is not image classification as tlapp reads it: it needs one "
        f"image feature and one class-label feature. Received: features "
        f"{ {k: kind.__name__ for k, kind in kinds.items()} }.")
