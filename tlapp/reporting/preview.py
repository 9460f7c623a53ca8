"""`tlapp augment-preview`: a PNG grid of augmented variants of a few training images."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from tlapp.augment.ops import AugmentSpec, augment_image, compute_pca, image_seed, parse_spec
from tlapp.data.datasets import image_dataset
from tlapp.data.decoding import decode_image
from tlapp.data.scan import scan_folder
from tlapp.errors import UserInputError
from tlapp.files import write_atomic

log = logging.getLogger(__name__)


def preview(data: str | os.PathLike, spec: str | AugmentSpec,
            out: str | os.PathLike = "augment_preview.png", images: int = 4, variants: int = 6,
            image_size: int = 128, seed: int = 0) -> Path:
    """Writes a PNG grid: one row per image, the original then `variants` augmentations.

    Images are taken from the train split, alternating classes. The grid is
    (variants + 1) * image_size + 2 * variants pixels wide and
    rows * image_size + 2 * (rows - 1) high (2-pixel white gaps).

    Returns:
        The path of the PNG.
    """
    for name, value, low in (("images", images, 1), ("variants", variants, 1),
                             ("image_size", image_size, 8)):
        if not isinstance(value, int) or value < low:
            raise UserInputError(f"augment-preview: '{name}' must be a whole number >= {low}. "
                                 f"Received: {name}={value!r}")
    spec = parse_spec(spec)
    scanned = scan_folder(data)
    pool = scanned.split("train") or scanned.samples
    by_class = [[s for s in pool if s.label == label] for label in range(len(scanned.classes))]
    chosen = _interleave(by_class)[:images]
    pca = None
    if spec.get("pca"):
        paths = [scanned.root / s.path for s in pool[:256]]
        pca = compute_pca(image_dataset(paths, image_size, batch_size=32))
        log.info("augment-preview: colour PCA over %d training images", len(paths))
    rows = []
    for index, sample in enumerate(chosen):
        original = decode_image(tf.io.read_file(str(scanned.root / sample.path)), image_size)
        rows.append([original] + [augment_image(original, spec, image_seed(seed, index, view),
                                                pca) for view in range(variants)])
    out = Path(out).expanduser()
    write_image_grid([[np.asarray(cell) for cell in row] for row in rows], out)
    log.info("augment-preview: %d images x %d variants of '%s' written to %s", len(rows),
             variants, spec or "none", out)
    return out


def write_image_grid(rows: list[list[np.ndarray]], path: str | Path, gap: int = 2) -> None:
    """Equal-size RGB images (0-255) as one PNG grid, `gap` white pixels between cells,
    written atomically."""
    from PIL import Image

    height, width = rows[0][0].shape[:2]
    columns = max(map(len, rows))
    grid = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255,
                   np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = i * (height + gap), j * (width + gap)
            grid[top:top + height, left:left + width] = np.clip(np.rint(image), 0, 255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temp: Image.fromarray(grid).save(temp, format="PNG"))


def _interleave(groups: list[list]) -> list:
    """Round robin over groups: a0, b0, c0, a1, b1, ..."""
    longest = max(map(len, groups), default=0)
    return [group[i] for i in range(longest) for group in groups if i < len(group)]
