"""Metrics from predictions and the evaluation files of a run folder.

Accuracy, top-5 accuracy, per-class precision/recall/F1/support, macro and weighted F1, the
confusion matrix; written as metrics.json sections, confusion_matrix.csv,
plots/confusion_matrix.png and misclassified.csv.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from tlapp import cache as cache_lib, report

TOP_K = 5  # top-5 accuracy is reported when there are more than 5 classes


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           classes: list[str]) -> dict:
    """Accuracy, top-5 accuracy (6 or more classes), per-class precision/recall/F1/support,
    macro and weighted F1, and the confusion matrix (rows: true class, columns: predicted).

    A class never predicted has precision 0; a class with no images has recall 0.
    """
    labels = np.asarray(labels, dtype=int)
    n = len(classes)
    if len(labels) == 0:
        return {"accuracy": None, "count": 0}
    probabilities = np.asarray(probabilities)
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
    result = {
        "accuracy": float(np.mean(predicted == labels)),
        "count": int(len(labels)),
    }
    if n > TOP_K:
        # rank of the true class = number of classes with a strictly higher probability
        true_probability = probabilities[np.arange(len(labels)), labels]
        rank = (probabilities > true_probability[:, None]).sum(axis=1)
        result[f"top{TOP_K}_accuracy"] = float(np.mean(rank < TOP_K))
    return result | {
        "macro_f1": float(f1s.mean()),
        "weighted_f1": float((f1s * support).sum() / support.sum()),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def misclassified(files: list[str], labels: np.ndarray, probabilities: np.ndarray,
                  classes: list[str]) -> list[dict]:
    """The wrongly predicted files, worst first: highest confidence in the wrong class first.

    Returns:
        [{"file", "true", "predicted", "confidence"}, ...]; confidence is the probability of
        the predicted class.
    """
    probabilities = np.asarray(probabilities)
    predicted = np.argmax(probabilities, axis=1)
    rows = [{"file": str(f), "true": classes[t], "predicted": classes[p],
             "confidence": float(row[p])}
            for f, t, p, row in zip(files, labels, predicted, probabilities) if t != p]
    return sorted(rows, key=lambda r: (-r["confidence"], r["file"]))


def write_reports(folder: str | Path, result: dict, files: list[str], labels: np.ndarray,
                  probabilities: np.ndarray, classes: list[str]) -> list[Path]:
    """Writes confusion_matrix.csv, misclassified.csv and plots/confusion_matrix.png.

    Args:
        result: `classification_metrics` of the same predictions.
        files: the images' paths as they should appear in misclassified.csv.

    Returns:
        The files written.
    """
    folder = Path(folder)
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    matrix = result["confusion_matrix"]

    def write_confusion(path):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *classes])
            writer.writerows([name, *row] for name, row in zip(classes, matrix))

    def write_misclassified(path):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["file", "true", "predicted", "confidence"])
            writer.writeheader()
            for row in misclassified(files, labels, probabilities, classes):
                writer.writerow(row | {"confidence": f"{row['confidence']:.6f}"})

    written = [folder / "confusion_matrix.csv", folder / "misclassified.csv",
               folder / "plots" / "confusion_matrix.png"]
    cache_lib.write_atomic(written[0], write_confusion)
    cache_lib.write_atomic(written[1], write_misclassified)
    cache_lib.write_atomic(written[2], lambda p: report.plot_confusion(matrix, classes, p))
    return written


def update_metrics(folder: str | Path, section: str, result: dict) -> Path:
    """Adds or replaces one section of folder/metrics.json, keeping every other key."""
    path = Path(folder) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    cache_lib.write_json(path, metrics | {section: result})
    return path
