"""Probabilities from images: test-time augmentation views, ensembles, batched file reading.

`tlapp predict`, `tlapp evaluate` and the exported SavedModel all compute probabilities with
`average_probabilities`, so the three give the same numbers for the same files.

TTA geometry (S = a model's image size):
- none:   the file decoded and resized to S x S (as in training): 1 view.
- flip:   that image and its left-right mirror: 2 views.
- 10crop: the file decoded and resized to L x L with L = round(S * 8 / 7) (224 -> 256, as in
  the classic ImageNet 10-crop), then the five S x S crops at the four corners and the centre
  (offset (L - S) // 2), each also mirrored: 10 views. A crop covers 7/8 of each side and
  needs no second resampling.
The probabilities of the views are averaged, then those of the ensemble's members.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlapp.constants import TTA_MODES
from tlapp.data import decoding
from tlapp.errors import UserInputError
from tlapp.progress import Progress

TEN_CROP_SCALE = 8 / 7


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an ensemble: RGB pixels (0-255) at image_size in, probabilities out."""

    model: keras.Model
    image_size: int
    name: str = "model"


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise UserInputError(f"Unknown test-time augmentation. Received: tta={tta!r}. "
                             f"Use one of: {', '.join(TTA_MODES)}.")
    return tta


def decode_size(image_size: int, tta: str) -> int:
    """Side of the square a file is decoded to before the views are cut out of it."""
    return round(image_size * TEN_CROP_SCALE) if check_tta(tta) == "10crop" else image_size


def view_boxes(image_size: int, tta: str) -> list[tuple[int, int, int, bool]]:
    """The views as (top, left, size, mirrored) boxes in the decoded square.

    Order: centre, top-left, top-right, bottom-left, bottom-right, then the same mirrored.
    """
    margin = decode_size(image_size, tta) - image_size
    if tta == "10crop":
        corners = [(margin // 2, margin // 2), (0, 0), (0, margin), (margin, 0),
                   (margin, margin)]
    else:
        corners = [(0, 0)]
    mirrored = [False] if tta == "none" else [False, True]
    return [(top, left, image_size, flip) for flip in mirrored for top, left in corners]


def make_views(pixels: tf.Tensor, image_size: int, tta: str) -> tf.Tensor:
    """[N, L, L, 3] pixels decoded at `decode_size` -> [V, N, S, S, 3] views."""
    views = []
    for top, left, size, flip in view_boxes(image_size, tta):
        crop = pixels[:, top:top + size, left:left + size, :]
        views.append(tf.reverse(crop, axis=[2]) if flip else crop)
    return tf.stack(views)


def view_probabilities(model: keras.Model, pixels: tf.Tensor, image_size: int,
                       tta: str) -> tf.Tensor:
    """Probabilities [N, C] averaged over the TTA views of pixels decoded at `decode_size`."""
    views = make_views(pixels, image_size, tta)
    count = len(view_boxes(image_size, tta))
    probabilities = model(tf.reshape(views, [-1, image_size, image_size, 3]), training=False)
    probabilities = tf.reshape(probabilities, [count, -1, probabilities.shape[-1]])
    return tf.reduce_mean(probabilities, axis=0)


def decode_sizes(members: list[Member], tta: str) -> list[int]:
    """The distinct decode sizes the members need, in a fixed order."""
    return sorted({decode_size(m.image_size, tta) for m in members})


def average_probabilities(members: list[Member], decoded: tuple[tf.Tensor, ...],
                          tta: str) -> tf.Tensor:
    """Mean over members of each member's TTA probabilities.

    Args:
        decoded: the images decoded at each of `decode_sizes(members, tta)`, in that order.
    """
    by_size = dict(zip(decode_sizes(members, tta), decoded))
    return tf.reduce_mean(tf.stack([
        view_probabilities(m.model, by_size[decode_size(m.image_size, tta)], m.image_size, tta)
        for m in members]), axis=0)


def check_same_labels(named_labels: list[tuple[str, list[str]]]) -> list[str]:
    """Returns the shared labels of several runs, or says which runs differ and how.

    Raises:
        UserInputError: two runs have different labels (or the same labels in another order).
    """
    first_name, first = named_labels[0]
    for name, labels in named_labels[1:]:
        if labels != first:
            only_first = sorted(set(first) - set(labels))
            only_other = sorted(set(labels) - set(first))
            detail = (f"only in {first_name}: {', '.join(only_first) or '-'}; only in {name}: "
                      f"{', '.join(only_other) or '-'}" if only_first or only_other
                      else "same classes in a different order")
            raise UserInputError(
                f"Runs to average must have the same labels, but {first_name} and {name} "
                f"differ ({detail}). Use runs trained on the same class folders.")
    return first


def _read_and_decode(path: str, sizes: list[int]) -> tuple[list[np.ndarray] | None, str | None]:
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        return None, "a folder with no images (.jpg, .png, .gif, .bmp, .webp) in it"
    except FileNotFoundError:
        return None, ("no file matches this pattern" if glob.has_magic(path)
                      else "no such file")
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    try:
        return [decoding.decode_file_bytes(raw, size) for size in sizes], None
    except tf.errors.OpError as e:
        return None, f"cannot decode: {decoding.describe_error(e)}"


def predict_files(members: list[Member], paths: list[str], tta: str = "none",
                  batch_size: int = 32, show_progress: bool = False
                  ) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """Yields (path, probabilities, None) or (path, None, error) per file, in input order.

    Files are read and decoded in parallel threads a chunk at a time (4 batches), so a
    large folder never sits in memory decoded.
    """
    sizes = decode_sizes(members, check_tta(tta))
    signature = [tuple(tf.TensorSpec([None, s, s, 3], tf.float32) for s in sizes)]
    compute = tf.function(lambda decoded: average_probabilities(members, decoded, tta),
                          input_signature=signature)
    chunk = 4 * batch_size
    progress = Progress(len(paths) if show_progress else 0, "image", "predict")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), chunk):
            names = paths[start:start + chunk]
            decoded = list(pool.map(lambda p: _read_and_decode(p, sizes), names))
            good = [pixels for pixels, _ in decoded if pixels is not None]
            rows = []
            for first in range(0, len(good), batch_size):
                batch = good[first:first + batch_size]
                stacked = tuple(np.stack([p[i] for p in batch]) for i in range(len(sizes)))
                rows.append(compute(stacked).numpy())
            rows = iter(np.concatenate(rows) if rows else [])
            for name, (pixels, error) in zip(names, decoded):
                yield (name, None, error) if error else (name, next(rows), None)
            progress.update(start + len(names))
