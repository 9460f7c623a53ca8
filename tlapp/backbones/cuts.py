"""Cut points: where a backbone can be split into a frozen stem and a trainable top."""
from __future__ import annotations

import difflib
import re

import keras

from tlapp.backbones.spec import BackboneSpec
from tlapp.errors import UserInputError

INPUT_CUT = "input"  # the cut at the model's input: nothing frozen, every layer trains


def _flat(tensors) -> list:
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def cut_points(model: keras.Model) -> list[str]:
    """Names of layers that every input-to-output path passes through, in order.

    Cutting there splits the model in two: a stem whose single output feeds the top. Paths
    through operations that are not layers count too: ConvNeXt's residual `inputs + x` and
    MobileNetV3's hard sigmoid are bare ops, invisible in `model.layers`; missing them made
    a ConvNeXt LayerScale, which the residual skips, look like a cut point.
    """
    # layers and bare ops, in topological order (a Sequential has only layers)
    operations = getattr(model, "operations", model.layers)
    last_use: dict[int, int] = {}
    for i, op in enumerate(operations):
        if not isinstance(op, keras.layers.InputLayer):
            for t in _flat(op.input):
                last_use[id(t)] = i
    for t in model.outputs:
        last_use[id(t)] = len(operations)
    live: set[int] = set()
    names = []
    for i, op in enumerate(operations):
        outputs = {id(t) for t in _flat(op.output)}
        live |= {t for t in outputs if last_use.get(t, -1) > i}
        live = {t for t in live if last_use[t] > i}
        if (len(outputs) == 1 and live == outputs and isinstance(op, keras.layers.Layer)
                and not isinstance(op, keras.layers.InputLayer)):
            names.append(op.name)
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


def _suggest(model: keras.Model, points: list[str], cut: str) -> str:
    """The cut points around `cut` when it is a layer of the model, else the names most like
    it (a misspelling), as a sentence; "" when nothing is alike."""
    names = [layer.name for layer in model.layers]
    if cut in names:
        at = names.index(cut)
        before = [p for p in points if p == INPUT_CUT or names.index(p) < at]
        after = [p for p in points if p != INPUT_CUT and names.index(p) > at]
        around = [name for name in (before[-1:] + after[:1])]
        return (f"'{cut}' is inside a block, where paths branch; the nearest cut points are "
                f"{' and '.join(around)}. ")
    score = {p: difflib.SequenceMatcher(None, cut, p).ratio() for p in points}
    best = max(score.values(), default=0.0)
    # only the names as close as the closest: conv2_blok1_out is not near conv5_block1_out
    alike = sorted((p for p in points if score[p] >= max(0.75, best - 0.03)),
                   key=lambda p: -score[p])[:3]
    return f"Did you mean {' or '.join(alike)}? " if alike else ""


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
            raise UserInputError(
                f"'{cut}' is not a valid cut point of {spec.name}: a cut point is a layer "
                f"that every path from input to output passes through. Received: cut={cut!r}. "
                f"{_suggest(model, points, cut)}"
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
