"""`tlapp demo`: a built-in synthetic dataset through the whole pipeline, export and reload."""
from __future__ import annotations

import colorsys
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tlapp import pipeline
from tlapp.backbones import registry
from tlapp.errors import UserInputError
from tlapp.inference.runs import Run

log = logging.getLogger(__name__)

CLASSES = ("checks", "dots", "rings", "stripes")
HUES = {"checks": 0.6, "dots": 0.0, "rings": 0.33, "stripes": 0.15}  # each class's colour family
BACKBONE = "resnet50"  # its random-init pooled features still separate textures (see README)
IMAGE_SIZE = 96


def draw_texture(kind: str, rng: np.random.Generator, size: int = 128,
                 hue: float | None = None) -> Image.Image:
    """One procedurally drawn texture with a jittered colour from its class's family (or
    from `hue`), a random dark background, and random scale, phase and angle."""
    hue = ((HUES[kind] if hue is None else hue) + rng.uniform(-0.08, 0.08)) % 1.0
    foreground = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(
        hue, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)))
    background = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(
        rng.uniform(0, 1), rng.uniform(0, 0.4), rng.uniform(0.05, 0.4)))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    step = int(rng.integers(10, 24))
    if kind == "checks":
        offset = int(rng.integers(0, step))
        for y in range(-step, size, step):
            for x in range(-step, size, step):
                if ((x + y) // step) % 2 == 0:
                    draw.rectangle([x + offset, y + offset, x + offset + step - 1,
                                    y + offset + step - 1], fill=foreground)
    elif kind == "dots":
        for _ in range(int(rng.integers(12, 30))):
            x, y, r = int(rng.integers(0, size)), int(rng.integers(0, size)), int(rng.integers(3, 8))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=foreground)
    elif kind == "rings":
        cx, cy = (int(c) for c in rng.integers(size // 4, 3 * size // 4, 2))
        for r in range(size * 3 // 2, 0, -step):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=foreground, width=step // 2)
    else:  # stripes, at a random angle
        width = step // 2
        for x in range(-size, 2 * size, step):
            draw.line([(x, -size), (x, 2 * size)], fill=foreground, width=width)
        image = image.rotate(float(rng.uniform(0, 180)), fillcolor=background)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def write_demo_data(folder: Path, per_class: int = 40, seed: int = 0) -> Path:
    """Writes CLASSES x per_class images (alternately JPEG and PNG) into folder/<class>/."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = draw_texture(kind, rng)
            if i % 2:
                image.save(folder / kind / f"{kind}_{i:03d}.png")
            else:
                image.save(folder / kind / f"{kind}_{i:03d}.jpg", quality=90)
    return folder


def check_demo_folder(data: Path, run_dir: Path) -> None:
    """The demo only reuses its own data and replaces its own previous run, never a folder of
    the user's that happens to sit where it writes."""
    if data.exists() and (not data.is_dir() or
                          sorted(p.name for p in data.iterdir()) != sorted(CLASSES)):
        raise UserInputError(f"{data} exists but does not hold the demo's images; tlapp will "
                             f"not train on it or change it. Give --out another folder.")
    is_run = all((run_dir / name).is_file() for name in ("config.toml", "labels.txt",
                                                          "model.keras"))
    if run_dir.exists() and not is_run:
        raise UserInputError(f"{run_dir} exists but is not a tlapp run; the demo will not "
                             f"replace it. Give --out another folder.")


SERVE_SCRIPT = """
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
images = tf.constant([open(p, "rb").read() for p in sys.argv[2:]])
out = model.signatures["serving_default"](images=images)
print(json.dumps([{"class_name": n.decode(), "probability": float(max(p))}
                  for n, p in zip(out["class_name"].numpy(), out["probabilities"].numpy())]))
"""


def run_demo(out: str | Path = "models/demo", cache_dir: str | None = None,
             epochs: int = 20) -> Run:
    """Writes the demo data, trains, exports, reloads the SavedModel in a fresh process, predicts."""
    out = Path(out)
    data, run_dir = out / "data", out / "run"
    check_demo_folder(data, run_dir)
    if not data.is_dir():
        log.info("demo: writing %d classes of synthetic textures to %s", len(CLASSES), data)
        write_demo_data(data)
    if run_dir.exists():
        log.info("demo: replacing the previous demo run in %s", run_dir)
        shutil.rmtree(run_dir)

    spec = registry.get_spec(BACKBONE)
    weights = "imagenet"
    try:
        registry.build_backbone(spec, "imagenet", IMAGE_SIZE)
    except UserInputError:
        log.warning("demo: ImageNet weights for %s could not be downloaded; continuing with "
                    "random initialisation (--weights none)", BACKBONE)
        weights = "none"
    run = pipeline.train(str(data), backbone=BACKBONE, weights=weights, image_size=IMAGE_SIZE,
                         epochs=epochs, out=str(run_dir), cache_dir=cache_dir)
    chance = 1 / len(CLASSES)
    log.info("demo: test accuracy %.1f%% (chance is %.0f%%) with %s weights",
             100 * run.metrics["test_accuracy"], 100 * chance, weights)

    samples = [str(data / kind / f"{kind}_001.png") for kind in CLASSES]
    served = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(run_dir / "saved_model"),
                             *samples], capture_output=True, text=True, check=True)
    answers = json.loads(served.stdout.strip().splitlines()[-1])
    log.info("demo: the SavedModel, reloaded in a fresh Python process, predicts:\n%s",
             "\n".join(f"  {Path(path).name:16s} -> {answer['class_name']} "
                       f"({answer['probability']:.1%})" for path, answer in zip(samples, answers)))
    log.info("demo: done. Run folder: %s  (try: tlapp predict %s --model %s)", run_dir,
             samples[0], run_dir)
    return run
