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
from tlapp.files import write_atomic
from tlapp.progress import fit_verbosity
from tlapp.training import sharding
from tlapp.training.checkpoint import (HISTORY_FIELDS, Checkpoint, EarlyStopping,
                                       ReduceLROnPlateau)

log = logging.getLogger(__name__)

STEPS_PER_CALL = 32  # training steps per call of Keras's train function (steps_per_execution)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one stage's fit needs besides the model and the data."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    optimizer: str = "adam"  # adam | sgd | adamw
    lr_schedule: str = "constant"  # constant | cosine | plateau | onecycle
    warmup_epochs: int = 0
    weight_decay: float | None = None  # None: 1e-4 for adamw, none otherwise
    label_smoothing: float = 0.0
    early_stopping: int = 0  # patience in epochs; 0 = off
    jit: bool = False
    class_weight: dict | None = None
    multi_label: bool = False  # sigmoid outputs: binary cross-entropy per label


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


ONECYCLE_START = 1 / 25  # one-cycle: from lr/25 ...
ONECYCLE_RISE = 0.3  # ... up to lr over this fraction of the steps ...
ONECYCLE_END = 1 / 25e4  # ... then cosine down to lr/250000 (PyTorch OneCycleLR's defaults)


def learning_rate(settings: Settings, steps_per_epoch: int):
    """The stage's learning rate: a float, or a schedule of the optimizer's step counter.

    A schedule depends on the step alone, and the step counter is part of the optimizer
    state a checkpoint saves, so a resumed stage follows the same rates exactly. Warmup
    rises linearly from 0 over `warmup_epochs` (capped at the stage's epochs), then the
    schedule runs over the remaining steps. Plateau keeps a float (its callback changes
    it); its warmup is `LinearWarmup`.
    """
    total = max(steps_per_epoch * settings.epochs, 1)
    warmup = min(steps_per_epoch * settings.warmup_epochs, total)
    schedule, lr = settings.lr_schedule, float(settings.lr)
    cosine = keras.optimizers.schedules.CosineDecay
    if schedule == "onecycle":
        rise = warmup or max(round(ONECYCLE_RISE * total), 1)
        return cosine(lr * ONECYCLE_START, decay_steps=max(total - rise, 1),
                      alpha=ONECYCLE_END, warmup_target=lr, warmup_steps=rise)
    if schedule == "cosine":
        if not warmup:
            return cosine(lr, decay_steps=total)
        return cosine(0.0, decay_steps=max(total - warmup, 1), warmup_target=lr,
                      warmup_steps=warmup)
    if schedule == "constant" and warmup:  # alpha=1: the "decay" keeps lr
        return cosine(0.0, decay_steps=max(total - warmup, 1), alpha=1.0, warmup_target=lr,
                      warmup_steps=warmup)
    return lr


def make_optimizer(settings: Settings, steps: int) -> keras.optimizers.Optimizer:
    """The stage's optimizer; `steps` is the number of batches per epoch."""
    lr = learning_rate(settings, steps)
    decay = settings.weight_decay
    if settings.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=decay)
    if settings.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=1e-4 if decay is None else decay)
    return keras.optimizers.Adam(lr, weight_decay=decay)


class LinearWarmup(keras.callbacks.Callback):
    """Warmup for the plateau schedule, whose learning rate is a plain variable: the rate
    of step s < `steps` is lr * s / steps, computed from the optimizer's step counter (so a
    resumed run repeats it exactly); from step `steps` on, the plateau callback rules."""

    def __init__(self, lr: float, steps: int):
        super().__init__()
        self.lr, self.steps = lr, steps

    def on_train_batch_begin(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step <= self.steps:
            self.model.optimizer.learning_rate = self.lr * min(step / self.steps, 1.0)


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


class SetEpoch(keras.callbacks.Callback):
    """Sets the epoch variable of a one-epoch training dataset at the start of each epoch
    (`sharding.training_batches(epoch=...)`)."""

    def __init__(self, epoch: tf.Variable):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch)


def fit_stage(stage: str, model: keras.Model, settings: Settings, n_train: int,
              train_loader: Callable, val_batches: tf.data.Dataset | None,
              checkpoint: Checkpoint, log_dir: Path | None = None,
              parallel: bool = False, callbacks: tuple = ()) -> list[dict]:
    """Trains `model` for one stage, resuming from `checkpoint` if it holds part of it.

    `callbacks` (experiment tracking, search pruning) run after tlapp's own and before the
    checkpoint. Returns the history rows of this stage (one per epoch, including resumed
    ones).
    """
    steps = sharding.steps_per_epoch(model.distribute_strategy, n_train, settings.batch_size)
    optimizer = make_optimizer(settings, steps)
    warmup_callback = settings.lr_schedule == "plateau" and settings.warmup_epochs > 0
    # Several steps per call of the train function on cached rows, where Keras's cost per
    # call (callbacks, the call itself) is most of a step; not on images (a step costs far
    # more, and the progress bar would wait for 32 of them). Without a strategy only (each
    # epoch a dataset of its own, `sharding.training_batches`), and not with the warmup
    # callback, which sets the learning rate of every step.
    per_call = min(STEPS_PER_CALL, steps) if not parallel and not warmup_callback and \
        sharding.is_default(model.distribute_strategy) else 1
    if settings.multi_label:  # "accuracy": the share of right yes/no decisions
        loss = keras.losses.BinaryCrossentropy(label_smoothing=settings.label_smoothing)
        metric = keras.metrics.BinaryAccuracy(name="accuracy")
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing)
        metric = "accuracy"
    model.compile(optimizer=optimizer, loss=loss, metrics=[metric], jit_compile=settings.jit,
                  steps_per_execution=per_call)
    optimizer.build(model.trainable_variables)
    done = checkpoint.completed(stage, settings.epochs)
    if checkpoint.restore_pending:  # resuming: the newest weights, once
        checkpoint.restore_weights(model)
        checkpoint.restore_pending = False
    checkpoint.stage = stage
    if done < settings.epochs:
        if done:
            log.info("%s: resuming after epoch %d from %s", stage, done, checkpoint.folder)
        extra, callbacks = callbacks, [Reseed(settings.seed)]
        epoch = tf.Variable(done, dtype=tf.int64, trainable=False) if per_call > 1 else None
        if epoch is not None:
            callbacks.append(SetEpoch(epoch))
        if log_dir:
            callbacks.append(keras.callbacks.TensorBoard(str(log_dir / stage)))
        monitor = "val_loss" if val_batches is not None else "loss"
        tracked = {}
        if settings.lr_schedule == "plateau":
            if settings.warmup_epochs:
                callbacks.append(LinearWarmup(float(settings.lr), steps * min(
                    settings.warmup_epochs, settings.epochs)))
            tracked["plateau"] = ReduceLROnPlateau(monitor, factor=0.2, patience=2)
        if settings.early_stopping:
            tracked["early_stopping"] = EarlyStopping(
                monitor, patience=settings.early_stopping, restore_best_weights=True)
        callbacks += tracked.values()
        checkpoint.track(**tracked)
        if done:  # resuming inside this stage
            checkpoint.restore_optimizer(optimizer)
            checkpoint.restore_callbacks()
        callbacks += [*extra, checkpoint]  # the checkpoint last: it saves what others left
        train, class_weight = sharding.training_batches(
            model.distribute_strategy, n_train, settings.batch_size, settings.seed, done,
            settings.epochs, train_loader, parallel, settings.class_weight, epoch)
        # Stopped early just before a kill: no epoch runs, the callbacks only end the stage.
        first = settings.epochs if done and checkpoint.stopped_early(stage) else done
        model.fit(train, epochs=settings.epochs, initial_epoch=first, steps_per_epoch=steps,
                  validation_data=sharding.validation_batches(model.distribute_strategy,
                                                              val_batches),
                  callbacks=callbacks,
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
    def write(temp: Path) -> None:
        with open(temp, "w", newline="") as f:
            writer = csv.DictWriter(f, HISTORY_FIELDS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)
