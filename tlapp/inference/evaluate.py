"""Metrics from predictions and the evaluation files of a run folder.

Accuracy, top-5 accuracy, per-class precision/recall/F1/support, macro and weighted F1, the
confusion matrix; written as metrics.json sections, confusion_matrix.csv,
plots/confusion_matrix.png and misclassified.csv.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tlapp.data.scan import data_root, resolve_data, scan_folder
from tlapp.errors import UserInputError
from tlapp.files import MARKER, owned_kind, write_atomic, write_json, write_text
from tlapp.inference import calibration, multilabel, predict as predict_lib
from tlapp.inference.runs import (Run, as_runs, check_batch_size, ensemble_members,
                                  resolve_reject)
from tlapp.reporting.model_card import CARD, write_cards_safely
from tlapp.reporting.plots import plot_confusion, plot_coverage

log = logging.getLogger(__name__)

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
                  probabilities: np.ndarray, classes: list[str],
                  draw: Callable = lambda plot, *args: plot(*args)) -> list[Path]:
    """Writes confusion_matrix.csv, misclassified.csv and plots/confusion_matrix.png.

    Args:
        result: `classification_metrics` of the same predictions.
        files: the images' paths as they should appear in misclassified.csv.
        draw: `draw(plot, *args)` draws the plot (now, or queued for `draw_aside`).

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
    write_atomic(written[0], write_confusion)
    write_atomic(written[1], write_misclassified)
    draw(plot_confusion, matrix, classes, written[2])
    return written


def update_metrics(folder: str | Path, section: str, result: dict) -> Path:
    """Adds or replaces one section of folder/metrics.json, keeping every other key."""
    path = Path(folder) / "metrics.json"
    metrics = _read_metrics(path)
    write_json(path, metrics | {section: result})
    return path


def _read_metrics(path: Path) -> dict:
    """A metrics.json tlapp wrote ({} if there is none)."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except ValueError:
        metrics = None
    if not isinstance(metrics, dict) or not ({"val_accuracy", "evaluate"} & set(metrics)):
        raise UserInputError(f"{path} was not written by tlapp; tlapp will not change it. "
                             f"Give --out a new or empty folder.")
    return metrics


def check_evaluation_out(out: Path, runs: list[Run]) -> None:
    """Evaluation results go to one of the evaluated runs, or to a folder that is new, empty
    or an earlier evaluation's: never into another run or a folder of the user's."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out must be a folder, but {out} is a file. Received: "
                             f"out={str(out)!r}")
    if not out.is_dir() or not any(out.iterdir()) or owned_kind(out) == "evaluation":
        return
    if any(out.resolve() == run.path.resolve() for run in runs):
        return
    what = "another run's folder" if (out / "config.toml").is_file() else \
        "a folder tlapp did not write"
    raise UserInputError(f"{out} is {what}; writing the evaluation there would mix it up. "
                         f"Give --out a new or empty folder. Received: out={str(out)!r}")


def read_split(run: Run) -> dict:
    """The run's split.json: train/val/test paths relative to its data."""
    path = run.path / "split.json"
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"{path} is missing, so the run's test split is unknown. Pass "
                             f"--data DIR to evaluate on a folder instead.") from None
    except ValueError:
        split = None
    if not isinstance(split, dict) or not isinstance(split.get("test"), list):
        raise UserInputError(f"{path} is damaged (not the JSON tlapp wrote), so the run's test "
                             f"split is unknown. Pass --data DIR to evaluate on a folder.")
    return split


def split_images(run: Run, split: str = "test") -> tuple[list[str], list[Path], list[list[str]]]:
    """The images of one split of the run (split.json): their paths as recorded (relative
    to the data), their paths on disk, and their labels (a list per image).

    Raises:
        UserInputError: split.json is missing, damaged or names classes the run does not
            have, or some of the images are gone.
    """
    root = data_root(resolve_data(run.config.data, Path(run.config.cache_dir)))
    recorded = read_split(run)
    files = recorded.get(split) or []
    paths = [root / p for p in files]
    if "labels" in recorded:  # a list file or --label-from: the labels are recorded
        names = recorded["labels"].get(split) or []
    else:
        class_part = 1 if (root / "train").is_dir() else 0  # train/CLASS/... or CLASS/...
        names = [p.split("/")[class_part] for p in files]
    sets = [n if isinstance(n, list) else [n] for n in names]  # multi-label: lists
    strange = sorted({n for names_ in sets for n in names_} - set(run.labels))
    if strange or len(names) != len(files):
        raise UserInputError(f"{run.path / 'split.json'} lists {split} images of classes the "
                             f"run does not have ({', '.join(strange[:5])}): the run folder "
                             f"is inconsistent. Pass --data DIR to evaluate on a folder.")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserInputError(f"{len(missing)} {split} images of this run are gone "
                             f"(first: {missing[0]}); pass --data DIR to evaluate elsewhere.")
    return files, paths, sets


def evaluate_run(run, data: str | Path | None = None, batch_size: int = 32,
                 tta: str = "none", out: str | Path | None = None,
                 reject_below: float | str | None = None) -> dict:
    """Evaluates the whole model (pixels in) on the run's test split, or on every image of
    `data` (a folder with the run's class folders, or a list file as in training).

    Args:
        run: a Run or run folder, or several (an ensemble: probabilities are averaged).
        tta: "none", "flip" or "10crop" (see tlapp.inference.predict).
        reject_below: as in `predict`: adds "selective" (coverage and accuracy on the
            images answered) and plots/coverage.png.
        out: folder for the results (default: the run folder; for an ensemble
            models/ensemble-TIME). metrics.json there gets them under "evaluate";
            confusion_matrix.csv, misclassified.csv and plots/confusion_matrix.png are
            rewritten (per_label.csv for a multi-label run), and a run's MODEL_CARD.md
            tells of the evaluation.

    Returns:
        The metrics (see `classification_metrics`, or `multilabel.multilabel_metrics` at
        the run's thresholds) plus data, tta, models, out.
    """
    runs = as_runs(run)
    check_batch_size(batch_size)
    out = Path(out) if out else runs[0].path if len(runs) == 1 else \
        Path("models") / f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}"
    check_evaluation_out(out, runs)
    members = ensemble_members(runs)
    reject = resolve_reject(runs, reject_below)
    first = runs[0]
    if data is None:
        _check_same_test_split(runs)
        files, paths, sets = split_images(first)
    else:
        scanned = scan_folder(data, 0.0, 0.0, label_from=first.config.label_from,
                              path_column=first.config.path_column,
                              label_column=first.config.label_column,
                              multi_label=first.config.multi_label)
        unknown = sorted(set(scanned.classes) - set(first.labels))
        if unknown:
            raise UserInputError(f"{data} has classes the run does not know: "
                                 f"{', '.join(unknown)}. Known: {', '.join(first.labels)}.")
        files = [s.path for s in scanned.samples]
        paths = [scanned.root / p for p in files]
        sets = [[scanned.classes[i] for i in (s.labels or (s.label,))] for s in scanned.samples]
    index = {name: i for i, name in enumerate(first.labels)}
    if first.config.multi_label:
        labels = np.zeros((len(sets), len(first.labels)), np.float32)
        for row, names_ in enumerate(sets):
            labels[row, [index[n] for n in names_]] = 1.0
    else:
        labels = np.array([index[names_[0]] for names_ in sets])
    if not paths:
        raise UserInputError("No images to evaluate on.")
    rows, errors = [], []
    for path, row, error in predict_lib.predict_files(members, [str(p) for p in paths], tta,
                                                      batch_size, show_progress=True):
        rows.append(row)
        errors += [f"{path}: {error}"] if error else []
    if errors:
        raise UserInputError(f"{len(errors)} images could not be read (first: {errors[0]}). "
                             f"Fix or remove them, or pass --data DIR.")
    probabilities = np.stack(rows)
    thresholds = first.thresholds
    if thresholds is not None:
        result = multilabel.multilabel_metrics(labels, probabilities, first.labels, thresholds)
    else:
        result = classification_metrics(labels, probabilities, first.labels)
    if not any(out.resolve() == r.path.resolve() for r in runs):
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / MARKER, json.dumps({"kind": "evaluation"}) + "\n")
    result |= {"data": str(data) if data else "test split", "tta": tta,
               "models": [str(r.path) for r in runs], "out": str(out)}
    if thresholds is not None:
        multilabel.write_label_report(out, result)
    else:
        write_reports(out, result, files, labels, probabilities, first.labels)
        selected = None
        if reject is not None:
            selected = result["selective"] = calibration.selective(probabilities, labels,
                                                                   reject)
        coverage, accuracy = calibration.coverage_curve(probabilities, labels)
        plot_coverage(coverage, accuracy, out / "plots" / "coverage.png", selected and (
            selected["coverage"], selected["selective_accuracy"]))
    update_metrics(out, "evaluate", result)
    if (out / CARD).is_file():  # a run's own card: it tells of this evaluation now
        write_cards_safely(out)
    return result


def _check_same_test_split(runs: list[Run]) -> None:
    first_split = read_split(runs[0])["test"]
    for other in runs[1:]:
        split = read_split(other)["test"]
        if other.config.data != runs[0].config.data or split != first_split:
            raise UserInputError(f"{runs[0].path} and {other.path} have different test splits, "
                                 f"so no test split is unseen by every member. Pass --data DIR "
                                 f"to evaluate the ensemble on one folder.")
