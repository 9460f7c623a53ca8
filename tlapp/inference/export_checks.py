"""What an export costs: an exported model against the run's Keras model on the run's test
split, and the training images that calibrate a full-integer model."""
from __future__ import annotations

import concurrent.futures
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from tlapp.data import decoding
from tlapp.errors import UserInputError
from tlapp.inference.evaluate import split_images
from tlapp.inference.runs import Run
from tlapp.progress import Progress

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 200  # --calibration-images default: enough for stable activation ranges
BATCH = 32


def _pixels(path: Path, size: int) -> np.ndarray | None:
    try:
        return decoding.decode_file_bytes(path.read_bytes(), size)
    except (OSError, tf.errors.OpError):  # training skipped it too
        return None


def representative_images(run: Run, count: int = CALIBRATION_IMAGES, seed: int = 0
                          ) -> tuple[Callable[[], Iterator[list[np.ndarray]]], int]:
    """A representative dataset for the TFLite converter: `count` of the run's training
    images (a seeded random sample; all if fewer), decoded as training decodes them, one
    [1, S, S, 3] float32 batch at a time. Returns (generator function, images used).

    Raises:
        UserInputError: the run's training images are not readable.
    """
    try:
        _, paths, _ = split_images(run, "train")
    except UserInputError as e:
        raise UserInputError(f"Full-integer quantisation calibrates on the run's training "
                             f"images, which cannot be read: {e}") from None
    if not paths:
        raise UserInputError(f"{run.path} records no training images, so a full-integer model "
                             f"cannot be calibrated; use --quantize dynamic or float16.")
    chosen = sorted(np.random.default_rng(seed).choice(len(paths), min(count, len(paths)),
                                                       replace=False))

    def generate():
        for i in chosen:
            pixels = _pixels(paths[i], run.image_size)
            if pixels is not None:
                yield [pixels[None]]

    return generate, len(chosen)


def compare_on_test_split(run: Run, exported: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Runs the Keras model and `exported` (float pixels [N, S, S, 3] -> probabilities) on
    the same decoded test images of the run.

    Returns:
        {"split": "test", "images", "keras_accuracy", "accuracy", "accuracy_drop" (Keras's
        minus the export's), "agreement" (share of images with the same top class, or the
        same labels at the run's thresholds), "max_probability_difference"}; or {"skipped":
        reason} when the run's test split is empty or unreadable. A multi-label run's
        accuracy is the share of images whose predicted label set is exactly right.
    """
    try:
        _, paths, sets = split_images(run, "test")
    except UserInputError as e:
        log.warning("export: not compared with the Keras model: %s", e)
        return {"skipped": str(e)}
    if not paths:
        return {"skipped": "the run has no test split"}
    index = {name: i for i, name in enumerate(run.labels)}
    thresholds = run.thresholds
    truth = np.zeros((len(sets), len(run.labels)), bool)
    for row, names in enumerate(sets):
        truth[row, [index[n] for n in names]] = True

    def predicted(probabilities):
        if thresholds is not None:
            return probabilities >= np.asarray(thresholds)
        return np.eye(len(run.labels), dtype=bool)[probabilities.argmax(axis=1)]

    keras_right = lite_right = agree = count = 0
    difference = 0.0
    progress = Progress(len(paths), "image", "export check")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), BATCH):
            decoded = list(pool.map(lambda p: _pixels(p, run.image_size),
                                    paths[start:start + BATCH]))
            good = [i for i, pixels in enumerate(decoded) if pixels is not None]
            if good:
                pixels = np.stack([decoded[i] for i in good])
                expected = truth[start:start + BATCH][good]
                reference = np.asarray(run.model.predict_on_batch(pixels))
                probabilities = np.asarray(exported(pixels))
                ours, theirs = predicted(reference), predicted(probabilities)
                keras_right += int((ours == expected).all(axis=1).sum())
                lite_right += int((theirs == expected).all(axis=1).sum())
                agree += int((ours == theirs).all(axis=1).sum())
                difference = max(difference, float(np.abs(reference - probabilities).max()))
                count += len(good)
            progress.update(min(start + BATCH, len(paths)))
    if not count:
        return {"skipped": "no test image could be read"}
    return {"split": "test", "images": count, "keras_accuracy": keras_right / count,
            "accuracy": lite_right / count, "accuracy_drop": (keras_right - lite_right) / count,
            "agreement": agree / count, "max_probability_difference": difference}
