"""Shared fixtures: tiny image folders written in tmp_path, an offline Keras, a trained run."""
from __future__ import annotations

import colorsys
import os
import urllib.error
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # tests make no network request

import numpy as np
import pytest
from PIL import Image

CLASS_HUES = {"cat": 0.0, "dog": 0.33, "fox": 0.6}
# Fixtures that train a model: every test using one is slow (`pytest -m "not slow"` skips it).
TRAINING_FIXTURES = {"trained_run", "second_run", "experiment", "uninterrupted"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def write_image(path: Path, hue: float, rng: np.random.Generator, size: int = 40) -> Path:
    """A noisy image dominated by one hue, so even random-weight features separate classes."""
    rgb = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    pixels = np.clip(rgb + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix == ".jpg" \
        else Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, per_class: int = 8, classes=CLASS_HUES, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            write_image(root / name / f"{name}_{i:02d}{'.jpg' if i % 2 else '.png'}",
                        CLASS_HUES.get(name, 0.15) + rng.uniform(-0.04, 0.04), rng)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 8 images (JPEG and PNG, 40 px)."""
    return make_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def offline_keras(monkeypatch, tmp_path):
    """No test may download: Keras's downloader fails as it does without network, and
    KERAS_HOME points at an empty folder."""
    from keras.src.utils import file_utils

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(file_utils, "urlretrieve", refuse)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One small resnet50 run (random weights, 32 px) shared by the read-only tests."""
    import tlapp

    base = tmp_path_factory.mktemp("session")
    data = make_folder(base / "data", per_class=8)
    run = tlapp.train(str(data), backbone="resnet50", weights="none", image_size=32, epochs=8,
                      batch_size=8, cache_dir=str(base / "cache"), out=str(base / "run"))
    return run


@pytest.fixture(scope="session")
def huge_jpeg() -> bytes:
    """A valid 14000x13000 grayscale JPEG (2 MB on disk; built once, 182 MB while encoding)."""
    import io

    buffer = io.BytesIO()
    Image.new("L", (14000, 13000), 128).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def run_cli(capsys, *args):
    """(exit status, stdout, stderr) of `tlapp ARGS...` run in this process; argparse's own
    usage errors (SystemExit) count as their status."""
    from tlapp import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
