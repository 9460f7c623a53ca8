"""The learning-rate range test (Smith 2015; fastai's `lr_find`): train for a few hundred
steps while the rate grows exponentially, record the loss of every step, stop when it
diverges, and suggest a rate.

Suggestion rule: smooth the per-step loss (exponential moving average, beta 0.98, bias
corrected), find the rate where the smoothed loss is lowest, and suggest a tenth of it.
At the minimum the rate is about as large as training tolerates; a tenth of it still
descends fast and stays clear of the divergence that follows (fastai's `lr_min`).
The model's weights are restored afterwards: the test only looks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import keras
import numpy as np

from tlapp.data.datasets import shuffled_batches
from tlapp.training.fit import Reseed, Settings, make_optimizer

log = logging.getLogger(__name__)

MIN_LR, MAX_LR, STEPS = 1e-7, 10.0, 200
SMOOTHING = 0.98  # of the moving average of the loss
DIVERGED = 4.0  # stop when the smoothed loss exceeds this many times its minimum


@dataclasses.dataclass
class RangeTest:
    """Rates tried (one per step), the raw and smoothed losses, and the suggestion."""

    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    minimum: float  # the rate where the smoothed loss was lowest
    diverged: bool  # stopped early because the loss diverged

    def to_dict(self) -> dict:
        return {"suggestion": self.suggestion, "minimum": self.minimum,
                "diverged": self.diverged, "steps": len(self.rates),
                "min_lr": self.rates[0], "max_lr": self.rates[-1]}


def rates_between(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """`steps` rates growing exponentially from min_lr to max_lr."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / max(steps - 1, 1))


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled
    towards 0)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def suggest_rate(rates: list[float], losses: list[float]) -> tuple[float, float, list[float]]:
    """(suggestion, rate at the smoothed minimum, smoothed losses): see the module doc."""
    smoothed = smooth(losses)
    finite = [i for i, value in enumerate(smoothed) if math.isfinite(value)]
    best = min(finite, key=lambda i: smoothed[i])
    return rates[best] / 10, rates[best], smoothed


def range_test(model: keras.Model, settings: Settings, n_train: int, loader: Callable,
               parallel: bool = False, min_lr: float = MIN_LR, max_lr: float = MAX_LR,
               steps: int = STEPS) -> RangeTest:
    """Runs the range test on `model` (compiled here with the stage's optimizer, loss and
    class weights) with batches of `loader` (as for `fit.fit_stage`), then restores the
    model's weights.

    Raises:
        ValueError: min_lr, max_lr or steps out of range (checked by the callers' inputs).
    """
    if not 0 < min_lr < max_lr or steps < 2:
        raise ValueError(f"need 0 < min_lr < max_lr and steps >= 2. Received: min_lr="
                         f"{min_lr}, max_lr={max_lr}, steps={steps}")
    saved = model.get_weights()
    per_epoch = math.ceil(n_train / settings.batch_size)
    constant = dataclasses.replace(settings, lr=min_lr, lr_schedule="constant",
                                   warmup_epochs=0)
    optimizer = make_optimizer(constant, per_epoch)
    loss = keras.losses.BinaryCrossentropy if settings.multi_label else \
        keras.losses.CategoricalCrossentropy
    model.compile(optimizer=optimizer, loss=loss(label_smoothing=settings.label_smoothing),
                  jit_compile=settings.jit)
    epochs = math.ceil(steps / per_epoch)
    batches = shuffled_batches(n_train, settings.batch_size, settings.seed, 0, epochs, loader,
                               parallel).take(steps)
    reseed = Reseed(settings.seed)
    reseed.set_model(model)
    rates, losses, diverged, lowest, average = [], [], False, math.inf, 0.0
    schedule = rates_between(min_lr, max_lr, steps)
    try:
        for step, (x, y) in enumerate(batches):
            if step % per_epoch == 0:
                reseed.on_epoch_begin(step // per_epoch)
            optimizer.learning_rate = float(schedule[step])
            loss = float(model.train_on_batch(x, y, class_weight=settings.class_weight))
            rates.append(float(schedule[step]))
            losses.append(loss)
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            current = average / (1 - SMOOTHING ** len(losses))  # as `smooth` computes it
            lowest = min(lowest, current)
            if not math.isfinite(loss) or (step > 10 and current > DIVERGED * lowest):
                diverged = True
                break
    finally:
        model.set_weights(saved)
    if len(losses) < 2:
        raise ValueError("the range test needs at least 2 steps")
    suggestion, minimum, smoothed = suggest_rate(rates, losses)
    log.info("lr range test: %d steps from %.1e to %.1e%s; lowest smoothed loss at %.2e, "
             "suggested rate %.2e", len(rates), rates[0], rates[-1],
             " (stopped: the loss diverged)" if diverged else "", minimum, suggestion)
    if not diverged and minimum == rates[-1]:
        log.warning("lr range test: the loss was still falling at the last rate tried "
                    "(%.1e), so the suggestion is only a tenth of the range's end; look at "
                    "the plot, or raise the maximum rate (--max-lr)", rates[-1])
    return RangeTest(rates, losses, smoothed, float(suggestion), float(minimum), diverged)
