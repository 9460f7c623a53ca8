"""Hyperparameter search: a [search] table in an experiment file (Optuna behind tlapp's TOML)."""
import contextlib
import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tlapp
from tests.conftest import make_folder
from tlapp import cli, config as config_lib
from tlapp.pipeline import stages

BASE = 'backbone = "vgg16"\nweights = "none"\nimage_size = 32\nepochs = {epochs}\n'


def write_file(folder: Path, search: str, epochs: int = 2, extra: str = "") -> Path:
    data = folder / "data"
    if not data.exists():
        make_folder(data, per_class=6)
    path = folder / "search.toml"
    path.write_text(f'data = "{data}"\ncache_dir = "{folder / "cache"}"\nout = "{folder / "out"}"\n'
                    + BASE.format(epochs=epochs) + extra
                    + ("" if "batch_size" in search else "batch_size = 4\n")
                    + "[search]\n" + search)
    return path


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("search, message", [
    ('method = "grid"\nlr = { log = [1e-3, 1e-1] }', "Received: method='grid'"),
    ('momentum = { linear = [0.1, 0.9] }', "unknown parameter or option 'momentum'"),
    ('seed = { choice = [0, 1] }', "seed is a Config key: set it as a base setting"),
    ('lr = { log = [0.1, 0.001] }', "'lr' log must be [low, high] with low < high"),
    ('lr = { log = [0, 0.1] }', "'lr' log range must be positive"),
    ('dropout = { linear = [0.0, 1.5] }', "'dropout' = 1.5 is not a valid setting"),
    ('optimizer = { choice = ["adam", "rmsprop"] }', "optimizer='rmsprop'"),
    ('batch_size = { linear = [2.5, 8] }', "'batch_size' takes integers"),
    ('batch_size = { linear = [0, 8] }', "'batch_size' = 0 is not a valid setting"),
    ('lr = { uniform = [0.1, 1] }', "'lr' must be a table with one of log, linear, choice"),
    ('trials = 0\nlr = { log = [1e-3, 1e-1] }', "'trials' must be an integer of at least 1"),
    ('multivariate = "yes"\nlr = { log = [1e-3, 1e-1] }',
     "'multivariate' must be true or false. Received: multivariate='yes'"),
    ('startup_trials = 0\nlr = { log = [1e-3, 1e-1] }',
     "'startup_trials' must be an integer of at least 1. Received: startup_trials=0"),
    ('method = "random"', "no parameter to search"),
    ('epochs = { choice = [1, 2] }', "epochs is a Config key: set it as a base setting"),
])
def test_bad_search_tables_exit_2_naming_the_key(tmp_path, capsys, search, message):
    path = write_file(tmp_path, search)
    assert cli.main(["experiment", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything runs


def test_a_setting_both_fixed_and_searched_exits_2(tmp_path, capsys):
    path = write_file(tmp_path, 'lr = { log = [1e-3, 1e-1] }\n', extra="lr = 0.01\n")
    assert cli.main(["experiment", str(path)]) == 2
    assert "'lr' is both a base setting (lr = 0.01) and searched" in capsys.readouterr().err


def test_search_beside_a_sweep_exits_2(tmp_path, capsys):
    path = write_file(tmp_path, 'lr = { log = [1e-3, 1e-1] }\n[sweep]\nseed = [0, 1]\n')
    assert cli.main(["experiment", str(path)]) == 2
    assert "cannot also have [sweep]" in capsys.readouterr().err


def test_missing_optuna_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    path = write_file(tmp_path, 'lr = { log = [1e-3, 1e-1] }\n')
    assert cli.main(["experiment", str(path)]) == 2
    assert 'pip install "tlapp[search]"' in capsys.readouterr().err


SEARCH = ('method = "random"\ntrials = 4\nlr = { log = [1e-3, 1e-1] }\n'
          'dropout = { linear = [0.0, 0.5] }\noptimizer = { choice = ["adam", "sgd"] }\n'
          'batch_size = { choice = [4, 6] }\n')


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A 4-trial random search from the command line, tracked in MLflow's default local
    store (./mlruns in the current folder)."""
    base = tmp_path_factory.mktemp("search")
    path = write_file(base, SEARCH, extra='track = "mlflow"\n')
    stems = []
    real = stages.cached_features
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)

        def spy(*args, **kwargs):
            loaders, stats = real(*args, **kwargs)
            stems.append(dict(stats))
            return loaders, stats

        patch.setattr(stages, "cached_features", spy)
        status = cli.main(["experiment", str(path)])
    return status, base, path, stems


@pytest.mark.slow
def test_search_writes_results_best_toml_and_evaluates_the_test_split_once(search, capsys):
    status, base, _, _ = search
    out = base / "out"
    assert status == 0
    rows = read_rows(out)
    assert [int(r["trial"]) for r in rows] == [0, 1, 2, 3]
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    assert any(r["state"] == "complete" for r in rows)
    for row in rows:
        assert 1e-3 <= float(row["lr"]) <= 1e-1 and 0 <= float(row["dropout"]) <= 0.5
        assert row["optimizer"] in ("adam", "sgd") and row["batch_size"] in ("4", "6")
        assert 0 <= float(row["val_accuracy"]) <= 1
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: float(r["val_accuracy"]))
    # best.toml: a ready-to-run config of the best trial, without `out`
    best_toml = config_lib.load_toml(out / "best.toml")
    assert "out" not in best_toml
    config = config_lib.from_dict(best_toml, "best.toml")
    assert config.lr == pytest.approx(float(best["lr"])) and config.optimizer == best["optimizer"]
    assert config.dropout == pytest.approx(float(best["dropout"]))
    assert config.batch_size == int(best["batch_size"]) and config.epochs == 2
    # the best configuration trained once more, the test split evaluated there only
    run_folder = out / f"best-trial-{int(best['trial']):03d}"
    run = tlapp.load_run(run_folder)
    assert run.config.lr == pytest.approx(config.lr)
    assert run.metrics["val_accuracy"] == pytest.approx(float(best["val_accuracy"]))
    report = (out / "results.md").read_text()
    assert f"Best: trial {best['trial']}" in report
    assert f"{100 * run.metrics['test_accuracy']:.1f}%" in report
    assert len([line for line in report.splitlines() if line.startswith("| ")]) == 1 + 4
    assert (out / "plots" / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "study.db").is_file() and not (out / "trials").exists()


@pytest.mark.slow
def test_search_trials_share_one_stem_extraction(search):
    _, _, _, stems = search
    # the trial runner extracts once; the best configuration's run finds the cache full
    assert [s["extracted"] for s in stems] == [18, 0]


@pytest.mark.slow
def test_finished_search_rerun_trains_nothing(search, monkeypatch, capsys):
    _, base, path, _ = search
    from tlapp.pipeline import trials

    monkeypatch.chdir(base)
    monkeypatch.setattr(trials.TrialRunner, "train", lambda *a: pytest.fail("trained"))
    before = read_rows(base / "out")
    assert cli.main(["experiment", str(path)]) == 0
    assert read_rows(base / "out") == before
    assert "is finished; skipped" in capsys.readouterr().err


@pytest.mark.slow
def test_search_logs_a_parent_run_with_a_child_per_trial_to_mlflow(search):
    from mlflow.tracking import MlflowClient

    _, base, _, _ = search
    client = MlflowClient(tracking_uri=f"sqlite:///{base / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tlapp")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("tlapp.kind") == "search"]
    assert len(parent) == 1
    parent = parent[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = sorted(int(r.data.tags["tlapp.trial"]) for r in children
                    if "tlapp.trial" in r.data.tags)
    assert trials == [0, 1, 2, 3]
    assert len(children) == 5  # and the best configuration's final run
    rows = {int(r["trial"]): r for r in read_rows(base / "out")}
    for child in children:
        if "tlapp.trial" not in child.data.tags:
            continue
        row = rows[int(child.data.tags["tlapp.trial"])]
        assert float(child.data.params["lr"]) == pytest.approx(float(row["lr"]))
        history = client.get_metric_history(child.info.run_id, "head/val_accuracy")
        assert [m.step for m in history] == list(range(1, int(row["epochs"]) + 1))
        assert child.data.tags["tlapp.state"] == row["state"]
    assert parent.data.params["search.method"] == "random"
    best = max((r for r in rows.values() if r["state"] == "complete"),
               key=lambda r: float(r["val_accuracy"]))
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(float(best["val_accuracy"]))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.csv", "best.toml", "plots"} <= artifacts


def study_states(database: Path) -> list[tuple[int, str, int]]:
    """(number, state, epochs reported) of each trial, read as another process would."""
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as db:
        try:
            return db.execute("SELECT number, state, (SELECT count(*) FROM "
                              "trial_intermediate_values v WHERE v.trial_id = t.trial_id) "
                              "FROM trials t ORDER BY number").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


def test_interrupted_trials_are_failed_and_their_parameters_queued_again(tmp_path):
    from tlapp.search import results, space, study as study_lib

    spec = space.parse_search({"method": "random", "lr": {"log": [1e-3, 1e-1]}}, {}, "t")
    study = study_lib.open_study(spec, tmp_path / "study.db")
    done = study.ask()
    done.suggest_float("lr", 1e-3, 1e-1, log=True)
    study.tell(done, 0.5)
    killed = study.ask()  # left RUNNING, as by a SIGKILL mid-trial ...
    lr = killed.suggest_float("lr", 1e-3, 1e-1, log=True)
    study.ask()  # ... or right after it began, before drawing anything
    study = study_lib.open_study(spec, tmp_path / "study.db")  # the next process
    assert study_lib.recover_interrupted(study) == [1, 2]
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL", "FAIL", "WAITING"]
    assert study_lib.counted(study) == 1  # interrupted trials do not use up the budget
    retry = study.ask()
    assert retry.number == 3 and retry.user_attrs == {"retry_of": 1}
    assert spec.params[0].suggest(retry) == lr  # the same value again
    rows = results.trial_rows(study, ["lr"])
    assert [r["state"] for r in rows] == ["complete", "interrupted", "interrupted", "running"]
    assert rows[1]["note"] == "process died; parameters tried again"
    assert rows[2]["note"] == "process died before drawing its values"


@pytest.mark.parametrize("table, expected", [
    ({"trials": 12}, {"n_startup_trials": 4, "multivariate": True}),  # the defaults
    ({"trials": 12, "startup_trials": 6, "multivariate": False},
     {"n_startup_trials": 6, "multivariate": False}),
])
def test_bayes_search_configures_optunas_tpe_from_the_table(tmp_path, monkeypatch, table,
                                                            expected):
    import optuna

    from tlapp.search import space, study as study_lib

    made = []
    real = optuna.samplers.TPESampler

    def recording(**kwargs):
        made.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", recording)
    spec = space.parse_search(table | {"sampler_seed": 3, "lr": {"log": [1e-3, 1e-1]}}, {},
                              "t")
    study = study_lib.open_study(spec, tmp_path / "study.db")
    assert made == [expected | {"seed": 3}] and isinstance(study.sampler, real)
    # the multivariate default does not change the fingerprint of an earlier study
    assert ("multivariate" in spec.fingerprint()) is not expected["multivariate"]


@pytest.mark.slow
def test_search_killed_mid_trial_resumes_and_retries_that_trial(tmp_path, caplog):
    """SIGKILL while a trial runs: the rerun marks it failed, tries its parameters again
    first, and finishes the budget; finished trials are kept."""
    path = write_file(tmp_path, 'method = "bayes"\ntrials = 2\nprune = false\n'
                                'lr = { log = [1e-3, 1e-1] }\n'
                                'label_smoothing = { linear = [0.0, 0.2] }\n', epochs=8)
    database = tmp_path / "out" / "study.db"
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(tmp_path / "kh"),
                        "PYTHONPATH": str(Path(__file__).parent.parent)}
    process = subprocess.Popen([sys.executable, "-m", "tlapp", "--quiet", "experiment",
                                str(path)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            states = study_states(database) if database.exists() else []
            last = states[-1] if states else (0, "", 0)
            if any(s == "COMPLETE" for _, s, _ in states) and last[1] == "RUNNING" \
                    and last[2] >= 2:  # two epochs into a trial
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        assert process.wait(60) == -signal.SIGKILL, "the search finished before the kill"
    finally:
        process.kill()
    killed = study_states(database)
    done, running = [n for n, s, _ in killed if s == "COMPLETE"], killed[-1][0]
    assert killed[-1][1] == "RUNNING" and done

    found = tlapp.run_search(path)
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{database}")
    trials = study.get_trials()
    assert trials[running].state.name == "FAIL"
    retry = trials[running + 1]
    assert retry.user_attrs["retry_of"] == running and retry.params == trials[running].params
    assert [t.number for t in trials if t.state.name == "COMPLETE"][:len(done)] == done
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2 and len(trials) == 3
    assert "were interrupted" in caplog.text
    rows = read_rows(tmp_path / "out")
    assert rows[running]["state"] == "interrupted"
    assert f"retry of trial {running}" == rows[running + 1]["note"]
    assert found.best_run is not None and (found.best_run / "metrics.json").is_file()
