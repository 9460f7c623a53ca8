"""The `--augment` spec language: op registry, parsing, canonical form. Pure Python (no
TensorFlow), so a config is validated without importing TF; the ops are in augment/ops.py."""
from __future__ import annotations

import dataclasses

from tlapp.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Op:
    """One augmentation op of the spec language: its values, defaults and valid ranges."""

    name: str
    params: tuple[str, ...]
    defaults: tuple[float, ...]
    ranges: tuple[tuple[float, float], ...]
    help: str


# Registry order is application order: crop, geometry, warp, mirror, colour.
OPS = {op.name: op for op in (
    Op("crop", ("fraction",), (0.875,), ((0.1, 1.0),),
       "random crop of this fraction of each side, resized back to the input size"),
    Op("rcrop", ("min_scale", "max_scale", "min_aspect", "max_aspect"),
       (0.08, 1.0, 0.75, 4 / 3), ((0.01, 1.0), (0.01, 1.0), (0.1, 10.0), (0.1, 10.0)),
       "random resized crop: area fraction and aspect ratio ranges, resized back"),
    Op("rotate", ("degrees",), (15.0,), ((0.0, 180.0),), "rotation by up to +-degrees"),
    Op("shear", ("factor",), (0.1,), ((0.0, 1.0),), "horizontal shear by up to +-factor"),
    Op("zoom", ("fraction",), (0.1,), ((0.0, 0.9),), "zoom by a factor in [1-f, 1+f]"),
    Op("translate", ("fraction",), (0.1,), ((0.0, 0.5),),
       "shift by up to +-fraction of the size, each axis"),
    Op("warp", ("amplitude", "grid"), (0.05, 4.0), ((0.0, 0.25), (2.0, 16.0)),
       "smooth local warping: a grid x grid field of random displacements of up to "
       "+-amplitude of the size, upsampled"),
    Op("flip", ("probability",), (0.5,), ((0.0, 1.0),), "horizontal mirror"),
    Op("vflip", ("probability",), (0.5,), ((0.0, 1.0),), "vertical mirror"),
    Op("color", ("offset",), (20.0,), ((0.0, 255.0),),
       "per-channel offsets in [-offset, offset] added to R, G and B"),
    Op("pca", ("sigma",), (0.1,), ((0.0, 1.0),),
       "AlexNet PCA colour shift along the dataset's RGB principal axes"),
    Op("brightness", ("delta",), (0.1,), ((0.0, 1.0),),
       "one offset in [-delta, delta] x 255 added to every channel"),
    Op("contrast", ("factor",), (0.2,), ((0.0, 1.0),),
       "contrast scaled by a factor in [1-f, 1+f] around each channel's mean"),
)}


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """A parsed `--augment` spec: op name -> its values, for the ops that were given."""

    ops: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def get(self, name: str) -> tuple[float, ...] | None:
        return dict(self.ops).get(name)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __str__(self) -> str:
        return ",".join(f"{name}={':'.join(f'{v:g}' for v in values)}"
                        for name, values in self.ops)


def parse_spec(spec: str | AugmentSpec | None) -> AugmentSpec:
    """Parses "flip,crop=0.875,rotate=15,..." (values of multi-value ops joined by ':').

    An op without a value gets its default; "" and "none" mean no augmentation.

    Raises:
        UserInputError: an unknown op, a repeated op, or a value out of its range.
    """
    if isinstance(spec, AugmentSpec):
        return spec
    given = {}
    for item in (spec or "").split(","):
        name, has_value, text = (part.strip() for part in item.partition("="))
        if not name or (name == "none" and not has_value):
            continue
        if name not in OPS:
            raise UserInputError(f"augment: unknown op '{name}'. Valid ops: "
                                 f"{', '.join(OPS)}. Received: augment={spec!r}")
        if name in given:
            raise UserInputError(f"augment: op '{name}' is given twice. Received: augment={spec!r}")
        given[name] = _parse_values(OPS[name], text.split(":") if has_value else [])
    if "crop" in given and "rcrop" in given:
        raise UserInputError(f"augment: give crop or rcrop, not both. Received: augment={spec!r}")
    return AugmentSpec(tuple((name, given[name]) for name in OPS if name in given))


def _parse_values(op: Op, texts: list[str]) -> tuple[float, ...]:
    usage = f"{op.name}=" + ":".join(op.params)
    received = f"Received: {op.name}={':'.join(texts)}"
    if len(texts) > len(op.params):
        raise UserInputError(f"augment: '{op.name}' takes at most {len(op.params)} value(s): "
                             f"{usage}. {received}")
    values = list(op.defaults)
    for i, text in enumerate(texts):
        try:
            values[i] = float(text)
        except ValueError:
            raise UserInputError(f"augment: '{op.name}' needs numbers: {usage}. "
                                 f"{received}") from None
    for param, value, (low, high) in zip(op.params, values, op.ranges):
        if not low <= value <= high:
            raise UserInputError(f"augment: '{op.name}' {param} must be in [{low:g}, {high:g}] "
                                 f"({op.help}). {received}")
    if op.name == "warp" and values[1] != int(values[1]):
        raise UserInputError(f"augment: 'warp' grid must be a whole number. {received}")
    if op.name == "rcrop" and (values[0] > values[1] or values[2] > values[3]):
        raise UserInputError(f"augment: 'rcrop' needs min_scale <= max_scale and min_aspect "
                             f"<= max_aspect. {received}")
    return tuple(values)
