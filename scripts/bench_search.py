"""Hyperparameter search on the feature cache (issue 18): what one more trial costs.

Writes N synthetic JPEGs (default 2,000 at 64 px, 10 classes whose hues overlap, so
accuracy is not at the ceiling) and, with resnet50 weights=None, in this one process:

  (a) timing, repeated and interleaved (load changes hit both alike), medians reported:
      - `tlapp experiment` with a [search] of T random trials (prune = false, E epochs
        each) on a fresh cache: the first trial's seconds (it extracts the stem once) and
        the median seconds of the trials after it, read from OUT/results.csv;
      - one training of the same head the way the Keras transfer-learning guide does it
        (image_dataset_from_directory, cached and prefetched; the frozen base inside
        model.fit every epoch; same image size, batch size, epochs and number of training
        images), timed around model.fit;
      the ratio guide / later trial is the point of the feature;
  (b) quality: a 12-trial random search and a 12-trial Bayesian (TPE) search on one shared
      cache, for 3 sampler seeds: best validation accuracy of each, and how many times each
      search ran the stem over the images (counted by wrapping stages.cached_features).

    python scripts/bench_search.py [--images 2000] [--size 64] [--epochs 5] [--trials 5]
        [--repeats 3] [--parts ab]
    # (b) on a fixture where the head settings matter (docs/benchmarks.md, issue 18):
    python scripts/bench_search.py --parts b --space wide --images 8000 --size 32 \
        --classes 20 --hue-jitter 0.3 --val-fraction 0.4 --epochs 1 --no-export
"""
from __future__ import annotations

import argparse
import colorsys
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlapp
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

import tlapp
from bench_pipeline import guide_model  # the Keras guide's model (frozen base in fit)
from tlapp.backbones import registry
from tlapp.pipeline import stages

SPACE = ('lr = { log = [1e-4, 3e-2] }\ndropout = { linear = [0.0, 0.6] }\n'
         'label_smoothing = { linear = [0.0, 0.2] }\n'
         'optimizer = { choice = ["adam", "sgd", "adamw"] }\n'
         'batch_size = { choice = [16, 32, 64] }\n')


# (b) with --space wide: the head settings that decide a short training on the cache,
# each over a range wide enough that its ends hurt (too low a rate under-fits in 1-3
# epochs, too high a one diverges; heavy dropout or weight decay under-fit)
WIDE = ('lr = { log = [1e-5, 1.0] }\ndropout = { linear = [0.0, 0.9] }\n'
        'weight_decay = { log = [1e-6, 1e-1] }\n'
        'optimizer = { choice = ["adam", "sgd", "adamw"] }\n'
        'batch_size = { choice = [16, 32, 64, 128] }\n')


def space(args) -> str:
    """SPACE with the learning rate's range from --lr-range, or WIDE (--space wide)."""
    if args.space == "wide":
        return WIDE
    low, high = args.lr_range
    return SPACE.replace("lr = { log = [1e-4, 3e-2] }", f"lr = {{ log = [{low:g}, {high:g}] }}")


def write_folder(root: Path, count: int, size: int, classes: int, seed: int = 0,
                 jitter: float = 0.6) -> Path:
    """Colour fields around a hue per class, hues jittered by a normal of standard
    deviation `jitter` class spacings (0.6: past the neighbouring class's, so many images
    are ambiguous; 0.25: about 95% of the images are nearer their own class's hue), plus
    noise."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % classes
        hue = label / classes + rng.normal(0, jitter / classes)
        rgb = np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.6, 0.8)) * 255
        coarse = np.clip(rgb + rng.normal(0, 50, (8, 8, 3)), 0, 255).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        path = root / f"class_{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
    return root


def write_experiment(path: Path, data: Path, cache: Path, out: Path, args, search: str) -> Path:
    path.write_text(f'data = "{data}"\ncache_dir = "{cache}"\nout = "{out}"\n'
                    f'backbone = "resnet50"\nweights = "none"\nimage_size = {args.size}\n'
                    f'epochs = {args.epochs}\nval_fraction = {args.val_fraction}\n'
                    + ("" if "batch_size" in search else "batch_size = 32\n") +
                    ('saved_model = "off"\n' if args.no_export else "") +
                    f'test_fraction = {args.test_fraction}\n[search]\n{search}')
    return path


class StemCounter:
    """Wraps stages.cached_features: how often a run looked up the cache, and how many
    images the stem ran on."""

    def __init__(self):
        self.calls: list[int] = []
        self.real = stages.cached_features

    def __call__(self, *a, **k):
        loaders, stats = self.real(*a, **k)
        self.calls.append(int(stats.get("extracted", 0)))
        return loaders, stats

    def __enter__(self):
        stages.cached_features = self
        return self

    def __exit__(self, *exc):
        stages.cached_features = self.real


def search_rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def time_search(work: Path, data: Path, args, r: int) -> dict:
    """One `tlapp experiment` with T random trials on a fresh cache."""
    out, cache = work / f"search-{r}", work / f"cache-{r}"
    path = write_experiment(work / f"search-{r}.toml", data, cache, out, args,
                            f'method = "random"\ntrials = {args.trials}\nprune = false\n'
                            f'sampler_seed = {r}\n' + SPACE.replace(
                                "batch_size = { choice = [16, 32, 64] }\n", ""))
    keras.backend.clear_session()
    tick = time.perf_counter()
    with StemCounter() as counter:
        tlapp.run_search(path)
    total = time.perf_counter() - tick
    seconds = [float(row["seconds"]) for row in search_rows(out)]
    return {"first": seconds[0], "later": statistics.median(seconds[1:]), "total": total,
            "stem": counter.calls}


def time_guide(data: Path, args, r: int) -> float:
    """The Keras guide's training: E epochs with the frozen base inside model.fit."""
    keras.backend.clear_session()
    train, val = keras.utils.image_dataset_from_directory(
        data, label_mode="categorical", image_size=(args.size, args.size), batch_size=32,
        shuffle=True, seed=r, validation_split=0.2, subset="both")  # 1,600 / 400 as tlapp
    train, val = (d.cache().prefetch(tf.data.AUTOTUNE) for d in (train, val))
    model = guide_model(registry.get_spec("resnet50"), args.size, args.classes, seed=r)
    tick = time.perf_counter()
    model.fit(train, validation_data=val, epochs=args.epochs, verbose=0)
    return time.perf_counter() - tick


def quality(work: Path, data: Path, args) -> dict:
    """12-trial searches on one cache, 3 seeds each, for each of --methods (random, bayes,
    and bayes-independent: bayes with multivariate = false)."""
    found = {}
    for seed in range(3):
        for method in args.methods:
            out = work / f"q-{method}-{seed}"
            options = ('method = "bayes"\nmultivariate = false\n'
                       if method == "bayes-independent" else f'method = "{method}"\n')
            path = write_experiment(work / f"q-{method}-{seed}.toml", data, work / "cache-q",
                                    out, args, f'{options}trials = 12\n'
                                    f'sampler_seed = {seed}\n' + space(args))
            keras.backend.clear_session()
            tick = time.perf_counter()
            with StemCounter() as counter:
                result = tlapp.run_search(path)
            rows = search_rows(out)
            found[f"{method}-{seed}"] = {
                "best_val": max(float(r["val_accuracy"]) for r in rows
                                if r["state"] == "complete"),
                "test_of_best": result.test_accuracy,
                "pruned": sum(r["state"] == "pruned" for r in rows),
                "best": result.best,  # the best trial's row: its number and drawn values
                "val_by_trial": [r["val_accuracy"] for r in rows],
                "stem_calls": counter.calls, "seconds": time.perf_counter() - tick}
            print(method, seed, json.dumps(found[f"{method}-{seed}"]), flush=True)
    for method in args.methods:
        found[f"{method}_mean_best_val"] = statistics.mean(
            found[f"{method}-{s}"]["best_val"] for s in range(3))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="ab")
    parser.add_argument("--lr-range", type=float, nargs=2, default=[1e-4, 3e-2],
                        metavar=("LOW", "HIGH"), help="(b): the searched lr range (log)")
    parser.add_argument("--methods", type=lambda text: text.split(","),
                        default=["random", "bayes"],
                        help="(b): comma-separated: random, bayes, bayes-independent")
    parser.add_argument("--space", choices=("base", "wide"), default="base",
                        help="(b): SPACE (with --lr-range) or WIDE")
    parser.add_argument("--hue-jitter", type=float, default=0.6,
                        help="hue noise per image, in class spacings")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--no-export", action="store_true",
                        help='saved_model = "off" (the best configuration\'s final run)')
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_search-"))
    data = write_folder(work / "data", args.images, args.size, args.classes,
                        jitter=args.hue_jitter)
    report = {"args": vars(args) | {"work": str(work)}, "load_start": os.getloadavg()}
    if "a" in args.parts:
        time_guide(data, argparse.Namespace(**(vars(args) | {"epochs": 1})), 99)  # warm-up
        raw = {"first": [], "later": [], "total": [], "guide": []}
        for r in range(args.repeats):
            found = time_search(work, data, args, r)
            for key in ("first", "later", "total"):
                raw[key].append(found[key])
            raw["guide"].append(time_guide(data, args, r))
            print("repeat", r, json.dumps({k: v[-1] for k, v in raw.items()}),
                  "stem", found["stem"], "load", os.getloadavg(), flush=True)
        medians = {k: statistics.median(v) for k, v in raw.items()}
        report["timing"] = {"raw": raw, "median": medians,
                            "guide_over_later_trial": medians["guide"] / medians["later"],
                            "guide_over_first_trial": medians["guide"] / medians["first"]}
        print(json.dumps(report["timing"], indent=1), flush=True)
    if "b" in args.parts:
        report["quality"] = quality(work, data, args)
    report["load_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
