"""tf.distribute: --strategy, sharded input pipelines, multi-worker training, the Keras
workaround and the refusals. Training on several devices runs in subprocesses
(tests/distribute_helper.py): a logical CPU split and a multi-worker strategy must precede
TensorFlow's device start-up."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_folder
from tlapp import cli, config as config_lib
from tlapp.errors import UserInputError
from tlapp.training import distribute, keras_distribute_patch, sharding

HELPER = Path(__file__).with_name("distribute_helper.py")
ROOT = Path(__file__).resolve().parents[1]


def helper_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", distribute.LOGICAL_CPUS)}
    return env | {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"} | extra


# --- The Keras workaround ------------------------------------------------------------------

def test_keras_workaround_matches_the_installed_keras():
    """Fails after a Keras upgrade that changed the patched functions: then rerun this file
    without the patch (keras-team/keras#20585 may be fixed) and update or delete it."""
    keras_distribute_patch.check()


@pytest.mark.parametrize("name", sorted(keras_distribute_patch.EXPECTED_SOURCE))
def test_keras_workaround_refuses_changed_keras(monkeypatch, name):
    monkeypatch.setitem(keras_distribute_patch.EXPECTED_SOURCE, name, "0" * 64)
    with pytest.raises(RuntimeError, match=r"keras==3\.15\.1.*") as raised:
        keras_distribute_patch.apply()
    assert name in str(raised.value)
    assert not keras_distribute_patch.applied()


def test_keras_workaround_applies_and_removes():
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    keras_distribute_patch.apply()
    try:
        assert keras_distribute_patch.applied()
        assert trainer.TensorFlowTrainer._maybe_symbolic_build is \
            keras_distribute_patch._maybe_symbolic_build
    finally:
        keras_distribute_patch.remove()
    assert trainer.reduce_per_replica is original and not keras_distribute_patch.applied()


# --- Input sharding ------------------------------------------------------------------------

@pytest.mark.parametrize("pipelines", [1, 2, 4])
def test_each_pipeline_reads_its_part_of_every_global_batch(pipelines):
    """Concatenating the pipelines' parts of step g gives global batch g of the single-device
    order; the parts are disjoint, and the incomplete last batch is dropped."""
    import tensorflow as tf

    order = tf.random.shuffle(tf.range(27, dtype=tf.int64), seed=1)
    batch, steps = 8, 27 // 8
    parts = [np.asarray(sharding.shard_order(order, steps, batch, pipelines, p)).reshape(steps, -1)
             for p in range(pipelines)]
    for g in range(steps):
        np.testing.assert_array_equal(np.concatenate([part[g] for part in parts]),
                                      np.asarray(order)[g * batch:(g + 1) * batch])
    seen = np.concatenate([part.ravel() for part in parts])
    assert len(seen) == len(set(seen.tolist())) == steps * batch


def test_one_replica_keeps_the_single_device_pipeline():
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    assert sharding.steps_per_epoch(strategy, 17, 6) == 3
    dataset, class_weight = sharding.training_batches(
        strategy, 17, 6, 0, 0, 1, lambda i, e: (tf.cast(i, tf.float32), i), False, {0: 2.0})
    assert class_weight == {0: 2.0} and isinstance(dataset, tf.data.Dataset)
    assert [len(x) for x, _ in dataset] == [6, 6, 5]


class TwoReplicas:
    """What training_batches asks of a strategy with 2 replicas fed by `pipelines` input
    pipelines: each pipeline's dataset, as tf.distribute would build them."""

    num_replicas_in_sync = 2

    def __init__(self, pipelines: int):
        self.pipelines = pipelines

    def distribute_datasets_from_function(self, dataset_fn):
        import tensorflow as tf

        return [dataset_fn(tf.distribute.InputContext(self.pipelines, p, 2))
                for p in range(self.pipelines)]


@pytest.mark.parametrize("pipelines", [1, 2])
def test_several_replicas_get_the_global_batches_and_class_weights(pipelines):
    """Each per-replica batch is half a global batch of the one-device order; class weights
    become per-example sample weights (Keras cannot add them to a distributed dataset)."""
    import tensorflow as tf

    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 0, 1, 1, 2, 0, 2, 2, 1, 0])

    def load(i, epoch):
        return tf.cast(i, tf.float32), tf.one_hot(tf.gather(labels, i), 3)

    one_device, _ = sharding.training_batches(tf.distribute.get_strategy(), 17, 8, 5, 0, 2,
                                              load, False, None)
    full = [np.asarray(x) for x, _ in one_device]  # 2 epochs: 8, 8, 1, 8, 8, 1
    datasets, class_weight = sharding.training_batches(
        TwoReplicas(pipelines), 17, 8, 5, 0, 2, load, False, {0: 0.5, 1: 2.0, 2: 3.0})
    assert class_weight is None
    per_pipeline = [list(d) for d in datasets]
    for p, batches in enumerate(per_pipeline):
        for x, y, w in batches:
            np.testing.assert_array_equal(np.asarray(w), np.array([0.5, 2.0, 3.0])[
                labels[np.asarray(x).astype(int)]])
    # the replicas' batches of step g, in order, make global batch g (the partial one dropped)
    replica_batches = [np.asarray(x) for batches in zip(*per_pipeline) for x, _, _ in batches]
    assert len(replica_batches) == 2 * 4 and all(len(b) == 4 for b in replica_batches)
    np.testing.assert_array_equal(np.concatenate(replica_batches),
                                  np.concatenate([full[0], full[1], full[3], full[4]]))


# --- Refusals --------------------------------------------------------------------------------

def train_args(tmp_path, *extra):
    data = make_folder(tmp_path / "data", per_class=2)
    return ["train", str(data), "--backbone", "vgg16", "--weights", "none", "--image-size",
            "32", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), *extra]


def test_unknown_strategy_exits_2(tmp_path, capsys):
    assert cli.main(train_args(tmp_path, "--strategy", "horovod")) == 2
    assert "strategy='horovod'" in capsys.readouterr().err


@pytest.mark.parametrize("tf_config, message", [
    (None, "TF_CONFIG environment variable, which is unset"),
    ("{not json", 'TF_CONFIG is not JSON with a "cluster"'),
    ('{"cluster": {}}', "lists no worker"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}', "must give this process's task"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
     "must give this process's task"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     "not one of the 1 worker task(s)"),
    ('{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}',
     'list the worker tasks as "host:port" strings'),
])
def test_multi_worker_without_a_cluster_exits_2(tmp_path, capsys, monkeypatch, tf_config,
                                                message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    assert cli.main(train_args(tmp_path, "--strategy", "multi-worker")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if tf_config:
        assert f"Received: TF_CONFIG={tf_config!r}" in err
    assert not (tmp_path / "run").exists()


def test_python_api_refuses_multi_worker_without_a_cluster(tmp_path, monkeypatch):
    import tlapp

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserInputError, match="Received: TF_CONFIG=None"):
        tlapp.train(str(make_folder(tmp_path / "data", per_class=2)), strategy="multi-worker",
                    out=str(tmp_path / "run"))
    with pytest.raises(UserInputError, match="Received: strategy='horovod'"):
        tlapp.train(str(tmp_path / "data"), strategy="horovod")
    assert not (tmp_path / "run").exists()


def test_cluster_task_index_counts_the_chief_first(monkeypatch):
    """Worker i comes after the chief; without a chief, worker 0 is the chief."""
    from tlapp.training import cluster

    two = ["127.0.0.1:1", "127.0.0.1:2"]
    for jobs, task, expected in [({"worker": two}, ("worker", 1), (2, 1)),
                                 ({"chief": two[:1], "worker": two}, ("worker", 0), (3, 1)),
                                 ({"chief": two[:1], "worker": two}, ("chief", 0), (3, 0))]:
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": jobs, "task": {"type": task[0], "index": task[1]}}))
        assert (cluster.read_task().tasks, cluster.read_task().index) == expected
    monkeypatch.delenv("TF_CONFIG")
    assert cluster.cluster_tasks() == 0


def test_bad_logical_cpu_count_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(distribute.LOGICAL_CPUS, "two")
    assert cli.main(train_args(tmp_path)) == 2
    assert "TLAPP_LOGICAL_CPUS='two'" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (dict(jit=True), "Received: jit=True, strategy='mirrored' with 2 replicas"),
    (dict(batch_size=5), "multiple of 2. Received: batch_size=5"),
])
def test_multi_replica_layouts_refuse_jit_and_uneven_batches(options, message):
    import tensorflow as tf

    config = config_lib.Config(data="x", **options)
    layout = distribute.Layout("mirrored", tf.distribute.get_strategy(), 2, config.batch_size)
    with pytest.raises(UserInputError, match=message):
        distribute.check_config(config, layout)
    distribute.check_config(config, distribute.Layout("one", tf.distribute.get_strategy(), 1,
                                                      config.batch_size))


def test_resume_refuses_a_checkpoint_of_another_replica_layout(tmp_path, capsys):
    """A run that trained on 2 replicas does not resume on this machine's 1."""
    data = make_folder(tmp_path / "data", per_class=2)
    partial = tmp_path / ".run.partial"
    partial.mkdir()
    config = config_lib.Config(data=str(data), backbone="vgg16", weights="none",
                               image_size=32, strategy="mirrored", out=str(tmp_path / "run"))
    (partial / "config.toml").write_text(config_lib.to_toml(config))
    (partial / distribute.LAYOUT_FILE).write_text(json.dumps(
        {"strategy": "mirrored", "replicas": 2, "workers": 1, "global_batch": 32,
         "per_replica_batch": 16}))
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "written by training on 2 replica(s)" in err and "Received: replicas=1" in err
    assert sorted(p.name for p in partial.iterdir()) == ["config.toml", distribute.LAYOUT_FILE]


def test_a_run_records_its_distribution(trained_run):
    assert trained_run.metrics["distribution"] == {
        "strategy": "one", "replicas": 1, "workers": 1, "global_batch": 8,
        "per_replica_batch": 8}
    assert 'strategy = "one"' in (trained_run.path / "config.toml").read_text()
    assert not (trained_run.path / distribute.LAYOUT_FILE).exists()


# --- Several devices and workers ---------------------------------------------------------

@pytest.mark.slow
def test_mirrored_training_matches_one_device(tmp_path):
    """2 logical CPUs: stage 1 on cached features and a live fine-tune in which
    BatchNormalization trains, with --strategy one and mirrored on the same global batches.
    Losses agree to 1e-5 and weights to rtol 1e-4 + atol 1e-5 (measured: about 1e-6 apart;
    without synchronized BatchNormalization the moving statistics differ by far more)."""
    result = subprocess.run([sys.executable, str(HELPER), "mirrored", str(tmp_path)],
                            env=helper_env(**{distribute.LOGICAL_CPUS: "2"}), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    one, mirrored = results["losses"]  # head epochs 1-2, then the fine-tune epoch
    assert len(one) == 3 and np.allclose(one, mirrored, rtol=0, atol=1e-5), results["losses"]
    assert mirrored[1] < mirrored[0]  # it trains
    # the same metrics.json, keys and values, as one device (only timings differ)
    assert results["metrics_keys"][0] == results["metrics_keys"][1]
    assert "distribution.replicas" in results["metrics_keys"][1]
    np.testing.assert_allclose(*results["accuracy"], atol=1e-6)
    with np.load(tmp_path / "weights_one.npz") as a, np.load(tmp_path / "weights_mirrored.npz") as b:
        assert len(a.files) == len(b.files) > 10
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert results["distribution"][1] == {"strategy": "mirrored", "replicas": 2, "workers": 1,
                                          "global_batch": 6, "per_replica_batch": 3}
    assert results["config_strategy"] == ["one", "mirrored"]
    # the extraction under the strategy wrote every row once, equal to one device's rows
    assert results["extracted"] == [27, 27] and results["cache_rows"] == [[27, 27], [27, 27]]
    assert results["cache_equal"]
    assert not results["saved_synchronized"]  # model.keras holds plain BatchNormalization
    assert results["jit_exit_code"] == 2
    assert "--jit (XLA) does not work with a multi-device strategy" in result.stderr


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_one_model(tmp_path):
    """`--strategy multi-worker` in two processes on 127.0.0.1 (worker 0 runs `tlapp train`,
    worker 1 tlapp.train with the same options): both exit 0 with
    equal weights, only the chief writes the run folder, each worker decodes its half of
    the training images, and the second worker finds the chief's rows in the shared cache."""
    from tests.distribute_helper import tiny_batchnorm_backbone
    from tlapp.data.scan import scan_folder

    data = make_folder(tmp_path / "data", per_class=7)  # 16 train images: 2 batches of 8
    backbone = tiny_batchnorm_backbone(tmp_path / "tiny_bn.keras")
    scan_folder(data, cache_dir=tmp_path / "cache")  # checked once here, not by both workers
    args = [str(data), "--backbone", backbone, "--weights", "saved", "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--fine-tune-epochs", "1",
            "--fine-tune-cut", "relu0", "--bn-trainable", "--val-fraction", "0.2",
            "--test-fraction", "0", "--cache-dir", str(tmp_path / "cache"),
            "--out", "run", "--strategy", "multi-worker"]  # --out relative to each worker's cwd
    cluster = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = []
    for index in range(2):
        folder = tmp_path / f"worker{index}"
        folder.mkdir()
        tf_config = json.dumps({"cluster": {"worker": cluster},
                                "task": {"type": "worker", "index": index}})
        log = open(tmp_path / f"worker{index}.log", "w")
        api = "worker" if index == 0 else "worker-python"  # the CLI, and tlapp.train
        workers.append((subprocess.Popen(
            [sys.executable, str(HELPER), api, str(tmp_path)] + args, cwd=folder,
            env=helper_env(TF_CONFIG=tf_config), stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + 180  # a hang fails the test instead of blocking CI
    try:
        codes = [process.wait(timeout=max(1, deadline - time.monotonic()))
                 for process, _ in workers]
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    for log in logs:  # a clean end: no collective aborted by a peer that left early
        assert "Traceback" not in log and not re.search("^error:", log, re.M), log[-3000:]
        assert "done: val accuracy" in log

    with np.load(tmp_path / "weights_0.npz") as a, np.load(tmp_path / "weights_1.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    run = tmp_path / "worker0" / "run"
    for name in ("config.toml", "metrics.json", "history.csv", "model.keras",
                 "saved_model/saved_model.pb"):
        assert (run / name).exists(), name
    assert list((run / "logs").rglob("*tfevents*"))
    assert list((tmp_path / "worker1").iterdir()) == []  # no run folder, no partial, no logs
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["distribution"] == {"strategy": "multi-worker", "replicas": 2, "workers": 2,
                                       "global_batch": 8, "per_replica_batch": 4}
    assert metrics["counts"]["train"] == 16 and metrics["val"]["count"] == 5
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2 + 1  # head 2, fine 1

    # the fine-tune epoch decodes images: each worker its own half, none twice
    decoded = [set(json.loads((tmp_path / f"decoded_{i}.json").read_text())) for i in range(2)]
    assert decoded[0].isdisjoint(decoded[1])
    assert decoded[0] | decoded[1] == set(range(16))
    assert len(decoded[0]) == len(decoded[1]) == 8
    assert "cache: 0/21 images already extracted" in logs[0]
    assert "cache: 21/21 images already extracted" in logs[1]
