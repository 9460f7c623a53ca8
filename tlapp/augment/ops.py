"""Augmentation ops as pure TensorFlow functions, the parallel tf.data map, the colour PCA
and the preview grid. The spec language (`parse_spec`, `OPS`) is in tlapp.augment_spec.

Every op runs inside the tf.data graph (no py_function, no Python per image). Randomness is
stateless: each image's seed is folded from (seed, view, index), and each op folds in a
number derived from its name, so the same seed gives the same images in any thread order,
and adding an op to a spec does not change what the other ops draw.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tlapp.augment.spec import OPS, AugmentSpec, parse_spec
from tlapp.data.datasets import image_dataset
from tlapp.errors import UserInputError
from tlapp.files import write_json


@dataclasses.dataclass(frozen=True)
class ColorPCA:
    """Principal axes of a dataset's RGB pixel values (0-255 scale), largest first.

    `eigvecs[:, i]` (a column) is the axis of eigenvalue `eigvals[i]`, a variance.
    """

    eigvals: tuple[float, float, float]
    eigvecs: tuple[tuple[float, float, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"eigvals": list(self.eigvals), "eigvecs": [list(row) for row in self.eigvecs]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ColorPCA":
        return cls(tuple(map(float, values["eigvals"])),
                   tuple(tuple(map(float, row)) for row in values["eigvecs"]))


def compute_pca(images: tf.data.Dataset | np.ndarray) -> ColorPCA:
    """The 3x3 covariance of RGB pixel values over `images` and its eigen decomposition.

    Args:
        images: an array [..., 3] of pixels, or a tf.data dataset of images or of
            (image, ...) tuples, batched or not. Accumulated in float64, one batch at a time.
    """
    batches = images.as_numpy_iterator() if isinstance(images, tf.data.Dataset) else [images]
    count, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    for batch in batches:
        batch = batch[0] if isinstance(batch, tuple) else batch
        pixels = np.asarray(batch, np.float64).reshape(-1, 3)
        count += len(pixels)
        total += pixels.sum(axis=0)
        outer += pixels.T @ pixels
    if count < 2:
        raise UserInputError(f"compute_pca needs at least 2 pixels. Received: {count} pixels")
    mean = total / count
    covariance = (outer - count * np.outer(mean, mean)) / (count - 1)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.clip(eigvals[order], 0, None), eigvecs[:, order]
    eigvecs *= np.where(eigvecs[np.abs(eigvecs).argmax(axis=0), range(3)] < 0, -1, 1)
    return ColorPCA(tuple(eigvals.tolist()), tuple(map(tuple, eigvecs.tolist())))


def cached_pca(spec: str | None, paths: list, digests: list[str], image_size: int,
               cache_dir: Path) -> ColorPCA | None:
    """The training images' colour PCA when `spec` uses `pca` (else None), computed once per
    set of training images and size, and kept as JSON in cache_dir/pca/."""
    if not spec or not parse_spec(spec).get("pca"):
        return None
    digest = hashlib.sha256(("".join(sorted(digests)) + str(image_size)).encode()
                            ).hexdigest()[:24]
    path = Path(cache_dir) / "pca" / f"{digest}.json"
    if path.is_file():
        return ColorPCA.from_dict(json.loads(path.read_text()))
    pca = compute_pca(image_dataset(paths, image_size, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, pca.to_dict())
    return pca


def image_seed(seed: int | tf.Tensor, index: int | tf.Tensor, view: int = 0) -> tf.Tensor:
    """The stateless seed of image `index` in augmented view `view` of a run seeded `seed`."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(view, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def augment_image(image: tf.Tensor, spec: str | AugmentSpec, seed: int | tf.Tensor,
                  pca: ColorPCA | None = None) -> tf.Tensor:
    """Augments one float32 RGB image [H, W, 3] in [0, 255]; shape, dtype and range are kept.

    Args:
        seed: an int, or a stateless seed of shape [2] (see `image_seed`).
        pca: the dataset's colour PCA (`compute_pca`), needed when the spec has `pca`.
    """
    spec = parse_spec(spec)
    _check_pca(spec, pca)
    image = tf.convert_to_tensor(image, tf.float32)
    shape = image.shape
    seed = tf.cast(seed, tf.int64)
    seed = tf.stack([seed, tf.constant(0, tf.int64)]) if seed.shape.rank == 0 else seed
    keys = {name: tf.random.experimental.stateless_fold_in(seed, zlib.crc32(name.encode()))
            for name in OPS}

    def uniform(name, bound, size=()):
        return tf.random.stateless_uniform(size, keys[name], -bound, bound)

    if spec.get("crop"):
        fraction = spec.get("crop")[0]
        image = _crop(image, tf.constant(fraction), tf.constant(fraction), keys["crop"])
    if spec.get("rcrop"):
        image = _random_resized_crop(image, spec.get("rcrop"), keys["rcrop"])
    if any(spec.get(name) for name in ("rotate", "shear", "zoom", "translate")):
        image = _transform(image, angle=uniform("rotate", math.radians(_value(spec, "rotate"))),
                           shear=uniform("shear", _value(spec, "shear")),
                           zoom=1 + uniform("zoom", _value(spec, "zoom")),
                           shift=uniform("translate", _value(spec, "translate"), [2]))
    if spec.get("warp"):
        image = _warp(image, *spec.get("warp"), keys["warp"])
    for name, axis in (("flip", 1), ("vflip", 0)):
        if spec.get(name):
            mirror = tf.random.stateless_uniform([], keys[name]) < spec.get(name)[0]
            image = tf.where(mirror, tf.reverse(image, [axis]), image)
    if spec.get("color"):
        image += uniform("color", _value(spec, "color"), [3])
    if spec.get("pca"):
        alpha = tf.random.stateless_normal([3], keys["pca"]) * _value(spec, "pca")
        image += pca_shift(pca, alpha)
    if spec.get("brightness"):
        image += uniform("brightness", 255 * _value(spec, "brightness"))
    if spec.get("contrast"):
        mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
        image = (image - mean) * (1 + uniform("contrast", _value(spec, "contrast"))) + mean
    image = tf.clip_by_value(image, 0.0, 255.0)
    image.set_shape(shape)
    return image


def pca_shift(pca: ColorPCA, alpha: tf.Tensor) -> tf.Tensor:
    """`eigvecs @ (alpha * sqrt(eigvals))`: the RGB offset for coefficients `alpha` [3].

    Scaled by the standard deviation along each axis (the square root of the eigenvalue), as
    the widely used fb.resnet.torch "Lighting" does, so the shift's covariance is
    sigma^2 times the pixel covariance and `sigma` means the same on any pixel scale.
    """
    vectors = tf.constant(pca.eigvecs, tf.float32)
    scales = tf.sqrt(tf.constant(pca.eigvals, tf.float32))
    return tf.linalg.matvec(vectors, alpha * scales)


def augment_dataset(dataset: tf.data.Dataset, spec: str | AugmentSpec, seed: int,
                    pca: ColorPCA | None = None, view: int = 0) -> tf.data.Dataset:
    """Augments every image of an unbatched dataset of images or (image, ...) tuples.

    Maps on parallel threads (AUTOTUNE, deterministic=False): the order may change between
    runs, but each image's seed comes from its position in `dataset`, so each image gets the
    same augmentation for the same (seed, view). Use a new `view` (e.g. the epoch) for new draws.
    """
    spec = parse_spec(spec)
    if not spec:
        return dataset
    _check_pca(spec, pca)
    element = dataset.element_spec
    image_spec = element[0] if isinstance(element, tuple) else element
    if image_spec.shape.rank != 3:
        raise UserInputError(f"augment_dataset needs single images [H, W, 3] (augment before "
                             f".batch()). Received: element shape {image_spec.shape}")

    def apply(index, element):
        key = image_seed(seed, index, view)
        if isinstance(element, tuple):
            return (augment_image(element[0], spec, key, pca),) + tuple(element[1:])
        return augment_image(element, spec, key, pca)

    return dataset.enumerate().map(apply, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=False)


def _value(spec: AugmentSpec, name: str) -> float:
    return (spec.get(name) or (0.0,))[0]


def _check_pca(spec: AugmentSpec, pca: ColorPCA | None) -> None:
    if spec.get("pca") and pca is None:
        raise UserInputError("augment: 'pca' needs the dataset's colour PCA: compute it with "
                             "tlapp.augment.ops.compute_pca(images) and pass pca=. Received: "
                             "pca=None")


def _size(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.shape(image)
    return shape[0], shape[1]


def _crop(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Crops a box of `height` x `width` (fractions of the sides) at a random place and
    resizes it back to the input size (bilinear)."""
    corner = tf.random.stateless_uniform([2], seed) * tf.stack([1 - height, 1 - width])
    box = tf.concat([corner, corner + tf.stack([height, width])], axis=0)
    return tf.image.crop_and_resize(image[None], box[None], [0], tf.stack(_size(image)))[0]


def _random_resized_crop(image: tf.Tensor, ranges: tuple[float, ...], seed) -> tf.Tensor:
    min_scale, max_scale, min_aspect, max_aspect = ranges
    scale_key, aspect_key, crop_key = (tf.random.experimental.stateless_fold_in(seed, i)
                                       for i in range(3))
    scale = tf.random.stateless_uniform([], scale_key, min_scale, max_scale)
    aspect = tf.exp(tf.random.stateless_uniform([], aspect_key, math.log(min_aspect),
                                                math.log(max_aspect)))
    height, width = (tf.cast(side, tf.float32) for side in _size(image))
    # Area fraction `scale` and pixel aspect `aspect` (width / height); sides capped at 1.
    box_width = tf.minimum(tf.sqrt(scale * aspect * height / width), 1.0)
    box_height = tf.minimum(tf.sqrt(scale / aspect * width / height), 1.0)
    return _crop(image, box_height, box_width, crop_key)


def _transform(image: tf.Tensor, angle, shear, zoom, shift) -> tf.Tensor:
    """Rotation, shear, zoom and translation about the centre as one projective transform,
    sampled bilinearly with reflection at the borders."""
    height, width = (tf.cast(side, tf.float32) for side in _size(image))
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Maps an output pixel to the input point it samples: rotation @ shear / zoom.
    a00, a01 = cos / zoom, (cos * shear - sin) / zoom
    a10, a11 = sin / zoom, (sin * shear + cos) / zoom
    cx, cy = (width - 1) / 2, (height - 1) / 2
    tx, ty = shift[0] * width, shift[1] * height
    transform = tf.stack([a00, a01, cx - a00 * cx - a01 * cy + tx,
                          a10, a11, cy - a10 * cx - a11 * cy + ty, 0.0, 0.0])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf.stack(_size(image)),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")[0]


def _warp(image: tf.Tensor, amplitude: float, grid: float, seed: tf.Tensor) -> tf.Tensor:
    """Local warping: a coarse grid of random displacements, upsampled smoothly to a field
    of the image's size, applied with bilinear sampling (edges clamped)."""
    height, width = _size(image)
    size = tf.cast(tf.stack([height, width]), tf.float32)
    coarse = tf.random.stateless_uniform([int(grid), int(grid), 2], seed, -amplitude, amplitude)
    field = tf.image.resize(coarse[None] * size, [height, width], method="bicubic")[0]
    rows, columns = tf.meshgrid(tf.range(height, dtype=tf.float32),
                                tf.range(width, dtype=tf.float32), indexing="ij")
    y = tf.clip_by_value(rows + field[..., 0], 0, size[0] - 1)
    x = tf.clip_by_value(columns + field[..., 1], 0, size[1] - 1)
    y0, x0 = tf.floor(y), tf.floor(x)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1, x1 = tf.minimum(y0 + 1, height - 1), tf.minimum(x0 + 1, width - 1)
    flat = tf.reshape(image, [-1, tf.shape(image)[2]])

    def pixel(yy, xx):
        return tf.gather(flat, yy * width + xx)

    top = pixel(y0, x0) * (1 - wx) + pixel(y0, x1) * wx
    bottom = pixel(y1, x0) * (1 - wx) + pixel(y1, x1) * wx
    return top * (1 - wy) + bottom * wy
