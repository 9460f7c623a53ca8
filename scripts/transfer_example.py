"""Transfer a small network of your own to new classes with few images, versus from scratch.

    python scripts/transfer_example.py [--out models/transfer_example] [--shots 5]

1. Writes two synthetic tasks with disjoint classes (offline, like `tlapp demo`): the source
   task is four textures (checks, dots, rings, stripes) in red and blue, 8 classes with plenty
   of images; the target task is the same four textures in green and purple, 8 new classes
   with only --shots training images each (and 20 test images each).
2. Pretrains a small CNN on the source task with plain Keras and saves it as a .keras file.
3. Trains on the target task with tlapp three ways, all from that file:
   - transfer: `backbone="pretrained.keras"`: the file's weights, frozen; its old softmax
     classifier is dropped and a new head trains on the cached pooled features;
   - transfer + fine-tune: the same weights, every layer trainable (`trainable_blocks="all"`);
   - scratch: the same architecture re-initialised (`weights="none"`), every layer trainable.
4. Prints the three test accuracies. Takes a few minutes on 2 CPU cores. Data, the
   pretrained model and finished runs are reused when run again; delete --out to start over.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tlapp  # noqa: E402
from tlapp import demo  # noqa: E402
from tlapp.data import decoding

KINDS = ("checks", "dots", "rings", "stripes")
SOURCE_HUES = {"red": 0.0, "yellow": 0.15, "blue": 0.6}
TARGET_HUES = {"green": 0.33, "purple": 0.8}
IMAGE_SIZE = 48


def write_task(folder: Path, hues: dict[str, float], counts: dict[str, int], seed: int) -> None:
    """Writes folder/<split>/<kind>-<colour>/NNN.png for each split in `counts`."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for kind in KINDS:
            for colour, hue in hues.items():
                target = folder / split / f"{kind}-{colour}"
                target.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    demo.draw_texture(kind, rng, size=96, hue=hue).save(target / f"{i:03d}.png")


def load_split(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pixels (decoded and resized as tlapp does) and labels of one split folder."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths = [(p, i) for i, name in enumerate(classes) for p in sorted((folder / name).iterdir())]
    pixels = np.stack([decoding.decode_image(p.read_bytes(), IMAGE_SIZE).numpy()
                       for p, _ in paths])
    return pixels, np.array([i for _, i in paths]), classes


def small_cnn(classes: int) -> keras.Model:
    """Three conv blocks and global average pooling; takes 0-255 pixels (rescales itself)."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
        layers.Rescaling(1 / 127.5, offset=-1, name="rescale"),
        layers.Conv2D(32, 3, padding="same", activation="relu", name="block1_conv"),
        layers.MaxPooling2D(name="block1_pool"),
        layers.Conv2D(64, 3, padding="same", activation="relu", name="block2_conv"),
        layers.MaxPooling2D(name="block2_pool"),
        layers.Conv2D(128, 3, padding="same", activation="relu", name="block3_conv"),
        layers.GlobalAveragePooling2D(name="features"),
        layers.Dense(classes, activation="softmax", name="classifier"),
    ], name="small_cnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="models/transfer_example")
    parser.add_argument("--shots", type=int, default=5, help="training images per new class")
    parser.add_argument("--pretrain-images", type=int, default=100, help="per source class")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=40, help="epochs on the target task")
    args = parser.parse_args()
    out = Path(args.out)
    source, target = out / "source", out / f"target-{args.shots}shot"
    if not source.is_dir():
        print(f"writing the source task ({len(KINDS) * len(SOURCE_HUES)} classes) to {source}")
        write_task(source, SOURCE_HUES, {"train": args.pretrain_images, "val": 10}, seed=1)
    if not target.is_dir():
        print(f"writing the target task ({len(KINDS) * len(TARGET_HUES)} new classes, "
              f"{args.shots} training images each) to {target}")
        write_task(target, TARGET_HUES, {"train": args.shots, "val": 5, "test": 20}, seed=2)

    start = time.perf_counter()
    pretrained = out / "pretrained.keras"
    if not pretrained.is_file():
        keras.utils.set_random_seed(0)
        x, y, classes = load_split(source / "train")
        val_x, val_y, _ = load_split(source / "val")
        model = small_cnn(len(classes))
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x, y, batch_size=32, epochs=args.pretrain_epochs,
                  validation_data=(val_x, val_y), verbose=2)
        model.save(pretrained)
        print(f"pretrained on the source task: val accuracy "
              f"{model.evaluate(val_x, val_y, verbose=0)[1]:.1%} "
              f"({time.perf_counter() - start:.0f} s); saved {pretrained}")

    common = dict(image_size=IMAGE_SIZE, batch_size=16, epochs=args.epochs,
                  cache_dir=str(out / "cache"))
    ways = [  # (label, run folder, options)
        ("transfer (frozen, new head)", "transfer", dict(lr=1e-3)),
        ("transfer + fine-tune all", "finetune", dict(trainable_blocks="all", lr=3e-4)),
        ("scratch (same architecture)", "scratch",
         dict(weights="none", trainable_blocks="all", lr=1e-3)),
    ]
    results = {}
    for label, folder, options in ways:
        run_dir = out / "runs" / f"{folder}-{args.shots}shot"
        if run_dir.exists():  # from an earlier invocation
            results[label] = tlapp.load_run(run_dir).metrics["test_accuracy"]
            continue
        run = tlapp.train(str(target), backbone=str(pretrained), out=str(run_dir),
                          **common | options)
        results[label] = run.metrics["test_accuracy"]
    chance = 1 / (len(KINDS) * len(TARGET_HUES))
    print(f"\ntarget task: {len(KINDS) * len(TARGET_HUES)} new classes, {args.shots} training "
          f"images each; test accuracy (chance {chance:.1%}):")
    for way, accuracy in results.items():
        print(f"  {way:30s} {accuracy:.1%}")
    print(f"run folders in {out / 'runs'}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
