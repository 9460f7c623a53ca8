"""keras.applications families: one spec per backbone, and building one with its weights."""
from __future__ import annotations

import contextlib
import os
import urllib.error
from pathlib import Path

import keras

from tlapp.backbones.spec import BackboneSpec
from tlapp.errors import UserInputError


def _spec(name: str, factory: str, preprocess: str, default_size: int, min_size: int,
          weight_file: str, block_pattern: str, module: str,
          collapses: bool = False) -> BackboneSpec:
    return BackboneSpec(name, "applications", preprocess, default_size, min_size,
                        block_pattern, factory=factory, weight_file=weight_file, module=module,
                        collapses_at_random_init=collapses)


def _resnet(name: str, factory: str, v2: bool = False) -> BackboneSpec:
    return _spec(name, factory, "tf" if v2 else "caffe", 224, 32,
                 f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 r"conv\d_block\d+_out$", "resnet_v2" if v2 else "resnet")


def _convnext(size: str) -> BackboneSpec:
    # Blocks inside a stage end in a bare `inputs + x` op, not a layer: the named blocks are
    # the stages (stem, then each downsampling layer), the last one ends at the final norm.
    return _spec(f"convnext_{size}", f"ConvNeXt{size.capitalize().replace('large', 'Large')}",
                 "none", 224, 32, f"convnext_{size}_notop.h5",
                 rf"convnext_{size}_(stem|downsampling_block_\d)$", "convnext")


EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
EFFICIENTNET_V2_SIZES = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "s": 384, "m": 480,
                         "l": 480}
MBCONV_BLOCKS = r"block\d[a-z]_(add|project_bn)$"  # EfficientNet V1 and V2 layer names

SPECS = [
    _resnet("resnet50", "ResNet50"),
    _resnet("resnet101", "ResNet101"),
    _resnet("resnet152", "ResNet152"),
    _resnet("resnet50v2", "ResNet50V2", v2=True),
    _resnet("resnet101v2", "ResNet101V2", v2=True),
    _resnet("resnet152v2", "ResNet152V2", v2=True),
    _spec("inception_v3", "InceptionV3", "tf", 299, 75,
          "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", r"mixed\d+$",
          "inception_v3"),
    _spec("inception_resnet_v2", "InceptionResNetV2", "tf", 299, 75,
          "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
          r"(mixed_\d[ab]|block\d+_\d+_ac|block8_10)$", "inception_resnet_v2"),
    _spec("vgg16", "VGG16", "caffe", 224, 32, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
          r"block\d_pool$", "vgg16"),
    _spec("vgg19", "VGG19", "caffe", 224, 32, "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
          r"block\d_pool$", "vgg19"),
    # MobileNet V1/V2 download a file per input size (128-224); the 224 one is named here.
    _spec("mobilenet", "MobileNet", "tf", 224, 32, "mobilenet_1_0_224_tf_no_top.h5",
          r"conv_pw_\d+_relu$", "mobilenet", collapses=True),
    _spec("mobilenet_v2", "MobileNetV2", "tf", 224, 32,
          "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
          r"block_\d+_(add|project_BN)$", "mobilenet_v2", collapses=True),
    *(_spec(f"mobilenet_v3_{size}", f"MobileNetV3{size.capitalize()}", "none", 224, 32,
            f"weights_mobilenet_v3_{size}_224_1.0_float_no_top_v2.h5",
            r"expanded_conv(_\d+)?_(add|project_bn)$", "mobilenet_v3", collapses=True)
      for size in ("small", "large")),
    *(_spec(f"efficientnetb{i}", f"EfficientNetB{i}", "none", size, 32,
            f"efficientnetb{i}_notop.h5", MBCONV_BLOCKS, "efficientnet", collapses=True)
      for i, size in enumerate(EFFICIENTNET_SIZES)),
    *(_spec(f"efficientnetv2{v}", f"EfficientNetV2{v.upper()}", "none", size, 32,
            f"efficientnetv2-{v}_notop.h5", MBCONV_BLOCKS, "efficientnet_v2")
      for v, size in EFFICIENTNET_V2_SIZES.items()),
    *(_convnext(size) for size in ("tiny", "small", "base", "large", "xlarge")),
    # Xception's residual additions are the only cut points inside it; Keras leaves them
    # unnamed (add, add_1, ...: stable in a fresh session, which tlapp's runs start from).
    _spec("xception", "Xception", "tf", 299, 71,
          "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
          r"(block1_conv2_act|add(_\d+)?)$", "xception", collapses=True),
    *(_spec(f"densenet{n}", f"DenseNet{n}", "torch", 224, 32,
            f"densenet{n}_weights_tf_dim_ordering_tf_kernels_notop.h5",
            r"(pool\d_pool|conv5_block\d+_concat)$", "densenet") for n in (121, 169, 201)),
    # A NASNet cell reads the two cells before it: the only cut points are two in the stem,
    # the last cell's output and the final activation.
    _spec("nasnet_mobile", "NASNetMobile", "tf", 224, 32, "nasnet_mobile_no_top.h5",
          r"(stem_bn1|normal_concat_\d+)$", "nasnet"),
    _spec("nasnet_large", "NASNetLarge", "tf", 331, 32, "nasnet_large_no_top.h5",
          r"(stem_bn1|normal_concat_\d+)$", "nasnet"),
]


def keras_models_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def build_application(spec: BackboneSpec, weights: str, image_size: int) -> keras.Model:
    """Builds a keras.applications backbone without its classifier (`include_top=False`).

    Args:
        weights: "imagenet" (Keras download and cache), "none" (random; seed it first),
            or a path to the notop `.h5` file as downloaded or a Keras 3 `.weights.h5`.
    """
    factory = getattr(keras.applications, spec.factory)
    kwargs = dict(include_top=False, input_shape=(image_size, image_size, 3))
    if weights == "none":
        return factory(weights=None, **kwargs)
    if weights == "imagenet":
        try:
            return factory(weights="imagenet", **kwargs)
        except Exception as e:  # keras.utils.get_file raises a bare Exception from a URLError
            if not isinstance(e.__context__, (urllib.error.URLError, OSError)):
                raise
            raise UserInputError(
                f"Could not download the ImageNet weights for {spec.name} ({e}). "
                f"To use them offline, fetch the file '{spec.weight_file}' on a machine with "
                f"network access and put it in {keras_models_dir()} ($KERAS_HOME/models, "
                f"default ~/.keras/models), or pass it with --weights PATH. "
                f"Alternatively use --weights none for random initialisation."
            ) from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserInputError(
            f"Weights must be 'imagenet', 'none' or a path to a weights file. "
            f"Received: weights={weights!r} (no such file)"
        )
    try:
        with _download_from(path):
            return factory(weights="imagenet", **kwargs)
    except Exception as e:  # any failure to read it is the file's: h5py, shape, name errors
        raise UserInputError(
            f"Could not load weights from {path} into {spec.name}: {e}. "
            f"Expected the notop file '{spec.weight_file}' or a Keras 3 .weights.h5 "
            f"saved from the same backbone."
        ) from None


@contextlib.contextmanager
def _download_from(path: Path):
    """Makes keras.applications take `path` as the ImageNet file it would download.

    A weights file builds the same model as `weights="imagenet"`, which is not always the
    model `weights=None` builds: EfficientNet B0-B7 add a Rescaling layer for ImageNet
    weights only (the original's normalisation divides by the variance, not the standard
    deviation). Every keras.applications module fetches through `file_utils.get_file`.
    """
    from keras.src.utils import file_utils

    download = file_utils.get_file
    file_utils.get_file = lambda *args, **kwargs: str(path)
    try:
        yield
    finally:
        file_utils.get_file = download
