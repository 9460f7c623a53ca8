"""Finished runs: open one, predict with one or an ensemble, evaluate on its test split."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import keras
import numpy as np

from tlapp import config as config_lib, data as data_lib, evaluation, inference
from tlapp.config import Config, UserInputError


@dataclasses.dataclass
class Run:
    """A finished run folder: its config, labels and metrics, and its model on demand."""

    path: Path
    config: Config
    labels: list[str]
    metrics: dict
    _model: keras.Model | None = None

    @property
    def model(self) -> keras.Model:
        """The whole model: RGB pixels (0-255) at config.image_size in, probabilities out."""
        if self._model is None:
            self._model = keras.saving.load_model(self.path / "model.keras", safe_mode=True)
        return self._model

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def predict(self, images: list[str], top_k: int = 5, tta: str = "none") -> list[dict]:
        """Predicts image files; see `predict`."""
        return predict([self], images, top_k, tta=tta)


def load_run(path: str | Path) -> Run:
    """Opens a run folder written by `tlapp train`.

    Raises:
        UserInputError: `path` is not a finished run folder.
    """
    path = Path(path).expanduser()
    missing = [name for name in ("config.toml", "labels.txt", "model.keras")
               if not (path / name).is_file()]
    if missing:
        raise UserInputError(f"{path} is not a tlapp run folder (missing {', '.join(missing)}). "
                             f"Give the folder that 'tlapp train --out' wrote.")
    config = config_lib.from_dict(config_lib.load_toml(path / "config.toml"), str(path))
    labels = (path / "labels.txt").read_text().splitlines()
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Run(path, config, labels, metrics)


def _as_runs(runs) -> list[Run]:
    """A Run, a run folder, or a list of them -> a list of Runs."""
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    if not runs:
        raise UserInputError("No run given: pass a run folder (RUN, or --model RUN per ensemble "
                             "member).")
    return [r if isinstance(r, Run) else load_run(r) for r in runs]


def ensemble_members(runs) -> list[inference.Member]:
    """The runs as ensemble members, after checking they share labels.

    Raises:
        UserInputError: the runs' labels differ (the message names the runs and classes).
    """
    runs = _as_runs(runs)
    inference.check_same_labels([(str(r.path), r.labels) for r in runs])
    return [inference.Member(r.model, r.image_size, str(r.path)) for r in runs]


def iter_predictions(runs, images: list[str], top_k: int = 5, batch_size: int = 32,
                     tta: str = "none"):
    """Like `predict`, but yields each file's result as soon as its chunk is done."""
    runs = _as_runs(runs)
    members = ensemble_members(runs)
    labels = runs[0].labels
    files = data_lib.expand_inputs(images)
    for path, row, error in inference.predict_files(members, files, tta, batch_size):
        if error:
            yield {"path": path, "error": error}
        else:
            best = np.argsort(-row, kind="stable")[:top_k]
            yield {"path": path, "predictions": [{"label": labels[i],
                                                   "probability": float(row[i])} for i in best]}


def predict(runs, images: list[str], top_k: int = 5, batch_size: int = 32,
            tta: str = "none") -> list[dict]:
    """Top-k predictions for image files, folders or globs, averaged over `runs`.

    Args:
        runs: a Run or run folder, or several (an ensemble: probabilities are averaged;
            each run decodes at its own image size; labels must match).
        tta: "none", "flip" or "10crop" (see tlapp.inference).

    Returns:
        One dict per file, in input order: {"path", "predictions": [{"label",
        "probability"}, ...] best first}, or {"path", "error"} for a file it could not read.
    """
    return list(iter_predictions(runs, images, top_k, batch_size, tta))


def evaluate_run(run, data: str | Path | None = None, batch_size: int = 32,
                 verbose: bool = True, tta: str = "none", out: str | Path | None = None) -> dict:
    """Evaluates the whole model (pixels in) on the run's test split, or on every image of
    `data` (a folder with the run's class folders).

    Args:
        run: a Run or run folder, or several (an ensemble: probabilities are averaged).
        tta: "none", "flip" or "10crop" (see tlapp.inference).
        out: folder for the results (default: the run folder; for an ensemble
            models/ensemble-TIME). metrics.json there gets them under "evaluate";
            confusion_matrix.csv, misclassified.csv and plots/confusion_matrix.png are
            rewritten.

    Returns:
        The metrics (see evaluation.classification_metrics) plus data, tta, models, out.
    """
    runs = _as_runs(run)
    members = ensemble_members(runs)
    first = runs[0]
    if data is None:
        _check_same_test_split(runs)
        root = data_lib.resolve_data(first.config.data, Path(first.config.cache_dir), verbose)
        split = json.loads((first.path / "split.json").read_text())
        files = split["test"]
        paths = [root / p for p in files]
        class_part = 1 if (root / "train").is_dir() else 0  # train/CLASS/... or CLASS/...
        labels = [first.labels.index(p.split("/")[class_part]) for p in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserInputError(f"{len(missing)} test images of this run are gone "
                                 f"(first: {missing[0]}); pass --data DIR to evaluate elsewhere.")
    else:
        scanned = data_lib.scan_folder(data, 0.0, 0.0, verbose=verbose)
        unknown = sorted(set(scanned.classes) - set(first.labels))
        if unknown:
            raise UserInputError(f"{data} has classes the run does not know: "
                                 f"{', '.join(unknown)}. Known: {', '.join(first.labels)}.")
        files = [s.path for s in scanned.samples]
        paths = [scanned.root / p for p in files]
        labels = [first.labels.index(scanned.classes[s.label]) for s in scanned.samples]
    if not paths:
        raise UserInputError("No images to evaluate on.")
    rows, errors = [], []
    for path, row, error in inference.predict_files(members, [str(p) for p in paths], tta,
                                                    batch_size, verbose=verbose):
        rows.append(row)
        errors += [f"{path}: {error}"] if error else []
    if errors:
        raise UserInputError(f"{len(errors)} images could not be read (first: {errors[0]}). "
                             f"Fix or remove them, or pass --data DIR.")
    probabilities = np.stack(rows)
    result = evaluation.classification_metrics(np.array(labels), probabilities, first.labels)
    out = Path(out) if out else first.path if len(runs) == 1 else \
        Path("models") / f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}"
    result |= {"data": str(data) if data else "test split", "tta": tta,
               "models": [str(r.path) for r in runs], "out": str(out)}
    evaluation.write_reports(out, result, files, np.array(labels), probabilities, first.labels)
    evaluation.update_metrics(out, "evaluate", result)
    return result


def _check_same_test_split(runs: list[Run]) -> None:
    first_split = json.loads((runs[0].path / "split.json").read_text())["test"]
    for other in runs[1:]:
        split = json.loads((other.path / "split.json").read_text())["test"]
        if other.config.data != runs[0].config.data or split != first_split:
            raise UserInputError(f"{runs[0].path} and {other.path} have different test splits, "
                                 f"so no test split is unseen by every member. Pass --data DIR "
                                 f"to evaluate the ensemble on one folder.")
