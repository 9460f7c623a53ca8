"""Classic networks trained from scratch, and user .keras models as backbones."""
import keras
import numpy as np
import pytest

import tlapp
from tests.conftest import make_folder
from tlapp import cli
from tlapp.backbones import classic
from tlapp.training import head
from tlapp.errors import UserInputError
from tlapp.backbones import cuts
from tlapp.backbones import registry


def test_lenet5_has_about_60k_parameters():
    assert classic.lenet5((32, 32, 3), include_top=True, classes=10).count_params() == 62_006
    assert classic.lenet5((32, 32, 1), include_top=True, classes=10).count_params() == 61_706


def test_alexnet_has_about_60m_parameters():
    with keras.StatelessScope():  # shapes only
        model = classic.alexnet((227, 227, 3), include_top=True, classes=1000)
        plain = classic.alexnet(include_top=True, local_response_normalization=False)
    assert model.count_params() == 60_965_224  # the paper's "60 million"
    assert plain.count_params() == model.count_params()  # LRN has no weights
    assert model.get_layer("pool5").output.shape[1:] == (6, 6, 256)
    assert "lrn1" not in [layer.name for layer in plain.layers]


def test_local_response_normalization_matches_the_paper_formula():
    x = np.random.default_rng(0).uniform(0, 3, (1, 2, 2, 7)).astype("float32")
    got = np.asarray(classic.LocalResponseNormalization(size=5, k=2, alpha=0.1, beta=0.75)(x))
    expected = np.empty_like(x)
    for c in range(7):
        window = x[..., max(0, c - 2):c + 3]
        expected[..., c] = x[..., c] / (2 + 0.1 * (window ** 2).sum(-1)) ** 0.75
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("weights", ["imagenet", "some.weights.h5"])
def test_classic_nets_have_no_pretrained_weights(weights):
    with pytest.raises(UserInputError, match="no pretrained weights.*--weights none"):
        registry.build_backbone(registry.get_spec("lenet5"), weights, 32)


def test_classic_net_default_cut_is_the_input():
    spec = registry.get_spec("lenet5")
    model = registry.build_backbone(spec, "none", 32)
    assert cuts.resolve_cut(spec, model, None, None) == cuts.INPUT_CUT
    assert cuts.resolve_cut(spec, model, None, 0) == "f6_dense"  # random features
    assert cuts.resolve_cut(spec, model, None, 1) == "c5_conv"
    assert cuts.valid_cuts(model) == ["input", "c1_conv", "s2_pool", "c3_conv",
                                           "s4_pool", "c5_conv", "flatten", "f6_dense"]


@pytest.mark.slow
def test_lenet5_trains_from_scratch_through_the_pipeline(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=5)
    code = cli.main(["train", str(data), "--backbone", "lenet5", "--weights", "none",
                     "--trainable-blocks", "all", "--image-size", "32", "--epochs", "2",
                     "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    run = tlapp.load_run(tmp_path / "run")
    assert run.config.cut is None and run.config.trainable_blocks == "all"
    assert run.config.weights == "none" and run.metrics["cache"]["mode"] == "off"
    lenet = run.model.get_layer("lenet5")
    assert all(layer.trainable for layer in lenet.layers)
    initial = registry.build_backbone(registry.get_spec("lenet5"), "none", 32, seed=0)
    for name in ("c1_conv", "f6_dense"):  # every layer moved away from its initialisation
        assert not np.allclose(lenet.get_layer(name).kernel, initial.get_layer(name).kernel)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert run.model.predict(pixels, verbose=0).shape == (2, 3)


@pytest.mark.slow
def test_alexnet_trains_a_step_with_its_dropout_active():
    spec = registry.get_spec("alexnet")
    base = registry.build_backbone(spec, "none", 67)
    models = head.build_models(spec, base, None, 3, 0.5, 67)
    assert models.stem is None and models.train is models.full  # trains on pixels
    x = np.random.default_rng(0).uniform(0, 255, (4, 67, 67, 3)).astype("float32")
    head.adapt_head(models, None)
    before = np.asarray(base.get_layer("conv1").kernel).copy()
    models.train.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    models.train.train_on_batch(x, np.array([0, 1, 2, 0]))
    assert not np.allclose(base.get_layer("conv1").kernel, before)
    a, b = (np.asarray(models.train(x, training=True)) for _ in range(2))
    assert not np.allclose(a, b)  # fc6_dropout and the head's dropout are on in training
    np.testing.assert_allclose(models.train(x), models.train(x))


def small_cnn(with_classifier: bool = True) -> keras.Model:
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((32, 32, 3)), layers.Rescaling(1 / 255, name="scale"),
        layers.Conv2D(8, 3, activation="relu", name="conv1"), layers.MaxPooling2D(name="pool1"),
        layers.Conv2D(16, 3, activation="relu", name="conv2"),
        layers.GlobalAveragePooling2D(name="gap")])
    if with_classifier:
        model.add(layers.Dense(5, activation="softmax", name="classifier"))
    return model


@pytest.mark.slow
def test_custom_backbone_round_trip(tmp_path, capsys):
    original = small_cnn()
    path = tmp_path / "mine.keras"
    original.save(path)
    assert cli.main(["backbones", str(path)]) == 0
    listing = capsys.readouterr().out
    for name in ("input", "conv1", "pool1", "conv2", "gap"):
        assert f"\n{name} " in listing
    assert "classifier" not in listing  # the old softmax classifier is dropped

    spec = registry.get_spec(str(path), "none")
    base = registry.build_backbone(spec, "saved", 32)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    features = keras.Model(original.inputs, original.get_layer("gap").output)(x)
    np.testing.assert_allclose(base(x), features, atol=1e-6)

    data = make_folder(tmp_path / "data", per_class=5)
    common = dict(image_size=32, epochs=2, batch_size=4, cache_dir=str(tmp_path / "cache"))
    run = tlapp.train(str(data), backbone=str(path), cut="conv2", out=str(tmp_path / "a"),
                      **common)
    assert run.config.backbone == str(path.resolve())
    assert (run.config.weights, run.config.preprocess, run.config.cut) == ("saved", "none",
                                                                          "conv2")
    reloaded = tlapp.load_run(run.path)
    np.testing.assert_allclose(reloaded.model.predict(x, verbose=0),
                               run.model.predict(x, verbose=0), atol=1e-6)
    again = tlapp.train(str(data), config=reloaded.config, out=str(tmp_path / "b"))
    assert again.metrics["cache"]["reused"] == 15 and again.metrics["cache"]["extracted"] == 0

    # same file name and cut but other weights: the weights hash keeps the entries apart
    small_cnn().save(path)
    other = tlapp.train(str(data), backbone=str(path), cut="conv2", out=str(tmp_path / "c"),
                        **common)
    assert other.metrics["cache"]["extracted"] == 15
    assert other.metrics["cache"]["entry"] != run.metrics["cache"]["entry"]
    scratch = tlapp.train(str(data), backbone=str(path), weights="none", trainable_blocks="all",
                          preprocess="tf", out=str(tmp_path / "d"), **common)
    assert scratch.config.cut is None and scratch.config.trainable_blocks == "all"
    assert scratch.config.preprocess == "tf" and scratch.metrics["cache"]["mode"] == "off"


@pytest.mark.parametrize("case, message", [
    ("missing", "Backbone file not found"),
    ("h5", "must be a .keras file"),
    ("lambda", "Could not load"),
    ("grey", "must take RGB images"),
    ("preprocess", "preprocess must be one of"),
    ("size", "takes 32x32 images"),
])
def test_custom_backbone_errors(tmp_path, case, message):
    path = tmp_path / "model.keras"
    preprocess, size = None, 32
    if case == "h5":
        path = tmp_path / "model.h5"
    elif case == "lambda":
        inputs = keras.Input((32, 32, 3))
        keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs)).save(path)
    elif case == "grey":
        keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(2, 3)]).save(path)
    else:
        small_cnn().save(path) if case != "missing" else None
        preprocess = "vgg" if case == "preprocess" else None
        size = 48 if case == "size" else 32
    with pytest.raises(UserInputError, match=message):
        spec = registry.get_spec(str(path), preprocess)
        registry.build_backbone(spec, "saved", size)


def test_preprocess_is_refused_for_registry_backbones():
    with pytest.raises(UserInputError, match="only for custom .keras backbones"):
        registry.get_spec("vgg16", "tf")
