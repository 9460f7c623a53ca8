"""Probabilities that mean what they say, and an honest "none of these".

Temperature scaling (Guo et al. 2017): one scalar T, fitted on the validation split to
minimise its negative log-likelihood, divides the logits. tlapp bakes it into the model
(the final Dense layer's kernel and bias are divided by T), so every path that produces
probabilities (predict, evaluate, TTA, ensembles per member, SavedModel, TFLite) is
calibrated without knowing it; a run made before calibration simply has T = 1.

Rejection: when the top probability is below a threshold P, the answer is "unknown".
`auto` picks P on the validation split so that a stated share of its images is kept.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tlapp.errors import UserInputError

ECE_BINS = 15
T_RANGE = (0.05, 20.0)  # searched on a log scale
MIN_IMAGES = 10  # fewer validation images tell too little to fit a temperature on
UNKNOWN = "unknown"  # the SavedModel's class_name for a rejected image (class_index -1)
REJECT_FILE = "reject.json"  # in a run folder: the threshold its predictions use


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): the probabilities the model gives once T is baked in."""
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probabilities)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over `bins` equal-width bins of top probability, the
    image-weighted mean of |accuracy - mean confidence| (a top probability of exactly 1
    falls in the last bin)."""
    confidence, accuracy, counts = reliability(probabilities, labels, bins)
    return float((counts * np.abs(accuracy - confidence)).sum() / max(1, counts.sum()))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin of top probability: mean confidence, accuracy, image count."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [(confidence[which == b].mean(), correct[which == b].mean(), (which == b).sum())
            for b in range(bins) if (which == b).any()]
    return tuple(np.array(column) for column in zip(*rows)) if rows else \
        (np.zeros(0), np.zeros(0), np.zeros(0))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in T_RANGE that minimises the NLL of `scale(probabilities, T)` (golden-section
    search on log T; the NLL is convex in 1/T)."""
    f = lambda log_t: nll(scale(probabilities, math.exp(log_t)), labels)  # noqa: E731
    low, high = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = f(a), f(b)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = f(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = f(b)
    return float(math.exp((low + high) / 2))


def why_not_fit(probabilities: np.ndarray | None, labels: np.ndarray) -> str | None:
    """The reason a temperature cannot be fitted on these predictions, or None. With every
    image right, the NLL falls without end as T shrinks: sharpening would be unfounded."""
    if probabilities is None or len(labels) < MIN_IMAGES:
        return f"fewer than {MIN_IMAGES} validation images"
    if (np.asarray(probabilities).argmax(axis=1) == np.asarray(labels)).all():
        return "every validation image is classified right: nothing to fit on"
    return None


def calibration_report(temperature: float, splits: dict[str, tuple]) -> dict:
    """metrics.json's calibration block: T, and per split NLL and ECE before and after.

    Args:
        splits: name -> (probabilities before, labels), for the splits that have images.
    """
    report = {"method": "temperature scaling", "temperature": temperature,
              "ece_bins": ECE_BINS}
    for name, (probabilities, labels) in splits.items():
        after = scale(probabilities, temperature)
        report[name] = {"nll_before": nll(probabilities, labels), "nll_after": nll(after, labels),
                        "ece_before": ece(probabilities, labels), "ece_after": ece(after, labels)}
    return report


def bake_temperature(model, temperature: float) -> None:
    """Divides the final layer's logits by T: its kernel and bias (layer "probabilities")."""
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / temperature, bias / temperature])


def check_reject_below(value) -> float | str | None:
    """None, "auto", or a probability in [0, 1] (strings from the command line too)."""
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 <= number <= 1 or math.isnan(number):
        raise UserInputError(f"reject_below must be a probability in [0, 1] or 'auto'. "
                             f"Received: reject_below={value!r}")
    return number


def read_reject(folder) -> float | None:
    """The reject threshold a run recorded (reject.json), or None."""
    path = Path(folder) / REJECT_FILE
    if not path.is_file():
        return None
    try:
        return float(check_reject_below(json.loads(path.read_text())["reject_below"]))
    except (ValueError, KeyError, TypeError, UserInputError):
        raise UserInputError(f"{path} is damaged (it must hold the run's reject_below, a "
                             f"probability in [0, 1]); restore it or delete it.") from None


def auto_threshold(probabilities: np.ndarray, keep: float) -> float:
    """The P that keeps a share `keep` of these images (top probability >= P)."""
    top = np.sort(np.asarray(probabilities).max(axis=1))
    if not len(top):
        return 0.0
    drop = int(math.floor((1 - keep) * len(top) + 1e-9))
    return float(top[min(drop, len(top) - 1)])


def selective(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Coverage (share accepted) and accuracy on the accepted images at `threshold`."""
    probabilities = np.asarray(probabilities)
    accepted = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    return {"reject_below": float(threshold), "coverage": float(accepted.mean()),
            "selective_accuracy": float(correct[accepted].mean()) if accepted.any() else None}


def coverage_curve(probabilities: np.ndarray, labels: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy on the most confident k images against coverage k/N, for every k."""
    probabilities = np.asarray(probabilities)
    order = np.argsort(-probabilities.max(axis=1), kind="stable")
    correct = (probabilities.argmax(axis=1) == np.asarray(labels))[order]
    k = np.arange(1, len(order) + 1)
    return k / len(order), np.cumsum(correct) / k
