"""Text tables: backbones with parameters and MACs, a backbone's cut points.

Building every backbone takes tens of seconds, so finished tables are kept in the cache
folder, keyed by the Keras version (registry backbones only); this module imports Keras
only when a table must be built, so a kept table prints without loading TensorFlow.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from tlapp.files import write_text

TABLE_FORMAT = 2  # bump when the tables change


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def backbone_table(name: str | None = None, image_size: int | None = None,
                   cache_dir: str | Path | None = None) -> str:
    """Without `name`: one row per backbone with its parameters and MACs per image at its
    default size (or `image_size`). With a name or a `.keras` path: its cut points, output
    shapes, cache bytes per image (float32; the final layer is cached pooled) and the MACs of
    the stem that ends there. Models are built with random weights; nothing runs.

    With `cache_dir`, a registry backbone's table is read from (or kept in)
    cache_dir/tables/.
    """
    kept = kept_table(name, image_size, cache_dir)
    if kept is not None:
        return kept
    table = _registry_table(image_size) if name is None else _cut_table(name, image_size)
    path = _kept_path(name, image_size, cache_dir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, table)
    return table


def kept_table(name: str | None, image_size: int | None,
               cache_dir: str | Path | None) -> str | None:
    """The table kept by an earlier `backbone_table` call, or None."""
    path = _kept_path(name, image_size, cache_dir)
    return path.read_text() if path is not None and path.is_file() else None


def _kept_path(name: str | None, image_size: int | None,
               cache_dir: str | Path | None) -> Path | None:
    """Where a registry backbone's table is kept (None for a model file: it may change)."""
    if cache_dir is None or (name and name.endswith((".keras", ".h5")) or "/" in (name or "")):
        return None
    version = importlib.metadata.version("keras")
    key = f"{TABLE_FORMAT}-{version}-{(name or 'all').lower()}-{image_size or 'default'}"
    return Path(cache_dir) / "tables" / \
        f"backbones-{hashlib.sha256(key.encode()).hexdigest()[:16]}.txt"


def registry_rows(image_size: int | None = None) -> list[tuple[str, ...]]:
    """One row per registry backbone: name, parameters, MACs per image, size, features,
    preprocessing, and "collapses" where its random-init features do (header row first)."""
    import keras

    from tlapp.backbones import costs, registry

    rows = [("name", "parameters", "MACs/image", "size", "features", "preprocessing",
             "random init")]
    for spec in registry.BACKBONES.values():
        keras.backend.clear_session()
        size = max(image_size or spec.default_size, spec.min_size)
        model = _build_shapes_only(spec, size)
        rows.append((spec.name, f"{model.count_params():,}",
                     costs.format_count(costs.model_macs(model)), str(size),
                     str(model.output.shape[-1]), spec.preprocess,
                     "collapses" if spec.collapses_at_random_init else ""))
    keras.backend.clear_session()
    return rows


def _registry_table(image_size: int | None) -> str:
    return (format_table(registry_rows(image_size)) + "\nparameters and MACs "
            "(multiply-accumulates: conv, depthwise and separable conv, dense) without the "
            "classifier, at the size shown; 'collapses': the pooled features at random "
            "initialisation are the same for every image, so --weights none needs "
            "--trainable-blocks all")


def _cut_table(name: str, image_size: int | None) -> str:
    import numpy as np

    from tlapp.backbones import costs, cuts, registry

    spec = registry.get_spec(name)
    size = image_size or spec.default_size
    model = _build_shapes_only(spec, size)
    blocks = set(cuts.block_ends(spec, model))
    stem_macs = costs.cumulative_macs(model)
    rows = [("cut point", "output shape", "cache bytes/image", "stem MACs", "block end")]
    final = model.layers[-1].name
    for point in cuts.valid_cuts(model):
        layer = model.layers[0] if point == cuts.INPUT_CUT else model.get_layer(point)
        shape = tuple(layer.output.shape[1:])
        cached = shape[-1:] if point == final and len(shape) == 3 else shape
        rows.append((point, "x".join(map(str, shape)), f"{int(np.prod(cached)) * 4:,}",
                     costs.format_count(stem_macs[layer.name]),
                     "yes" if point in blocks else ""))
    header = (f"{spec.name} at {size}x{size}: {model.count_params():,} parameters, "
              f"{costs.format_count(costs.model_macs(model))} MACs per image; "
              f"{len(rows) - 1} cut points (--cut LAYER; --trainable-blocks N counts block "
              f"ends from the top; 'input' trains everything)\n")
    if spec.weight_file:
        header += (f"ImageNet weights: {spec.weight_file} (Keras downloads it into "
                   f"$KERAS_HOME/models; --weights PATH takes it too)\n")
    if spec.collapses_at_random_init:
        header += ("Random initialisation: its pooled features collapse (the same for every "
                   "image); with --weights none, train every layer (--trainable-blocks all)\n")
    return header + format_table(rows)


def _build_shapes_only(spec, size: int):
    """Builds a backbone for its shapes and parameter counts. Registry backbones are built
    in a StatelessScope, where Keras defers initialising variables: nearly twice as fast."""
    import keras

    from tlapp.backbones import registry

    if spec.family == "custom":
        return registry.build_backbone(spec, "saved", size)
    with keras.StatelessScope():
        return registry.build_backbone(spec, "none", size)
