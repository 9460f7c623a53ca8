"""Fit loops: stage 1 on cached activations (or live), stage 2 fine-tuning live.

Every epoch is reproducible on its own: the shuffle order and the dropout seeds of epoch e
depend only on (seed, e), and a checkpoint (weights, optimizer state, history) is written
after every epoch, so a resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tlapp import data as data_lib

HISTORY_FIELDS = ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one stage's fit needs besides the model and the data."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    optimizer: str = "adam"  # adam | sgd | adamw
    lr_schedule: str = "constant"  # constant | cosine | plateau
    label_smoothing: float = 0.0
    early_stopping: int = 0  # patience in epochs; 0 = off
    jit: bool = False
    class_weight: dict | None = None


def shuffled_batches(n: int, batch_size: int, seed: int, first_epoch: int, epochs: int,
                     load: Callable, parallel: bool = False) -> tf.data.Dataset:
    """Batches for epochs [first_epoch, epochs): each epoch a permutation drawn from (seed, epoch).

    `load(index, epoch)` -> (x, label) for one example (parallel=True maps it on many
    threads, for decoding and augmentation); otherwise `load(indices, epoch)` is called on
    a whole batch of indices.
    """
    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
        dataset = tf.data.Dataset.from_tensor_slices(order)
        if parallel:  # deterministic order keeps runs reproducible; work stays parallel
            return dataset.map(lambda i: load(i, e),
                               num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
        return dataset.batch(batch_size).map(lambda i: load(i, e))

    return (tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch)
            .prefetch(tf.data.AUTOTUNE))


def image_source(paths: list, labels: np.ndarray, image_size: int, num_classes: int,
                 augment: str | None = None, seed: int = 0, pca=None):
    """A per-example loader that reads and decodes image files (live training), and
    augments them when `augment` is given, with a seed drawn from (seed, index, epoch)."""
    from tlapp import augment as augment_lib

    paths = tf.constant([str(p) for p in paths])
    labels = tf.constant(labels)

    def load(i, epoch=None):
        image = data_lib.decode_image(tf.io.read_file(paths[i]), image_size)
        if augment and epoch is not None:
            image = augment_lib.augment_image(image, augment,
                                              augment_lib.image_seed(seed, i, epoch), pca)
        return image, tf.one_hot(labels[i], num_classes)

    return load


def evaluation_batches(load: Callable, n: int, batch_size: int, parallel: bool = False):
    """Batches in order, never augmented."""
    dataset = tf.data.Dataset.range(n)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size) \
        if parallel else dataset.batch(batch_size).map(load)
    return dataset.prefetch(tf.data.AUTOTUNE)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Weights n / (classes * n_class), so every class contributes equally to the loss
    (a class absent from `labels` gets 1)."""
    counts = np.bincount(labels, minlength=num_classes)
    return {i: float(len(labels) / (num_classes * n)) if n else 1.0
            for i, n in enumerate(counts)}


def make_optimizer(settings: Settings, steps: int) -> keras.optimizers.Optimizer:
    lr = settings.lr
    if settings.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(settings.lr, decay_steps=max(steps, 1))
    if settings.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)
    if settings.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=1e-4)
    return keras.optimizers.Adam(lr)


class Checkpoint(keras.callbacks.Callback):
    """After every epoch: the full model's weights, the optimizer state and the history so far.

    Files in RUN/checkpoints/: weights.weights.h5, optimizer.npz, state.json (written last;
    each by temp file + rename, so a kill leaves the previous complete checkpoint).
    """

    def __init__(self, folder: Path, full_model: keras.Model):
        super().__init__()
        self.folder = Path(folder)
        self.full_model = full_model
        self.state = {"stage": None, "epoch": 0, "history": [], "finished": []}
        if (self.folder / "state.json").is_file():
            self.state = json.loads((self.folder / "state.json").read_text())
        self.restore_pending = bool(self.state["history"])
        self.stage = None

    def completed(self, stage: str, epochs: int) -> int:
        """Epochs of `stage` already done in the checkpoint (all of them once it finished,
        early stopping included)."""
        if stage in self.state["finished"]:
            return epochs
        return [row["stage"] for row in self.state["history"]].count(stage)

    def restore_weights(self, model: keras.Model) -> None:
        """Loads the newest weights into the full model, or into `model` (the model of the
        stage being resumed) when they were saved from a model on cached features."""
        target = model if self.state.get("weights") == "stage" else self.full_model
        target.load_weights(self.folder / "weights.weights.h5")

    def restore_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        saved = np.load(self.folder / "optimizer.npz", allow_pickle=False)
        for i, variable in enumerate(optimizer.variables):
            variable.assign(saved[f"v{i}"])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1, "stage": self.stage}
        row |= {k: float(logs[k]) for k in HISTORY_FIELDS[2:6] if k in logs}
        row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.save(self.state | {"stage": self.stage, "epoch": epoch + 1,
                                "history": self.state["history"] + [row]})

    def on_train_end(self, logs=None):
        # after EarlyStopping may have restored the best weights
        self.save(self.state | {"finished": self.state["finished"] + [self.stage]})

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # A model on cached features cannot change the frozen stem: saving only its weights
        # takes milliseconds, where the full backbone's take over a second per epoch.
        stage_only = self.model is not self.full_model
        self.state = state | {"weights": "stage" if stage_only else "full"}
        temp = self.folder / "weights.tmp.weights.h5"
        (self.model if stage_only else self.full_model).save_weights(temp)
        os.replace(temp, self.folder / "weights.weights.h5")
        with open(self.folder / "optimizer.tmp.npz", "wb") as f:
            np.savez(f, **{f"v{i}": keras.ops.convert_to_numpy(v)
                           for i, v in enumerate(self.model.optimizer.variables)})
        os.replace(self.folder / "optimizer.tmp.npz", self.folder / "optimizer.npz")
        temp = self.folder / "state.tmp.json"
        temp.write_text(json.dumps(self.state, indent=1))
        os.replace(temp, self.folder / "state.json")


class Reseed(keras.callbacks.Callback):
    """Sets every dropout seed from (seed, epoch) at the start of each epoch."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        states = [v for v in self.model.variables if "seed_generator_state" in v.path]
        for i, variable in enumerate(states):
            variable.assign(np.array([self.seed * 100003 + epoch * 1009 + i, 0],
                                     dtype=variable.dtype))


def fit_stage(stage: str, model: keras.Model, settings: Settings, n_train: int,
              train_loader: Callable, val_batches: tf.data.Dataset | None,
              checkpoint: Checkpoint, log_dir: Path | None = None, parallel: bool = False,
              verbose: bool = True) -> list[dict]:
    """Trains `model` for one stage, resuming from `checkpoint` if it holds part of it.

    Returns the history rows of this stage (one per epoch, including resumed ones).
    """
    steps = math.ceil(n_train / settings.batch_size)
    optimizer = make_optimizer(settings, steps * settings.epochs)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(
                      label_smoothing=settings.label_smoothing),
                  metrics=["accuracy"], jit_compile=settings.jit)
    optimizer.build(model.trainable_variables)
    done = checkpoint.completed(stage, settings.epochs)
    if checkpoint.restore_pending:  # resuming: the newest weights, once
        checkpoint.restore_weights(model)
        checkpoint.restore_pending = False
    if 0 < done < settings.epochs:  # resuming inside this stage
        checkpoint.restore_optimizer(optimizer)
    checkpoint.stage = stage
    if done < settings.epochs:
        if done and verbose:
            print(f"{stage}: resuming after epoch {done} from {checkpoint.folder}")
        callbacks = [Reseed(settings.seed)]
        if log_dir:
            callbacks.append(keras.callbacks.TensorBoard(str(log_dir / stage)))
        monitor = "val_loss" if val_batches is not None else "loss"
        if settings.lr_schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor, factor=0.2, patience=2))
        if settings.early_stopping:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor, patience=settings.early_stopping, restore_best_weights=True))
        callbacks.append(checkpoint)  # last: it saves what the others left
        train = shuffled_batches(n_train, settings.batch_size, settings.seed, done,
                                 settings.epochs, train_loader, parallel)
        model.fit(train, epochs=settings.epochs, initial_epoch=done, steps_per_epoch=steps,
                  validation_data=val_batches, callbacks=callbacks,
                  class_weight=settings.class_weight, shuffle=False,
                  verbose=1 if verbose else 0)
    rows = [row for row in checkpoint.state["history"] if row["stage"] == stage]
    if verbose and rows:
        last = rows[-1]
        print(f"{stage}: {len(rows)} epochs, loss {last.get('loss', float('nan')):.4f}, "
              f"accuracy {last.get('accuracy', float('nan')):.3f}, val_accuracy "
              f"{last.get('val_accuracy', float('nan')):.3f}")
    return rows


def write_history(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def clean_float(value: float | None) -> float | None:
    """JSON has no NaN: report a missing metric as null."""
    return None if value is None or math.isnan(value) else float(value)
