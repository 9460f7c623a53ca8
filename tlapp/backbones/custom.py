"""User backbones: a Keras model file (`--backbone path/to/model.keras`) used like a registry one.

The file is loaded with `safe_mode=True` (no pickled Lambda code), rebuilt as a functional
model at the run's image size, and stripped of a final softmax classifier (as
`include_top=False` does). Every layer that all paths pass through is a cut point; block ends
are all of them, so `--trainable-blocks N` leaves the top N cut points trainable.
"""
from __future__ import annotations

import re
from pathlib import Path

import keras
from keras.src.models.functional import Functional

from tlapp.backbones.spec import BackboneSpec, Preprocess
from tlapp.errors import UserInputError

DEFAULT_SIZE = 224  # for models that accept any size
SAVED = "saved"  # weights value: the weights stored in the file


def is_custom(name: str) -> bool:
    """True when `name` names a model file rather than a registry backbone."""
    return name.endswith((".keras", ".h5")) or "/" in name or "\\" in name


def load_file(path: str | Path) -> keras.Model:
    """Loads the user's model (safe mode, not compiled) as a functional or sequential model."""
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as e:
        raise UserInputError(
            f"Could not load {path} as a Keras model: {str(e).splitlines()[0]}. "
            f"Save it with model.save('name.keras'); Lambda layers are refused "
            f"(safe_mode=True), so use a registered custom layer instead."
        ) from None
    if not isinstance(model, (keras.Sequential, Functional)):
        raise UserInputError(f"{path} holds a subclassed model ({type(model).__name__}), which "
                             f"has no layer graph to cut. Save a functional or Sequential model.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserInputError(f"{path} must have one image input and one output. Received: "
                             f"{len(model.inputs)} inputs, {len(model.outputs)} outputs.")
    return model


def custom_spec(path: str, preprocess: str | None) -> BackboneSpec:
    """A registry-style spec for a model file; checks the file, its input and `preprocess`."""
    file = Path(path).expanduser()
    if file.suffix != ".keras":
        raise UserInputError(f"A custom backbone must be a .keras file (model.save('x.keras')). "
                             f"Received: backbone={path!r}")
    if not file.is_file():
        raise UserInputError(f"Backbone file not found. Received: backbone={path!r}. "
                             f"'tlapp backbones' lists the built-in backbones.")
    mode = preprocess or "none"
    if mode not in Preprocess.MODES:
        raise UserInputError(f"preprocess must be one of {', '.join(Preprocess.MODES)}. "
                             f"Received: preprocess={preprocess!r}")
    shape = tuple(load_file(file).inputs[0].shape[1:])
    if len(shape) != 3 or shape[-1] != 3:
        raise UserInputError(f"{file} must take RGB images (height, width, 3). "
                             f"Received: input shape {shape}")
    if shape[0] != shape[1]:
        raise UserInputError(f"{file} must take square images (tlapp resizes to N x N). "
                             f"Received: input shape {shape}")
    size = shape[0] or DEFAULT_SIZE
    name = re.sub(r"\W", "_", file.stem)
    return BackboneSpec(name, "custom", mode, size, 1 if shape[0] is None else size, r".*",
                        path=str(file.resolve()))


def build_custom(spec: BackboneSpec, weights: str, image_size: int, seed: int = 0
                 ) -> keras.Model:
    """Loads the file and rebuilds it as a functional model at `image_size`.

    Args:
        weights: "saved" or "imagenet" (the weights stored in the file), "none" (the same
            architecture, randomly initialised from `seed`) or a `.weights.h5` path.
    """
    loaded = load_file(spec.path)
    fixed = loaded.inputs[0].shape[1]
    if fixed is not None and image_size != fixed:
        raise UserInputError(f"{spec.path} takes {fixed}x{fixed} images. Pass --image-size "
                             f"{fixed} or leave it out. Received: image_size={image_size}")
    keras.utils.set_random_seed(seed)  # after loading, which draws initial values too
    inputs = keras.Input((image_size, image_size, 3), name="input")
    if isinstance(loaded, keras.Sequential):
        x = inputs
        for layer in loaded.layers:
            x = layer.__class__.from_config(layer.get_config())(x)
        model = keras.Model(inputs, x, name=loaded.name)
    else:
        model = keras.models.clone_model(loaded, input_tensors=inputs)
    if weights in (SAVED, "imagenet"):
        model.set_weights(loaded.get_weights())
    elif weights != "none":
        path = Path(weights).expanduser()
        try:
            model.load_weights(str(path))
        except Exception as e:
            raise UserInputError(f"Could not load weights from {path} into {spec.path}: "
                                 f"{str(e).splitlines()[0]}. Expected 'saved', 'none' or a "
                                 f".weights.h5 file saved from the same model. "
                                 f"Received: weights={weights!r}") from None
    return drop_classifier(model)


def drop_classifier(model: keras.Model) -> keras.Model:
    """Removes a final softmax classifier (Dense with softmax, or Dense then Softmax/Activation),
    so its input, the features the old classes were read from, is the final layer."""
    layers = model.layers
    last = layers[-1]
    softmax_layer = isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and _is_softmax(last.activation))
    if softmax_layer and len(layers) > 2 and isinstance(layers[-2], keras.layers.Dense):
        last = layers[-2]
    elif not (isinstance(last, keras.layers.Dense) and _is_softmax(last.activation)):
        return model
    return keras.Model(model.input, last.input, name=model.name)


def _is_softmax(activation) -> bool:
    return getattr(activation, "__name__", "") == "softmax"
