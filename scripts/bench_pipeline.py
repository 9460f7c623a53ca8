"""tlapp against what users would do instead: extraction, head training, live mode, spatial cut.

Writes a synthetic folder of JPEGs (a few classes) and, with resnet50 weights=None, measures
in this one process, each measurement repeated (interleaved, so load changes hit every case
alike) with medians reported as ratios:

  (a) extraction (FeatureCache.extract: read, decode, resize, preprocess, stem, write) in
      images/s against the compute-only limit: the same stem on the same images, already
      decoded in memory (predict_on_batch on in-memory batches, and Model.predict);
  (b) head training for E epochs: tlapp (cache key, extract once, train on the cache) against
      the Keras transfer-learning guide (image_dataset_from_directory, cached and prefetched,
      the frozen base inside model.fit every epoch), same images, head and batch size;
  (c) a second experiment with other head settings reusing tlapp's cache, against (b)'s baseline;
  (d) live mode (fit.fit_stage on images): epoch time with the full augmentation spec
      against none;
  (e) the top block(s) above a spatial cut (conv5_block1_out) trained on cached activations
      against running the whole frozen stem every step.

    python scripts/bench_pipeline.py [--images 512] [--size 224] [--epochs 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlapp

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from tlapp.augment import ops as augment
from tlapp.features import cache as cache_lib
from tlapp.features.loader import FeatureLoader
from tlapp.features.extract import extract_features
from tlapp.training import head
from tlapp.backbones import spec as backbone_spec
from tlapp.training import checkpoint
from tlapp.backbones import cuts
from tlapp.data import datasets
from tlapp.training import fit
from tlapp.backbones import registry
from tlapp.data import scan

FULL_SPEC = ("flip,rcrop,rotate=15,shear=0.1,zoom=0.1,translate=0.1,warp=0.05,color=20,"
             "pca=0.1,brightness=0.1,contrast=0.2")  # the same spec as bench_augment.py


def write_folder(root: Path, count: int, size: int, classes: int, seed: int = 0) -> Path:
    """`count` JPEGs of `size` px in `classes` folders: smooth colour fields around a hue per
    class plus noise, so decoding costs what photos cost and the classes are separable."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % classes
        hue = label / classes + rng.uniform(-0.05, 0.05)
        base = np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.7, 0.8)) * 255
        coarse = np.clip(base + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        noisy = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        path = root / f"class_{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
    return root


class TimedCheckpoint(checkpoint.Checkpoint):
    """The pipeline's per-epoch checkpoint that also records each epoch's time (without its
    own save) and the time spent saving."""

    def __init__(self, folder: Path, full_model: keras.Model):
        super().__init__(folder, full_model)
        self.epoch_seconds: list[float] = []
        self.save_seconds = 0.0
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._start)
        tick = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        self.save_seconds += time.perf_counter() - tick


def median(values: list[float]) -> float:
    return statistics.median(values)


def cache_key(spec, models: head.Models, cut: str, size: int) -> dict:
    """The key pipeline.run builds for this stem (weights hashed: tlapp pays that each run)."""
    return cache_lib.cache_key(spec.name, models.stem, cut, models.pooled, size, spec.preprocess)


def train_on_cache(models, feature_cache, digests, labels, classes, settings, folder):
    """What pipeline.run does after extraction: stream the rows, standardise the head,
    fit_stage with the per-epoch checkpoint. Returns the checkpoint (with its timings)."""
    loader = FeatureLoader(feature_cache, digests, labels, classes)
    batches = datasets.ordered_batches(loader, len(labels), settings.batch_size)
    head.adapt_head(models, (x if models.pooled else models.pooled_features.predict_on_batch(x)
                             for x, _ in batches))
    checkpoint = TimedCheckpoint(folder, models.full)
    with loader:
        fit.fit_stage("head", models.train, settings, len(labels), loader, None, checkpoint)
    return checkpoint


def train_live(model, source, n, settings, folder):
    """fit_stage on images (the stem runs every step); returns the checkpoint's timings."""
    checkpoint = TimedCheckpoint(folder, model)
    fit.fit_stage("live", model, settings, n, source, None, checkpoint, parallel=True)
    return checkpoint


def guide_model(spec, size: int, classes: int, seed: int) -> keras.Model:
    """The Keras transfer-learning guide's model: frozen base called with training=False,
    pooling, dropout 0.2, a dense softmax; the backbone's preprocessing in front."""
    base = registry.build_backbone(spec, "none", size, seed)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(backbone_spec.Preprocess(spec.preprocess)(inputs), training=False)
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def guide_dataset(root: Path, size: int, batch_size: int, seed: int) -> tf.data.Dataset:
    dataset = keras.utils.image_dataset_from_directory(
        root, label_mode="categorical", image_size=(size, size), batch_size=batch_size,
        shuffle=True, seed=seed)
    return dataset.cache().prefetch(tf.data.AUTOTUNE)  # as the guide does


def run(args: argparse.Namespace, work: Path) -> dict:
    root = write_folder(work / "data", args.images, args.size, args.classes)
    scanned = scan.scan_folder(root, 0.0, 0.0)
    files = {s.sha256: root / s.path for s in scanned.samples}
    digests = [s.sha256 for s in scanned.samples]
    paths = [root / s.path for s in scanned.samples]
    labels = np.array([s.label for s in scanned.samples], np.int32)
    n, classes, bs, size = len(labels), len(scanned.classes), args.batch_size, args.size
    spec = registry.get_spec("resnet50")
    base = registry.build_backbone(spec, "none", size, seed=0)
    cut = cuts.resolve_cut(spec, base, None, 0)
    models = head.build_models(spec, base, cut, classes, 0.2, size)
    settings = fit.Settings(epochs=args.epochs, batch_size=bs, lr=1e-3, seed=0)
    second = fit.Settings(epochs=args.epochs, batch_size=bs, lr=3e-4, seed=1,
                               optimizer="sgd", label_smoothing=0.1)
    parts, raw = args.parts, {}

    def record(name, value):
        raw.setdefault(name, []).append(value)

    def timed(fn):
        tick = time.perf_counter()
        result = fn()
        return time.perf_counter() - tick, result

    # warm-ups (tracing) outside every timing
    pixels = list(datasets.image_dataset(paths, size, bs))
    all_pixels = np.concatenate(pixels)
    models.stem.predict_on_batch(pixels[0])
    models.stem.predict(pixels[0], batch_size=bs, verbose=0)
    key = cache_key(spec, models, cut, size)
    warm = dict(list(files.items())[:bs])
    extract_features(cache_lib.FeatureCache(work / "cache-warm", key),
        models.stem, warm, size, bs)
    if "b" in parts or "c" in parts:
        guide = guide_model(spec, size, classes, seed=0)
        guide.fit(guide_dataset(root, size, bs, 0).take(1), epochs=1, verbose=0)
    if "d" in parts:
        pca = augment.compute_pca(datasets.image_dataset(paths[:64], size, bs))
    if "e" in parts:
        base_e = registry.build_backbone(spec, "none", size, seed=0)
        models_e = head.build_models(spec, base_e, args.spatial_cut, classes, 0.2, size)
        key_e = cache_key(spec, models_e, args.spatial_cut, size)
        extract_features(cache_lib.FeatureCache(work / "cache-warm-e", key_e),
            models_e.stem, warm, size, bs)
    live_settings = fit.Settings(epochs=args.live_epochs, batch_size=bs, lr=1e-3, seed=0)

    for r in range(args.repeats):
        if "a" in parts:
            seconds, _ = timed(lambda: [models.stem.predict_on_batch(b) for b in pixels])
            record("a_compute_batches_ips", n / seconds)
            seconds, _ = timed(lambda: models.stem.predict(all_pixels, batch_size=bs, verbose=0))
            record("a_compute_predict_ips", n / seconds)
            seconds, _ = timed(lambda: sum(1 for _ in datasets.image_dataset(paths, size, bs)))
            record("a_decode_only_ips", n / seconds)
        if parts & set("abc"):
            cache_dir = work / f"cache-{r}"
            tick = time.perf_counter()
            feature_cache = cache_lib.FeatureCache(cache_dir, cache_key(spec, models, cut, size))
            key_s = time.perf_counter() - tick
            extract_s, _ = timed(lambda: extract_features(feature_cache, models.stem, files, size, bs))
            record("a_extract_ips", n / extract_s)
            if parts & set("bc"):
                train_s, checkpoint = timed(lambda: train_on_cache(
                    models, feature_cache, digests, labels, classes, settings,
                    work / f"ckpt-b{r}"))
                record("b_tlapp_s", key_s + extract_s + train_s)
                record("b_tlapp_train_s", train_s)
                record("b_tlapp_checkpoint_s", checkpoint.save_seconds)
                record("b_key_s", key_s)
        if parts & set("bc"):
            seconds, _ = timed(lambda: guide.fit(guide_dataset(root, size, bs, r),
                                                 epochs=args.epochs, verbose=0))
            record("b_guide_s", seconds)
        if "c" in parts:
            def second_experiment():
                reused = cache_lib.FeatureCache(cache_dir, cache_key(spec, models, cut, size))
                stats = extract_features(reused, models.stem, files, size, bs)
                assert stats["extracted"] == 0, stats
                return train_on_cache(models, reused, digests, labels, classes, second,
                                      work / f"ckpt-c{r}")
            seconds, checkpoint = timed(second_experiment)
            record("c_tlapp_s", seconds)
            record("c_tlapp_checkpoint_s", checkpoint.save_seconds)
        if "d" in parts:
            for name, spec_text in (("none", None), ("full", FULL_SPEC)):
                source = datasets.image_loader(paths, labels, size, classes, spec_text, r, pca)
                checkpoint = train_live(models.full, source, n, live_settings,
                                        work / f"ckpt-d-{name}{r}")
                record(f"d_{name}_epoch_s", median(checkpoint.epoch_seconds[1:]))
        if "e" in parts:
            spatial = cache_lib.FeatureCache(work / f"cache-spatial-{r}", key_e)
            seconds, _ = timed(lambda: extract_features(spatial, models_e.stem, files, size, bs))
            record("e_extract_s", seconds)
            checkpoint = train_on_cache(models_e, spatial, digests, labels, classes,
                                        live_settings, work / f"ckpt-e-cached{r}")
            record("e_cached_epoch_s", median(checkpoint.epoch_seconds[1:]))
            source = datasets.image_loader(paths, labels, size, classes)
            checkpoint = train_live(models_e.full, source, n, live_settings,
                                    work / f"ckpt-e-live{r}")
            record("e_live_epoch_s", median(checkpoint.epoch_seconds[1:]))
        for folder in work.glob("ckpt-*"):
            shutil.rmtree(folder)
    return raw


def summarise(raw: dict, args: argparse.Namespace) -> list[tuple[str, float, str]]:
    """(measurement, ratio, goal) rows from the medians."""
    m = {name: median(values) for name, values in raw.items()}
    rows = []
    if "a_extract_ips" in m and "a_compute_batches_ips" in m:
        limit = max(m["a_compute_batches_ips"], m["a_compute_predict_ips"])
        rows.append(("(a) extraction / compute-only limit", m["a_extract_ips"] / limit, ">= 0.9"))
    if "b_guide_s" in m and "b_tlapp_s" in m:
        rows.append((f"(b) head training, {args.epochs} epochs: guide time / tlapp time",
                     m["b_guide_s"] / m["b_tlapp_s"], f">= {0.8 * args.epochs:g}"))
    if "b_guide_s" in m and "c_tlapp_s" in m:
        rows.append(("(c) second experiment: guide time / tlapp time (cache reused)",
                     m["b_guide_s"] / m["c_tlapp_s"], ">= 50"))
    if "d_full_epoch_s" in m:
        rows.append(("(d) live epoch: full augmentation / none",
                     m["d_full_epoch_s"] / m["d_none_epoch_s"], "<= 1.10"))
    if "e_live_epoch_s" in m:
        rows.append((f"(e) top-block epoch: live stem / cached {args.spatial_cut}",
                     m["e_live_epoch_s"] / m["e_cached_epoch_s"], "(none)"))
        total = m["e_extract_s"] + args.epochs * m["e_cached_epoch_s"]
        rows.append((f"(e) {args.epochs} epochs: live / (extract once + cached)",
                     args.epochs * m["e_live_epoch_s"] / total, "(none)"))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224, help="image size in px")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10, help="E, head-training epochs")
    parser.add_argument("--live-epochs", type=int, default=2,
                        help="epochs per live/spatial fit; the first (tracing) is not timed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spatial-cut", default="conv5_block1_out")
    parser.add_argument("--parts", default="abcde", help="which of a-e to measure")
    parser.add_argument("--json", help="also write the raw timings and ratios to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # fit's default, for the guide
    args.parts = set(args.parts)
    if args.live_epochs < 2:
        parser.error(f"--live-epochs must be at least 2. Received: {args.live_epochs}")

    with tempfile.TemporaryDirectory(prefix="tlapp-bench-") as work:
        raw = run(args, Path(work))
    rows = summarise(raw, args)
    print(f"resnet50 weights=None, {args.images} JPEGs {args.size}px, {args.classes} classes, "
          f"batch {args.batch_size}, E={args.epochs}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, median of {args.repeats}")
    for name, values in raw.items():
        print(f"  {name:24s} median {median(values):9.3f}   runs: "
              + ", ".join(f"{v:.3f}" for v in values))
    for name, ratio, goal in rows:
        print(f"{name:64s} {ratio:8.2f}  goal {goal}")
    result = {"args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
              "raw": raw, "ratios": {name: ratio for name, ratio, _ in rows}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
