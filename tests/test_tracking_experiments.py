"""MLflow tracking of experiments: a [sweep] and a [search] each log one parent run with a
child run per run or trial, read back through MLflow's client (real mlflow, local store)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import make_folder
from tlapp import cli, config as config_lib
from tlapp.pipeline import stages

BASE = ('backbone = "vgg16"\nweights = "none"\nimage_size = 32\nbatch_size = 4\nepochs = 1\n'
        'fine_tune_epochs = 1\ntrack = "mlflow"\n')


def write_file(base: Path, name: str, table: str) -> Path:
    path = base / f"{name}.toml"
    path.write_text(f'data = "{base / "data"}"\ncache_dir = "{base / ("cache-" + name)}"\n'
                    f'out = "{base / name}"\n' + BASE + table)
    return path


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 2-run [sweep] and a 2-trial Bayesian [search] (both stages each), logged to the
    default local store (./mlruns); the sweep is run twice (the rerun skips both runs)."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("tracked_experiments")
    make_folder(base / "data", per_class=6)
    # The runs of an experiment skip the SavedModel unless the file asks for it: this one
    # does, so each child also logs it as an MLflow model.
    sweep = write_file(base, "sweep", 'saved_model = "on"\n[sweep]\nlr = [0.01, 0.1]\n')
    search = write_file(base, "search", '[search]\nmethod = "bayes"\ntrials = 2\n'
                                        'prune = false\nlr = { log = [1e-3, 1e-1] }\n')
    stems, real = [], stages.cached_features

    def spy(*args, **kwargs):
        loaders, stats = real(*args, **kwargs)
        stems.append(dict(stats))
        return loaders, stats

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert cli.main(["experiment", str(sweep)]) == 0
        client = MlflowClient(tracking_uri=f"sqlite:///{base / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("tlapp")
        first = client.search_runs([experiment.experiment_id])
        assert cli.main(["experiment", str(sweep)]) == 0  # all finished: skipped
        rerun = client.search_runs([experiment.experiment_id])
        patch.setattr(stages, "cached_features", spy)
        assert cli.main(["experiment", str(search)]) == 0
    runs = client.search_runs([experiment.experiment_id])
    return base, client, experiment, runs, stems, (len(first), len(rerun))


def parent_and_children(runs, kind):
    parents = [r for r in runs if r.data.tags.get("tlapp.kind") == kind]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def steps(client, run, name):
    return [m.step for m in client.get_metric_history(run.info.run_id, name)]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_logs_one_parent_with_a_child_run_per_run(tracked):
    import mlflow

    base, client, experiment, runs, _, (first, rerun) = tracked
    parent, children = parent_and_children(runs, "experiment")
    assert first == rerun == 3  # the rerun logged into the same parent, and no new child
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    assert sorted(c.info.run_name for c in children) == ["lr=0.01", "lr=0.1"]
    assert parent.data.params["experiment.runs"] == "2"
    assert json.loads(parent.data.params["experiment.sweep.lr"]) == [0.01, 0.1]
    rows = {r["run"]: r for r in read_csv(base / "sweep" / "results.csv")}
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(
        max(float(r["val_accuracy"]) for r in rows.values()))
    assert {"results.md", "results.csv", "report.html", "plots"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id],
                                         output_format="list")
    for child in children:
        name = child.info.run_name
        metrics = json.loads((base / "sweep" / name / "metrics.json").read_text())
        assert float(child.data.params["lr"]) == float(name.split("=")[1])
        assert child.data.params["backbone"] == "vgg16"
        assert steps(client, child, "head/loss") == [1]  # per epoch, both stages
        assert steps(client, child, "fine_tune/val_accuracy") == [1]
        assert child.data.metrics["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
        assert child.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
        assert {"config.toml", "metrics.json", "history.csv", "plots"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)}
        assert [m.source_run_id for m in models].count(child.info.run_id) == 1


@pytest.mark.slow
def test_search_logs_one_parent_with_a_child_run_per_trial(tracked):
    base, client, _, runs, _, _ = tracked
    parent, children = parent_and_children(runs, "search")
    assert parent.info.status == "FINISHED" and parent.data.params["search.method"] == "bayes"
    trials = {int(c.data.tags["tlapp.trial"]): c for c in children if "tlapp.trial" in c.data.tags}
    assert sorted(trials) == [0, 1]
    assert [c.info.run_name for c in children if "tlapp.trial" not in c.data.tags] == [
        "best-trial-000" if parent.data.metrics["best_trial"] == 0 else "best-trial-001"]
    rows = read_csv(base / "search" / "results.csv")
    for row in rows:
        child = trials[int(row["trial"])]
        assert child.data.tags["tlapp.state"] == "complete"
        assert float(child.data.params["lr"]) == pytest.approx(float(row["lr"]))
        assert child.data.params["fine_tune_epochs"] == "1"  # the whole resolved config
        assert steps(client, child, "head/val_accuracy") == [1]
        assert steps(client, child, "fine_tune/val_accuracy") == [1]
        assert child.data.metrics["val_accuracy"] == pytest.approx(float(row["val_accuracy"]))
        assert child.data.metrics["epochs"] == 2
        logged = Path(client.download_artifacts(child.info.run_id, "config.toml",
                                                str(base / f"dl-{row['trial']}")))
        config = config_lib.from_dict(config_lib.load_toml(logged), "logged")
        assert config.lr == pytest.approx(float(row["lr"])) and config.fine_tune_epochs == 1
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(
        max(float(r["val_accuracy"]) for r in rows))
    assert {"results.md", "results.csv", "best.toml", "plots"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_bayesian_search_runs_the_stem_over_the_images_once(tracked):
    *_, stems, _ = tracked
    # the trials share one extraction; the best configuration's final run finds it cached
    assert [s["extracted"] for s in stems] == [18, 0]
