import keras
import pytest

from tlapp.backbones import classic, costs
from tlapp.backbones import registry
from tlapp.reporting import tables


def conv_model(*layers, shape=(28, 28, 192)):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def test_inception_bottleneck_arithmetic():
    """GoogLeNet's argument for 1x1 bottlenecks (Szegedy et al. 2014): a 5x5 convolution
    with 32 filters on 28x28x192 costs ~120 M multiplies, ~12.4 M after a 1x1 to 16 channels."""
    direct = conv_model(keras.layers.Conv2D(32, 5, padding="same"))
    assert costs.model_macs(direct) == 28 * 28 * 5 * 5 * 192 * 32 == 120_422_400
    bottleneck = conv_model(keras.layers.Conv2D(16, 1),
                            keras.layers.Conv2D(32, 5, padding="same"))
    assert costs.model_macs(bottleneck) == 28 * 28 * 192 * 16 + 28 * 28 * 5 * 5 * 16 * 32
    assert round(costs.model_macs(bottleneck) / 1e6, 1) == 12.4


def test_depthwise_separable_grouped_dense_and_strides():
    shape = (8, 8, 4)
    assert costs.model_macs(conv_model(keras.layers.DepthwiseConv2D(3, padding="same"),
                                       shape=shape)) == 8 * 8 * 9 * 4
    assert costs.model_macs(conv_model(keras.layers.DepthwiseConv2D(
        3, padding="same", depth_multiplier=2), shape=shape)) == 8 * 8 * 9 * 4 * 2
    assert costs.model_macs(conv_model(keras.layers.SeparableConv2D(6, 3, padding="same"),
                                       shape=shape)) == 8 * 8 * 9 * 4 + 8 * 8 * 4 * 6
    assert costs.model_macs(conv_model(keras.layers.Conv2D(6, 3, padding="same", groups=2),
                                       shape=shape)) == 8 * 8 * 9 * 2 * 6
    assert costs.model_macs(conv_model(keras.layers.Conv2D(6, 3, strides=2),
                                       shape=shape)) == 3 * 3 * 9 * 4 * 6  # 3x3 outputs
    dense = conv_model(keras.layers.Flatten(), keras.layers.Dense(5), shape=shape)
    assert costs.model_macs(dense) == 8 * 8 * 4 * 5
    per_position = conv_model(keras.layers.Dense(5), shape=(3, 10))
    assert costs.model_macs(per_position) == 3 * 10 * 5
    pooling = conv_model(keras.layers.MaxPooling2D(), keras.layers.BatchNormalization(),
                         shape=shape)
    assert costs.model_macs(pooling) == 0  # not counted


def test_nested_models_are_counted_and_cumulative_macs_follow_the_layers():
    inner = conv_model(keras.layers.Conv2D(6, 3, name="a"), shape=(10, 10, 3))
    outer = conv_model(inner, keras.layers.Conv2D(2, 1, name="b"), shape=(10, 10, 3))
    a, b = 8 * 8 * 9 * 3 * 6, 8 * 8 * 6 * 2
    assert costs.model_macs(outer) == a + b
    assert list(costs.cumulative_macs(outer).values())[-2:] == [a, a + b]


def test_vgg16_with_its_top_parameters_and_macs():
    with keras.StatelessScope():  # shapes only: Keras defers initialising the weights
        model = keras.applications.VGG16(weights=None)
    assert model.count_params() == 138_357_544
    assert costs.model_macs(model) == 15_470_264_320  # the well-known 15.5 G


def test_lenet5_macs_by_hand():
    model = classic.lenet5((32, 32, 3), include_top=True, classes=10)
    c1, c3, c5 = 28 * 28 * 25 * 3 * 6, 10 * 10 * 25 * 6 * 16, 25 * 16 * 120
    assert costs.model_macs(model) == c1 + c3 + c5 + 120 * 84 + 84 * 10


@pytest.mark.parametrize("value, text", [(0, "0"), (999, "999"), (651_000, "651 k"),
                                         (15_470_264_320, "15.5 G"), (2_500_000, "2.5 M")])
def test_format_count(value, text):
    assert costs.format_count(value) == text


def test_cut_point_table_has_stem_macs_and_cache_bytes():
    table = tables.backbone_table("vgg16", 32)
    lines = table.splitlines()
    assert lines[0].startswith("vgg16 at 32x32: 14,714,688 parameters")
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["input"][1:4] == ["32x32x3", "12,288", "0"]  # pixels, no MACs
    spec = registry.get_spec("vgg16")
    model = registry.build_backbone(spec, "none", 32)
    first = costs.format_count(32 * 32 * 9 * 3 * 64).split()
    assert rows["block1_conv1"][3:5] == first
    assert rows["block5_pool"][3:5] == costs.format_count(costs.model_macs(model)).split()
    assert rows["block5_pool"][2] == "2,048" and rows["block5_pool"][-1] == "yes"
