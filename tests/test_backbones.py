import h5py
import keras
import numpy as np
import pytest

from tlapp.errors import UserInputError
from tlapp.backbones import cuts
from tlapp.backbones import registry


def small_size(spec):
    return max(spec.min_size, 32)


def sample_cuts(points: list[str], ends: list[str]) -> list[str]:
    """First, middle and last-but-one cut points, plus the first and last block ends."""
    chosen = {points[0], points[len(points) // 2], points[-2], ends[0], ends[-2]}
    return [p for p in points if p in chosen]


@pytest.mark.slow  # keras.applications: tests/test_backbone_zoo.py
@pytest.mark.parametrize("name", [n for n, s in registry.BACKBONES.items()
                                  if s.family != "applications"])
def test_stem_then_top_equals_full_model(name):
    keras.backend.clear_session()
    spec = registry.BACKBONES[name]
    model = registry.build_backbone(spec, "none", small_size(spec))
    points = cuts.cut_points(model)
    ends = cuts.block_ends(spec, model)
    assert ends[-1] == model.layers[-1].name and len(ends) >= 4
    assert set(ends) <= set(points)
    x = np.random.default_rng(0).uniform(-1, 1, (2,) + model.input.shape[1:]).astype("float32")
    expected = np.asarray(model(x))
    for cut in [cuts.INPUT_CUT] + sample_cuts(points, ends):
        stem, top = cuts.split_backbone(model, cut)
        assert top is not None
        np.testing.assert_allclose(np.asarray(top(stem(x))), expected, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{name} cut at {cut}")


def test_cut_points_of_a_residual_model():
    inputs = keras.Input((8,), name="in")
    a = keras.layers.Dense(8, name="a")(inputs)
    b = keras.layers.Dense(8, name="b")(a)
    c = keras.layers.Add(name="c")([a, b])  # a's output skips over b
    d = keras.layers.Dense(4, name="d")(c)
    model = keras.Model(inputs, d)
    assert cuts.cut_points(model) == ["a", "c", "d"]


@pytest.mark.slow
def test_notop_h5_weights_file_loads_with_identical_outputs(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    spec = registry.get_spec("resnet50")
    source = registry.build_backbone(spec, "none", 32, seed=3)
    path = tmp_path / spec.weight_file
    with h5py.File(path, "w") as f:  # the layout of the file Keras downloads
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    loaded = registry.build_backbone(spec, str(path), 32, seed=99)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(source(x)))
    other = registry.build_backbone(spec, "none", 32, seed=99)
    assert not np.allclose(np.asarray(other(x)), np.asarray(source(x)))


def test_keras3_weights_file_loads(tmp_path):
    spec = registry.get_spec("vgg16")
    source = registry.build_backbone(spec, "none", 32, seed=1)
    path = tmp_path / "mine.weights.h5"
    source.save_weights(path)
    loaded = registry.build_backbone(spec, str(path), 32, seed=2)
    for a, b in zip(loaded.weights, source.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_weights_file_is_a_user_error(tmp_path):
    spec = registry.get_spec("vgg16")
    path = tmp_path / "resnet.weights.h5"
    registry.build_backbone(registry.get_spec("resnet50"), "none", 32).save_weights(path)
    with pytest.raises(UserInputError, match="Could not load weights"):
        registry.build_backbone(spec, str(path), 32)
    with pytest.raises(UserInputError, match="no such file"):
        registry.build_backbone(spec, str(tmp_path / "missing.h5"), 32)


def test_offline_imagenet_names_file_and_folder(tmp_path):
    spec = registry.get_spec("resnet50")
    with pytest.raises(UserInputError) as error:
        registry.build_backbone(spec, "imagenet", 32)
    message = str(error.value)
    assert spec.weight_file in message
    assert str(tmp_path / "keras_home" / "models") in message
    assert "--weights none" in message and "--weights PATH" in message


def test_random_weights_are_reproducible_from_seed():
    spec = registry.get_spec("mobilenet_v2")
    a, b, c = (registry.build_backbone(spec, "none", 32, seed=s) for s in (5, 5, 6))
    np.testing.assert_array_equal(np.asarray(a.weights[0]), np.asarray(b.weights[0]))
    assert not np.array_equal(np.asarray(a.weights[0]), np.asarray(c.weights[0]))


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(UserInputError, match="resnet50.*vgg16"):
        registry.get_spec("resnet51")


def test_resolve_cut():
    spec = registry.get_spec("vgg16")
    model = registry.build_backbone(spec, "none", 32)
    assert cuts.resolve_cut(spec, model, None, None) == "block5_pool"
    assert cuts.resolve_cut(spec, model, None, 1) == "block4_pool"
    assert cuts.resolve_cut(spec, model, "block3_conv2", None) == "block3_conv2"
    with pytest.raises(UserInputError, match="not a valid cut point.*block4_pool"):
        cuts.resolve_cut(spec, model, "block4_poo", None)
    with pytest.raises(UserInputError, match="at most 4, or 'all'"):
        cuts.resolve_cut(spec, model, None, 5)
    assert cuts.resolve_cut(spec, model, None, "all") == cuts.INPUT_CUT
    assert cuts.resolve_cut(spec, model, "input", None) == cuts.INPUT_CUT


def test_image_size_below_minimum():
    with pytest.raises(UserInputError, match="at least 75 px"):
        registry.build_backbone(registry.get_spec("inception_v3"), "none", 32)
