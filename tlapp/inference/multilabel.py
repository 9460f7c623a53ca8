"""Multi-label runs: one yes/no decision per label, each with its own threshold.

Thresholds are tuned on the validation split (the one that maximises each label's F1) and
recorded in the run folder's thresholds.json, which predict, evaluate and export read.
Metrics: per label precision, recall, F1 and average precision; micro and macro F1, mean
average precision (mAP), the share of images whose whole label set is right ("accuracy")
and the share of right decisions.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from tlapp.errors import UserInputError
from tlapp.files import write_atomic, write_json

DEFAULT_THRESHOLD = 0.5  # for a label the validation split has no positive of
THRESHOLDS_FILE = "thresholds.json"


def tune_thresholds(targets: np.ndarray | None, probabilities: np.ndarray | None,
                    classes: int) -> list[float]:
    """Per label, the threshold t (predict yes when p >= t) with the best F1 on these
    predictions; DEFAULT_THRESHOLD where there is nothing to tune on (no images, or no
    positive of that label)."""
    if targets is None or probabilities is None or not len(targets):
        return [DEFAULT_THRESHOLD] * classes
    thresholds = []
    for truth, scores in zip(np.asarray(targets).T > 0.5, np.asarray(probabilities).T):
        positives = int(truth.sum())
        if not positives:
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        order = np.argsort(-scores, kind="stable")
        ranked, hits = scores[order], np.cumsum(truth[order])
        # cut after position k (yes for the top k+1) only where the score changes
        cuts = np.flatnonzero(np.append(ranked[1:] < ranked[:-1], True))
        f1 = 2 * hits[cuts] / (cuts + 1 + positives)
        best = cuts[int(np.argmax(f1))]
        below = ranked[best + 1] if best + 1 < len(ranked) else 0.0
        thresholds.append(float((ranked[best] + below) / 2))
    return thresholds


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """The mean of the precision at each positive, ranked by score (None without one)."""
    positives = int(truth.sum())
    if not positives:
        return None
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(truth[order])
    ranks = np.flatnonzero(truth[order]) + 1
    return float(np.mean(hits[ranks - 1] / ranks))


def multilabel_metrics(targets: np.ndarray, probabilities: np.ndarray | None,
                       classes: list[str], thresholds: list[float]) -> dict:
    """Metrics of multi-hot `targets` [N, C] against `probabilities` [N, C] at `thresholds`.

    Returns:
        {"accuracy" (exact label set), "label_accuracy", "count", "micro_f1", "macro_f1",
        "mAP", "per_label": {name: {precision, recall, f1, average_precision, threshold,
        support}}}; {"accuracy": None, "count": 0} without images.
    """
    if probabilities is None or not len(targets):
        return {"accuracy": None, "count": 0}
    truth = np.asarray(targets) > 0.5
    probabilities = np.asarray(probabilities)
    predicted = probabilities >= np.asarray(thresholds)[None, :]
    tp = (predicted & truth).sum(axis=0)
    fp = (predicted & ~truth).sum(axis=0)
    fn = (~predicted & truth).sum(axis=0)
    per_label, f1s, aps = {}, [], []
    for i, name in enumerate(classes):
        precision = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 0.0
        recall = tp[i] / (tp[i] + fn[i]) if tp[i] + fn[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        ap = average_precision(truth[:, i], probabilities[:, i])
        f1s.append(f1)
        aps += [ap] if ap is not None else []
        per_label[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "average_precision": ap,
                           "threshold": float(thresholds[i]), "support": int(truth[:, i].sum())}
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()) if tp.sum() else 0.0
    return {"accuracy": float(np.mean((predicted == truth).all(axis=1))),
            "label_accuracy": float(np.mean(predicted == truth)), "count": int(len(truth)),
            "micro_f1": float(micro), "macro_f1": float(np.mean(f1s)),
            "mAP": float(np.mean(aps)) if aps else None, "per_label": per_label}


def predicted_labels(row: np.ndarray, labels: list[str], thresholds: list[float]) -> list[dict]:
    """The labels at or above their threshold, most probable first, with probabilities."""
    chosen = [i for i in np.argsort(-row, kind="stable") if row[i] >= thresholds[i]]
    return [{"label": labels[i], "probability": float(row[i])} for i in chosen]


def write_thresholds(folder: Path, labels: list[str], thresholds: list[float]) -> None:
    write_json(folder / THRESHOLDS_FILE, {"labels": labels, "thresholds": thresholds,
                                          "tuned_on": "val"})


def read_thresholds(folder: Path, labels: list[str]) -> list[float]:
    """The thresholds a multi-label run recorded, checked against its labels."""
    path = folder / THRESHOLDS_FILE
    try:
        stored = json.loads(path.read_text())
        thresholds = [float(t) for t in stored["thresholds"]]
        ok = stored["labels"] == labels and all(0 <= t <= 1 for t in thresholds)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserInputError(f"{path} is missing or damaged (it must hold one threshold in "
                             f"[0, 1] per label of labels.txt): this multi-label run cannot "
                             f"decide which labels to predict. Train the run again.")
    return thresholds


def write_label_report(folder: Path, result: dict) -> Path:
    """per_label.csv: precision, recall, F1, average precision, threshold, support."""
    path = Path(folder) / "per_label.csv"
    fields = ["precision", "recall", "f1", "average_precision", "threshold", "support"]

    def write(temp):
        with open(temp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", *fields])
            for name, row in result["per_label"].items():
                writer.writerow([name, *("" if row[k] is None else row[k] for k in fields)])

    write_atomic(path, write)
    return path
