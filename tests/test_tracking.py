"""Experiment tracking with MLflow (`--track mlflow`), against the real mlflow package and a
local SQLite store under tmp_path."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import tlapp
from tests.conftest import make_folder
from tlapp import cli
from tlapp.reporting import tracking


def test_default_store_is_a_sqlite_file_in_mlruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri() == "http://tracking.example:5000"


def test_missing_mlflow_names_the_install_command_before_any_work(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    data = make_folder(tmp_path / "data", per_class=3)
    code = cli.main(["train", str(data), "--backbone", "vgg16", "--weights", "none",
                     "--image-size", "32", "--cache-dir", str(tmp_path / "c"), "--out",
                     str(tmp_path / "run"), "--track", "mlflow"])
    assert code == 2
    assert 'pip install "tlapp[mlflow]"' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run folder begun


def test_params_and_nested_metrics_are_flattened():
    assert tracking.params_of({"lr": 0.1, "augment": None, "sizes": [1, 2]}) == \
        {"lr": 0.1, "augment": "null", "sizes": "[1, 2]"}
    assert tracking._flatten({"val": {"accuracy": 1.0, "per_class": {"cat": 0.5}}}) == \
        {"val.accuracy": 1.0, "val.per_class.cat": 0.5}


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs."""


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A run with both stages logged to a SQLite store named by MLFLOW_TRACKING_URI, killed
    after its first epoch and resumed from the command line."""
    from tlapp.training import checkpoint

    base = tmp_path_factory.mktemp("tracked")
    make_folder(base / "data", per_class=6)
    uri = f"sqlite:///{base / 'store' / 'mlflow.db'}"
    (base / "store").mkdir()
    real_save = checkpoint.Checkpoint.save

    def save_then_die(self, state):
        real_save(self, state)
        if state["epoch"] == 1:
            raise Killed()

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)  # where MLflow puts artifacts of a store given by URI
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setattr(checkpoint.Checkpoint, "save", save_then_die)
        with pytest.raises(Killed):
            tlapp.train(str(base / "data"), backbone="vgg16", weights="none", image_size=32,
                        batch_size=4, epochs=2, fine_tune_epochs=1, track="mlflow",
                        cache_dir=str(base / "cache"), out=str(base / "run"))
        patch.setattr(checkpoint.Checkpoint, "save", real_save)
        assert cli.main(["train", "--resume", str(base / "run")]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tlapp")
    runs = client.search_runs([experiment.experiment_id])
    return base, tlapp.load_run(base / "run"), client, experiment, runs


@pytest.mark.slow
def test_run_logs_its_config_as_parameters(tracked):
    _, run, _, _, runs = tracked
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert runs[0].info.run_name == "run"
    assert params["backbone"] == "vgg16" and params["epochs"] == "2"
    assert float(params["lr"]) == run.config.lr and params["fine_tune_epochs"] == "1"
    assert params["track"] == "mlflow"


@pytest.mark.slow
def test_run_logs_per_epoch_metrics_of_both_stages_and_final_metrics(tracked):
    base, run, client, _, runs = tracked
    run_id = runs[0].info.run_id
    history = {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
               for name in ("head/val_accuracy", "head/loss", "head/lr", "fine_tune/loss")}
    assert [step for step, _ in history["head/loss"]] == [1, 2]
    assert [step for step, _ in history["fine_tune/loss"]] == [1]
    rows = [line.split(",") for line in (run.path / "history.csv").read_text().splitlines()]
    header = rows[0]
    losses = [float(r[header.index("loss")]) for r in rows[1:]]
    assert [v for _, v in history["head/loss"]] + [v for _, v in history["fine_tune/loss"]] \
        == pytest.approx(losses, rel=1e-5)
    assert history["head/lr"][0][1] == pytest.approx(run.config.lr)
    metrics = runs[0].data.metrics
    assert metrics["val_accuracy"] == pytest.approx(run.metrics["val_accuracy"])
    assert metrics["test_accuracy"] == pytest.approx(run.metrics["test_accuracy"])
    assert "timings.total_s" in metrics


@pytest.mark.slow
def test_run_logs_the_run_folder_and_the_savedmodel(tracked):
    import mlflow
    import tensorflow as tf

    base, run, client, experiment, runs = tracked
    run_id = runs[0].info.run_id
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.toml", "metrics.json", "history.csv", "labels.txt", "plots"} <= artifacts
    assert not artifacts & {"model.keras", "saved_model", "checkpoints"}
    logged = json.loads(Path(client.download_artifacts(run_id, "metrics.json",
                                                       str(base / "dl"))).read_text())
    assert logged == run.metrics
    assert [a.path for a in client.list_artifacts(run_id, "plots")]
    assert (base / "mlruns").is_dir() or any(base.iterdir())  # artifacts stayed under base
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id],
                                         output_format="list")
    assert len(models) == 1 and models[0].source_run_id == run_id
    mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
    served = mlflow.tensorflow.load_model(models[0].model_uri)
    files = sorted((base / "data" / "fox").iterdir())[:2]
    images = tf.constant([f.read_bytes() for f in files])
    got = served.signatures["serving_default"](images=images)
    want = tf.saved_model.load(str(run.path / "saved_model")).signatures["serving_default"](
        images=images)
    np.testing.assert_allclose(got["probabilities"].numpy(), want["probabilities"].numpy(),
                               atol=1e-6)
    assert list(got["class_name"].numpy()) == list(want["class_name"].numpy())


@pytest.mark.slow
def test_resumed_run_logs_into_the_mlflow_run_it_started(tracked):
    _, _, client, _, runs = tracked
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "head/loss")]
    assert steps == [1, 2]  # epoch 1 before the kill, epoch 2 after the resume
