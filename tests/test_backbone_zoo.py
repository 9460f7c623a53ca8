"""Every keras.applications backbone in the registry: builds at its minimum size, splits into a
stem and a top that together equal the full model, preprocesses like keras.applications, names
the weight file Keras downloads, loads that file through --weights PATH, and knows whether its
features collapse at random initialisation.

Parametrised over the registry, so a new entry is covered without a new test. Light models
run in the quick suite; the rest are marked slow. Models are built one at a time at their
minimum size and freed (ConvNeXt XLarge holds 1.4 GB of random weights).
"""
import gc
import importlib

import h5py
import keras
import numpy as np
import pytest

from tlapp.backbones import cuts, registry
from tlapp.backbones.spec import Preprocess
from tlapp.training.head import set_trainable

ZOO = [name for name, spec in registry.BACKBONES.items() if spec.family == "applications"]
QUICK = {"mobilenet_v3_small", "efficientnetb0", "convnext_tiny"}
# Collapsed: pooled features' std across images at random init below this. Measured at the
# minimum size: MobileNet 5e-22, MobileNetV2 2e-13, MobileNetV3 3e-12 to 2e-11, EfficientNet
# B0-B7 2e-7 to 6e-7, Xception 4e-6; the lowest of the others is InceptionV3's 7e-5.
COLLAPSE_STD = 1e-5


def zoo_params(quick=QUICK, names=ZOO):
    return [pytest.param(name, marks=() if name in quick else pytest.mark.slow) for name in names]


@pytest.fixture
def fresh_session():
    """A clean Keras session before and after: auto-named layers (Xception's add, add_1, ...)
    get their first-build names, and the previous model's memory is freed."""
    keras.backend.clear_session()
    gc.collect()
    yield
    keras.backend.clear_session()
    gc.collect()


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Varied images: a random colour each, a gradient and a few rectangles, 0-255."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        image = rng.uniform(0, 255, 3) + ramp * rng.uniform(-80, 80, 3)
        image = np.broadcast_to(image, (size, size, 3)).copy()
        for _ in range(3):
            y, x = rng.integers(0, size // 2, 2)
            image[y:y + size // 3, x:x + size // 3] = rng.uniform(0, 255, 3)
        out[i] = np.clip(image, 0, 255)
    return out


def sample_cuts(points: list[str], ends: list[str], thorough: bool) -> list[str]:
    """Deep models have hundreds of cut points and each check runs the whole model: the
    input cut, the first, middle and last-but-one cut points and block ends when `thorough`
    (the quick set), else the middle cut point and the last-but-one block end."""
    if len(points) < 2:
        return [cuts.INPUT_CUT]
    chosen = {points[len(points) // 2], ends[-2]}
    if thorough:
        chosen |= {cuts.INPUT_CUT, points[0], points[-2], ends[0], ends[len(ends) // 2]}
    return [p for p in [cuts.INPUT_CUT] + points if p in chosen]


def assert_close(got, expected, message: str):
    scale = float(np.abs(expected).max()) or 1.0  # collapsed models output ~1e-13
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4,
                               atol=1e-5 * scale, err_msg=message)


@pytest.mark.parametrize("name", zoo_params())
def test_backbone_builds_splits_and_knows_whether_it_collapses(name, fresh_session):
    spec = registry.BACKBONES[name]
    model = registry.build_backbone(spec, "none", spec.min_size, seed=0)
    points = cuts.cut_points(model)
    ends = cuts.block_ends(spec, model)
    assert ends[-1] == model.layers[-1].name and len(ends) >= 3, ends
    assert set(ends) <= set(points)
    x = Preprocess(spec.preprocess)(pixels(4, spec.min_size))
    expected = model(x, training=False)
    for cut in sample_cuts(points, ends, thorough=name in QUICK):
        stem, top = cuts.split_backbone(model, cut)
        assert top is not None
        assert_close(top(stem(x, training=False), training=False), expected,
                     f"{name} cut at {cut}")
    # Frozen by tlapp, the stem gives its inference output in training mode too (live
    # training, fine-tuning): BatchNormalization uses its moving statistics, EfficientNet's
    # drop-connect (Dropout, which ignores `trainable`) drops nothing.
    cut = ends[len(ends) // 2]
    set_trainable(model, cut, bn_trainable=False)
    stem, _ = cuts.split_backbone(model, cut)
    assert_close(stem(x, training=True), stem(x, training=False), f"{name}: frozen stem")

    spread = float(np.asarray(keras.ops.mean(expected, axis=(1, 2))).std(axis=0).mean())
    print(f"{name}: random-init pooled feature std {spread:.3g}")
    assert spec.collapses_at_random_init == (spread < COLLAPSE_STD), \
        f"{name}: pooled features' std across images at random init is {spread:.3g}"


@pytest.mark.parametrize("name", ZOO)
def test_preprocessing_equals_keras_preprocess_input(name):
    spec = registry.BACKBONES[name]
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    module = importlib.import_module(f"keras.applications.{spec.module}")
    expected = module.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(Preprocess(spec.preprocess)(x)), np.asarray(expected),
                               rtol=1e-5, atol=1e-4)
    if spec.preprocess == "none":  # the model normalises itself: tlapp's layer must not
        np.testing.assert_array_equal(np.asarray(Preprocess(spec.preprocess)(x)), x)


class Stop(Exception):
    pass


def imagenet_build(spec, size: int, monkeypatch) -> tuple[list[str], keras.Model]:
    """What `weights="imagenet"` asks Keras to download, and the model it builds, found
    without downloading or loading anything (variables deferred: quick)."""
    from keras.src.utils import file_utils

    requested, built = [], []

    def download(fname=None, *args, **kwargs):
        requested.append(fname)
        return "never-read.h5"

    def keep(model, *args, **kwargs):
        built.append(model)
        raise Stop

    monkeypatch.setattr(file_utils, "get_file", download)
    monkeypatch.setattr(keras.Model, "load_weights", keep)
    with keras.StatelessScope(), pytest.raises(Stop):
        getattr(keras.applications, spec.factory)(weights="imagenet", include_top=False,
                                                  input_shape=(size, size, 3))
    monkeypatch.undo()
    return requested, built[0]


# Names made by a pattern: the first and last of each family (ConvNeXt's XLarge is spelled
# differently), and every name written out.
@pytest.mark.parametrize("name", zoo_params({"efficientnetb0", "efficientnetv2b0", "mobilenet"}, [
    "efficientnetb0", "efficientnetv2b0", "mobilenet", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnetb7", "efficientnetv2s", "efficientnetv2l", "convnext_tiny",
    "convnext_xlarge", "xception", "densenet201", "nasnet_mobile", "nasnet_large", "resnet50",
    "resnet152v2", "inception_v3", "inception_resnet_v2", "vgg19"]))
def test_weight_file_is_the_one_keras_downloads(name, monkeypatch, fresh_session):
    spec = registry.BACKBONES[name]
    requested, _ = imagenet_build(spec, spec.default_size, monkeypatch)
    assert requested == [spec.weight_file]


@pytest.mark.parametrize("name", zoo_params({"efficientnetb0"}, [
    "efficientnetb0", "mobilenet_v3_small", "convnext_tiny"]))
def test_notop_file_in_the_download_layout_loads_through_weights_path(
        name, tmp_path, fresh_session, monkeypatch):
    """The file Keras downloads is legacy HDF5 (layer names, weight names; what
    `legacy_h5_format.save_weights_to_hdf5_group` writes). Loading it builds the model
    `weights="imagenet"` builds, which for EfficientNet B0-B7 has one more Rescaling layer
    than `weights=None`'s."""
    from keras.src.legacy.saving import legacy_h5_format

    spec = registry.BACKBONES[name]
    size = spec.min_size
    factory = getattr(keras.applications, spec.factory)
    keras.utils.set_random_seed(3)
    source = factory(weights=None, include_top=False, input_shape=(size, size, 3))
    path = tmp_path / spec.weight_file
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    loaded = registry.build_backbone(spec, str(path), size, seed=99)
    for got, want in zip(loaded.weights, source.weights):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _, imagenet = imagenet_build(spec, size, monkeypatch)
    assert [type(layer).__name__ for layer in loaded.layers] == [
        type(layer).__name__ for layer in imagenet.layers]


def test_collapsing_backbones_are_marked_and_never_a_default():
    from tlapp import demo
    from tlapp.config import Config

    assert {"mobilenet_v2", "mobilenet_v3_small", "efficientnetb0"} <= {
        name for name, spec in registry.BACKBONES.items() if spec.collapses_at_random_init}
    assert not registry.get_spec(demo.BACKBONE).collapses_at_random_init
    assert not registry.get_spec(Config().backbone).collapses_at_random_init
    # The example experiments run offline with weights = "none".
    import tomllib
    from pathlib import Path

    for path in Path(__file__).parent.parent.glob("scripts/*.toml"):
        config = tomllib.loads(path.read_text())
        names = [config.get("backbone", "resnet50"), *config.get("sweep", {}).get("backbone", [])]
        if config.get("weights") == "none":
            assert not [n for n in names if registry.get_spec(n).collapses_at_random_init], path


def test_backbones_table_marks_collapsing_backbones(capsys, monkeypatch, tmp_path):
    from tests.conftest import run_cli

    subset = {name: registry.BACKBONES[name] for name in ("mobilenet_v3_small", "vgg16")}
    monkeypatch.setattr(registry, "BACKBONES", subset)
    code, out, _ = run_cli(capsys, "backbones", "--image-size", 32, "--cache-dir", tmp_path)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert rows["mobilenet_v3_small"][-2:] == ["none", "collapses"]
    assert rows["vgg16"][-1] == "caffe"
    assert "random init" in out.splitlines()[0] and "--trainable-blocks all" in out
    code, out, _ = run_cli(capsys, "backbones", "mobilenet_v3_small", "--image-size", 32,
                           "--cache-dir", tmp_path)
    assert code == 0 and "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5" in out
    assert "pooled features collapse" in out and "expanded_conv_10_add" in out


def test_weights_none_with_a_collapsing_backbone_warns(tmp_path, caplog, fresh_session):
    """A warning, not a refusal: training every layer from random initialisation works (the
    batch statistics rescale the activations), and so does any run's plumbing; only a head
    on the frozen random stem learns nothing."""
    from tests.conftest import make_folder
    from tlapp.config import Config
    from tlapp.data.scan import scan_folder
    from tlapp.pipeline.plan import resolve_plan

    data = make_folder(tmp_path / "data", per_class=2)
    scanned = scan_folder(data)
    spec = registry.get_spec("mobilenet_v3_small")
    config = Config(data=str(data), backbone=spec.name, weights="none", image_size=32)
    base = registry.build_backbone(spec, "none", 32)
    for changes, warned in (({}, True), ({"trainable_blocks": "all"}, False)):
        caplog.clear()
        resolve_plan(config.replace(**changes), spec, scanned, tmp_path / "cache",
                     tmp_path / "run", base=base)
        assert ("learns nothing from the images" in caplog.text) == warned, changes


def test_cut_points_see_residuals_made_of_bare_ops():
    """ConvNeXt adds its residual with `inputs + x`, an op that is not a layer: the layer it
    skips is not a cut point."""
    inputs = keras.Input((8,))
    a = keras.layers.Dense(8, name="a")(inputs)
    b = keras.layers.Dense(8, name="b")(a)  # like LayerScale: a layer inside the residual
    c = keras.layers.Activation("linear", name="c")(b)
    d = keras.layers.Dense(4, name="d")(a + c)
    model = keras.Model(inputs, d)
    assert cuts.cut_points(model) == ["a", "d"]
    stem, top = cuts.split_backbone(model, "a")
    x = np.ones((1, 8), "float32")
    np.testing.assert_allclose(np.asarray(top(stem(x))), np.asarray(model(x)), rtol=1e-6)
