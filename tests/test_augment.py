from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import make_folder
from tlapp import cli
from tlapp.augment import ops as augment
from tlapp import config as config_lib
from tlapp.errors import UserInputError
from tlapp.reporting import preview

FULL = ("rcrop,rotate=15,shear=0.1,zoom=0.1,translate=0.1,warp=0.05,flip,vflip,color=20,"
        "pca=0.1,brightness=0.1,contrast=0.2")
# Every op at its default and at the top of its range.
OP_SPECS = [name for name in augment.OPS] + [
    "crop=0.1", "rcrop=0.01:1:0.1:10", "rotate=180", "shear=1", "zoom=0.9", "translate=0.5",
    "warp=0.25:16", "color=255", "pca=1", "brightness=1", "contrast=1", FULL]


@pytest.fixture(scope="module")
def image():
    """A non-square image that touches both ends of [0, 255]."""
    pixels = np.random.default_rng(0).uniform(0, 255, (33, 41, 3)).astype(np.float32)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    return tf.constant(pixels)


@pytest.fixture(scope="module")
def pca(image):
    return augment.compute_pca(image.numpy())


@pytest.mark.parametrize("spec", OP_SPECS)
def test_each_op_keeps_shape_dtype_and_range(image, pca, spec):
    for seed in range(3):
        out = augment.augment_image(image, spec, seed, pca)
        assert out.shape == image.shape and out.dtype == tf.float32
        assert 0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255
        assert np.all(np.isfinite(out.numpy()))
    if spec not in ("flip", "vflip"):  # a mirror may draw "no"; see test_mirror_is_exact
        assert not np.allclose(out, image, atol=0.5), f"{spec} changed nothing"


def test_mirror_is_exact(image):
    np.testing.assert_array_equal(augment.augment_image(image, "flip=1", 5), image[:, ::-1])
    np.testing.assert_array_equal(augment.augment_image(image, "vflip=1", 5), image[::-1])
    outcomes = set()
    for seed in range(12):
        out = augment.augment_image(image, "flip", seed).numpy()
        mirrored = np.array_equal(out, image[:, ::-1])
        assert mirrored or np.array_equal(out, image)
        outcomes.add(mirrored)
    assert outcomes == {True, False}


@pytest.mark.parametrize("spec", ["rotate=0", "shear=0", "rotate=0,shear=0,zoom=0,translate=0",
                                  "crop=1", "warp=0", "flip=0", "color=0,brightness=0,contrast=0"])
def test_zero_strength_is_identity(image, spec):
    np.testing.assert_allclose(augment.augment_image(image, spec, 3), image, atol=1e-3)


def test_pca_matches_numpy_on_known_pixels():
    rng = np.random.default_rng(1)
    covariance = np.array([[900.0, 300, 100], [300, 400, 50], [100, 50, 100]])
    pixels = rng.multivariate_normal([120, 110, 100], covariance, size=(50, 20, 20))
    eigvals, eigvecs = np.linalg.eigh(np.cov(pixels.reshape(-1, 3).T))
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    from_array = augment.compute_pca(pixels)
    from_dataset = augment.compute_pca(
        tf.data.Dataset.from_tensor_slices((pixels.astype(np.float32), np.zeros(50))).batch(7))
    for result, rtol in ((from_array, 1e-9), (from_dataset, 1e-4)):
        np.testing.assert_allclose(result.eigvals, eigvals, rtol=rtol)
        cosines = np.abs(np.sum(np.array(result.eigvecs) * eigvecs, axis=0))
        np.testing.assert_allclose(cosines, 1, atol=1e-4)
    assert augment.ColorPCA.from_dict(from_array.to_dict()) == from_array
    with pytest.raises(UserInputError, match="pca"):
        augment.augment_image(pixels[0], "pca=0.1", 0, pca=None)


def test_pca_shift_has_sigma_squared_times_pixel_covariance():
    covariance = np.array([[400.0, 150, 40], [150, 200, 20], [40, 20, 50]])
    eigvals, eigvecs = np.linalg.eigh(covariance)
    pca = augment.ColorPCA(tuple(eigvals), tuple(map(tuple, eigvecs)))
    sigma, count = 0.3, 4000
    grey = tf.data.Dataset.from_tensors(tf.fill([2, 2, 3], 128.0)).repeat(count)
    augmented = augment.augment_dataset(grey, f"pca={sigma}", seed=7, pca=pca).batch(count)
    shifts = next(augmented.as_numpy_iterator())[:, 0, 0] - 128
    expected = sigma**2 * covariance
    np.testing.assert_allclose(np.cov(shifts.T), expected, atol=0.1 * expected.max())
    np.testing.assert_allclose(shifts.mean(axis=0), 0, atol=0.1 * np.sqrt(expected.max()))


def test_same_seed_same_images_different_seed_different(image, pca):
    first, again, other = (augment.augment_image(image, FULL, seed, pca) for seed in (4, 4, 5))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other, atol=1)

    def by_label(seed, view=0):
        dataset = tf.data.Dataset.from_tensor_slices((tf.stack([image] * 6), tf.range(6)))
        return {int(label): pixels for pixels, label in
                augment.augment_dataset(dataset, FULL, seed, pca, view).as_numpy_iterator()}

    a, b, c, d = by_label(1), by_label(1), by_label(2), by_label(1, view=1)
    for label in range(6):
        np.testing.assert_array_equal(a[label], b[label])
        assert not np.allclose(a[label], c[label], atol=1)
        assert not np.allclose(a[label], d[label], atol=1)
    assert not np.allclose(a[0], a[1], atol=1), "images of one dataset share their draws"


@pytest.mark.parametrize("spec", list(augment.OPS) + [FULL])
def test_ops_trace_once_in_tf_function_and_dataset_map(image, pca, spec):
    function = tf.function(lambda pixels, seed: augment.augment_image(pixels, spec, seed, pca))
    outputs = [function(image, augment.image_seed(0, i)).numpy() for i in range(4)]
    assert function.experimental_get_tracing_count() == 1
    if spec not in ("flip", "vflip"):  # a mirror can draw "no" twice
        assert not np.allclose(outputs[0], outputs[1], atol=1e-3)
    unknown = function.get_concrete_function(tf.TensorSpec([None, None, 3], tf.float32),
                                             tf.TensorSpec([2], tf.int64))
    assert unknown(image, augment.image_seed(0, 0)).shape == image.shape
    mapped = augment.augment_dataset(tf.data.Dataset.from_tensors(image).repeat(3), spec, 0, pca)
    assert mapped.element_spec.shape == image.shape
    assert len(list(mapped)) == 3


def test_augment_dataset_without_ops_or_batched():
    dataset = tf.data.Dataset.from_tensors(tf.zeros([4, 4, 3]))
    assert augment.augment_dataset(dataset, "none", 0) is dataset
    with pytest.raises(UserInputError, match=r"before \.batch\(\)"):
        augment.augment_dataset(dataset.batch(2), "flip", 0)


@pytest.mark.parametrize("spec, message", [
    ("rotat=5", "unknown op 'rotat'. Valid ops: crop, rcrop, rotate"),
    ("rotate=200", r"'rotate' degrees must be in \[0, 180\].*Received: rotate=200"),
    ("crop=0", r"'crop' fraction must be in \[0.1, 1\]"),
    ("color=-3", r"'color' offset must be in \[0, 255\]"),
    ("shear=abc", "'shear' needs numbers: shear=factor. Received: shear=abc"),
    ("flip,flip=1", "'flip' is given twice"),
    ("crop,rcrop", "crop or rcrop, not both"),
    ("rcrop=0.5:0.2", "min_scale <= max_scale"),
    ("warp=0.1:3.5", "grid must be a whole number"),
    ("color=1:2", "at most 1 value"),
])
def test_parser_rejects_bad_input_with_range(spec, message):
    with pytest.raises(UserInputError, match=message):
        augment.parse_spec(spec)


def test_parser_defaults_canonical_form_and_none():
    spec = augment.parse_spec(" flip , rotate = 10, rcrop=0.25 ,")
    assert spec.get("flip") == (0.5,) and spec.get("rotate") == (10.0,)
    assert spec.get("rcrop") == (0.25, 1.0, 0.75, 4 / 3)
    assert str(spec) == "rcrop=0.25:1:0.75:1.33333,rotate=10,flip=0.5"
    assert augment.parse_spec(str(spec)).get("flip") == (0.5,)
    assert not augment.parse_spec("none") and not augment.parse_spec("")


def test_config_augment_from_string_and_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('epochs = 2\n[augment]\nflip = true\nrotate = 15\nrcrop = [0.25, 1.0]\n'
                    'color = false\n')
    config = config_lib.from_dict(config_lib.load_toml(path), str(path))
    assert config.augment == "rcrop=0.25:1:0.75:1.33333,rotate=15,flip=0.5"
    path.write_text(config_lib.to_toml(config))
    assert config_lib.from_dict(config_lib.load_toml(path)) == config
    assert config_lib.from_dict({"augment": "none"}).augment is None
    with pytest.raises(UserInputError, match="unknown op 'blur'"):
        config_lib.from_dict({"augment": "blur=2"})
    path.write_text('[augment]\nrotate = "lots"\n')
    with pytest.raises(UserInputError, match="Received: rotate='lots'"):
        config_lib.load_toml(path)
    path.write_text('[other]\nx = 1\n')
    with pytest.raises(UserInputError, match="tables are not supported"):
        config_lib.load_toml(path)


@pytest.mark.slow
def test_preview_writes_png_grid_of_expected_size(tmp_path, caplog):
    data = make_folder(tmp_path / "data", per_class=4)
    caplog.set_level("INFO", "tlapp")
    out = preview.preview(data, "flip,rotate=30,pca=0.2", tmp_path / "sub" / "grid.png",
                          images=2, variants=3, image_size=32, seed=1)
    assert out == tmp_path / "sub" / "grid.png"
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 32 + 2, 4 * 32 + 3 * 2, 3)
    cells = [grid[:32, j * 34:j * 34 + 32].astype(float) for j in range(4)]
    assert all(np.abs(cells[0] - cell).mean() > 1 for cell in cells[1:])
    assert str(out) in caplog.text
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left
    with pytest.raises(UserInputError, match="Received: variants=0"):
        preview.preview(data, "flip", tmp_path / "x.png", variants=0)


@pytest.mark.slow
def test_cli_augment_preview_and_train_flag(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=3, classes={"cat": 0, "dog": 0.3})
    out = tmp_path / "grid.png"
    code = cli.main(["augment-preview", str(data), "--augment", "flip,warp=0.1,color=30",
                     "--out", str(out), "--images", "1", "--variants", "2", "--image-size", "24"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert str(out) in err and Image.open(out).size == (3 * 24 + 4, 24)
    for command in (["augment-preview", str(data), "--augment", "rotate=500"],
                    ["train", str(data), "--augment", "rotate=500", "--out", str(tmp_path / "r")]):
        code = cli.main(command)
        _, err = capsys.readouterr()
        assert code == 2
        assert "'rotate' degrees must be in [0, 180]" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()

    train = ["train", str(data), "--backbone", "vgg16", "--weights", "none", "--image-size",
             "32", "--epochs", "1", "--augment", "flip,rotate=15", "--cache-dir",
             str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    code = cli.main(train)  # on cached features of plain images, augmentation does nothing
    _, err = capsys.readouterr()
    assert code == 2 and "--augment would change nothing" in err and "--aug-views K" in err
    assert not (tmp_path / "run").exists()
    code = cli.main(train + ["--aug-views", "2"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert 'augment = "rotate=15,flip=0.5"' in (tmp_path / "run" / "config.toml").read_text()


def test_readme_documents_every_op_and_range():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Augmentation")[1].split("\n## ")[0]
    for op in augment.OPS.values():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{op.name}`")),
                   None)
        assert row, f"README has no row for {op.name}"
        for low, high in op.ranges:
            assert f"{low:g} to {high:g}" in row, (op.name, low, high)
