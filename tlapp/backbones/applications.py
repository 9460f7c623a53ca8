"""keras.applications families: one spec per backbone, and building one with its weights."""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import keras

from tlapp.backbones.spec import BackboneSpec
from tlapp.errors import UserInputError


def _spec(name: str, factory: str, preprocess: str, default_size: int, min_size: int,
          weight_file: str, block_pattern: str, module: str) -> BackboneSpec:
    return BackboneSpec(name, "applications", preprocess, default_size, min_size,
                        block_pattern, factory=factory, weight_file=weight_file, module=module)


def _resnet(name: str, factory: str, v2: bool = False) -> BackboneSpec:
    return _spec(name, factory, "tf" if v2 else "caffe", 224, 32,
                 f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 r"conv\d_block\d+_out$", "resnet_v2" if v2 else "resnet")


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
    _spec("mobilenet_v2", "MobileNetV2", "tf", 224, 32,
          "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
          r"block_\d+_(add|project_BN)$", "mobilenet_v2"),
    _spec("efficientnetb0", "EfficientNetB0", "none", 224, 32, "efficientnetb0_notop.h5",
          r"block\d[a-z]_(add|project_bn)$", "efficientnet"),
    _spec("densenet121", "DenseNet121", "torch", 224, 32,
          "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
          r"(pool\d_pool|conv5_block\d+_concat)$", "densenet"),
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
    model = factory(weights=None, **kwargs)
    try:
        model.load_weights(str(path))
    except Exception as e:  # any failure to read it is the file's: h5py, shape, name errors
        raise UserInputError(
            f"Could not load weights from {path} into {spec.name}: {e}. "
            f"Expected the notop file '{spec.weight_file}' or a Keras 3 .weights.h5 "
            f"saved from the same backbone."
        ) from None
    return model
