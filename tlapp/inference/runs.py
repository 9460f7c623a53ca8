"""Finished runs: open one, and predict with one or an ensemble."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np

from tlapp import config as config_lib
from tlapp.backbones import classic, spec  # noqa: F401  registers the layers model.keras uses
from tlapp.config import Config
from tlapp.data.scan import expand_inputs
from tlapp.errors import UserInputError
from tlapp.inference import calibration, multilabel, predict as predict_lib


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
        """The whole model: RGB pixels (0-255) at config.image_size in, probabilities out.

        Raises:
            UserInputError: model.keras cannot be read, or its classes are not labels.txt's.
        """
        if self._model is None:
            file = self.path / "model.keras"
            try:
                model = keras.saving.load_model(file, safe_mode=True)
            except Exception as e:  # zip, HDF5 and deserialisation errors of a damaged file
                raise UserInputError(
                    f"Cannot read {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    f". The file is damaged or was not written by tlapp; train the run again "
                    f"or restore the file.") from None
            classes = int(model.output.shape[-1])
            if classes != len(self.labels):
                raise UserInputError(
                    f"{self.path / 'labels.txt'} lists {len(self.labels)} classes but the model "
                    f"in {file} predicts {classes}: the run folder is inconsistent. Restore "
                    f"labels.txt (one class per line, in class-index order).")
            self._model = model
        return self._model

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def explain(self, images: list[str], class_name: str | None = None) -> list[dict]:
        """Grad-CAM heatmaps of image files, folders or globs: per file {"path", "pixels",
        "heatmap" [S, S] in [0, 1], "probabilities"} (or {"path", "error"}); the heatmap is
        for `class_name` if given, else for the image's top class."""
        from tlapp.inference.explain import explain_files

        files = expand_inputs(images)
        classes = None
        if class_name is not None:
            if class_name not in self.labels:
                raise UserInputError(f"Unknown class. Received: class_name={class_name!r}. "
                                     f"The run's classes: {', '.join(self.labels)}.")
            classes = [self.labels.index(class_name)] * len(files)
        return explain_files(self.model, files, self.image_size, classes)

    @property
    def reject_below(self) -> float | None:
        """The "none of these" threshold the run recorded (reject.json), or None."""
        return calibration.read_reject(self.path)

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label run's per-label thresholds (thresholds.json); None otherwise."""
        if not self.config.multi_label:
            return None
        return multilabel.read_thresholds(self.path, self.labels)

    def predict(self, images: list[str], top_k: int = 5, tta: str = "none",
                reject_below: float | str | None = None) -> list[dict]:
        """Predicts image files; see `predict`."""
        return predict([self], images, top_k, tta=tta, reject_below=reject_below)


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
    if not labels or any(not label for label in labels):
        raise UserInputError(f"{path / 'labels.txt'} must list one class per line, with no empty "
                             f"lines; restore it from the run's training.")
    metrics_file = path / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except ValueError:
        raise UserInputError(f"{metrics_file} is not valid JSON; restore it or delete it "
                             f"(predict and export do not need it).") from None
    return Run(path, config, labels, metrics)


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a whole number of at least 1. Received: "
                             f"batch_size={batch_size!r}")
    return batch_size


def as_runs(runs) -> list[Run]:
    """A Run, a run folder, or a list of them -> a list of Runs."""
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    if not runs:
        raise UserInputError("No run given: pass a run folder (RUN, or --model RUN per ensemble "
                             "member).")
    return [r if isinstance(r, Run) else load_run(r) for r in runs]


def ensemble_members(runs) -> list[predict_lib.Member]:
    """The runs as ensemble members, after checking they share labels.

    Raises:
        UserInputError: the runs' labels differ (the message names the runs and classes).
    """
    runs = as_runs(runs)
    predict_lib.check_same_labels([(str(r.path), r.labels) for r in runs])
    check_multi_label(runs)
    return [predict_lib.Member(r.model, r.image_size, str(r.path)) for r in runs]


def resolve_reject(runs: list[Run], reject_below: float | str | None) -> float | None:
    """The threshold predictions use: the one given; for None the run's own (one run; an
    ensemble has none unless given); 'auto' requires the run to have recorded one."""
    reject_below = calibration.check_reject_below(reject_below)
    if isinstance(reject_below, float):
        if any(r.config.multi_label for r in runs):
            raise UserInputError("reject_below applies to one label per image; a multi-label "
                                 "run answers 'none' when no label reaches its threshold.")
        return reject_below
    recorded = runs[0].reject_below if len(runs) == 1 else None
    if reject_below == "auto" and recorded is None:
        which = runs[0].path if len(runs) == 1 else "an ensemble"
        raise UserInputError(f"--reject-below auto uses the threshold a run chose on its "
                             f"validation split, and {which} has none: train with "
                             f"--reject-below auto, or give a number.")
    return recorded


def check_multi_label(runs: list[Run]) -> None:
    """Multi-label runs are used one at a time (each has its own tuned thresholds)."""
    if len(runs) > 1 and any(r.config.multi_label for r in runs):
        raise UserInputError(f"Ensembles of multi-label runs are not supported (each run's "
                             f"thresholds were tuned for its own probabilities). Received: "
                             f"{', '.join(str(r.path) for r in runs)}")


def iter_predictions(runs, images: list[str], top_k: int = 5, batch_size: int = 32,
                     tta: str = "none", reject_below: float | str | None = None):
    """Like `predict`, but yields each file's result as soon as its chunk is done."""
    runs = as_runs(runs)
    check_batch_size(batch_size)
    if not isinstance(top_k, int) or not 1 <= top_k:
        raise UserInputError(f"top_k must be at least 1 (the number of labels to show per "
                             f"image). Received: top_k={top_k!r}")
    members = ensemble_members(runs)
    labels = runs[0].labels
    thresholds = runs[0].thresholds
    reject = resolve_reject(runs, reject_below)
    files = expand_inputs(images)
    for path, row, error in predict_lib.predict_files(members, files, tta, batch_size):
        if error:
            yield {"path": path, "error": error}
        elif thresholds is not None:
            yield {"path": path, "predictions": multilabel.predicted_labels(row, labels,
                                                                            thresholds),
                   "probabilities": {label: float(p) for label, p in zip(labels, row)}}
        else:
            best = np.argsort(-row, kind="stable")[:top_k]
            known = reject is None or row[best[0]] >= reject
            yield {"path": path, "label": labels[best[0]] if known else None,
                   "predictions": [{"label": labels[i], "probability": float(row[i])}
                                   for i in best]}


def predict(runs, images: list[str], top_k: int = 5, batch_size: int = 32,
            tta: str = "none", reject_below: float | str | None = None) -> list[dict]:
    """Top-k predictions for image files, folders or globs, averaged over `runs`.

    Args:
        runs: a Run or run folder, or several (an ensemble: probabilities are averaged;
            each run decodes at its own image size; labels must match).
        tta: "none", "flip" or "10crop" (see tlapp.inference.predict).

    Returns:
        One dict per file, in input order: {"path", "predictions": [{"label",
        "probability"}, ...] best first}, or {"path", "error"} for a file it could not read.
        "label" is the answer: the top label, or None ("unknown") when its probability is
        below `reject_below` (default: the run's own threshold, if it was trained with one;
        "auto" insists on it). A multi-label run predicts every label at or above its
        threshold (not top_k) and adds "probabilities" {label: probability} for every label.
    """
    return list(iter_predictions(runs, images, top_k, batch_size, tta, reject_below))
