"""Why the model decided: Grad-CAM (Selvaraju et al. 2017) on a run's whole model.

The heatmap is taken at the backbone's last convolutional activation with more than one
position (a tlapp model is a chain: preprocessing, backbone, pooling, head, so the backbone
is split there into a stem and a top, and the gradient of the class score is taken with
respect to the stem's output): the channels are weighted by their mean gradient, summed,
kept where positive (or, where nothing is, taken above its minimum), scaled to [0, 1]
and resized to the image. The class score is its logit (the
head's output before softmax), as in the paper: a saturated softmax has no gradient.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlapp.backbones.cuts import split_backbone
from tlapp.data.decoding import decode_image
from tlapp.errors import UserInputError
from tlapp.reporting.plots import plot_explanation

EXPLAIN_BATCH = 16  # images per Grad-CAM pass


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone inside a tlapp model: its one nested model."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise UserInputError(f"{model.name} is not a model tlapp built (it has "
                             f"{len(nested)} nested backbones, expected 1): Grad-CAM needs the "
                             f"run's own model.keras.")
    return nested[0]


def heatmap_layer(backbone: keras.Model) -> str:
    """The last layer with a spatial output (rank 4, more than one position), at or after
    a convolution, that the backbone can be split at."""
    candidates, convolved = [], False
    for layer in backbone.layers:
        convolved = convolved or "Conv" in type(layer).__name__
        if convolved and len(layer.output.shape) == 4 and \
                layer.output.shape[1] * layer.output.shape[2] > 1:
            candidates.append(layer.name)
    for name in reversed(candidates):
        try:
            split_backbone(backbone, name)
            return name
        except (ValueError, KeyError):  # not a point the graph passes through whole
            continue
    raise UserInputError(
        f"{backbone.name} has no convolutional activation with more than one position at "
        f"this image size, so there is nothing to place a heatmap on (Grad-CAM needs a "
        f"convolutional backbone; a larger --image-size helps a small one).")


class GradCam:
    """Heatmaps and probabilities of a tlapp model for batches of pixels."""

    def __init__(self, model: keras.Model):
        self.model = model
        backbone = backbone_of(model)
        self.layer = heatmap_layer(backbone)
        self.stem, self.top = split_backbone(backbone, self.layer)
        index = model.layers.index(backbone)
        self.before, self.after = model.layers[1:index], model.layers[index + 1:]

    def __call__(self, pixels: np.ndarray, classes: list[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(heatmaps [N, S, S] in [0, 1] at the input size, probabilities [N, C]); the
        heatmap of image i is for classes[i] (default: its top class)."""
        x = tf.convert_to_tensor(pixels, tf.float32)
        size = x.shape[1:3]
        for layer in self.before:
            x = layer(x, training=False)
        with tf.GradientTape() as tape:
            activation = self.stem(x, training=False)
            tape.watch(activation)
            y = self.top(activation, training=False) if self.top is not None else activation
            for layer in self.after[:-1]:
                y = layer(y, training=False)
            # the score is the class's logit: a saturated softmax has no gradient left
            head = self.after[-1]
            logits = tf.matmul(y, head.kernel) + head.bias
            probabilities = head.activation(logits)
            chosen = tf.argmax(logits, axis=-1, output_type=tf.int32) if classes is None else \
                tf.constant(classes, tf.int32)
            score = tf.gather(logits, chosen, batch_dims=1)
        gradients = tape.gradient(score, activation)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        raw = tf.reduce_sum(weights * activation, axis=-1)
        # Where nothing is positive (tanh nets such as LeNet-5 can sum below zero), the map
        # is taken relative to its lowest point instead of vanishing.
        lowest = tf.reduce_min(raw, axis=(1, 2), keepdims=True)
        nothing = tf.reduce_max(raw, axis=(1, 2), keepdims=True) <= 0
        cam = tf.where(nothing, raw - lowest, tf.nn.relu(raw))
        cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-12)
        cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
        return cam.numpy(), probabilities.numpy()


def explain_files(model: keras.Model, paths: list[str], image_size: int,
                  classes: list[int] | None = None) -> list[dict]:
    """Per file: {"path", "pixels" [S, S, 3] uint8, "heatmap" [S, S], "probabilities"}, or
    {"path", "error"} for a file that cannot be decoded."""
    cam = GradCam(model)
    results, decoded = [], []  # decoded: (index in results, pixels, class or None)
    for i, path in enumerate(paths):
        try:
            pixels = decode_image(tf.io.read_file(path), image_size).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            results.append({"path": path, "error": f"not a readable image ({message})"})
            continue
        results.append({"path": path, "pixels": np.clip(pixels, 0, 255).astype(np.uint8)})
        decoded.append((len(results) - 1, pixels, None if classes is None else classes[i]))
    # Batches, not one image per call: each eager pass costs about as much for 1 as for 16.
    for start in range(0, len(decoded), EXPLAIN_BATCH):
        batch = decoded[start:start + EXPLAIN_BATCH]
        heatmaps, probabilities = cam(np.stack([pixels for _, pixels, _ in batch]),
                                      None if classes is None else [c for _, _, c in batch])
        for (index, _, _), heatmap, probability in zip(batch, heatmaps, probabilities):
            results[index] |= {"heatmap": heatmap, "probabilities": probability}
    return results


def write_explanations(results: list[dict], labels: list[str], out_dir: Path,
                       top: int = 3) -> list[Path]:
    """One PNG per explained image in `out_dir` (NAME.gradcam.png): the image, the heatmap
    over it, and the top classes with their probabilities."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for result in results:
        if "error" in result:
            continue
        stem = Path(result["path"]).stem
        name = stem
        while name in used:  # two images of one name from different folders
            name = f"{stem}-{len(used)}"
        used.add(name)
        best = np.argsort(-result["probabilities"], kind="stable")[:top]
        path = out_dir / f"{name}.gradcam.png"
        plot_explanation(result["pixels"], result["heatmap"],
                         [(labels[i], float(result["probabilities"][i])) for i in best],
                         Path(result["path"]).name, path)
        result["png"] = str(path)
        written.append(path)
    return written
