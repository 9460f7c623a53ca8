"""Grad-CAM: `tlapp explain` and `Run.explain`, checked against where the evidence is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def corner_folder(root: Path, per_class: int = 16) -> Path:
    """Class "corner" has a red square in the top-left corner; class "plain" has none."""
    rng = np.random.default_rng(0)
    for name in ("corner", "plain"):
        for i in range(per_class):
            pixels = np.clip(120 + rng.normal(0, 30, (64, 64, 3)), 0, 255)
            if name == "corner":
                pixels[4:24, 4:24] = [250, 30, 30]
            path = root / name / f"{name}{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def corner_run(tmp_path_factory):
    import tlapp

    base = tmp_path_factory.mktemp("corner")
    data = corner_folder(base / "data")
    return tlapp.train(str(data), backbone="lenet5", weights="none", image_size=64, epochs=10,
                       batch_size=8, cache_dir=str(base / "cache"), out=str(base / "run"))


def quadrants(heatmap: np.ndarray) -> np.ndarray:
    h, w = heatmap.shape[0] // 2, heatmap.shape[1] // 2
    parts = np.array([heatmap[:h, :w].sum(), heatmap[:h, w:].sum(), heatmap[h:, :w].sum(),
                      heatmap[h:, w:].sum()])
    return parts / parts.sum()


@pytest.mark.slow
def test_heatmap_mass_lies_in_the_deciding_corner(corner_run):
    assert corner_run.metrics["test_accuracy"] == 1.0
    results = corner_run.explain([str(Path(corner_run.config.data) / "corner")], "corner")
    assert len(results) == 16
    shares = np.array([quadrants(r["heatmap"]) for r in results])
    assert all(r["heatmap"].shape == (64, 64) for r in results)
    assert 0 <= min(r["heatmap"].min() for r in results) <= max(
        r["heatmap"].max() for r in results) <= 1
    # the top-left quadrant holds the most mass in nearly every image, and far above the
    # quarter an uninformative map would give it
    assert np.mean(shares.argmax(axis=1) == 0) >= 0.8
    assert np.median(shares[:, 0]) > 0.4


@pytest.mark.slow
def test_explain_command_writes_one_png_per_image(corner_run, tmp_path, capsys):
    images = sorted(Path(corner_run.config.data).rglob("*.png"))[:2]
    (tmp_path / "notes.png").write_text("not an image")
    code, out, err = run_cli(capsys, "explain", *images, tmp_path / "notes.png", "--model",
                             corner_run.path, "--out", tmp_path / "why")
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "why").iterdir())
    assert written == sorted(f"{p.stem}.gradcam.png" for p in images)
    assert "notes.png: error: not a readable image" in out
    with Image.open(tmp_path / "why" / written[0]) as png:
        assert png.size[0] > 300
    code, out, err = run_cli(capsys, "explain", images[0], "--model", corner_run.path,
                             "--class", "nope", "--out", tmp_path / "x")
    assert code == 2 and "Unknown class" in err and "Traceback" not in err


def test_explain_bad_input_exits_2(tmp_path, capsys):
    code, out, err = run_cli(capsys, "explain", tmp_path / "a.png", "--model",
                             tmp_path / "no-run")
    assert code == 2 and "not a tlapp run folder" in err and "Traceback" not in err


def test_a_backbone_without_spatial_activations_is_refused():
    import keras

    from tlapp.errors import UserInputError
    from tlapp.inference.explain import GradCam

    pixels = keras.Input((8, 8, 3))
    flat = keras.Model(pixels, keras.layers.Dense(4)(keras.layers.Flatten()(pixels)),
                       name="mlp")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax",
                                                   name="probabilities")(flat(inputs)))
    with pytest.raises(UserInputError, match="nothing to place a heatmap on"):
        GradCam(model)


# one of each structure: residual, branched, squeeze-excite, dense concatenation, classic
FAMILIES = ["resnet50", "inception_v3", "efficientnetb0", "densenet121", "alexnet"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_gradcam_works_for_every_backbone_family(name):
    import keras

    from tlapp.backbones import registry
    from tlapp.inference.explain import GradCam
    from tlapp.training import head

    spec = registry.get_spec(name)
    size = max(spec.min_size, 64)
    base = registry.build_backbone(spec, "none", size)
    models = head.build_models(spec, base, None, 3, 0.2, size)
    saved = keras.saving.load_model(_save(models.full), safe_mode=True)  # as a run loads it
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    heatmaps, probabilities = GradCam(saved)(pixels)
    assert heatmaps.shape == (2, size, size) and np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1 + 1e-6
    np.testing.assert_allclose(probabilities, saved.predict(pixels, verbose=0), atol=1e-4)


def _save(model) -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "model.keras"
    model.save(path)
    return str(path)
