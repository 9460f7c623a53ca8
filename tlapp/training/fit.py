"""Fit loops: stage 1 on cached activations (or live), stage 2 fine-tuning live.

Every epoch is reproducible on its own: the shuffle order and the dropout seeds of epoch e
depend only on (seed, e), and a checkpoint (weights, optimizer state, history) is written
after every epoch, so a resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tlapp.augment import ops as augment_ops
from tlapp.progress import fit_verbosity
from tlapp.training import sharding
from tlapp.training.checkpoint import HISTORY_FIELDS, Checkpoint

log = logging.getLogger(__name__)


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


def augmentation(spec: str | None, seed: int, pca=None) -> Callable | None:
    """The per-image transform of live training, for `datasets.image_loader`: augmented with
    a stateless seed drawn from (seed, image index, epoch), or None without a spec."""
    if not spec:
        return None
    return lambda image, index, epoch: augment_ops.augment_image(
        image, spec, augment_ops.image_seed(seed, index, epoch), pca)


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
              checkpoint: Checkpoint, log_dir: Path | None = None,
              parallel: bool = False) -> list[dict]:
    """Trains `model` for one stage, resuming from `checkpoint` if it holds part of it.

    Returns the history rows of this stage (one per epoch, including resumed ones).
    """
    steps = sharding.steps_per_epoch(model.distribute_strategy, n_train, settings.batch_size)
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
        if done:
            log.info("%s: resuming after epoch %d from %s", stage, done, checkpoint.folder)
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
        train, class_weight = sharding.training_batches(
            model.distribute_strategy, n_train, settings.batch_size, settings.seed, done,
            settings.epochs, train_loader, parallel, settings.class_weight)
        model.fit(train, epochs=settings.epochs, initial_epoch=done, steps_per_epoch=steps,
                  validation_data=val_batches, callbacks=callbacks,
                  class_weight=class_weight, shuffle=False,
                  verbose=fit_verbosity())
    rows = [row for row in checkpoint.state["history"] if row["stage"] == stage]
    if rows:
        last = rows[-1]
        log.info("%s: %d epochs, loss %.4f, accuracy %.3f, val_accuracy %.3f", stage, len(rows),
                 last.get("loss", float("nan")), last.get("accuracy", float("nan")),
                 last.get("val_accuracy", float("nan")))
    return rows


def write_history(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
