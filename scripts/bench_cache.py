"""Feature-cache speed: streaming reads against head training, and incremental extraction.

1. Read throughput (rows/s) of the streaming loader (FeatureCache.loader through
   datasets.shuffled_batches: a fresh shuffle each epoch, rows read by pread) for a pooled
   entry (resnet50's 2048 float32 per image) and a spatial one (the activations at
   --spatial-cut, float16), against the rate at which head training consumes rows (the
   training model's train_on_batch on in-memory batches of the same shape). The entries are
   filled by a cheap stand-in stem with the real output shape: read speed depends on the
   bytes per row and the number of rows, not on their values. Rows are read from the page
   cache when the entry fits in RAM (it does here: the entry was just written).
2. Incremental extraction: the time to extract a folder whose first 90% is already cached
   (the 10% new images only) against extracting all of it, resnet50 weights=None.

    python scripts/bench_cache.py [--images 512] [--size 224] [--rows 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlapp

import keras
import numpy as np
from PIL import Image

from bench_pipeline import cache_key, write_folder
from tlapp.features import cache as cache_lib
from tlapp.features.loader import FeatureLoader
from tlapp.features.extract import extract_features
from tlapp.training import head
from tlapp.backbones import cuts
from tlapp.data import datasets
from tlapp.backbones import registry
from tlapp.data import scan


def write_noise_images(folder: Path, count: int, seed: int = 0) -> dict:
    """`count` distinct 16 px JPEGs; returns {content hash: path} as a scan would."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(path, quality=90)
        files[cache_lib.file_sha256(path)] = path
    return files


def stand_in_stem(shape: tuple) -> keras.Model:
    """16 px pixels -> activations of `shape`, for a few FLOPs per row."""
    pixels = keras.Input((16, 16, 3))
    if len(shape) == 1:
        x = keras.layers.Dense(shape[0])(keras.layers.GlobalAveragePooling2D()(pixels))
    else:
        x = keras.layers.Conv2D(shape[-1], 1)(keras.layers.Resizing(*shape[:2])(pixels))
    return keras.Model(pixels, x)


def read_rate(feature_cache, digests, batch_size: int, epochs: int, seed: int) -> float:
    """Rows/s streamed by shuffled_batches over the entry's loader, `epochs` epochs; the
    clock starts when the first batch arrives (after tracing)."""
    labels = np.zeros(len(digests), np.int32)
    with FeatureLoader(feature_cache, digests, labels, 2) as loader:
        batches = iter(datasets.shuffled_batches(len(digests), batch_size, seed, 0, epochs,
                                                 loader))
        next(batches)
        tick = time.perf_counter()
        rows = sum(int(x.shape[0]) for x, _ in batches)
        seconds = time.perf_counter() - tick
    return rows / seconds


def consume_rate(model: keras.Model, shape: tuple, batch_size: int, steps: int) -> float:
    """Rows/s the training model consumes: train_on_batch on in-memory batches."""
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(batch_size,) + shape).astype("float32")
    y = keras.utils.to_categorical(np.arange(batch_size) % 2, 2)
    model.train_on_batch(x, y)  # trace
    tick = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch_size / (time.perf_counter() - tick)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="folder size, incremental run")
    parser.add_argument("--size", type=int, default=224, help="image size in px")
    parser.add_argument("--rows", type=int, default=2048, help="rows of the pooled entry")
    parser.add_argument("--spatial-rows", type=int, default=512)
    parser.add_argument("--spatial-cut", default="conv4_block6_out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--read-epochs", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=5, help="timed steps per rate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the raw numbers and ratios to this file")
    args = parser.parse_args(argv)
    bs, raw = args.batch_size, {}

    def record(name, value):
        raw.setdefault(name, []).append(value)

    spec = registry.get_spec("resnet50")
    with tempfile.TemporaryDirectory(prefix="tlapp-bench-cache-") as work:
        work = Path(work)
        entries = {}
        for kind, cut, rows in (("pooled", None, args.rows),
                                ("spatial", args.spatial_cut, args.spatial_rows)):
            base = registry.build_backbone(spec, "none", args.size)
            cut = cuts.resolve_cut(spec, base, cut, 0)
            models = head.build_models(spec, base, cut, 2, 0.2, args.size)
            shape = tuple(models.stem.output.shape[1:])
            files = write_noise_images(work / f"noise-{kind}", rows)
            stem = stand_in_stem(shape)
            key = cache_lib.cache_key(f"stand-in-{kind}", stem, cut, models.pooled, 16, "none")
            feature_cache = cache_lib.FeatureCache(work / "cache", key)
            extract_features(feature_cache, stem, files, 16, bs)
            entries[kind] = (feature_cache, list(files), models.train, shape)

        root = write_folder(work / "data", args.images, args.size, 4)
        scanned = scan.scan_folder(root, 0.0, 0.0)
        files = {s.sha256: root / s.path for s in scanned.samples}
        old = dict(list(files.items())[:len(files) - max(1, len(files) // 10)])
        base = registry.build_backbone(spec, "none", args.size)
        cut = cuts.resolve_cut(spec, base, None, 0)
        models = head.build_models(spec, base, cut, 4, 0.2, args.size)
        key = cache_key(spec, models, cut, args.size)
        extract_features(cache_lib.FeatureCache(work / "warm", key),
            models.stem, dict(list(files.items())[:bs]), args.size, bs)

        for r in range(args.repeats):  # interleaved, so load changes hit every case alike
            for kind, (feature_cache, digests, model, shape) in entries.items():
                record(f"{kind}_read_rows_per_s",
                       read_rate(feature_cache, digests, bs, args.read_epochs, r))
                record(f"{kind}_train_rows_per_s",
                       consume_rate(model, shape, bs, args.train_steps))
            incremental = cache_lib.FeatureCache(work / f"incremental-{r}", key)
            extract_features(incremental, models.stem, old, args.size, bs)
            tick = time.perf_counter()
            stats = extract_features(incremental, models.stem, files, args.size, bs)
            record("incremental_extract_s", time.perf_counter() - tick)
            assert stats["extracted"] == len(files) - len(old), stats
            full = cache_lib.FeatureCache(work / f"full-{r}", key)
            tick = time.perf_counter()
            extract_features(full, models.stem, files, args.size, bs)
            record("full_extract_s", time.perf_counter() - tick)
            tick = time.perf_counter()
            scan.scan_folder(root, 0.0, 0.0)
            record("scan_s", time.perf_counter() - tick)

    m = {name: statistics.median(values) for name, values in raw.items()}
    ratios = {f"{kind} read / head-training consumption":
              m[f"{kind}_read_rows_per_s"] / m[f"{kind}_train_rows_per_s"] for kind in entries}
    ratios["full extraction / incremental (+10% images)"] = \
        m["full_extract_s"] / m["incremental_extract_s"]
    ratios["extraction time saved by the incremental run"] = \
        1 - m["incremental_extract_s"] / m["full_extract_s"]
    shapes = ", ".join(f"{kind} {entries[kind][3]} {entries[kind][0].dtype.name}"
                       for kind in entries)
    print(f"rows: {shapes}; pooled {args.rows} rows, spatial {args.spatial_rows} rows, batch "
          f"{bs}; incremental: {args.images} JPEGs {args.size}px, resnet50 weights=None; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, median of {args.repeats}")
    for name, values in raw.items():
        print(f"  {name:28s} median {m[name]:10.3f}   runs: "
              + ", ".join(f"{v:.3f}" for v in values))
    for name, ratio in ratios.items():
        print(f"{name:52s} {ratio:8.2f}")
    result = {"args": vars(args), "raw": raw, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
