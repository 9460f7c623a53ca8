"""Fit loops. Stage 1: the unfrozen top and the head on cached activations."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


def feature_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int,
                    shuffle_seed: int | None = None) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices((features, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fit_on_features(model: keras.Model, train: tuple[np.ndarray, np.ndarray],
                    val: tuple[np.ndarray, np.ndarray], epochs: int, batch_size: int,
                    lr: float, seed: int, log_dir: Path | None = None,
                    verbose: bool = True, class_weight: dict[int, float] | None = None
                    ) -> list[dict]:
    """Trains `model` on (features, labels) and returns one history row per epoch.
    `class_weight` (class index -> loss weight) is passed to `model.fit`."""
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    validation = feature_dataset(*val, batch_size) if len(val[1]) else None
    callbacks = [keras.callbacks.TensorBoard(str(log_dir))] if log_dir else []
    history = model.fit(feature_dataset(*train, batch_size, shuffle_seed=seed),
                        validation_data=validation, epochs=epochs, callbacks=callbacks, shuffle=False,
                        class_weight=class_weight,
                        verbose=1 if verbose else 0)
    rows = []
    for epoch in range(len(history.epoch)):
        row = {"epoch": epoch + 1, "stage": "head"}
        row |= {k: float(v[epoch]) for k, v in history.history.items()
                if k in ("loss", "accuracy", "val_loss", "val_accuracy")}
        rows.append(row)
    return rows


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Weights n / (classes * n_class), so every class contributes equally to the loss
    (a class absent from `labels` gets 1)."""
    counts = np.bincount(labels, minlength=num_classes)
    return {i: float(len(labels) / (num_classes * n)) if n else 1.0
            for i, n in enumerate(counts)}


def write_history(path: Path, rows: list[dict]) -> None:
    fields = ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def clean_float(value: float | None) -> float | None:
    """JSON has no NaN: report a missing metric as null."""
    return None if value is None or math.isnan(value) else float(value)
