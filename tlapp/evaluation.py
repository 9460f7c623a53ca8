"""Metrics from predictions: accuracy, per-class precision/recall/F1, confusion matrix."""
from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           classes: list[str]) -> dict:
    """Accuracy, per-class and macro/weighted F1, and the confusion matrix (rows: true class)."""
    labels = np.asarray(labels, dtype=int)
    n = len(classes)
    if len(labels) == 0:
        return {"accuracy": None, "count": 0}
    predicted = np.argmax(probabilities, axis=1)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for i, name in enumerate(classes):
        true_positive = confusion[i, i]
        precision = true_positive / max(confusion[:, i].sum(), 1)
        recall = true_positive / max(confusion[i].sum(), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "support": int(confusion[i].sum())}
    support = np.array([c["support"] for c in per_class.values()])
    f1s = np.array([c["f1"] for c in per_class.values()])
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "count": int(len(labels)),
        "macro_f1": float(f1s.mean()),
        "weighted_f1": float((f1s * support).sum() / support.sum()),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }
