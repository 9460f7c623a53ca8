"""The backbone registry: a name (or a .keras path) to its spec, and building it with weights.

Each family keeps its own table (applications.py, classic.py) and builder; custom.py turns a
user's model file into a spec of the same shape.
"""
from __future__ import annotations

import keras

from tlapp.backbones import applications, classic, custom
from tlapp.backbones.spec import BackboneSpec
from tlapp.errors import UserInputError

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in
                                      applications.SPECS + classic.SPECS}


def get_spec(name: str, preprocess: str | None = None) -> BackboneSpec:
    """Returns the registry entry for `name` (or a spec for a `.keras` model file, with the
    `preprocess` mode it needs); raises a UserInputError listing the known ones."""
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


def build_backbone(spec: BackboneSpec, weights: str, image_size: int, seed: int = 0) -> keras.Model:
    """Builds the backbone without its classifier (`include_top=False`).

    Args:
        spec: registry entry.
        weights: "imagenet" (Keras download and cache), "none" (random, from `seed`),
            or a path to the notop `.h5` file as downloaded or a Keras 3 `.weights.h5`.
            Classic nets take "none" only; model files see `custom.build_custom`.
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
    if spec.family == "custom":
        return custom.build_custom(spec, weights, image_size, seed)
    keras.utils.set_random_seed(seed)
    if spec.family == "classic":
        return classic.build_classic(spec, weights, image_size)
    return applications.build_application(spec, weights, image_size)


def resolved_source(spec: BackboneSpec, weights: str) -> dict[str, str]:
    """Config values that pin a model file down in a run's config.toml: its absolute path,
    its preprocessing and "saved" for its own weights. Empty for registry backbones."""
    if spec.family != "custom":
        return {}
    return {"backbone": spec.path, "preprocess": spec.preprocess,
            "weights": "saved" if weights == "imagenet" else weights}
