"""Experiment tracking with MLflow (`--track mlflow`; `pip install "tlapp[mlflow]"`).

A run logs its resolved config as parameters, every epoch's metrics of every stage
(`head/val_accuracy`, `fine_tune/loss`, ... with the epoch as step), its final metrics,
the run folder's files as artifacts and its SavedModel as a logged model. Experiments and
searches log one parent run with a child run per run or trial.

The store is $MLFLOW_TRACKING_URI when set (a server, or any store MLflow knows), else a
local SQLite store in ./mlruns/ (mlflow.db, artifacts in mlruns/artifacts/), so tracking
needs no server. MLflow's usage telemetry is off unless MLFLOW_DISABLE_TELEMETRY is set
otherwise: tlapp makes no network request its user did not ask for.
"""
from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
from pathlib import Path
from typing import Iterator

import keras

from tlapp.errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "mlruns"
EXPERIMENT = "tlapp"
# Not logged as artifacts: too big (the SavedModel is logged as a model instead) or internal.
NOT_LOGGED = {"model.keras", "saved_model", "logs", "checkpoints", "mlflow_run_id.txt"}


def import_mlflow():
    """mlflow, with telemetry off by default; a UserInputError naming the install command
    when it is missing."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ModuleNotFoundError:
        raise UserInputError('--track mlflow needs MLflow: pip install "tlapp[mlflow]"') \
            from None
    return mlflow


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the SQLite store in ./mlruns/ (an absolute path: MLflow
    resolves a relative one against whatever folder it runs in later)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = Path(DEFAULT_FOLDER).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _experiment_id(mlflow) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else \
        (Path(DEFAULT_FOLDER).resolve() / "artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


class Tracker:
    """One MLflow run: what tlapp logs into it."""

    def __init__(self, mlflow, run_id: str):
        self.mlflow, self.run_id = mlflow, run_id

    def log_params(self, values: dict) -> None:
        """Parameters (MLflow stores them as text); None values are left out."""
        self.mlflow.log_params({k: v for k, v in values.items() if v is not None},
                               run_id=self.run_id)

    def log_metrics(self, values: dict, step: int | None = None) -> None:
        """The numeric values of `values` (nested dicts flattened with '.')."""
        flat = {k: float(v) for k, v in _flatten(values).items()
                if isinstance(v, numbers.Real) and not isinstance(v, bool)}  # numpy's too
        if flat:
            self.mlflow.log_metrics(flat, step=step, run_id=self.run_id)

    def set_tags(self, tags: dict) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def epoch_logger(self, stage: str) -> keras.callbacks.Callback:
        """A Keras callback logging each epoch's metrics as `<stage>/<name>`, step = epoch."""
        return EpochLogger(self, stage)

    def log_files(self, paths: list[Path]) -> None:
        """Files as artifacts (a folder as a folder of the same name)."""
        for path in paths:
            if path.is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path=path.name,
                                          run_id=self.run_id)
            elif path.is_file():
                self.mlflow.log_artifact(str(path), run_id=self.run_id)

    def log_text(self, text: str, name: str) -> None:
        """`text` as an artifact file called `name`."""
        self.mlflow.log_text(text, name, run_id=self.run_id)

    def log_run_folder(self, folder: Path) -> None:
        """The run folder's files (config, labels, split, history, metrics, reports,
        plots) as artifacts, and its SavedModel as a logged model."""
        self.log_files([p for p in sorted(Path(folder).iterdir()) if p.name not in NOT_LOGGED])
        if (Path(folder) / "saved_model").is_dir():
            self.log_saved_model(Path(folder) / "saved_model")

    def log_saved_model(self, saved_model: Path) -> str:
        """Logs a tlapp SavedModel export with MLflow's TensorFlow flavour; returns the
        model's URI (`mlflow.tensorflow.load_model(uri).signatures["serving_default"]`
        serves encoded image files)."""
        import tensorflow as tf
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec
        import numpy as np

        loaded = tf.saved_model.load(str(saved_model))
        module = tf.Module()  # MLflow's flavour saves a tf.Module; this one holds the export
        module.export = loaded
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(object), (-1,),
                                                             "images")]))
        info = self.mlflow.tensorflow.log_model(
            module, name="saved_model", signature=signature,
            saved_model_kwargs={"signatures": dict(loaded.signatures)},
            pip_requirements=[f"tensorflow=={tf.__version__}"])
        return info.model_uri


class EpochLogger(keras.callbacks.Callback):
    def __init__(self, tracker: Tracker, stage: str):
        super().__init__()
        self.tracker, self.stage = tracker, stage

    def on_epoch_end(self, epoch, logs=None):
        values = {f"{self.stage}/{k}": v for k, v in (logs or {}).items()}
        values[f"{self.stage}/lr"] = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))  # a 0-d array would not count as a number
        self.tracker.log_metrics(values, step=epoch + 1)


@contextlib.contextmanager
def mlflow_run(name: str, run_id_file: Path | None = None,
               tags: dict | None = None) -> Iterator[Tracker]:
    """Starts an MLflow run (a child of the active run, if there is one) and ends it when
    the block ends: FINISHED, or FAILED on an exception.

    `run_id_file` keeps the run's id: when it exists, that run is continued (a resumed
    tlapp run or experiment logs into the MLflow run it started)."""
    mlflow = import_mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    run_id = None
    if run_id_file is not None and Path(run_id_file).is_file():
        run_id = Path(run_id_file).read_text().strip() or None
    parent = mlflow.active_run()
    experiment = parent.info.experiment_id if parent else _experiment_id(mlflow)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment,
                          run_name=None if run_id else name, nested=parent is not None,
                          tags=tags) as run:
        if run_id_file is not None:
            Path(run_id_file).parent.mkdir(parents=True, exist_ok=True)
            Path(run_id_file).write_text(run.info.run_id + "\n")
        log.info("mlflow: logging %s%s (run id %s) to %s", name,
                 " as a child run" if parent else "", run.info.run_id,
                 mlflow.get_tracking_uri())
        yield Tracker(mlflow, run.info.run_id)


def maybe_run(enabled: bool, name: str, run_id_file: Path | None = None,
              tags: dict | None = None):
    """`mlflow_run(...)` when `enabled`, else a block that yields None."""
    return mlflow_run(name, run_id_file, tags) if enabled else contextlib.nullcontext()


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params_of(config_values: dict) -> dict:
    """A config as MLflow parameters: scalars as they are, anything else as JSON."""
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
            for k, v in config_values.items()}
