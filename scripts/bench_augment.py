"""Images per second of decode + augment + resize, serial map vs parallel (AUTOTUNE) map.

Writes a synthetic folder of JPEGs, then runs the same tf.data pipeline with
num_parallel_calls=None and with AUTOTUNE (deterministic=False), each repeated, and prints
medians and their ratio. Decode-only (no augmentation) is measured too, as the floor.

    python scripts/bench_augment.py [--images 256] [--size 224] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from PIL import Image

from tlapp.augment import ops as augment
from tlapp.data import datasets
from tlapp.data import decoding

FULL_SPEC = ("flip,rcrop,rotate=15,shear=0.1,zoom=0.1,translate=0.1,warp=0.05,color=20,"
             "pca=0.1,brightness=0.1,contrast=0.2")


def write_images(folder: Path, count: int, rng: np.random.Generator) -> list[str]:
    """Smooth random colour fields (JPEG, 320x256), so decoding costs what photos cost."""
    paths = []
    for i in range(count):
        coarse = rng.uniform(0, 255, (8, 10, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((320, 256), Image.BICUBIC))
        noisy = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(str(path))
    return paths


def images_per_second(paths: list[str], spec: str, size: int, parallel: bool,
                      pca: augment.ColorPCA) -> float:
    parsed = augment.parse_spec(spec)

    def load(index, path):
        image = decoding.decode_image(tf.io.read_file(path), size)
        if parsed:
            image = augment.augment_image(image, parsed, augment.image_seed(0, index), pca)
        return image

    dataset = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
        load, num_parallel_calls=tf.data.AUTOTUNE if parallel else None,
        deterministic=False if parallel else None).batch(32).prefetch(tf.data.AUTOTUNE)
    for _ in dataset.take(1):  # trace and warm up outside the timing
        pass
    start = time.perf_counter()
    count = sum(int(batch.shape[0]) for batch in dataset)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spec", default=FULL_SPEC)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), args.images, np.random.default_rng(0))
        pca = augment.compute_pca(datasets.image_dataset(paths[:64], args.size, 32))
        cases = [("decode+resize, parallel", "none", True),
                 ("decode+augment+resize, serial", args.spec, False),
                 ("decode+augment+resize, parallel", args.spec, True)]
        rates = {name: [] for name, _, _ in cases}
        for _ in range(args.repeats):  # interleaved, so load changes hit every case alike
            for name, spec, parallel in cases:
                rates[name].append(images_per_second(paths, spec, args.size, parallel, pca))
    print(f"{args.images} JPEGs 320x256 -> {args.size}px, spec {args.spec!r}, "
          f"{os.cpu_count()} CPUs, median of {args.repeats}")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"  {name:34s} {medians[name]:8.1f} images/s  "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    serial, parallel = (medians[f"decode+augment+resize, {kind}"]
                        for kind in ("serial", "parallel"))
    print(f"parallel / serial: {parallel / serial:.2f}x; augmentation cost in the parallel "
          f"pipeline: {medians['decode+resize, parallel'] / parallel:.2f}x the decode-only time")


if __name__ == "__main__":
    main()
