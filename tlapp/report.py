"""Text reports (backbones with parameters and MACs, a backbone's cut points) and plots."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from tlapp import backbones, costs


def backbone_table(name: str | None = None, image_size: int | None = None) -> str:
    """Without `name`: one row per backbone with its parameters and MACs per image at its
    default size (or `image_size`). With a name or a `.keras` path: its cut points, output
    shapes, cache bytes per image (float32; the final layer is cached pooled) and the MACs of
    the stem that ends there. Models are built with random weights; nothing runs."""
    if name is None:
        rows = [("name", "parameters", "MACs/image", "size", "features", "preprocessing")]
        for spec in backbones.BACKBONES.values():
            keras.backend.clear_session()
            size = max(image_size or spec.default_size, spec.min_size)
            model = _build_shapes_only(spec, size)
            rows.append((spec.name, f"{model.count_params():,}",
                         costs.format_count(costs.model_macs(model)), str(size),
                         str(model.output.shape[-1]), spec.preprocess))
        return (_format(rows) + "\nparameters and MACs (multiply-accumulates: conv, depthwise "
                "and separable conv, dense) without the classifier, at the size shown")
    spec = backbones.get_spec(name)
    size = image_size or spec.default_size
    model = _build_shapes_only(spec, size)
    blocks = set(backbones.block_ends(spec, model))
    stem_macs = costs.cumulative_macs(model)
    rows = [("cut point", "output shape", "cache bytes/image", "stem MACs", "block end")]
    final = model.layers[-1].name
    for point in backbones.valid_cuts(model):
        layer = model.layers[0] if point == backbones.INPUT_CUT else model.get_layer(point)
        shape = tuple(layer.output.shape[1:])
        cached = shape[-1:] if point == final and len(shape) == 3 else shape
        rows.append((point, "x".join(map(str, shape)), f"{int(np.prod(cached)) * 4:,}",
                     costs.format_count(stem_macs[layer.name]),
                     "yes" if point in blocks else ""))
    header = (f"{spec.name} at {size}x{size}: {model.count_params():,} parameters, "
              f"{costs.format_count(costs.model_macs(model))} MACs per image; "
              f"{len(rows) - 1} cut points (--cut LAYER; --trainable-blocks N counts block "
              f"ends from the top; 'input' trains everything)\n")
    return header + _format(rows)


def _build_shapes_only(spec: backbones.BackboneSpec, size: int) -> keras.Model:
    """Builds a backbone for its shapes and parameter counts. Registry backbones are built
    in a StatelessScope, where Keras defers initialising variables: nearly twice as fast."""
    if spec.path:
        return backbones.build_backbone(spec, "saved", size)
    with keras.StatelessScope():
        return backbones.build_backbone(spec, "none", size)


def _format(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def plot_history(rows: list[dict], path) -> None:
    """Loss and accuracy per epoch, train and val, all stages in sequence with a dotted line
    where a stage starts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = list(range(1, len(rows) + 1))
    starts = [(i + 1, row["stage"]) for i, row in enumerate(rows)
              if i == 0 or row["stage"] != rows[i - 1]["stage"]]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [row.get(prefix + metric) for row in rows]
            if any(v is not None for v in values):
                axis.plot(epochs, [float("nan") if v is None else v for v in values], style,
                          label=(prefix or "train_") + metric)
        for epoch, stage in starts:
            if epoch > 1:
                axis.axvline(epoch - 0.5, color="gray", linestyle=":")
            axis.annotate(stage, (max(epoch - 0.5, 1), 1), xycoords=("data", "axes fraction"),
                          xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
        axis.set_xlabel("epoch (all stages)")
        axis.set_title(metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


def plot_confusion(matrix: list[list[int]], classes: list[str], path) -> None:
    """A labelled confusion matrix (rows: true class, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n = len(classes)
    side = min(4 + 0.35 * n, 24)
    figure, axis = plt.subplots(figsize=(side, side))
    axis.imshow(np.asarray(matrix), cmap="Blues")
    axis.set_xticks(range(n), classes, rotation=90, fontsize=max(5, 10 - n // 10))
    axis.set_yticks(range(n), classes, fontsize=max(5, 10 - n // 10))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                axis.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


def write_image_grid(rows: list[list[np.ndarray]], path, gap: int = 2) -> None:
    """Equal-size RGB images (0-255) as one PNG grid, `gap` white pixels between cells,
    written atomically."""
    from PIL import Image

    from tlapp.cache import write_atomic

    height, width = rows[0][0].shape[:2]
    columns = max(map(len, rows))
    grid = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255,
                   np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = i * (height + gap), j * (width + gap)
            grid[top:top + height, left:left + width] = np.clip(np.rint(image), 0, 255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temp: Image.fromarray(grid).save(temp, format="PNG"))


def plot_results(rows: list[dict], path) -> None:
    """An experiment's runs side by side: val and test accuracy, and extraction and training
    seconds, as a PNG (failed runs appear with empty bars)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def values(key):
        return [float("nan") if row.get(key) is None else row[key] for row in rows]

    names = [row["run"] + (" (failed)" if row["status"] == "failed" else "") for row in rows]
    y = np.arange(len(rows))
    figure, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.45 * len(rows)), sharey=True)
    for offset, key in ((-0.2, "val_accuracy"), (0.2, "test_accuracy")):
        axes[0].barh(y + offset, values(key), height=0.4, label=key.replace("_", " "))
    axes[0].set_xlim(0, 1)
    axes[0].set_title("accuracy")
    extract, train = values("extract_s"), values("train_s")
    axes[1].barh(y, extract, label="extraction (s)")
    axes[1].barh(y, train, left=np.nan_to_num(extract), label="training (s)")
    axes[1].set_title("time")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    for axis in axes:
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
