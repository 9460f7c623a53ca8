"""Backbone registry: name -> spec, building with weights, cut points, stem/top split."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Callable

import keras
import numpy as np
from keras import ops

from tlapp import classic
from tlapp.config import UserInputError

INPUT_CUT = "input"  # the cut at the model's input: nothing frozen, the cache holds pixels


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and use it as a feature extractor.

    Attributes:
        name: registry name (lower case, as typed on the command line).
        factory: attribute of `keras.applications` that builds it.
        preprocess: mode of its `preprocess_input`: caffe, tf, torch or none.
        default_size: image size it was trained on (square).
        min_size: smallest image size its `keras.applications` builder accepts.
        weight_file: the ImageNet "notop" file Keras downloads into $KERAS_HOME/models.
        block_pattern: regex matching the layer that ends each block; block ends are
            the cut points whose names match it, plus the final layer.
        module: `keras.applications` submodule holding its `preprocess_input`.
        builder: for classic nets trained from scratch (no `keras.applications` factory, no
            pretrained weights): image size -> model without its softmax layer.
        path: for a user's model file (`tlapp.custom`): its absolute path.
    """

    name: str
    factory: str
    preprocess: str
    default_size: int
    min_size: int
    weight_file: str
    block_pattern: str
    module: str
    builder: Callable[[int], keras.Model] | None = None
    path: str | None = None

    @property
    def scratch_only(self) -> bool:
        """True for classic nets: no pretrained weights, everything trains by default."""
        return self.builder is not None


def _classic(name: str, builder: Callable[[int], keras.Model], default_size: int,
             min_size: int, block_pattern: str) -> BackboneSpec:
    return BackboneSpec(name, "", "tf", default_size, min_size, "", block_pattern, "",
                        builder=builder)


def _resnet(name: str, factory: str, v2: bool = False) -> BackboneSpec:
    return BackboneSpec(name, factory, "tf" if v2 else "caffe", 224, 32,
                        f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                        r"conv\d_block\d+_out$", "resnet_v2" if v2 else "resnet")


_SPECS = [
    _resnet("resnet50", "ResNet50"),
    _resnet("resnet101", "ResNet101"),
    _resnet("resnet152", "ResNet152"),
    _resnet("resnet50v2", "ResNet50V2", v2=True),
    _resnet("resnet101v2", "ResNet101V2", v2=True),
    _resnet("resnet152v2", "ResNet152V2", v2=True),
    BackboneSpec("inception_v3", "InceptionV3", "tf", 299, 75,
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 r"mixed\d+$", "inception_v3"),
    BackboneSpec("inception_resnet_v2", "InceptionResNetV2", "tf", 299, 75,
                 "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 r"(mixed_\d[ab]|block\d+_\d+_ac|block8_10)$", "inception_resnet_v2"),
    BackboneSpec("vgg16", "VGG16", "caffe", 224, 32,
                 "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 r"block\d_pool$", "vgg16"),
    BackboneSpec("vgg19", "VGG19", "caffe", 224, 32,
                 "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 r"block\d_pool$", "vgg19"),
    BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", 224, 32,
                 "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                 r"block_\d+_(add|project_BN)$", "mobilenet_v2"),
    BackboneSpec("efficientnetb0", "EfficientNetB0", "none", 224, 32,
                 "efficientnetb0_notop.h5", r"block\d[a-z]_(add|project_bn)$", "efficientnet"),
    BackboneSpec("densenet121", "DenseNet121", "torch", 224, 32,
                 "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 r"(pool\d_pool|conv5_block\d+_concat)$", "densenet"),
    _classic("lenet5", lambda size: classic.lenet5((size, size, 3)), 32, 32,
             r"(s\d_pool|c5_conv|f6_dense)$"),
    _classic("alexnet", lambda size: classic.alexnet((size, size, 3)), 227, 67,
             r"(pool\d|conv[34]|fc[67])$"),
]
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name: str, preprocess: str | None = None) -> BackboneSpec:
    """Returns the registry entry for `name` (or a spec for a `.keras` model file, with the
    `preprocess` mode it needs); raises a UserInputError listing the known ones."""
    from tlapp import custom  # custom builds on this module

    if custom.is_custom(name):
        return custom.custom_spec(name, preprocess)
    if preprocess is not None:
        raise UserInputError(
            f"preprocess is only for custom .keras backbones; {name} brings its own "
            f"preprocessing. Remove it. Received: preprocess={preprocess!r}")
    key = name.lower().replace("-", "_")
    if key not in BACKBONES:
        raise UserInputError(
            f"Unknown backbone. Received: backbone={name!r}. "
            f"Known backbones: {', '.join(BACKBONES)}."
        )
    return BACKBONES[key]


@keras.saving.register_keras_serializable(package="tlapp")
class Preprocess(keras.layers.Layer):
    """A backbone's `preprocess_input` as a layer, so saved models take plain pixels (0-255, RGB).

    Modes follow `keras.applications.imagenet_utils.preprocess_input`: caffe (RGB->BGR,
    subtract the ImageNet mean), tf (scale to [-1, 1]), torch (scale to [0, 1], normalise
    by ImageNet mean and std) and none (the model rescales by itself, as EfficientNet does).
    """

    MODES = ("caffe", "tf", "torch", "none")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Unknown preprocessing mode. Received: mode={mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = np.array([0.485, 0.456, 0.406]) * 255.0
            std = np.array([0.229, 0.224, 0.225]) * 255.0
            return (x - ops.cast(mean, x.dtype)) / ops.cast(std, x.dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.cast([103.939, 116.779, 123.68], x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def resolved_source(spec: BackboneSpec, weights: str) -> dict[str, str]:
    """Config values that pin a model file down in a run's config.toml: its absolute path,
    its preprocessing and "saved" for its own weights. Empty for registry backbones."""
    if not spec.path:
        return {}
    return {"backbone": spec.path, "preprocess": spec.preprocess,
            "weights": "saved" if weights == "imagenet" else weights}


def keras_models_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def build_backbone(spec: BackboneSpec, weights: str, image_size: int, seed: int = 0) -> keras.Model:
    """Builds the backbone without its classifier (`include_top=False`).

    Args:
        spec: registry entry.
        weights: "imagenet" (Keras download and cache), "none" (random, from `seed`),
            or a path to the notop `.h5` file as downloaded or a Keras 3 `.weights.h5`.
            Classic nets take "none" only; model files see `tlapp.custom.build_custom`.
        image_size: square input size in pixels.
        seed: seeds random initialisation, so weights="none" is reproducible.

    Raises:
        UserInputError: bad size, missing or incompatible weights file, or ImageNet
            weights that cannot be downloaded.
    """
    if image_size < spec.min_size:
        raise UserInputError(
            f"{spec.name} needs images of at least {spec.min_size} px. "
            f"Received: image_size={image_size}"
        )
    if spec.path:
        from tlapp import custom

        return custom.build_custom(spec, weights, image_size, seed)
    if spec.builder:
        if weights != "none":
            raise UserInputError(
                f"{spec.name} has no pretrained weights: it trains from scratch. Pass "
                f"--weights none. Received: weights={weights!r}")
        keras.utils.set_random_seed(seed)
        return spec.builder(image_size)
    factory = getattr(keras.applications, spec.factory)
    kwargs = dict(include_top=False, input_shape=(image_size, image_size, 3))
    keras.utils.set_random_seed(seed)
    if weights == "none":
        return factory(weights=None, **kwargs)
    if weights == "imagenet":
        try:
            return factory(weights="imagenet", **kwargs)
        except Exception as e:  # Keras raises a bare Exception for download failures
            if "fetch failure" not in str(e):
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
    except Exception as e:
        raise UserInputError(
            f"Could not load weights from {path} into {spec.name}: {e}. "
            f"Expected the notop file '{spec.weight_file}' or a Keras 3 .weights.h5 "
            f"saved from the same backbone."
        ) from None
    return model


def _flat(tensors) -> list:
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def cut_points(model: keras.Model) -> list[str]:
    """Names of layers that every input-to-output path passes through, in order.

    Cutting there splits the model in two: a stem whose single output feeds the top.
    """
    layers = model.layers
    last_use: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.InputLayer):
            for t in _flat(layer.input):
                last_use[id(t)] = i
    for t in model.outputs:
        last_use[id(t)] = len(layers)
    live: set[int] = set()
    names = []
    for i, layer in enumerate(layers):
        outputs = {id(t) for t in _flat(layer.output)}
        live |= {t for t in outputs if last_use.get(t, -1) > i}
        live = {t for t in live if last_use[t] > i}
        if len(outputs) == 1 and live == outputs and not isinstance(layer, keras.layers.InputLayer):
            names.append(layer.name)
    return names


def valid_cuts(model: keras.Model) -> list[str]:
    """Every value `--cut` accepts, in order: INPUT_CUT ("input"), then the cut points."""
    return [INPUT_CUT] + [name for name in cut_points(model) if name != INPUT_CUT]


def block_ends(spec: BackboneSpec, model: keras.Model) -> list[str]:
    """Cut points that end a block, ending with the final layer."""
    pattern = re.compile(spec.block_pattern)
    ends = [name for name in cut_points(model) if pattern.match(name)]
    final = model.layers[-1].name
    return [name for name in ends if name != final] + [final]


def resolve_cut(spec: BackboneSpec, model: keras.Model, cut: str | None,
                trainable_blocks: int | str | None) -> str:
    """Turns --cut / --trainable-blocks into the name of the layer where the stem ends.

    `trainable_blocks="all"`, and the default of classic nets, is INPUT_CUT: every layer trains.
    """
    if trainable_blocks == "all" or (spec.scratch_only and cut is None
                                     and trainable_blocks is None):
        return INPUT_CUT
    if cut is not None:
        points = valid_cuts(model)
        if cut not in points:
            near = difflib.get_close_matches(cut, points, n=8, cutoff=0.4) or points[-8:]
            raise UserInputError(
                f"'{cut}' is not a valid cut point of {spec.name}: a cut point is a layer "
                f"that every path from input to output passes through. Received: cut={cut!r}. "
                f"Valid cut points near it: {', '.join(near)}. "
                f"'tlapp backbones {spec.path or spec.name}' lists them all."
            )
        return cut
    ends = block_ends(spec, model)
    blocks = trainable_blocks or 0
    if blocks >= len(ends):
        raise UserInputError(
            f"{spec.name} has {len(ends) - 1} blocks above its first block end; "
            f"trainable_blocks must be at most {len(ends) - 1}, or 'all'. "
            f"Received: trainable_blocks={trainable_blocks}"
        )
    return ends[-1 - blocks]


def split_backbone(model: keras.Model, cut: str) -> tuple[keras.Model, keras.Model | None]:
    """Splits at `cut` into (stem, top); top is None when `cut` is the final layer.

    Both share layers (and so weights) with `model`: training the top trains the model.
    At INPUT_CUT the stem passes its input through and the top is the whole model.
    """
    if cut == INPUT_CUT:
        return (keras.Model(model.input, model.input, name="stem"),
                keras.Model(model.input, model.output, name="top"))
    cut_output = model.get_layer(cut).output
    stem = keras.Model(model.input, cut_output, name="stem")
    if cut == model.layers[-1].name:
        return stem, None
    return stem, keras.Model(cut_output, model.output, name="top")


def resolve_fine_tune_cut(spec: BackboneSpec, model: keras.Model, cut: str, blocks: int,
                          fine_tune_cut: str | None = None) -> str | None:
    """Where the frozen part ends in stage 2: `fine_tune_cut`, or `blocks` block ends below
    `cut`. None means nothing stays frozen."""
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    if fine_tune_cut is not None:
        resolve_cut(spec, model, fine_tune_cut, None)  # validates the name
        if order[fine_tune_cut] >= order[cut]:
            raise UserInputError(f"fine_tune_cut must be below the stage-1 cut '{cut}'. "
                                 f"Received: fine_tune_cut={fine_tune_cut!r}")
        return fine_tune_cut
    earlier = [name for name in block_ends(spec, model) if order[name] < order[cut]]
    if blocks > len(earlier) + 1:
        raise UserInputError(
            f"{spec.name} has {len(earlier) + 1} blocks below '{cut}'. Received: "
            f"fine_tune_blocks={blocks}")
    return None if blocks == len(earlier) + 1 else earlier[-blocks]
